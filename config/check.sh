#!/usr/bin/env bash
# Runs `bearer-proxy check` on every example configuration in this directory.
#
# The examples point at secret files that exist only inside a pod (/var/run/secrets/...), so we
# create placeholder files in a temporary directory and point the configuration at them through
# environment overrides (BEARER_PROXY__TOKENS__<NAME>__<KEY>), exactly as an operator could.
# Only keys the example actually sets are overridden, so a key missing from an example is still
# reported by `check`.
#
# Usage: config/check.sh [path/to/bearer-proxy]   (default: target/debug/bearer-proxy)
set -euo pipefail

bin=${1:-target/debug/bearer-proxy}
here=$(cd "$(dirname "$0")" && pwd)
if [[ ! -x $bin ]]; then
  echo "config/check.sh: $bin is not an executable; build it first (cargo build)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'placeholder-client-id\n' >"$tmp/client_id"
printf 'placeholder-client-secret\n' >"$tmp/client_secret"
printf 'placeholder-refresh-token\n' >"$tmp/refresh_token"
printf 'placeholder-code\n' >"$tmp/code"
mkdir "$tmp/state"
head -c 32 /dev/urandom | base64 >"$tmp/encryption_key"
printf 'placeholder-api-token\n' >"$tmp/api_token"
printf 'placeholder-redis-password\n' >"$tmp/redis_password"
chmod 0600 "$tmp"/client_id "$tmp"/client_secret "$tmp"/refresh_token "$tmp"/code \
  "$tmp"/encryption_key "$tmp"/api_token

# key in the file -> placeholder path
declare -A placeholder=(
  [client_id_file]="$tmp/client_id"
  [client_secret_file]="$tmp/client_secret"
  [refresh_token_file]="$tmp/refresh_token"
  [code_file]="$tmp/code"
  [state_dir]="$tmp/state"
)

# [subjects] keys -> placeholder path (a real random key, since `check` loads the keys)
declare -A subjects_placeholder=(
  [encryption_key_file]="$tmp/encryption_key"
  [api_token_file]="$tmp/api_token"
  [state_dir]="$tmp/state"
)

# check [--subjects] FILE TOKEN...: validate FILE with the file keys of each named token
# overridden; with --subjects, the [subjects] keys instead of the token's state_dir.
check() {
  local subjects=0
  if [[ $1 == --subjects ]]; then
    subjects=1
    shift
  fi
  local file=$1
  shift
  local -a env=()
  local token key
  if ((subjects)); then
    for key in $(printf '%s\n' "${!subjects_placeholder[@]}" | sort); do
      if grep -Eq "^[[:space:]]*${key}[[:space:]]*[=:]" "$file"; then
        env+=("BEARER_PROXY__SUBJECTS__${key^^}=${subjects_placeholder[$key]}")
      fi
    done
  fi
  for token in "$@"; do
    for key in $(printf '%s\n' "${!placeholder[@]}" | sort); do
      # A per-subject token keeps no state_dir of its own: that key is [subjects]'.
      if ((subjects)) && [[ $key == state_dir ]]; then
        continue
      fi
      # `key = ...` (TOML) or `key: ...` (YAML); every example has one token, so a match
      # anywhere in the file belongs to it.
      if grep -Eq "^[[:space:]]*${key}[[:space:]]*[=:]" "$file"; then
        env+=("BEARER_PROXY__TOKENS__${token^^}__${key^^}=${placeholder[$key]}")
      fi
    done
  done
  # [redis]'s files (shared tokens): a real random key, since `check` loads it.
  if grep -Eq "^[[:space:]]*shared[[:space:]]*[=:][[:space:]]*true" "$file"; then
    env+=("BEARER_PROXY__REDIS__ENCRYPTION_KEY_FILE=$tmp/encryption_key")
    env+=("BEARER_PROXY__REDIS__PASSWORD_FILE=$tmp/redis_password")
  fi
  echo "== bearer-proxy check --config $file"
  printf '   with %s\n' "${env[@]}"
  local out
  if ! out=$(env "${env[@]}" "$bin" check --config "$file" 2>&1); then
    printf '%s\n' "$out" | sed 's/^/   /'
    echo "FAIL: $file" >&2
    return 1
  fi
  printf '%s\n' "$out" | sed 's/^/   /'
  # Prove the overrides took effect (otherwise a real /var/run/secrets on this machine could
  # make the check pass for the wrong reason).
  if ! grep -qF "secret from $tmp/client_secret" <<<"$out"; then
    echo "FAIL: $file: the client_secret_file override was not applied" >&2
    return 1
  fi
}

failed=0
check "$here/flinks-client-credentials.toml" flinks || failed=1
check "$here/flinks-data-recipient.toml" flinks || failed=1
check "$here/gateway.yaml" flinks || failed=1
check --subjects "$here/flinks-data-recipient-subjects.toml" fdx || failed=1

# The Redis examples: `check` connects to Redis, so a throwaway redis-server (loopback, a
# placeholder password, no persistence) stands in for the real one when it is installed.
if command -v redis-server >/dev/null; then
  printf 'placeholder-redis-password\n' >"$tmp/redis_password"
  redis_pid=
  for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000))
    redis-server --bind 127.0.0.1 --port "$port" --requirepass placeholder-redis-password \
      --save '' --appendonly no --dir "$tmp" --logfile "$tmp/redis.log" &
    redis_pid=$!
    for _ in $(seq 50); do
      grep -q 'Ready to accept connections' "$tmp/redis.log" 2>/dev/null && break
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.1
    done
    grep -q 'Ready to accept connections' "$tmp/redis.log" 2>/dev/null && break
    kill "$redis_pid" 2>/dev/null || true
    redis_pid=
    rm -f "$tmp/redis.log"
  done
  if [[ -n $redis_pid ]]; then
    BEARER_PROXY__REDIS__URL="redis://127.0.0.1:$port" \
      BEARER_PROXY__REDIS__PASSWORD_FILE="$tmp/redis_password" \
      check --subjects "$here/flinks-data-recipient-redis.toml" fdx || failed=1
    BEARER_PROXY__REDIS__URL="redis://127.0.0.1:$port" \
      check "$here/gateway-redis.yaml" flinks || failed=1
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  else
    echo "FAIL: redis-server did not start for the Redis example" >&2
    failed=1
  fi
else
  echo "SKIP: $here/flinks-data-recipient-redis.toml and $here/gateway-redis.yaml (redis-server is not installed)"
fi

if ((failed)); then
  echo "config/check.sh: FAILED" >&2
  exit 1
fi
echo "config/check.sh: all example configurations pass"
