#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the deterministic companion of
# benches/e2e.sh's CPU time (see BENCHMARKS.md). Same workload as the bp-fwd candidate there:
# absolute-form `GET http://api1.bench.test/small` through the proxy (like an HTTP_PROXY client),
# the token from the dev issuer (--fixed-token), an nginx upstream that answers 401 unless
# `Authorization` is exactly that token.
#
#   benches/callgrind.sh [--bin PATH] [--requests N] [--warmup N] [--conns N] [--idle S]
#                        [--credentials N] [--per-subject N [--active N]] [--intercept]
#                        [--size small|16k] [--tls-upstream] [--redis] [--out DIR]
#
# The proxy (default: this checkout's target/release/bearer-proxy) runs under
# `valgrind --tool=callgrind` (instruction counts only: no cache or branch simulation). A small
# Python client opens --conns keep-alive connections (default 8, as wrk in BENCHMARKS.md),
# sends --warmup requests on each (default 200), then `callgrind_control --zero` resets the
# counters, the client sends exactly --requests requests (default 20000) spread over the
# connections, one at a time per connection, and `callgrind_control --dump` writes the counters
# of that window: no connection setup, no start-up, no scrape. The proxy's
# `bearer_proxy_requests_total` and the upstream's stub_status must both have counted every
# request the client sent, each answered 200 with the right body.
# Result: the window's instructions (all threads of the proxy) / --requests. An idle window
# (--idle seconds, default 5, no requests) is measured first to show that background work is
# negligible; it is not subtracted.
# --credentials N (default 1) configures N routes api1..apiN.bench.test, each with a token of
# its own ([tokens.e2e1]..), all to the same upstream; client connection i uses route
# api<i mod N + 1>. It shows what separate upstream pools per credential cost in steady state:
# the result also gives the upstream connections open after the run and opened in the window.
# --per-subject N (with one credential) makes the route's token `per_subject = true` (a
# [subjects] section, records under the work directory) and enrols N subjects s1..sN before the
# window: for each, a code from the dev issuer's authorize endpoint (user uI) is posted to the
# subjects API. The proxy runs without valgrind for the enrolment, and its VmRSS/VmHWM are
# reported with no subject and with N enrolled (every first access token held in memory); then it
# is restarted under valgrind with the N records on disk. The client sends
# `X-Bearer-Proxy-Subject: sJ`, J cycling over the first --active subjects (default 100; the
# warm-up fetches their tokens). The issuer then mints a token per user (no --fixed-token), so
# the upstream only checks that a JWT-shaped bearer token arrived; that the right subject's token
# is injected is checked before the window through a second route to the issuer's /api/fdx/
# stand-in, which names the user whose token arrived (sJ must come back as uJ). The windows
# start 75 s after the proxy, after the keep-alive's first pass over the store; the enrolment
# takes ≈30 s per 10,000 subjects on an idle machine.
# --redis (with --per-subject) keeps the records in a redis-server started for the run
# (`[subjects] store = "redis"`, loopback, AOF on) instead of the file store, and counts the
# commands Redis processed during the measured window other than the proxy's health `PING`s:
# the request path must not touch Redis while the cached tokens are valid.
# --intercept (with one credential) adds [proxy.intercept] with a CA from `bearer-proxy ca init`:
# each client connection sends `CONNECT api1.bench.test:443`, does TLS with that CA trusted
# (the proxy's leaf) and then sends origin-form `GET /small` requests inside it, keep-alive; the
# upstream is the same plain-HTTP nginx, so the difference to the default is the proxy's TLS
# termination.
# --size 16k asks for /16k (16 KiB) instead of /small (12 bytes); every answer's body is checked.
# --tls-upstream makes the upstream nginx listen with TLS (a throwaway CA and a certificate for
# 127.0.0.1 made by openssl, as in e2e.sh's tls scenario); the proxy trusts that CA through
# proxy.ca_file and verifies it, and keeps its TLS connections alive.
#
# Needs nginx, python3, curl, valgrind (callgrind_control talks to it through vgdb). Everything
# listens on 127.0.0.1 (ports BASE_PORT..+5, default 29300); every process it starts runs in its
# own session and is stopped by its PID on exit. Takes about a minute per 10,000 requests on an
# idle machine (the proxy runs ~50x slower under valgrind).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/bearer-proxy REQUESTS=20000 WARMUP=200 CONNS=8 IDLE=5 CREDENTIALS=1 OUT=""
SUBJECTS=0 ACTIVE=100   # --per-subject: subjects enrolled, and how many the client names
INTERCEPT=0 SIZE=small TLS_UP=0 REDIS=0
TOKEN=${TOKEN:-e2e-6b1d0c7a93f24e58a1}
P=${BASE_PORT:-29300}   # every port is P + a fixed offset
while (($#)); do
  case $1 in
    --bin) BIN=$2; shift 2;;
    --requests) REQUESTS=$2; shift 2;;
    --warmup) WARMUP=$2; shift 2;;
    --idle) IDLE=$2; shift 2;;
    --credentials) CREDENTIALS=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --per-subject) SUBJECTS=$2; shift 2;;
    --active) ACTIVE=$2; shift 2;;
    --intercept) INTERCEPT=1; shift;;
    --size) SIZE=$2; shift 2;;
    --tls-upstream) TLS_UP=1; shift;;
    --redis) REDIS=1; shift;;
    --out) OUT=$2; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }
for t in nginx python3 curl valgrind callgrind_control; do
  command -v $t >/dev/null || die "$t is missing (apt-get install nginx python3 curl valgrind)"
done
if ((SUBJECTS)); then
  ((CREDENTIALS == 1)) || die "--per-subject takes one credential"
  ((ACTIVE >= 1 && ACTIVE <= SUBJECTS)) || die "--active must be 1..--per-subject"
else
  ACTIVE=0
fi
if ((INTERCEPT)); then
  ((CREDENTIALS == 1 && SUBJECTS == 0)) || die "--intercept takes one credential, no --per-subject"
fi
[[ $SIZE == small || $SIZE == 16k ]] || die "--size is small or 16k"
if ((REDIS)); then
  ((SUBJECTS)) || die "--redis takes --per-subject"
  for t in redis-server redis-cli; do command -v $t >/dev/null || die "$t is missing (apt-get install redis-server)"; done
fi
((TLS_UP)) && { command -v openssl >/dev/null || die "openssl is missing"; }
[[ -x $BIN ]] || die "$BIN is not an executable (build it: cargo build --release --locked)"
BIN=$(realpath "$BIN")

UP=$P STUB=$((P + 1)) ISSUER=$((P + 2)) PROXY=$((P + 3)) ADMIN=$((P + 4)) SUBJ_API=$((P + 5))
RED=$((P + 6))
OUT=${OUT:-/tmp/bp-callgrind.$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W"/{www,tmp}
chmod 755 "$OUT" "$W" "$W/www"          # nginx workers run as nobody

# ------------------------------------------------------------------ process control
PIDS=()   # every process we started, stopped by PID (and session) on exit
start() {  # NAME COMMAND... (own session, so nginx's worker goes with its master)
  local name=$1; shift
  setsid "$@" >"$W/$name.log" 2>&1 </dev/null &
  LAST_PID=$!; PIDS+=("$LAST_PID")
}
cleanup() {
  trap - EXIT INT TERM
  local p i alive
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  for i in $(seq 100); do   # up to 10 s: valgrind writes its last dump on the way out
    alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {  # SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local secs=$1 what=$2 deadline; shift 2; deadline=$((SECONDS + secs))
  until "$@"; do ((SECONDS < deadline)) || die "$what did not happen within ${secs}s"; sleep 0.2; done
}
for port in $(seq "$P" $((P + 6))); do
  listening "$port" && die "127.0.0.1:$port is in use; stop what listens there or set BASE_PORT"
done

# ------------------------------------------------------------------ upstream (as in e2e.sh)
printf '{"ok":true}\n' >"$W/www/small"     # 12 bytes
head -c 16384 /dev/zero | tr '\0' 'x' >"$W/www/16k"
BYTES=$(stat -c %s "$W/www/$SIZE")
UP_SCHEME=http UP_SSL="" UP_CERT=""
if ((TLS_UP)); then   # a throwaway CA and a server certificate for 127.0.0.1 (as in e2e.sh)
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bp-callgrind CA" \
    -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$W/up.key" \
    -out "$W/up.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$W/up.ext"
  openssl x509 -req -in "$W/up.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
    -days 2 -extfile "$W/up.ext" -out "$W/up.pem" 2>/dev/null
  chmod 644 "$W"/*.pem "$W"/*.key
  UP_SCHEME=https
  UP_SSL=ssl UP_CERT="ssl_certificate $W/up.pem; ssl_certificate_key $W/up.key;"
fi
# The upstream's token check: exactly the fixed token, or (per subject: one token per user) a
# JWT-shaped bearer token; which user's token is checked through the issuer below.
AUTH_CHECK="!= \"Bearer $TOKEN\""
((SUBJECTS)) && AUTH_CHECK='!~ "^Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$"'
cat >"$W/upstream.conf" <<EOF
daemon off; master_process on; worker_processes 1; error_log $W/upstream.err crit;
pid $W/upstream.pid;
events { worker_connections 4096; }
http {
  access_log off; client_body_temp_path $W/tmp; proxy_temp_path $W/tmp;
  fastcgi_temp_path $W/tmp; uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
  keepalive_requests 1000000000; keepalive_timeout 600s;
  default_type application/octet-stream; etag off;
  server {
    listen 127.0.0.1:$UP $UP_SSL backlog=4096;
    $UP_CERT
    root $W/www;
    if (\$http_authorization $AUTH_CHECK) { return 401 "wrong or missing token\n"; }
    location ~ ^/(small|16k)$ { }
    location / { return 404; }
  }
  server { listen 127.0.0.1:$STUB; location / { stub_status; } }
}
EOF
start upstream nginx -p "$W" -e "$W/upstream.err" -c "$W/upstream.conf"
wait_for 10 "upstream listening" listening "$UP"

# ------------------------------------------------------------------ dev issuer and proxy
FIXED=(--fixed-token "$TOKEN"); ((SUBJECTS)) && FIXED=()   # per subject: a token per user
start issuer "$BIN" dev-issuer --listen "127.0.0.1:$ISSUER" --lifetime 600 \
  --client-id e2e --client-secret e2e-secret "${FIXED[@]}"
wait_for 10 "issuer listening" listening "$ISSUER"
cat >"$W/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY"
workers = 1
drain_delay = "0s"
shutdown_grace = "1s"
$( ((TLS_UP)) && echo "ca_file = \"$W/ca.pem\"")
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
level = "warn"
format = "text"
EOF
if ((INTERCEPT)); then
  "$BIN" ca init --out "$W/ca" >"$W/ca.log" 2>&1 || die "ca init failed: $(cat "$W/ca.log")"
  cat >>"$W/proxy.toml" <<EOF
[proxy.intercept]
ca_cert_file = "$W/ca/ca.crt"
ca_key_file = "$W/ca/ca.key"
EOF
fi
REDIRECT=http://app.bench.test/callback
if ((SUBJECTS)); then
  mkdir -p "$W/state"
  head -c 32 /dev/urandom | base64 >"$W/subjects.key"
  STORE="state_dir = \"$W/state\""
  if ((REDIS)); then
    mkdir -p "$W/redis"
    start redis redis-server --bind 127.0.0.1 --port "$RED" --dir "$W/redis" --save '' \
      --appendonly yes
    wait_for 10 "redis listening" listening "$RED"
    STORE="store = \"redis\""
    printf '[redis]\nurl = "redis://127.0.0.1:%s"\n' "$RED" >>"$W/proxy.toml"
  fi
  cat >>"$W/proxy.toml" <<EOF
[subjects]
listen = "127.0.0.1:$SUBJ_API"
$STORE
encryption_key_file = "$W/subjects.key"
[[routes]]
name = "check"
host = "check.bench.test"
token = "e2e1"
upstream = "http://127.0.0.1:$ISSUER"
EOF
  GRANT='grant_type = "authorization_code"
per_subject = true
redirect_uri = "'$REDIRECT'"'
else
  GRANT='grant_type = "client_credentials"'
fi
for ((i = 1; i <= CREDENTIALS; i++)); do   # route api<i> -> token e2e<i>, all to the same upstream
  cat >>"$W/proxy.toml" <<EOF
[tokens.e2e$i]
token_url = "http://127.0.0.1:$ISSUER/api/v1/token"
$GRANT
client_id = "e2e"
client_secret = "e2e-secret"
refresh_ratio = 0.75
[[routes]]
name = "api$i"
host = "api$i.bench.test"
token = "e2e$i"
upstream = "$UP_SCHEME://127.0.0.1:$UP"
EOF
done
ready() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$ADMIN/readyz") == 200 ]]; }
stopped() { ! kill -0 "$1" 2>/dev/null; }
rss() { awk '/^Vm(RSS|HWM):/ {printf "%s %s %s  ", $1, $2, $3}' "/proc/$1/status"; }
SUBJ_HEAD=()
if ((SUBJECTS)); then
  # The enrolment, without valgrind: each worker asks the issuer's authorize endpoint for user
  # uI's code and posts it to the subjects API as subject sI.
  cat >"$W/enrol.py" <<'PY'
import concurrent.futures, http.client, json, sys, urllib.parse

issuer, api, n, redirect = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
WORKERS = 8

def worker(k):
    iss = http.client.HTTPConnection("127.0.0.1", issuer, timeout=30)
    sub = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    for i in range(k + 1, n + 1, WORKERS):
        q = urllib.parse.urlencode({"client_id": "e2e", "redirect_uri": redirect,
                                    "state": "x", "user": f"u{i}"})
        iss.request("GET", f"/api/v1/authorize?{q}")
        r = iss.getresponse(); r.read()
        loc = urllib.parse.urlparse(r.getheader("location") or "")
        code = urllib.parse.parse_qs(loc.query).get("code", [""])[0]
        if r.status != 302 or not code:
            raise SystemExit(f"authorize for u{i}: HTTP {r.status}")
        sub.request("POST", f"/v1/tokens/e2e1/subjects/s{i}/code",
                    body=json.dumps({"code": code}),
                    headers={"content-type": "application/json"})
        r = sub.getresponse(); body = r.read()
        if r.status != 201:
            raise SystemExit(f"enrolling s{i}: HTTP {r.status} {body[:200]!r}")

with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
    for f in [ex.submit(worker, k) for k in range(WORKERS)]:
        f.result()
PY
  start proxy-native "$BIN" run --config "$W/proxy.toml"
  native=$LAST_PID
  wait_for 30 "proxy listening" listening "$PROXY"
  wait_for 30 "subjects API listening" listening "$SUBJ_API"
  wait_for 30 "proxy ready" ready
  rss_none=$(rss "$native")
  say "enrolling $SUBJECTS subjects"; t0=$SECONDS
  timeout -k 5 1800 python3 "$W/enrol.py" "$ISSUER" "$SUBJ_API" "$SUBJECTS" "$REDIRECT" \
    >"$W/enrol.log" 2>&1 || die "enrolment failed: $(tail -5 "$W/enrol.log")"
  enrol_secs=$((SECONDS - t0))
  rss_all=$(rss "$native")
  kill -TERM -- "-$native"; wait_for 30 "the unmeasured proxy stopping" stopped "$native"
  SUBJ_HEAD=(-H "X-Bearer-Proxy-Subject: s1")
fi
# Instruction counts only (callgrind's default: no cache or branch simulation).
start proxy valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out.%p" \
  "$BIN" run --config "$W/proxy.toml"
PROXY_PID=$LAST_PID PROXY_T0=$SECONDS
wait_for 300 "proxy (under valgrind) listening" listening "$PROXY"
wait_for 60 "proxy ready (token fetched)" ready
got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 10 "${SUBJ_HEAD[@]}" \
  -x "http://127.0.0.1:$PROXY" "http://api1.bench.test/$SIZE")
[[ $got == "200 $BYTES" ]] || die "a proxied request gave '$got', not '200 $BYTES'"
if ((INTERCEPT)); then
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 30 \
    --cacert "$W/ca/ca.crt" -x "http://127.0.0.1:$PROXY" https://api1.bench.test/small)
  [[ $got == "200 12" ]] || die "an intercepted request gave '$got', not '200 12'"
fi
# Per subject: the issuer's data stand-in names the user whose token the proxy injected.
for j in 1 "$ACTIVE" "$SUBJECTS"; do
  ((SUBJECTS)) || break
  got=$(curl -s --max-time 30 -H "X-Bearer-Proxy-Subject: s$j" -x "http://127.0.0.1:$PROXY" \
    http://check.bench.test/api/fdx/accounts)
  [[ $got == *'"user":"u'$j'"'* ]] || die "subject s$j's request reached the issuer as '$got'"
done

# ------------------------------------------------------------------ measurement
# The client: CONNS keep-alive connections, each sending its share of the requests one after
# another (like wrk; no pipelining), every answer checked (200 and the whole body). The
# connections are opened and warmed up before the counters are zeroed and closed after the dump,
# so the window holds exactly REQUESTS requests and no connection setup or teardown.
cat >"$W/client.py" <<'PY'
import asyncio, itertools, ssl, subprocess, sys, urllib.request

proxy_port, conns, warmup, requests, pid, stub_port, credentials, active = map(int, sys.argv[1:9])
ca = sys.argv[9]   # intercept: CONNECT, then TLS trusting this CA; "" for plain forward mode
path = sys.argv[10]   # /small or /16k, and the body every answer must carry
with open(sys.argv[11], "rb") as f:
    BODY = f.read()
redis_port, work = sys.argv[12], sys.argv[13]   # --redis: its port ("" without), where to write
# connection i always uses route api<i mod credentials + 1>; per subject (active > 0) the
# requests name the subjects s1..s<active> in turn, over all connections
REQS = [f"GET http://api{k}.bench.test{path} HTTP/1.1\r\nHost: api{k}.bench.test\r\n\r\n".encode()
        for k in range(1, credentials + 1)]
SUBJ = [f"GET http://api1.bench.test{path} HTTP/1.1\r\nHost: api1.bench.test\r\n"
        f"X-Bearer-Proxy-Subject: s{j}\r\n\r\n".encode() for j in range(1, active + 1)]
turn = itertools.count()
TLS_REQ = f"GET {path} HTTP/1.1\r\nHost: api1.bench.test\r\n\r\n".encode()

async def one(reader, writer, req):
    writer.write(req)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = head.split(b" ", 2)[1]
    length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    if status != b"200" or body != BODY:
        raise SystemExit(f"unexpected answer: {head!r} {body!r}")

async def run(streams, total):
    async def conn(i, n):
        for _ in range(n):
            req = (TLS_REQ if ca else SUBJ[next(turn) % active] if active
                   else REQS[i % credentials])
            await one(*streams[i], req)
    share = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    await asyncio.gather(*(conn(i, share[i]) for i in range(conns)))

def control(arg):
    out = subprocess.run(["callgrind_control", arg, str(pid)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"callgrind_control {arg} failed: {out.stdout}{out.stderr}")

def accepts():  # connections the upstream has accepted (its stub_status; this read is one)
    with urllib.request.urlopen(f"http://127.0.0.1:{stub_port}/", timeout=10) as r:
        return int(r.read().decode().splitlines()[2].split()[0])

async def open_one():
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    if ca:
        writer.write(b"CONNECT api1.bench.test:443 HTTP/1.1\r\nHost: api1.bench.test:443\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if head.split(b" ", 2)[1] != b"200":
            raise SystemExit(f"CONNECT answered {head!r}")
        await asyncio.wait_for(writer.start_tls(ssl.create_default_context(cafile=ca),
                                                server_hostname="api1.bench.test"), 60)
    return reader, writer

def redis_stats(name):  # Redis' per-command counts, read exactly at the window's edges
    if redis_port:
        out = subprocess.run(["redis-cli", "-p", redis_port, "info", "commandstats"],
                             capture_output=True, text=True, timeout=30, check=True)
        with open(f"{work}/redis-{name}.txt", "w") as f:
            f.write(out.stdout.replace("\r", ""))

async def main():
    streams = [await open_one() for _ in range(conns)]
    await run(streams, warmup)
    a0 = accepts()
    redis_stats("before")
    control("--zero")
    await run(streams, requests)
    control("--dump=load")
    redis_stats("after")
    print("upstream_connections_opened", accepts() - a0 - 1)
    for _, writer in streams:
        writer.close()

asyncio.run(main())
PY
served() {  # sum of bearer_proxy_requests_total over its series
  curl -s --max-time 10 "http://127.0.0.1:$ADMIN/metrics" |
    awk '/^bearer_proxy_requests_total[{ ]/ {s += $NF} END {printf "%d\n", s}'
}
upstream_requests() { curl -s --max-time 10 "http://127.0.0.1:$STUB/" | awk 'NR == 3 {print $3}'; }
newest_dump() { { ls -t "$OUT"/callgrind.out."$PROXY_PID".* 2>/dev/null || true; } | head -1; }
complete_dump() {  # FILE_BEFORE: a newer dump exists and has its totals line
  local f; f=$(newest_dump); [[ -n $f && $f != "$1" ]] && grep -qE '^(summary|totals):' "$f"
}
dumped() {  # FILE_BEFORE -> the new dump's file, once complete
  wait_for 60 "a callgrind dump" complete_dump "$1"; newest_dump
}
total_ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

if ((SUBJECTS)); then
  # The keep-alive's first pass over the store runs a minute after start (FIRST_SWEEP_DELAY);
  # let it happen before the windows (the idle window shows whether it was over).
  say "waiting for the subjects keep-alive's first pass (a minute after start)"
  while ((SECONDS < PROXY_T0 + 75)); do sleep 1; done
fi
say "idle window: ${IDLE}s without requests"
before=$(newest_dump)
callgrind_control --zero "$PROXY_PID" >"$W/control.log" 2>&1 || die "callgrind_control --zero failed"
sleep "$IDLE"
callgrind_control --dump=idle "$PROXY_PID" >>"$W/control.log" 2>&1 || die "callgrind_control --dump failed"
idle_ir=$(total_ir "$(dumped "$before")")

say "load: $CONNS connections, $((WARMUP * CONNS)) warm-up requests, then $REQUESTS measured"
CA_ARG=""; ((INTERCEPT)) && CA_ARG=$W/ca/ca.crt
# Redis commands other than the health check's PINGs (INFO itself is counted after reading)
# Redis commands in the measured window (the client reads INFO commandstats at its edges):
# FILE_BEFORE FILE_AFTER -> "total cmd=n cmd=n…", PING and the INFO that read the first file left out
redis_delta() {
  awk -F'[:=,]' '/^cmdstat_/ {c = substr($1, 9); if (FILENAME == ARGV[1]) b[c] = $3; else a[c] = $3}
    END {a["info"]--; for (c in a) if (c != "ping" && a[c] - b[c] > 0) {t += a[c] - b[c]; l = l " " c "=" a[c] - b[c]}
         print t + 0 l}' "$1" "$2"
}
before=$(newest_dump); r0=$(served); u0=$(upstream_requests); t0=$SECONDS
timeout -k 5 1800 python3 "$W/client.py" "$PROXY" "$CONNS" $((WARMUP * CONNS)) "$REQUESTS" \
  "$PROXY_PID" "$STUB" "$CREDENTIALS" "$ACTIVE" "$CA_ARG" "/$SIZE" "$W/www/$SIZE" "$( ((REDIS)) && echo "$RED")" "$W" >"$W/client.log" 2>&1 || die "client failed: $(tail -5 "$W/client.log")"
file=$(dumped "$before")
secs=$((SECONDS - t0))
r1=$(served); u1=$(upstream_requests)
ir=$(total_ir "$file")
opened=$(awk '$1 == "upstream_connections_opened" {print $2}' "$W/client.log")
pooled=$(curl -s --max-time 10 "http://127.0.0.1:$STUB/" | awk 'NR == 1 {print $3 - 1}')
# stub_status counts its own reads: ours (the second includes itself) and the client's two
served_n=$((r1 - r0)) up_n=$((u1 - u0 - 3)) expect=$((WARMUP * CONNS + REQUESTS))
((INTERCEPT)) && served_n=$((served_n - CONNS))   # the proxy also counts each CONNECT
((served_n == expect && up_n == expect)) ||
  die "the proxy counted $served_n requests and the upstream $up_n; the client sent $expect"
{
  echo "binary: $BIN (sha256 $(sha256sum "$BIN" | cut -c1-12))"
  echo "workload: bp-fwd, GET http://apiN.bench.test/$SIZE ($UP_SCHEME upstream), $CREDENTIALS route(s) each with its" \
    "own token, $CONNS keep-alive connections, $((WARMUP * CONNS)) warm-up + $REQUESTS measured" \
    "requests (${secs}s)"
  echo "idle window (${IDLE}s, no requests): $idle_ir instructions"
  echo "measured window: $ir instructions for $REQUESTS requests" \
    "(proxy and upstream each counted all $expect)"
  echo "upstream connections: $pooled open after the run, $opened opened during the measured window"
  ((INTERCEPT)) && echo "intercepted: CONNECT api1.bench.test:443 + TLS (proxy's leaf), then" \
    "origin-form requests inside each connection"
  if ((SUBJECTS)); then
    echo "per subject: $SUBJECTS subjects enrolled (${enrol_secs}s), requests name s1..s$ACTIVE in" \
      "turn; s1, s$ACTIVE and s$SUBJECTS checked to reach the issuer with their user's token"
    echo "proxy RSS without valgrind, no subject: $rss_none"
    echo "proxy RSS without valgrind, $SUBJECTS enrolled: $rss_all"
    ((REDIS)) && echo "store: redis; commands other than PING during the measured window:" \
      "$(redis_delta "$W/redis-before.txt" "$W/redis-after.txt")"
  fi
  awk -v ir="$ir" -v n="$REQUESTS" 'BEGIN {printf "instructions per request: %.0f\n", ir / n}'
  echo "profile: callgrind_annotate --inclusive=yes $file"
} | tee "$OUT/result.txt"
