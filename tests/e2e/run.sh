#!/usr/bin/env bash
# End-to-end test with real parts: the dev issuer, a TLS upstream (Python, certificate from a
# throwaway CA), bearer-proxy, two real clients (curl with -x, Python requests with HTTP_PROXY),
# and a real Prometheus server scraping the admin port, whose HTTP API must then report the token
# as valid and count every request. Usage: tests/e2e/run.sh [path/to/bearer-proxy]
set -euo pipefail
bin=$(realpath "${1:-target/debug/bearer-proxy}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "e2e: FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Polls "$@" until it succeeds, for at most $deadline seconds.
until_ok() { local deadline=$1; shift; local end=$((SECONDS + deadline)); until "$@"; do ((SECONDS < end)) || return 1; sleep 0.2; done; }

issuer_port=$(free_port); upstream_port=$(free_port); proxy_port=$(free_port)
admin_port=$(free_port); prom_port=$(free_port)

echo "e2e: certificates"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=e2e test CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/ext.cnf" -out "$work/server.pem" 2>/dev/null

echo "e2e: dev issuer, TLS upstream"
"$bin" dev-issuer --listen "127.0.0.1:$issuer_port" --lifetime 30 > "$work/issuer.log" 2>&1 &
pids+=($!)
python3 "$here/upstream.py" "$upstream_port" "$work/server.pem" "$work/server.key" "$work/requests.txt" \
  > "$work/upstream.log" 2>&1 &
pids+=($!)

upstream_ready() { grep -q "upstream ready" "$work/upstream.log"; }
until_ok 20 upstream_ready || fail "the TLS upstream never started"

cat > "$work/config.toml" <<TOML
[proxy]
listen = "127.0.0.1:$proxy_port"
ca_file = "$work/ca.pem"
drain_delay = "1s"
[admin]
listen = "127.0.0.1:$admin_port"
[log]
access = true
[tokens.e2e]
token_url = "http://127.0.0.1:$issuer_port/api/v1/token"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret_file = "$work/client_secret"
[[routes]]
name = "e2e"
host = "api.e2e.test"
token = "e2e"
upstream = "https://localhost:$upstream_port"
TOML
echo demo-secret > "$work/client_secret"
"$bin" check --config "$work/config.toml" > /dev/null || fail "config check"

echo "e2e: bearer-proxy"
"$bin" run --config "$work/config.toml" > "$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
until_ok 20 curl -sf "http://127.0.0.1:$admin_port/readyz" -o /dev/null || fail "proxy never became ready"

echo "e2e: curl -x"
out=$(curl -sS -x "http://127.0.0.1:$proxy_port" "http://api.e2e.test/api/fdx/5/accounts") || fail "curl"
grep -q '"bearer_received": true' <<<"$out" || fail "curl: upstream saw no token: $out"

echo "e2e: Python requests with HTTP_PROXY"
HTTP_PROXY="http://127.0.0.1:$proxy_port" NO_PROXY="" python3 - <<'PY' || fail "python requests"
import requests
for i in range(5):
    r = requests.get(f"http://api.e2e.test/api/fdx/5/accounts/{i}", timeout=10)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.json()["bearer_received"] is True
PY
[[ $(grep -c "^localhost:$upstream_port True$" "$work/requests.txt") == 6 ]] || fail "upstream did not see 6 requests with a token"

echo "e2e: Prometheus scrapes the admin port"
cat > "$work/prometheus.yml" <<YML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: bearer-proxy
    static_configs: [{targets: ["127.0.0.1:$admin_port"]}]
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)
# The value of an instant query, or nothing (also while Prometheus is still starting).
query() {
  curl -sf "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' \
      2>/dev/null || true
}
valid_is_1() { [[ $(query 'bearer_proxy_token_valid{token="e2e"}') == 1 ]]; }
counted_6() { [[ $(query 'sum(bearer_proxy_requests_total{route="e2e",code="200"})') == 6 ]]; }
until_ok 30 valid_is_1 || fail "Prometheus never saw bearer_proxy_token_valid == 1"
until_ok 10 counted_6 || fail "Prometheus did not count 6 requests: $(query 'sum(bearer_proxy_requests_total{route="e2e"})')"

echo "e2e: SIGTERM"
kill -TERM "$proxy_pid"
code=0; wait "$proxy_pid" || code=$?
[[ $code == 0 ]] || fail "proxy exited $code after SIGTERM"
if grep -q 'eyJ' "$work/proxy.log"; then fail "a token appears in the proxy's log"; fi
echo "e2e: 1 passed, 0 failed"
