#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30s each), keeping the corpus in
# fuzz/corpus/<target>. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Usage: fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -print_final_stats=1
done
