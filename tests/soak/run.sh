#!/usr/bin/env bash
# Soak under rotation (RELIABILITY.md): the proxy binary runs for a few minutes while tokens
# rotate every ~3 s (6 s tokens, then 3 s tokens renewed every ~1.4 s for the last third), the
# dev issuer fails every 5th token request, the client secret is rotated
# with a Kubernetes ..data swap every 30 s, and 8 clients send ~100 requests/s. The upstream
# checks every token and body as it arrives; RSS and descriptors are compared at rest.
#
# Usage: tests/soak/run.sh [--secs N] [--release] [--rps N] [--clients N]
#   --secs N     run length in seconds (default 240)
#   --release    soak the release binary (built first) instead of the debug one
#   --rps N      target request rate (default 100)
#   --clients N  concurrent client connections (default 8)
# Ends with "soak: N passed, M failed" (checked requests plus criteria); exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SOAK_SECS=240
while (($#)); do
  case "$1" in
    --secs) SOAK_SECS=$2; shift 2 ;;
    --rps) export SOAK_RPS=$2; shift 2 ;;
    --clients) export SOAK_CONCURRENCY=$2; shift 2 ;;
    --release)
      cargo build --locked --release --quiet
      export SOAK_BIN=$PWD/target/release/bearer-proxy
      shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "soak: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
code=0
cargo test --locked --test it -- --ignored --exact soak::soak_under_rotation --nocapture \
  2>&1 | tee "$log" || code=$?
summary=$(grep -E '^soak: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)
echo "${summary:-soak: 0 passed, 1 failed (the run did not finish)}"
exit "$code"
