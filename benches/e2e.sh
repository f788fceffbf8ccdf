#!/usr/bin/env bash
# End-to-end benchmark of bearer-proxy against nginx and HAProxy doing the same job (add a
# static "Authorization: Bearer <token>" to every request), plus wrk calling the upstream
# directly. See BENCHMARKS.md for what it measures and the results.
#
#   benches/e2e.sh                      # everything: build, main + rotation + TLS scenarios
#   benches/e2e.sh --quick              # 1 round x 3 s, for trying changes (numbers are rough)
#   benches/e2e.sh --scenarios main --rounds 3 --conns 64 --sizes small
#   benches/e2e.sh --wait-idle 20       # first wait up to 20 min for an idle machine
#
# Needs Debian's nginx, haproxy, wrk, curl, openssl, util-linux (taskset, setsid) and the repo.
# Everything listens on 127.0.0.1 and every started process is stopped on exit.
#
# CPU placement (2 cores): wrk (1 thread), the upstream nginx (1 worker) and the dev token
# issuers share LOAD_CPU (0); the proxy under test runs alone on PROXY_CPU (1). The direct rows
# use the same placement with PROXY_CPU idle. Compare proxies by "proxy CPU per request": with
# both cores near 100 %, requests/s is limited by the load core as much as by the proxy.
#
# Scenarios:
#   main      plain-HTTP upstream; candidates direct, bp-fwd (bearer-proxy, absolute-form
#             requests like an HTTP_PROXY client), bp-gw (bearer-proxy, origin-form requests routed
#             by Host), nginx and haproxy (reverse proxies with a static header). The upstream
#             answers 401 unless Authorization is exactly "Bearer $TOKEN"; bearer-proxy gets that
#             token from the dev issuer (--fixed-token), so nothing is faked. floor: HAProxy as a
#             TCP relay (no HTTP), wrk sending the header itself: the kernel's share, the limit row.
#   rotation  the dev issuer hands out a new random JWT-shaped token each time, with a 5 s
#             lifetime; refresh_ratio 0.4 makes bearer-proxy fetch one every ~1.7-2 s.
#             bp-rotating runs against it, bp-steady (300 s tokens) against an identical upstream
#             listener of its own; both accept only JWT-shaped "Bearer" values and log when each
#             token (its signature's first 12 characters) was seen. Checked afterwards: no non-2xx,
#             several distinct tokens used per run, and no token used for longer than its
#             lifetime (a stale token would show a longer span).
#   tls       the upstream listens with TLS (certificate from a throwaway CA made by openssl);
#             bearer-proxy trusts the CA via proxy.ca_file, nginx and HAProxy verify it too and
#             keep TLS connections alive; direct-tls is wrk over TLS.
#   intercept (not in the default set) the cost of terminating the client's TLS: the app talks
#             HTTPS with keep-alive; the upstream is the plain-HTTP one, so only the client leg
#             differs. bp-icpt is bearer-proxy with [proxy.intercept] (a CA from `ca init`): the
#             client sends CONNECT api.bench.test:443 and then TLS inside it; nginx-tlsterm is
#             nginx terminating TLS itself (an ECDSA P-256 certificate, as bearer-proxy's
#             leaves) with the static header; bp-plain is plain forward mode, for the baseline.
#             wrk cannot send CONNECT, so every candidate is reached through a socat relay on
#             the load core (socat's PROXY address sends the CONNECT for bp-icpt; plain TCP
#             relays for the other two), which keeps the client side identical; the relays'
#             CPU is not the proxy's. Needs socat.
#   idle      memory per idle keep-alive client connection: for bp-fwd, bp-gw, nginx and HAProxy
#             (configured as in main, with connection limits and idle timeouts raised above the
#             test's), one at a time: the proxy's memory after start (0 connections), then
#             benches/idle_clients.py (python3 asyncio, on the load core) opens --idle-conns
#             connections and sends one request on each (64 in flight) and reads the answer,
#             and the memory is read again; then a second request on every connection checks
#             that the proxy kept them all open. Memory is PSS (/proc/PID/smaps_rollup; RSS
#             too) summed over the proxy's processes; the row gives the difference / connections.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=5 DURATION=10 WARMUP=2 CONNS="64 1" SIZES="small 16k" SCENARIOS="main rotation tls idle"
IDLE_CONNS=10000
ROT_ROUNDS="" TLS_ROUNDS="" ICPT_ROUNDS="" OUT="" BUILD=1 WAIT_IDLE=0 BASELINE=""
LOAD_CPU=${LOAD_CPU:-0} PROXY_CPU=${PROXY_CPU:-1} NICE=${NICE:--15}
TOKEN=${TOKEN:-e2e-6b1d0c7a93f24e58a1}
P=${BASE_PORT:-29100}   # every port is P + a fixed offset

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; cat <<EOF
Options:
  --rounds N         measured rounds per scenario (default $ROUNDS; candidates interleaved,
                     order rotated every round)
  --rot-rounds N     rounds for the rotation scenario (default: --rounds)
  --tls-rounds N     rounds for the TLS scenario (default: --rounds)
  --icpt-rounds N    rounds for the intercept scenario (default: --rounds)
  --duration S       seconds per wrk run (default $DURATION)
  --warmup S         one unrecorded run per candidate first (default $WARMUP; 0 = none)
  --conns "A B"      wrk connection counts (default "$CONNS")
  --sizes "a b"      response bodies: small (12 bytes), 16k (16 KiB) (default "$SIZES")
  --scenarios "..."  main rotation tls idle intercept (default "$SCENARIOS")
  --idle-conns N     client connections held open in the idle scenario (default $IDLE_CONNS)
  --out DIR          results (default /tmp/bp-e2e.<time>)
  --no-build         use the existing target/release/bearer-proxy
  --baseline BIN     main scenario: also run bp-base, another bearer-proxy binary configured as
                     bp-fwd, interleaved with the others (an A/B of two builds in one run)
  --wait-idle MIN    wait up to MIN minutes for load average < 0.5 before starting
  --quick            --rounds 1 --duration 3 --warmup 1
Env: LOAD_CPU PROXY_CPU NICE TOKEN BASE_PORT
EOF
}
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2;;
    --rot-rounds) ROT_ROUNDS=$2; shift 2;;
    --tls-rounds) TLS_ROUNDS=$2; shift 2;;
    --icpt-rounds) ICPT_ROUNDS=$2; shift 2;;
    --duration) DURATION=$2; shift 2;;
    --warmup) WARMUP=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --sizes) SIZES=$2; shift 2;;
    --scenarios) SCENARIOS=$2; shift 2;;
    --idle-conns) IDLE_CONNS=$2; shift 2;;
    --out) OUT=$2; shift 2;;
    --no-build) BUILD=0; shift;;
    --baseline) BASELINE=$2; shift 2;;
    --wait-idle) WAIT_IDLE=$2; shift 2;;
    --quick) ROUNDS=1 DURATION=3 WARMUP=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
ROT_ROUNDS=${ROT_ROUNDS:-$ROUNDS} TLS_ROUNDS=${TLS_ROUNDS:-$ROUNDS} ICPT_ROUNDS=${ICPT_ROUNDS:-$ROUNDS}

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }
for t in nginx haproxy wrk curl openssl taskset setsid; do
  command -v $t >/dev/null || die "$t is missing (apt-get install nginx haproxy wrk curl openssl)"
done
if [[ " $SCENARIOS " == *" intercept "* ]] && ! command -v socat >/dev/null; then
  die "socat is missing (apt-get install socat): the intercept scenario needs it"
fi
if [[ " $SCENARIOS " == *" idle "* ]]; then
  command -v python3 >/dev/null || die "python3 is missing: the idle scenario's client needs it"
  # The client and the proxy each hold one descriptor per connection, plus the upstream's.
  # HAProxy asks for two per connection slot (maxconn) and is told not to insist (no
  # strict-limits) where the hard limit is lower: idle clients hold no server connection.
  need_fds=$((IDLE_CONNS + 1024))
  ulimit -n $((2 * need_fds + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  (($(ulimit -n) >= need_fds)) || die "the idle scenario needs ulimit -n $need_fds (raise the hard limit)"
fi

# Ports.
UP=$((P + 0)) STUB=$((P + 1)) UP_ROT=$((P + 2)) UP_TLS=$((P + 3)) UP_STEADY=$((P + 4))
OUT=${OUT:-/tmp/bp-e2e.$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$OUT/wrk" "$W"/{www,tmp,lua,cfg}
chmod 755 "$OUT" "$W" "$W/www"          # nginx workers run as nobody
BIN=$ROOT/target/release/bearer-proxy

# ------------------------------------------------------------------ process control
# Each started process gets its own session, so it and its children (nginx workers) can be
# found and accounted for by session id; the EXIT trap stops them all by pid.
declare -A SESS=()   # name -> session id (= pid of the session leader)
# With sched_autogroup, CPU is shared between sessions by their autogroup's nice value, so the
# new session sets its own (from inside: it only exists after setsid) before exec'ing.
IN_OWN_AUTOGROUP='echo "$0" >/proc/self/autogroup 2>/dev/null; exec "$@"'
ALL_SESS=()
start() {  # NAME CPU COMMAND...
  local name=$1 cpu=$2; shift 2
  setsid sh -c "$IN_OWN_AUTOGROUP" "$NICE" taskset -c "$cpu" nice -n "$NICE" "$@" \
    >"$W/$name.log" 2>&1 </dev/null &
  SESS[$name]=$!; ALL_SESS+=("$!")
}
sess_pids() { ps -o pid= -s "$1" 2>/dev/null | tr -d ' ' || true; }
stop() {  # NAME
  local sid=${SESS[$1]:-} i
  [[ -n $sid ]] || return 0
  kill -TERM "$sid" 2>/dev/null || true
  for i in $(seq 50); do [[ -z $(sess_pids "$sid") ]] && break; sleep 0.1; done
  for i in $(sess_pids "$sid"); do kill -KILL "$i" 2>/dev/null || true; done
  unset "SESS[$1]"
}
cleanup() {
  trap - EXIT INT TERM
  [[ -n ${WRK_PID:-} ]] && kill -TERM "$WRK_PID" 2>/dev/null
  local n; for n in "${!SESS[@]}"; do stop "$n"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
taskset -cp "$LOAD_CPU" $$ >/dev/null

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_listen() {  # PORT NAME
  local i
  for i in $(seq 100); do
    listening "$1" && return 0
    [[ -n $(sess_pids "${SESS[$2]}") ]] || break
    sleep 0.1
  done
  tail -5 "$W/$2.log" >&2; die "$2 is not listening on $1"
}
ticks() {  # SESSION -> "utime+stime utime" of its processes, in clock ticks (1/100 s)
  local p; for p in $(sess_pids "$1"); do cut -d')' -f2 "/proc/$p/stat" 2>/dev/null; done |
    awk '{t += $12 + $13; u += $12} END {print t + 0, u + 0}'
}
hwm_kb() {  # SESSION -> sum of VmHWM
  local p; for p in $(sess_pids "$1"); do awk '/^VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null; done |
    awk '{s += $1} END {print s + 0}'
}
mem_kb() {  # SESSION -> "PSS RSS" in KiB, summed over its processes (smaps_rollup)
  local p; for p in $(sess_pids "$1"); do
    awk '/^Pss:/ {p = $2} /^Rss:/ {r = $2} END {print p + 0, r + 0}' "/proc/$p/smaps_rollup" 2>/dev/null
  done | awk '{p += $1; r += $2} END {print p + 0, r + 0}'
}
# CPU ticks of every live process outside our sessions, "pid:start ticks" (a process that
# starts and ends within a run is missed; the busy time of the proxy's core below is not).
others() {
  local ours=" ${ALL_SESS[*]} ${WRK_PID:-} "
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v ours="$ours" -v me=$$ '{
    pid = $1; sub(/^.*\) /, ""); split($0, f, " ")
    if (pid == me || index(ours, " " f[4] " ")) next
    print pid ":" f[20], f[12] + f[13] }' || true
}
# busy ticks of one CPU (everything but idle and iowait)
cpu_busy() { awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
delta_others() { awk 'NR == FNR {a[$1] = $2; next} {d += $2 - a[$1]} END {print d + 0}' "$1" "$2"; }
stub() { curl -s --max-time 3 "http://127.0.0.1:$STUB/" | awk 'NR == 3 {print $1, $3}'; }
issuer_calls() { curl -s --max-time 3 "http://127.0.0.1:$1/control/stats" | sed -n 's/.*"token_requests":\([0-9]*\).*/\1/p'; }

for port in $(seq "$P" $((P + 140))); do
  listening "$port" && die "127.0.0.1:$port is in use; stop what listens there or set BASE_PORT"
done

# ------------------------------------------------------------------ idle machine
busy_report() { uptime; ps -eo pcpu,comm --sort=-pcpu | head -6; }
if ((WAIT_IDLE > 0)); then
  deadline=$((SECONDS + WAIT_IDLE * 60))
  until awk '{exit !($1 < 0.5)}' /proc/loadavg; do
    ((SECONDS < deadline)) || { say "machine still busy after $WAIT_IDLE min; going on (see other_cpu%)"; break; }
    say "waiting for an idle machine: $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 60
  done
fi
busy_report >"$OUT/idle-check.txt"

# ------------------------------------------------------------------ build
if ((BUILD)); then
  say "cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --quiet) || die "build failed"
fi
[[ -x $BIN ]] || die "$BIN not built"
[[ -z $BASELINE || -x $BASELINE ]] || die "--baseline $BASELINE is not an executable"

# ------------------------------------------------------------------ upstream
head -c 16384 /dev/zero | tr '\0' 'x' >"$W/www/16k"
printf '{"ok":true}\n' >"$W/www/small"     # 12 bytes
# A throwaway CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bp-e2e CA" \
  -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$W/up.key" -out "$W/up.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:up.bench.test\nbasicConstraints=CA:FALSE\n' >"$W/up.ext"
openssl x509 -req -in "$W/up.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial -days 2 \
  -extfile "$W/up.ext" -out "$W/up.pem" 2>/dev/null
chmod 644 "$W"/*.pem "$W"/*.key

NGINX_COMMON="daemon off; master_process on; worker_processes 1; error_log $W/ERRLOG crit;
events { worker_connections 4096; }"
NGINX_HTTP="access_log off; client_body_temp_path $W/tmp; proxy_temp_path $W/tmp;
fastcgi_temp_path $W/tmp; uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
keepalive_requests 1000000000; keepalive_timeout 600s;"
cat >"$W/cfg/upstream.conf" <<EOF
${NGINX_COMMON//ERRLOG/upstream.err}
pid $W/upstream.pid;
http {
  $NGINX_HTTP
  default_type application/octet-stream; etag off;
  # rotation: any JWT-shaped bearer token; the first 12 characters of its signature name it
  map \$http_authorization \$rot_token {
    "~^Bearer [A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+\\.(?<sig>[A-Za-z0-9_-]{12})[A-Za-z0-9_-]*\$" \$sig;
    default "";
  }
  log_format rot '\$msec \$rot_token';
  server {
    listen 127.0.0.1:$UP backlog=4096;
    listen 127.0.0.1:$UP_TLS ssl backlog=4096;
    ssl_certificate $W/up.pem; ssl_certificate_key $W/up.key;
    ssl_session_cache shared:up:1m;
    root $W/www;
    if (\$http_authorization != "Bearer $TOKEN") { return 401 "wrong or missing token\n"; }
    location ~ ^/(small|16k)\$ { }
    location / { return 404; }
  }
$(for l in rotating:$UP_ROT steady:$UP_STEADY; do cat <<EOS
  server {
    listen 127.0.0.1:${l#*:} backlog=4096;
    root $W/www;
    if (\$rot_token = "") { return 401 "not a bearer token from the issuer\n"; }
    access_log $W/tokens-${l%%:*}.log rot buffer=256k;
    location ~ ^/(small|16k)\$ { }
    location / { return 404; }
  }
EOS
done)
  server { listen 127.0.0.1:$STUB; location / { stub_status; } }
}
EOF
start upstream "$LOAD_CPU" nginx -p "$W" -e "$W/upstream.err" -c "$W/cfg/upstream.conf"
wait_listen "$UP" upstream
for s in small 16k; do
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$UP/$s") == 401 ]] || die "upstream accepts requests without the token"
  [[ $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$UP/$s") == 200 ]] || die "upstream refuses the token"
done
declare -A BYTES=([small]=12 [16k]=16384)

# ------------------------------------------------------------------ candidates
# name -> mode (direct|fwd|rev), port, scheme of the URL wrk calls, dev issuer port
declare -A MODE=() PORT=() ISSUER=() URLSCHEME=()
issuer() {  # NAME PORT LIFETIME [--fixed-token T]
  local name=$1 port=$2 life=$3; shift 3
  start "$name" "$LOAD_CPU" "$BIN" dev-issuer --listen "127.0.0.1:$port" --lifetime "$life" \
    --client-id e2e --client-secret e2e-secret "$@"
  wait_listen "$port" "$name"
}
bearer_proxy() {  # NAME PORT ISSUER_PORT UPSTREAM_URL LIFETIME [fixed|rotating] [extra toml for [proxy]]
  local name=$1 port=$2 iport=$3 upstream=$4 life=$5 kind=$6 extra=${7:-} ratio=0.75
  if [[ $kind == fixed ]]; then
    issuer "$name-issuer" "$iport" "$life" --fixed-token "$TOKEN"
  else
    issuer "$name-issuer" "$iport" "$life"; ratio=0.4
  fi
  cat >"$W/cfg/$name.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
workers = 1
drain_delay = "0s"
shutdown_grace = "1s"
$extra
[admin]
listen = "127.0.0.1:$((port + 100))"
[log]
level = "warn"
format = "text"
[tokens.e2e]
token_url = "http://127.0.0.1:$iport/api/v1/token"
grant_type = "client_credentials"
client_id = "e2e"
client_secret = "e2e-secret"
refresh_ratio = $ratio
[[routes]]
name = "api"
host = "api.bench.test"
token = "e2e"
upstream = "$upstream"
EOF
  start "$name" "$PROXY_CPU" "${BP_BIN:-$BIN}" run --config "$W/cfg/$name.toml"
  wait_listen "$port" "$name"
  ISSUER[$name]=$iport
}
nginx_proxy() {  # NAME PORT UPSTREAM_SCHEME UPSTREAM_PORT [WORKER_CONNECTIONS]
  local name=$1 port=$2 scheme=$3 uport=$4 wc=${5:-4096} tls="" common
  common=${NGINX_COMMON//ERRLOG/$name.err}
  [[ $scheme == https ]] && tls="proxy_ssl_verify on; proxy_ssl_trusted_certificate $W/ca.pem;
      proxy_ssl_session_reuse on;
      proxy_ssl_name up.bench.test; proxy_ssl_server_name on;"
  cat >"$W/cfg/$name.conf" <<EOF
${common//worker_connections 4096/worker_connections $wc}
pid $W/$name.pid;
http {
  $NGINX_HTTP
  upstream api { server 127.0.0.1:$uport; keepalive 128; keepalive_requests 1000000000; keepalive_timeout 600s; }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / {
      proxy_pass $scheme://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      $tls
    }
  }
}
EOF
  start "$name" "$PROXY_CPU" nginx -p "$W" -e "$W/$name.err" -c "$W/cfg/$name.conf"
  wait_listen "$port" "$name"
}
haproxy_proxy() {  # NAME PORT UPSTREAM_SCHEME UPSTREAM_PORT [MAXCONN]
  local name=$1 port=$2 scheme=$3 uport=$4 maxconn=${5:-4096} tls="" limits=""
  [[ $scheme == https ]] && tls="ssl verify required ca-file $W/ca.pem sni str(up.bench.test) verifyhost up.bench.test"
  [[ -n ${5:-} ]] && limits="no strict-limits"
  cat >"$W/cfg/$name.cfg" <<EOF
global
  nbthread 1
  maxconn $maxconn
  $limits
defaults
  maxconn $maxconn
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
frontend fe
  bind 127.0.0.1:$port
  default_backend api
backend api
  http-reuse always
  http-request set-header Authorization "Bearer $TOKEN"
  server up 127.0.0.1:$uport $tls
EOF
  start "$name" "$PROXY_CPU" haproxy -db -f "$W/cfg/$name.cfg"
  wait_listen "$port" "$name"
}
# nginx terminating the client's TLS (ECDSA P-256 certificate for api.bench.test, TLS 1.3 and
# 1.2 as bearer-proxy offers), static header, plain-HTTP upstream with a keepalive pool.
nginx_tls_term() {  # NAME PORT UPSTREAM_PORT
  local name=$1 port=$2 uport=$3
  cat >"$W/cfg/$name.conf" <<EOF
${NGINX_COMMON//ERRLOG/$name.err}
pid $W/$name.pid;
http {
  $NGINX_HTTP
  upstream api { server 127.0.0.1:$uport; keepalive 128; keepalive_requests 1000000000; keepalive_timeout 600s; }
  server {
    listen 127.0.0.1:$port ssl backlog=4096;
    ssl_certificate $W/term.pem; ssl_certificate_key $W/term.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
}
EOF
  start "$name" "$PROXY_CPU" nginx -p "$W" -e "$W/$name.err" -c "$W/cfg/$name.conf"
  wait_listen "$port" "$name"
}
# A socat relay on the load core: PORT -> TARGET (a socat address, e.g. TCP:127.0.0.1:N, or
# PROXY:127.0.0.1:host:443,proxyport=N to send CONNECT first). One process per connection;
# TCP_NODELAY on both sides (without it a 16 KiB answer meets Nagle + delayed ACK: 40 ms each).
relay() {  # NAME PORT TARGET
  start "$1" "$LOAD_CPU" socat "TCP-LISTEN:$2,bind=127.0.0.1,fork,reuseaddr,backlog=4096,nodelay" "$3,nodelay"
  wait_listen "$2" "$1"
}
# The kernel floor: HAProxy as a plain TCP relay (one upstream connection per client connection,
# bytes copied, nothing parsed), wrk sending the header itself as for `direct`. Its CPU per
# request is the loopback TCP work and wake-ups every proxy pays, plus a relay's minimal user
# work: what no HTTP proxy on this machine can go below.
floor_relay() {  # NAME PORT UPSTREAM_PORT
  cat >"$W/cfg/$1.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
listen relay
  bind 127.0.0.1:$2
  server up 127.0.0.1:$3
EOF
  start "$1" "$PROXY_CPU" haproxy -db -f "$W/cfg/$1.cfg"
  wait_listen "$2" "$1"
}
add() { MODE[$1]=$2; PORT[$1]=$3; URLSCHEME[$1]=${4:-http}; }

# ------------------------------------------------------------------ wrk
lua() {  # MODE SIZE AUTH -> script path
  local f=$W/lua/$1-$2-${3:-none}.lua
  {
    case $1 in
      direct) echo "wrk.headers[\"Authorization\"] = \"Bearer $TOKEN\"";;
      fwd) echo "wrk.path = \"http://api.bench.test/$2\""   # absolute-form, like HTTP_PROXY clients
           echo 'wrk.headers["Host"] = "api.bench.test"';;
      rev) echo "wrk.path = \"/$2\""
           echo 'wrk.headers["Host"] = "api.bench.test"';;
    esac
    cat <<'EOF'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("E2E %d %d %d %d %d %d %d %d %.0f %.0f %.0f\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
EOF
  } >"$f"
  echo "$f"
}

TSV=$OUT/runs.tsv
printf 'scenario\tround\tcandidate\tsize\tconns\trequests\trps\tp50_us\tp99_us\tmax_us\tnon2xx\tsock_errors\tproxy_cpu_pct\tproxy_us_per_req\tup_new_conns\tup_requests\ttoken_calls\tother_cpu_pct\tstatus\tsteady_new_conns_per_1k\tproxy_core_other_pct\tproxy_user_us_per_req\n' >"$TSV"

measure() {  # SCENARIO ROUND CANDIDATE SIZE CONNS SECS
  local sc=$1 round=$2 c=$3 size=$4 conns=$5 secs=$6 url script log
  case ${MODE[$c]} in
    direct) url=${URLSCHEME[$c]}://127.0.0.1:${PORT[$c]}/$size;;
    *) url=${URLSCHEME[$c]}://127.0.0.1:${PORT[$c]}/;;
  esac
  script=$(lua "${MODE[$c]}" "$size")
  log=$OUT/wrk/$sc-$round-$c-$size-c$conns.log
  local t0 t1 px0=0 px1=0 pu0=0 pu1=0 a0 r0 a1 r1 am rm k0=0 k1=0 b0 b1 rc=0 sid=${SESS[$c]:-}
  others >"$W/o0"; [[ -n $sid ]] && read -r px0 pu0 < <(ticks "$sid")
  [[ -n ${ISSUER[$c]:-} ]] && k0=$(issuer_calls "${ISSUER[$c]}")
  read -r a0 r0 < <(stub); b0=$(cpu_busy "$PROXY_CPU"); t0=$(date +%s%N)
  # Upstream counters one second in: connections opened after that are steady-state churn.
  rm -f "$W/stub-mid"; (sleep 1; stub >"$W/stub-mid") & local mid=$!
  setsid sh -c "$IN_OWN_AUTOGROUP" "$NICE" taskset -c "$LOAD_CPU" nice -n "$NICE" \
    timeout -k 5 $((secs + 30)) wrk -t1 -c"$conns" -d"${secs}s" --timeout 5s -s "$script" "$url" \
    >"$log" 2>&1 </dev/null &
  WRK_PID=$!
  wait "$WRK_PID" || rc=$?
  WRK_PID=
  t1=$(date +%s%N); b1=$(cpu_busy "$PROXY_CPU"); read -r a1 r1 < <(stub)
  [[ -n $sid ]] && read -r px1 pu1 < <(ticks "$sid")
  wait "$mid" || true; read -r am rm <"$W/stub-mid" || { am=$a0; rm=$r0; }
  [[ -n ${ISSUER[$c]:-} ]] && k1=$(issuer_calls "${ISSUER[$c]}")
  others >"$W/o1"
  local res; res=$(awk '$1 == "E2E" {$1 = ""; print}' "$log")
  [[ $rc == 0 && -n $res ]] || { say "wrk failed for $c ($rc): $(tail -2 "$log")"; res="0 1 0 0 0 0 0 0 0 0 0"; }
  awk -v OFS='\t' -v sc="$sc" -v round="$round" -v c="$c" -v size="$size" -v conns="$conns" \
      -v res="$res" -v wall=$(((t1 - t0) / 1000)) -v px=$((px1 - px0)) -v pu=$((pu1 - pu0)) -v direct=$([[ -z $sid ]] && echo 1 || echo 0) \
      -v upc=$((a1 - a0 - 2)) -v upr=$((r1 - r0 - 2)) -v upcs=$((a1 - am - 1)) -v uprs=$((r1 - rm - 1)) \
      -v calls=$((k1 - k0)) -v core_other=$((b1 - b0 - (px1 - px0))) \
      -v other="$(delta_others "$W/o0" "$W/o1")" -v bytes="${BYTES[$size]}" 'BEGIN {
    split(res, x, " "); req = x[1]; dur = x[2] / 1e6; rps = dur > 0 ? req / dur : 0
    sock = x[5] + x[6] + x[7] + x[8]; wall_ticks = wall / 1e4
    st = "ok"
    if (req == 0) st = "FAIL:no_requests"
    else if (x[4] > 0) st = "FAIL:non2xx"
    else if (sock > 0) st = "FAIL:socket_errors"
    else if (upr < req) st = "FAIL:upstream_saw_fewer"
    else if (x[3] / req < bytes) st = "FAIL:short_responses"
    print sc, round, c, size, conns, req, sprintf("%.0f", rps), x[9], x[10], x[11], x[4], sock,
      direct ? "-" : sprintf("%.1f", px / wall_ticks * 100),
      direct ? "-" : sprintf("%.2f", req ? px * 1e4 / req : 0),
      upc, upr, calls, sprintf("%.1f", other / wall_ticks * 100), st,
      sprintf("%.2f", uprs > 0 ? upcs * 1000 / uprs : 0), sprintf("%.1f", core_other / wall_ticks * 100),
      direct ? "-" : sprintf("%.2f", req ? pu * 1e4 / req : 0)
  }' >>"$TSV"
  tail -1 "$TSV" | awk -F'\t' '{printf "  %-11s %-5s c=%-2s %7d rps  p50 %5d us  p99 %6d us  proxy %5s us/req  up_conns %d  other %s%% / core %s%%  %s\n",
    $3, $4, $5, $7, $8, $9, $14, $15, $18, $21, $19}' >&2
}

preflight() {  # CANDIDATE
  local c=$1 s got
  for s in $SIZES; do
    case ${MODE[$c]} in
      direct) got=$(curl -sk -o /dev/null -w '%{http_code} %{size_download}' -H "Authorization: Bearer $TOKEN" "${URLSCHEME[$c]}://127.0.0.1:${PORT[$c]}/$s");;
      fwd) got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' -x "http://127.0.0.1:${PORT[$c]}" "http://api.bench.test/$s");;
      rev) got=$(curl -sk -o /dev/null -w '%{http_code} %{size_download}' -H "Host: api.bench.test" "${URLSCHEME[$c]}://127.0.0.1:${PORT[$c]}/$s");;
    esac
    [[ $got == "200 ${BYTES[$s]}" ]] || die "preflight: $c /$s gave '$got'"
  done
}

run_scenario() {  # SCENARIO ROUNDS CANDIDATE...
  local sc=$1 rounds=$2; shift 2
  local cands=("$@") n=$# r k size conns
  for k in "${cands[@]}"; do preflight "$k"; done
  if ((WARMUP > 0)); then
    say "$sc: warm-up"
    for k in "${cands[@]}"; do for size in $SIZES; do measure warmup 0 "$k" "$size" 64 "$WARMUP" 2>/dev/null; done; done
    sed -i '/^warmup\t/d' "$TSV"
  fi
  for ((r = 1; r <= rounds; r++)); do
    say "$sc: round $r/$rounds"
    for size in $SIZES; do for conns in $CONNS; do
      for ((k = 0; k < n; k++)); do
        measure "$sc" "$r" "${cands[(k + r - 1) % n]}" "$size" "$conns" "$DURATION"
        sleep 1
      done
    done; done
  done
}

IDLE=$OUT/idle.tsv
idle_measure() {  # CANDIDATE: memory at 0 and at IDLE_CONNS idle keep-alive connections
  local c=$1 sid=${SESS[$1]} rel=$W/idle-release-$1 log=$W/idle-client-$1.log
  local pss0 rss0 pss1 rss1 ready open answered secs kept i st=ok
  preflight "$c"
  sleep 2; read -r pss0 rss0 < <(mem_kb "$sid")
  rm -f "$rel"
  start "idle-client-$c" "$LOAD_CPU" python3 "$ROOT/benches/idle_clients.py" --port "${PORT[$c]}" \
    --conns "$IDLE_CONNS" --mode "${MODE[$c]}" --release "$rel"
  for i in $(seq 1200); do
    ready=$(awk '$1 == "READY"' "$W/idle-client-$c.log"); [[ -n $ready ]] && break; sleep 0.25
  done
  [[ -n $ready ]] || die "idle: the client for $c did not get ready: $(tail -3 "$W/idle-client-$c.log")"
  read -r _ open answered secs <<<"$ready"
  sleep 2; read -r pss1 rss1 < <(mem_kb "$sid")
  touch "$rel"
  for i in $(seq 1200); do
    kept=$(awk '$1 == "STILL_OPEN" {print $2}' "$W/idle-client-$c.log"); [[ -n $kept ]] && break; sleep 0.25
  done
  ((open == IDLE_CONNS)) || st="FAIL:connected_$open"
  ((answered == IDLE_CONNS)) || st="FAIL:answered_$answered"
  ((${kept:-0} == IDLE_CONNS)) || st="FAIL:still_open_${kept:-0}"
  printf '%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n' "$c" "$IDLE_CONNS" "$pss0" "$pss1" "$rss0" "$rss1" \
    "$(hwm_kb "$sid")" "$secs" "$st" >>"$IDLE"
  say "  $c: PSS $pss0 -> $pss1 KiB, RSS $rss0 -> $rss1 KiB with $IDLE_CONNS idle connections ($st)"
  stop "idle-client-$c"
}
RSS=$OUT/rss.tsv CALLS=$OUT/token-calls.tsv
: >"$RSS"; printf 'candidate\tlifetime_s\tuptime_s\ttoken_calls\texpected\n' >"$CALLS"
declare -A STARTED_AT=()
finish() {  # CANDIDATE LIFETIME REFRESH_MIN REFRESH_MAX: record RSS and token calls, then stop it
  local c=$1 life=${2:-} lo=${3:-} hi=${4:-} up calls
  [[ -n ${SESS[$c]:-} ]] || return 0
  echo -e "$c\t$(hwm_kb "${SESS[$c]}")" >>"$RSS"
  if [[ -n ${ISSUER[$c]:-} ]]; then
    up=$((SECONDS - STARTED_AT[$c])); calls=$(issuer_calls "${ISSUER[$c]}")
    # one at start, then one per refresh interval (refresh_ratio of the lifetime, jittered)
    echo -e "$c\t$life\t$up\t$calls\t$(awk -v u="$up" -v lo="$lo" -v hi="$hi" 'BEGIN {printf "%d-%d", 1 + int(u / hi), 1 + int(u / lo) + 1}')" >>"$CALLS"
    stop "$c-issuer"
  fi
  stop "$c"
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "kernel: $(uname -r)"
  lscpu | awk -F: '/^(Model name|CPU\(s\)|Hypervisor vendor)/ {gsub(/^ +/, "", $2); print $1 ": " $2}'
  echo "rustc: $(rustc --version)"; echo "nginx: $(nginx -v 2>&1)"
  echo "haproxy: $(haproxy -v | head -1)"; echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "bearer-proxy: $(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet || echo +dirty)"
  [[ -z $BASELINE ]] || echo "bp-base: $BASELINE (sha256 $(sha256sum "$BASELINE" | cut -c1-12))"
  echo "pinning: wrk + upstream + issuers on CPU $LOAD_CPU, proxy under test on CPU $PROXY_CPU, nice $NICE"
  echo "args: rounds=$ROUNDS rot_rounds=$ROT_ROUNDS tls_rounds=$TLS_ROUNDS icpt_rounds=$ICPT_ROUNDS duration=${DURATION}s warmup=${WARMUP}s conns='$CONNS' sizes='$SIZES' scenarios='$SCENARIOS'"
} >"$OUT/env.txt"
say "results in $OUT"

# ------------------------------------------------------------------ scenarios
for sc in $SCENARIOS; do
  case $sc in
    main)
      add direct direct "$UP"
      bearer_proxy bp-fwd $((P + 10)) $((P + 50)) "http://127.0.0.1:$UP" 600 fixed; STARTED_AT[bp-fwd]=$SECONDS; add bp-fwd fwd $((P + 10))
      bearer_proxy bp-gw $((P + 11)) $((P + 51)) "http://127.0.0.1:$UP" 600 fixed; STARTED_AT[bp-gw]=$SECONDS; add bp-gw rev $((P + 11))
      nginx_proxy nginx $((P + 12)) http "$UP"; add nginx rev $((P + 12))
      haproxy_proxy haproxy $((P + 13)) http "$UP"; add haproxy rev $((P + 13))
      floor_relay floor $((P + 14)) "$UP"; add floor direct $((P + 14))
      base=()
      if [[ -n $BASELINE ]]; then
        BP_BIN=$BASELINE bearer_proxy bp-base $((P + 15)) $((P + 55)) "http://127.0.0.1:$UP" 600 fixed; STARTED_AT[bp-base]=$SECONDS; add bp-base fwd $((P + 15))
        base=(bp-base)
      fi
      run_scenario main "$ROUNDS" direct bp-fwd "${base[@]}" bp-gw nginx haproxy floor
      finish bp-fwd 600 382 450; finish bp-gw 600 382 450; finish nginx; finish haproxy; finish floor
      [[ -z $BASELINE ]] || finish bp-base 600 382 450
      ;;
    rotation)
      # Identical upstream listeners (JWT shape check, log of the tokens seen), one each.
      bearer_proxy bp-steady $((P + 20)) $((P + 60)) "http://127.0.0.1:$UP_STEADY" 300 rotating; STARTED_AT[bp-steady]=$SECONDS; add bp-steady fwd $((P + 20))
      bearer_proxy bp-rotating $((P + 21)) $((P + 61)) "http://127.0.0.1:$UP_ROT" 5 rotating; STARTED_AT[bp-rotating]=$SECONDS; add bp-rotating fwd $((P + 21))
      SIZES_SAVED=$SIZES; SIZES=small
      run_scenario rotation "$ROT_ROUNDS" bp-steady bp-rotating
      SIZES=$SIZES_SAVED
      # refresh every 0.4 x lifetime less up to 15 % jitter; steady: 0.4 x 300 s
      finish bp-steady 300 102 120; finish bp-rotating 5 1.7 2.0
      ;;
    tls)
      add direct-tls direct "$UP_TLS" https
      bearer_proxy bp-tls $((P + 30)) $((P + 70)) "https://127.0.0.1:$UP_TLS" 600 fixed "ca_file = \"$W/ca.pem\""
      STARTED_AT[bp-tls]=$SECONDS; add bp-tls fwd $((P + 30))
      nginx_proxy nginx-tls $((P + 32)) https "$UP_TLS"; add nginx-tls rev $((P + 32))
      haproxy_proxy haproxy-tls $((P + 33)) https "$UP_TLS"; add haproxy-tls rev $((P + 33))
      run_scenario tls "$TLS_ROUNDS" direct-tls bp-tls nginx-tls haproxy-tls
      finish bp-tls 600 382 450; finish nginx-tls; finish haproxy-tls
      ;;
    intercept)
      # The operator CA as an operator makes it; nginx gets a P-256 leaf from the same CA.
      "$BIN" ca init --out "$W/icpt-ca" --name-constraint api.bench.test >/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=api.bench.test" \
        -keyout "$W/term.key" -out "$W/term.csr" 2>/dev/null
      printf 'subjectAltName=DNS:api.bench.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$W/term.ext"
      openssl x509 -req -in "$W/term.csr" -CA "$W/icpt-ca/ca.crt" -CAkey "$W/icpt-ca/ca.key" \
        -CAcreateserial -days 2 -extfile "$W/term.ext" -out "$W/term.pem" 2>/dev/null
      chmod 644 "$W/term.pem" "$W/term.key"
      bearer_proxy bp-plain $((P + 40)) $((P + 80)) "http://127.0.0.1:$UP" 600 fixed
      STARTED_AT[bp-plain]=$SECONDS
      bearer_proxy bp-icpt $((P + 41)) $((P + 81)) "http://127.0.0.1:$UP" 600 fixed \
        "$(printf '[proxy.intercept]\nca_cert_file = "%s"\nca_key_file = "%s"' "$W/icpt-ca/ca.crt" "$W/icpt-ca/ca.key")"
      STARTED_AT[bp-icpt]=$SECONDS
      nginx_tls_term nginx-tlsterm $((P + 42)) "$UP"
      # The interception is real: curl through CONNECT, verifying the leaf against the CA only.
      got=$(curl -s -o /dev/null -w '%{http_code}' --proxy "http://127.0.0.1:$((P + 41))" \
        --cacert "$W/icpt-ca/ca.crt" "https://api.bench.test/small")
      [[ $got == 200 ]] || die "preflight: an intercepted request through bp-icpt gave '$got'"
      got=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$W/icpt-ca/ca.crt" \
        --resolve "api.bench.test:$((P + 42)):127.0.0.1" "https://api.bench.test:$((P + 42))/small")
      [[ $got == 200 ]] || die "preflight: nginx-tlsterm gave '$got'"
      relay relay-plain $((P + 45)) "TCP:127.0.0.1:$((P + 40))"; add bp-plain fwd $((P + 45))
      relay relay-icpt $((P + 46)) "PROXY:127.0.0.1:api.bench.test:443,proxyport=$((P + 41))"
      add bp-icpt rev $((P + 46)) https
      relay relay-tlsterm $((P + 47)) "TCP:127.0.0.1:$((P + 42))"; add nginx-tlsterm rev $((P + 47)) https
      run_scenario intercept "$ICPT_ROUNDS" bp-plain bp-icpt nginx-tlsterm
      finish bp-plain 600 382 450; finish bp-icpt 600 382 450; finish nginx-tlsterm
      stop relay-plain; stop relay-icpt; stop relay-tlsterm
      ;;
    idle)
      # Limits above the test's: a connection slot per client (+ upstream and spare), and
      # client idle timeouts of 600 s (nginx and HAProxy already have them). bearer-proxy's
      # upstream pool closes idle upstream connections after 30 s (not configurable), so the
      # memory is read within that (the row's "s to ready" + 2 s).
      slots=$((IDLE_CONNS + 1024))
      for c in idle-bp-fwd idle-bp-gw idle-nginx idle-haproxy; do
        case $c in
          idle-bp-fwd|idle-bp-gw)
            i=$([[ $c == idle-bp-fwd ]] && echo 0 || echo 1)
            bearer_proxy "$c" $((P + 35 + i)) $((P + 85 + i)) "http://127.0.0.1:$UP" 600 fixed \
              "$(printf 'max_connections = %d\nidle_timeout = "600s"' "$slots")"
            add "$c" "$([[ $c == idle-bp-fwd ]] && echo fwd || echo rev)" $((P + 35 + i));;
          idle-nginx) nginx_proxy "$c" $((P + 37)) http "$UP" "$slots"; add "$c" rev $((P + 37));;
          idle-haproxy) haproxy_proxy "$c" $((P + 38)) http "$UP" "$slots"; add "$c" rev $((P + 38));;
        esac
        idle_measure "$c"
        [[ -n ${ISSUER[$c]:-} ]] && stop "$c-issuer"
        stop "$c"
      done
      ;;
    *) die "unknown scenario $sc";;
  esac
done
stop upstream   # flushes the rotation access log

# ------------------------------------------------------------------ report
# Rotation: the tokens each upstream listener saw, with when each was first and last used.
for f in "$W"/tokens-*.log; do
  [[ -s $f ]] || continue
  sort -k2,2 -k1,1n "$f" | awk '
    $2 != tok { if (tok != "") print tok, first, last, n; tok = $2; first = $1; n = 0 } { last = $1; n++ }
    END { if (tok != "") print tok, first, last, n }' | sort -k2,2n >"$OUT/$(basename "$f" .log).txt"
done

awk -F'\t' -v rssf="$RSS" -v callsf="$CALLS" '
function median(key, col,   n, i, j, t, v) {
  n = cnt[key]; for (i = 1; i <= n; i++) v[i] = val[key, i, col]
  for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
  return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
BEGIN {
  while ((getline l < rssf) > 0) { split(l, a, "\t"); rss[a[1]] = a[2] }
}
NR == 1 { next }
{
  key = $1 SUBSEP $3 SUBSEP $4 SUBSEP $5
  if (!(key in cnt)) order[++nk] = key
  k = ++cnt[key]; for (f = 1; f <= NF; f++) val[key, k, f] = $f
  if (!(key in lo) || $7 < lo[key]) lo[key] = $7
  if (!(key in hi) || $7 > hi[key]) hi[key] = $7
  if ($18 > noise[key]) noise[key] = $18
  if ($21 > cnoise[key]) cnoise[key] = $21
  reqs[key] += $6; non2xx[key] += $11; newc[key] += $15; calls[key] += $17
  if ($19 != "ok") bad[key] = bad[key] " r" $2 ":" $19
}
END {
  print "| scenario | candidate | body | conns | req/s (median) | spread | p50 µs | p99 µs | proxy CPU µs/req | of which user | proxy CPU % | new upstream conns /1k req (steady) | peak RSS MB | non-2xx | token calls | max other CPU % (all / proxy core) | status |"
  print "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for (o = 1; o <= nk; o++) {
    key = order[o]; split(key, kk, SUBSEP); r = median(key, 7)
    printf "| %s | %s | %s | %s | %.0f | %.1f%% | %.0f | %.0f | %s | %s | %s | %.2f (%.2f) | %s | %d | %d | %.1f / %.1f | %s |\n",
      kk[1], kk[2], kk[3], kk[4], r, r ? (hi[key] - lo[key]) / r * 100 : 0, median(key, 8), median(key, 9),
      val[key, 1, 14] == "-" ? "-" : sprintf("%.2f", median(key, 14)),
      val[key, 1, 22] == "-" ? "-" : sprintf("%.2f", median(key, 22)),
      val[key, 1, 13] == "-" ? "-" : sprintf("%.1f", median(key, 13)),
      reqs[key] ? newc[key] * 1000 / reqs[key] : 0, median(key, 20),
      (kk[2] in rss) ? sprintf("%.1f", rss[kk[2]] / 1024) : "-",
      non2xx[key], calls[key], noise[key], cnoise[key], (key in bad) ? "FAIL" bad[key] : "ok"
  }
  print ""
  print "Token endpoint calls over each bearer-proxy process lifetime:"
  print ""
  print "| candidate | token lifetime s | process uptime s | token calls | expected |"
  print "|---|---:|---:|---:|---:|"
  while ((getline l < callsf) > 0) { if (l ~ /^candidate/) continue; split(l, a, "\t"); printf "| %s | %s | %s | %s | %s |\n", a[1], a[2], a[3], a[4], a[5] }
}' "$TSV" >"$OUT/summary.md"
for k in rotating steady; do
  f=$OUT/tokens-$k.txt; [[ -s $f ]] || continue
  awk -v k="$k" '{ n++; req += $4; s = $3 - $2; if (s > max) max = s }
    END { printf "\nRotation, bp-%s: the upstream saw %d distinct tokens in %d requests; the longest any one token was in use: %.3f s.\n", k, n, req, max }' "$f"
done >>"$OUT/summary.md"
if [[ -s $IDLE ]]; then
  awk -F'\t' 'BEGIN {
    print "\nIdle keep-alive client connections (one request answered on each, then idle; memory summed over the proxy'"'"'s processes):\n"
    print "| candidate | idle conns | PSS at 0 MB | PSS idle MB | PSS KiB/conn | RSS at 0 MB | RSS idle MB | RSS KiB/conn | peak RSS MB | s to ready | status |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" }
  { printf "| %s | %d | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f | %.1f | %s | %s |\n", substr($1, 6), $2,
      $3 / 1024, $4 / 1024, ($4 - $3) / $2, $5 / 1024, $6 / 1024, ($6 - $5) / $2, $7 / 1024, $8, $9 }' "$IDLE"
fi >>"$OUT/summary.md"

echo; cat "$OUT/env.txt"; echo; cat "$OUT/summary.md"
echo; echo "raw runs: $TSV, wrk output: $OUT/wrk/, configs and logs: $W/"
