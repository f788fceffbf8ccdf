#!/usr/bin/env bash
# Runs every fuzz target (every [[bin]] of fuzz/Cargo.toml, as `cargo fuzz list` names them: a new
# target is picked up without editing this file) for a bounded time (default 30s each), keeping
# the corpus in fuzz/corpus/<target>. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`).
#
# All targets are built first, in one `cargo fuzz build` with cargo fuzz's defaults (release with
# debug assertions, AddressSanitizer, libFuzzer's coverage instrumentation): the dependencies
# are compiled once and the targets' own crates in parallel. Each `cargo fuzz run` then finds its
# binary up to date, only runs it, and on a crash prints the failing input and how to reproduce
# it.
# Usage: fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
targets=$(cargo +nightly fuzz list)
echo "== build every fuzz target:" $targets
cargo +nightly fuzz build
for target in $targets; do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -print_final_stats=1
done
