#!/usr/bin/env bash
# Smoke test of the built image (deploy/image.sh), with podman or docker:
#   1. image facts: size (target < 15 MB), USER 65532:65532, OCI labels, exposed ports, no
#      shell, /bearer-proxy root-owned, /var/lib/bearer-proxy owned by 65532 with mode 0700
#   2. `demo` read-only as the non-root user: /livez, /readyz, a request through the proxy port
#      arrives with the token, no capabilities (CapEff/CapPrm 0 in /proc/<pid>/status on the
#      host), SIGTERM → exit 0 within drain_delay + shutdown_grace
#   3. the real sidecar mode: `run` with a config, a secret and a CA mounted read-only, against
#      the dev issuer and a TLS upstream on the host; token injected, SIGTERM → exit 0 in time,
#      no token in the container's log
# Usage: tests/image/run.sh IMAGE HOST_BINARY   (HOST_BINARY runs the dev issuer on the host)
# ENGINE: docker or podman (default: podman unless a Docker daemon answers).
set -euo pipefail
image=$1
bin=$(realpath "$2")
here=$(cd "$(dirname "$0")" && pwd)
if [[ -n ${ENGINE:-} ]]; then engine=$ENGINE
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
else engine=podman; fi
work=$(mktemp -d)
chmod 0755 "$work"
pids=(); containers=()
cleanup() {
  for c in "${containers[@]}"; do "$engine" rm -f "$c" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "image: FAIL: $*" >&2
  for f in "$work"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  for c in "${containers[@]}"; do echo "--- container $c" >&2; "$engine" logs "$c" 2>&1 | tail -n 20 >&2 || true; done
  exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
until_ok() { local deadline=$1; shift; local end=$((SECONDS + deadline)); until "$@"; do ((SECONDS < end)) || return 1; sleep 0.2; done; }
passed=0
ok() { echo "image: ok   $*"; passed=$((passed + 1)); }
inspect() { "$engine" image inspect --format "$1" "$image"; }

# Effective and permitted capabilities of a container's main process, read on the host (the
# image has no shell to run `grep` in).
caps() {
  local pid
  pid=$("$engine" inspect --format '{{.State.Pid}}' "$1")
  grep -E '^Cap(Eff|Prm):' "/proc/$pid/status" | awk '{print $2}' | sort -u | tr '\n' ' '
}
# Sends SIGTERM and checks exit code 0 within $2 seconds (drain_delay + shutdown_grace + 1s
# for the engine's own bookkeeping).
stop_within() {
  local c=$1 limit=$2 start code
  start=$(date +%s.%N)
  "$engine" kill --signal TERM "$c" >/dev/null
  code=$(timeout "$((limit + 10))" "$engine" wait "$c") || fail "$c did not stop"
  local took
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
  [[ $code == 0 ]] || fail "$c exited $code after SIGTERM"
  python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)" "$took" "$limit" ||
    fail "$c took ${took}s to stop after SIGTERM (limit ${limit}s)"
  ok "SIGTERM: exit 0 after ${took}s (limit ${limit}s)"
}

echo "== image facts ($engine, $image)"
size=$(inspect '{{.Size}}')
echo "image: size $size bytes ($((size / 1024 / 1024)) MiB)"
((size < 15 * 1000 * 1000)) || fail "image is $size bytes, over the 15 MB target"
ok "size under 15 MB"
[[ $(inspect '{{.Config.User}}') == 65532:65532 ]] || fail "USER is $(inspect '{{.Config.User}}')"
ok "USER 65532:65532"
for label in title description licenses version revision; do
  [[ -n $(inspect "{{index .Config.Labels \"org.opencontainers.image.$label\"}}") ]] ||
    fail "label org.opencontainers.image.$label missing or empty"
done
ok "OCI labels"
# shellcheck disable=SC2016 # a Go template, not shell
ports=$(inspect '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}')
[[ $ports == *3128/tcp* && $ports == *9901/tcp* ]] || fail "exposed ports: $ports"
ok "exposes 3128 and 9901"
if "$engine" run --rm --network none --entrypoint /bin/sh "$image" -c true > "$work/sh.log" 2>&1; then
  fail "the image has a shell"
fi
# It must fail for the right reason, not because the engine cannot run containers at all.
grep -qiE 'no such file|not found' "$work/sh.log" || fail "running /bin/sh failed oddly: $(cat "$work/sh.log")"
ok "no shell"
cid=$("$engine" create "$image")
containers+=("$cid")
"$engine" export "$cid" | tar -tvf - --numeric-owner > "$work/files.txt"
"$engine" rm "$cid" >/dev/null
grep -Eq '^-rwxr-xr-x 0/0 .* bearer-proxy$' "$work/files.txt" || fail "/bearer-proxy: $(grep ' bearer-proxy$' "$work/files.txt")"
grep -Eq '^drwx------ 65532/65532 .* var/lib/bearer-proxy/?$' "$work/files.txt" ||
  fail "/var/lib/bearer-proxy: $(grep 'var/lib/bearer-proxy' "$work/files.txt")"
grep -Eq '^d[rwx-]{9} 0/0 .* var/lib/?$' "$work/files.txt" || fail "/var/lib: $(grep 'var/lib/\?$' "$work/files.txt")"
ok "/bearer-proxy 0755 root, /var/lib/bearer-proxy 0700 65532"

echo "== demo, read-only, non-root"
proxy_port=$(free_port); admin_port=$(free_port)
demo=$("$engine" run -d --read-only --user 65532:65532 \
  -p "127.0.0.1:$proxy_port:3128" -p "127.0.0.1:$admin_port:9901" \
  "$image" demo --listen 0.0.0.0:3128 --admin 0.0.0.0:9901)
containers+=("$demo")
until_ok 30 curl -sf "http://127.0.0.1:$admin_port/livez" -o /dev/null || fail "demo: /livez never answered"
ok "demo: /livez"
until_ok 30 curl -sf "http://127.0.0.1:$admin_port/readyz" -o /dev/null || fail "demo: /readyz never 200"
ok "demo: /readyz"
out=$(curl -sS -x "http://127.0.0.1:$proxy_port" -w '\n%{http_code}' http://api.demo.test/accounts) || fail "demo: curl"
[[ ${out##*$'\n'} == 200 && $out == *'"authorization_received": "Bearer '* ]] || fail "demo: no token upstream: $out"
ok "demo: a request through the proxy port arrives with the token"
c=$(caps "$demo")
[[ $c == "0000000000000000 " ]] || fail "demo: capabilities $c"
ok "demo: no capabilities (CapEff and CapPrm 0)"
# The demo's own configuration: drain_delay 0s, shutdown_grace 2s.
stop_within "$demo" 3

echo "== sidecar mode: run with a read-only config and secret, dev issuer and TLS upstream on the host"
issuer_port=$(free_port); upstream_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=image test CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/ext.cnf" -out "$work/server.pem" 2>/dev/null
"$bin" dev-issuer --listen "127.0.0.1:$issuer_port" --lifetime 30 > "$work/issuer.log" 2>&1 &
pids+=($!)
python3 "$here/../e2e/upstream.py" "$upstream_port" "$work/server.pem" "$work/server.key" \
  "$work/requests.txt" > "$work/upstream.log" 2>&1 &
pids+=($!)
until_ok 20 grep -q "upstream ready" "$work/upstream.log" || fail "the TLS upstream never started"
mkdir -m 0755 "$work/etc" "$work/secrets"
echo demo-secret > "$work/secrets/client_secret"
cp "$work/ca.pem" "$work/etc/ca.pem"
cat > "$work/etc/config.toml" <<TOML
[proxy]
listen = "127.0.0.1:$proxy_port"
ca_file = "/etc/bearer-proxy/ca.pem"
drain_delay = "1s"
shutdown_grace = "2s"
[admin]
listen = "127.0.0.1:$admin_port"
[log]
access = true
[tokens.flinks]
token_url = "http://127.0.0.1:$issuer_port/api/v1/token"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret_file = "/var/run/secrets/bearer-proxy/client_secret"
[[routes]]
name = "fdx"
host = "api.image.test"
token = "flinks"
upstream = "https://localhost:$upstream_port"
TOML
chmod 0444 "$work/etc/"* "$work/secrets/"*
# --network host: the dev issuer and the upstream listen on the host's loopback.
sidecar=$("$engine" run -d --read-only --user 65532:65532 --network host \
  -v "$work/etc:/etc/bearer-proxy:ro" -v "$work/secrets:/var/run/secrets/bearer-proxy:ro" \
  "$image")
containers+=("$sidecar")
until_ok 30 curl -sf "http://127.0.0.1:$admin_port/readyz" -o /dev/null || fail "sidecar: never ready"
ok "sidecar: ready (token from the host's dev issuer)"
out=$(curl -sS -x "http://127.0.0.1:$proxy_port" "http://api.image.test/api/fdx/5/accounts") || fail "sidecar: curl"
[[ $out == *'"bearer_received": true'* ]] || fail "sidecar: upstream saw no token: $out"
grep -q "^localhost:$upstream_port True$" "$work/requests.txt" || fail "sidecar: upstream log"
ok "sidecar: the TLS upstream received the token (CA from the mounted ca_file)"
status=$(curl -sf "http://127.0.0.1:$admin_port/status")
[[ $status == *'"commit"'* ]] || fail "sidecar: /status has no commit: $status"
c=$(caps "$sidecar")
[[ $c == "0000000000000000 " ]] || fail "sidecar: capabilities $c"
ok "sidecar: no capabilities"
# drain_delay 1s + shutdown_grace 2s.
stop_within "$sidecar" 4
"$engine" logs "$sidecar" > "$work/sidecar.log" 2>&1
if grep -q 'eyJ' "$work/sidecar.log"; then fail "a token appears in the container's log"; fi
grep -q '"stopped"\|stopped' "$work/sidecar.log" || fail "sidecar: no 'stopped' in its log"
ok "sidecar: log has no token"
echo "image: $passed passed, 0 failed"
