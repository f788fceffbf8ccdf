//! Issue #10, the proxy half: waits a peer could stretch forever (silent clients, stalled
//! upstream bodies, silent tunnels, an admin-port flood), framing the guard and hyper must
//! agree on (chunk sizes with leading zeros, upstream `Transfer-Encoding`, a client's broken
//! chunked body), and the smaller request checks (TRACE/TRACK in any case, dot segments under
//! a base path, targets the URI parser refuses). Real sockets throughout; each test failed
//! before its fix.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bearer_proxy::admin::{Admin, MAX_CONNECTIONS};
use bearer_proxy::metrics::Metrics;
use bearer_proxy::shutdown::ShutdownController;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::support::*;

const TOKEN: &str = "tok-hardening";

/// A proxy with `[proxy]` settings `extra` (unrouted hosts forwarded) and a token published.
async fn proxy(extra: &str, routes: &str) -> TestProxy {
    let cfg = config(&format!(
        "[proxy]\nunmatched = \"forward\"\nconnect = \"tunnel\"\ntoken_wait = \"100ms\"\n{extra}\n{routes}"
    ));
    let p = TestProxy::start(&cfg).await;
    p.publish(TOKEN);
    p
}

/// Polls `p`'s metric `series` until it is `want`; fails after [`PATIENCE`].
async fn until_metric(p: &TestProxy, series: Metric, want: f64) {
    let deadline = Instant::now() + PATIENCE;
    while p.metric(series.clone()) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {:?}, expected {want}",
            p.metric(series.clone())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that reads one request head per connection, writes `answer` and then keeps the
/// connection open without another byte until the proxy closes it. Counts connections still
/// open.
async fn stalling_upstream(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() {
                    let _ = s.write_all(answer).await;
                    // Hold until the proxy goes.
                    let mut sink = [0u8; 1024];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

async fn until_zero(open: &AtomicUsize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while open.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "{what} was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Untimed waits

/// `max_connections` clients that connect and never send a byte (and one that goes silent
/// after a first exchange) are closed after `idle_timeout`, so a new client is served.
#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let up = Upstream::plain(|_, _| Reply::ok("ok")).await;
    let p = proxy(
        "max_connections = 3\nidle_timeout = \"300ms\"\nheader_read_timeout = \"10s\"",
        "",
    )
    .await;
    let url = format!("http://127.0.0.1:{}/x", up.addr.port());
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(connect(p.addr).await);
    }
    // The third slot: one exchange, then silence on the keep-alive connection.
    let mut kept = connect(p.addr).await;
    kept.write_all(format!("GET {url} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut kept).await.unwrap().status, 200);
    // All slots are taken; this one is served once the silent ones are closed.
    let resp = get(p.addr, &url, &[]).await;
    assert_eq!(resp.status, 200);
    for mut s in silent {
        assert!(closed(&mut s).await, "a silent connection stayed open");
    }
    assert!(
        closed(&mut kept).await,
        "an idle keep-alive connection stayed open"
    );
}

/// An upstream that sends its head and part of the body, then stalls: the client's answer is
/// cut (a chunked body without its terminator, a length-delimited body short), the stall is
/// counted as `body_timeout`, and both the upstream connection and the client's slot are
/// released, also when the client has already gone.
#[tokio::test]
async fn a_stalled_upstream_body_is_cut_and_counted() {
    let p = proxy("idle_timeout = \"300ms\"", "").await;
    for (answer, shape) in [
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"[..],
            "chunked",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            "length",
        ),
    ] {
        let (addr, open) = stalling_upstream(answer).await;
        let mut s = connect(p.addr).await;
        s.write_all(format!("GET http://{addr}/ HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert!(
            read_response(&mut s).await.is_err(),
            "{shape}: the cut answer looked complete"
        );
        until_zero(&open, "the upstream connection").await;
    }
    // The client goes away after the head: everything is still released.
    let (addr, open) =
        stalling_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await;
    let mut s = connect(p.addr).await;
    s.write_all(format!("GET http://{addr}/ HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_head(&mut s).await;
    drop(s);
    until_zero(&open, "the upstream connection of a gone client").await;
    until_metric(&p, metric("bearer_proxy_open_connections"), 0.0).await;
    assert_eq!(
        p.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "body_timeout")
                .label("route", "unmatched")
        ),
        Some(3.0)
    );
}

/// A 401 whose body stalls: the consent probe gives up after `idle_timeout` with a 504 of the
/// proxy's own instead of holding the request forever.
#[tokio::test]
async fn a_stalled_401_body_does_not_hold_the_consent_probe() {
    let (addr, open) =
        stalling_upstream(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100\r\n\r\n{\"code\"")
            .await;
    let p = proxy(
        "idle_timeout = \"300ms\"",
        &format!(
            "[[routes]]\nname = \"bank\"\nhost = \"bank.test\"\ntoken = \"flinks\"\nupstream = \"http://{addr}\"\n"
        ),
    )
    .await;
    let resp = get(p.addr, "http://bank.test/x", &[]).await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_timeout"));
    until_zero(&open, "the upstream connection").await;
    assert_eq!(
        p.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "body_timeout")
                .label("route", "bank")
        ),
        Some(1.0)
    );
}

/// A tunnel to a host that never says anything is closed after the idle timeout once the
/// client has gone (before, it kept its slot forever).
#[tokio::test]
async fn a_silent_tunnel_is_closed_after_the_idle_timeout() {
    // A host that accepts and then neither reads nor writes nor closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let p = proxy("idle_timeout = \"300ms\"", "").await;
    let mut s = connect(p.addr).await;
    s.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    until_metric(&p, metric("bearer_proxy_open_tunnels"), 1.0).await;
    // Half-close from the client; the remote host stays silent and open.
    s.shutdown().await.unwrap();
    until_metric(&p, metric("bearer_proxy_open_tunnels"), 0.0).await;
    until_metric(&p, metric("bearer_proxy_open_connections"), 0.0).await;
    assert!(closed(&mut s).await);
    held.abort();
}

/// A flood of silent connections to the admin port is capped at [`MAX_CONNECTIONS`]: beyond
/// that the listener stops accepting (the kernel's backlog holds the rest), so the process
/// keeps its file descriptors; once they go, probes are answered again.
#[tokio::test]
async fn the_admin_port_caps_its_connections() {
    let (_ctl, shutdown) = ShutdownController::new();
    let admin = Admin::new(&Default::default(), Metrics::new(), shutdown);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin.serve(listener));
    let mut flood = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut probe = TcpStream::connect(addr).await.unwrap();
    probe
        .write_all(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), read_head(&mut probe)).await;
    assert!(
        early.is_err(),
        "connection {} was served",
        MAX_CONNECTIONS + 1
    );
    drop(flood);
    let resp = read_response(&mut probe).await.unwrap();
    assert_eq!(resp.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Framing

/// A chunk-size line of 20 hex digits (leading zeros, value 5) is valid to hyper, so the guard
/// keeps following the stream and refuses what comes next: neither a CL+TE request nor a
/// `gzip, chunked` one reaches the upstream (before, the guard gave up on the connection).
#[tokio::test]
async fn leading_zero_chunk_sizes_do_not_blind_the_guard() {
    let up = Upstream::plain(|r, _| Reply::ok(&format!("up {}", r.target))).await;
    let p = proxy("", "").await;
    let host = format!("127.0.0.1:{}", up.addr.port());
    for next in [
        "POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /gzip HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ] {
        let req = format!(
            "POST http://{host}/first HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             00000000000000000005\r\nhello\r\n0\r\n\r\n{}",
            next.replace("POST /", &format!("POST http://{host}/"))
        );
        let mut s = connect(p.addr).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut carry = Vec::new();
        let first = read_pipelined(&mut s, &mut carry).await.unwrap();
        assert_eq!(first.status, 200, "{}", first.text());
        let second = read_pipelined(&mut s, &mut carry).await.unwrap();
        assert_eq!(second.status, 400, "{next}");
        assert_eq!(second.proxy_error().as_deref(), Some("bad_request"));
        assert!(closed(&mut s).await);
    }
    let seen: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(seen, ["/first", "/first"]);
    assert!(up.requests().iter().all(|r| &r.body[..] == b"hello"));
}

/// An upstream answer with `Transfer-Encoding: chunked` and `Content-Length: 5` and a 20-byte
/// chunked body reaches the app as the 20 bytes, without the misleading length; one with
/// `gzip, chunked` is a 502.
#[tokio::test]
async fn upstream_transfer_codings_are_checked() {
    let p = proxy("", "").await;
    let both = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\
          14\r\n01234567890123456789\r\n0\r\n\r\n",
    )
    .await;
    let resp = get(p.addr, &format!("http://{both}/"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), None);
    assert_eq!(resp.body, b"01234567890123456789");

    let gzip = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let resp = get(p.addr, &format!("http://{gzip}/"), &[]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_reset"));
    assert_eq!(
        p.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "bad_response")
                .label("route", "unmatched")
        ),
        Some(1.0)
    );
}

/// A client's malformed chunked body is the client's fault: 400 `bad_request`, counted as a
/// rejected request, not as an upstream error.
#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_400() {
    let up = Upstream::plain(|_, _| Reply::ok("ok")).await;
    let p = proxy("", "").await;
    let host = format!("127.0.0.1:{}", up.addr.port());
    for body in ["5\r\nhello\r\nzz\r\n\r\n", "5\r\nhelloXY"] {
        let mut s = connect(p.addr).await;
        s.write_all(
            format!(
                "POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.status, 400, "{body:?}: {}", resp.text());
        assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));
        assert!(closed(&mut s).await);
    }
    assert_eq!(
        p.metric(metric("bearer_proxy_rejected_requests_total").label("reason", "bad_request")),
        Some(2.0)
    );
    assert_eq!(
        p.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "reset")
                .label("route", "unmatched")
        ),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------------------------
// Smaller request checks

/// TRACE and TRACK in any letter case are refused with the JSON 405 and never forwarded.
#[tokio::test]
async fn trace_and_track_are_refused_in_any_case() {
    let up = Upstream::plain(|_, _| Reply::ok("echo")).await;
    let p = proxy(
        "",
        &format!(
            "[[routes]]\nname = \"bank\"\nhost = \"bank.test\"\ntoken = \"flinks\"\nupstream = \"http://127.0.0.1:{}\"\n",
            up.addr.port()
        ),
    )
    .await;
    for method in ["TRACE", "trace", "Trace", "TRACK", "track"] {
        for url in [
            "http://bank.test/x".to_owned(),
            format!("http://127.0.0.1:{}/x", up.addr.port()),
        ] {
            let resp = raw(
                p.addr,
                format!("{method} {url} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
            )
            .await;
            assert_eq!(resp.status, 405, "{method} {url}");
            assert_eq!(resp.proxy_error().as_deref(), Some("method_not_allowed"));
        }
    }
    assert!(up.requests().is_empty());
}

/// A prefix route with a base path refuses `.`/`..` segments in every spelling: the token
/// never goes to a path outside the base.
#[tokio::test]
async fn dot_segments_never_leave_the_base_path() {
    let up = Upstream::plain(|r, _| Reply::ok(&format!("up {}", r.target))).await;
    let p = proxy(
        "",
        &format!(
            "[[routes]]\nname = \"bank\"\nhost = \"bank.test\"\npath_prefix = \"/bank\"\ntoken = \"flinks\"\nupstream = \"http://127.0.0.1:{}/base\"\n",
            up.addr.port()
        ),
    )
    .await;
    for path in [
        "/bank/../../escape",
        "/bank/%2e%2e/%2E%2e/escape",
        "/bank/.%2e/escape",
        "/bank/./x",
        "/bank/..;/escape",
        "/bank/..%2fescape",
    ] {
        let resp = raw(
            p.addr,
            format!("GET {path} HTTP/1.1\r\nHost: bank.test\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(resp.status, 400, "{path}: {}", resp.text());
        assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));
    }
    let resp = raw(
        p.addr,
        b"GET /bank/.well-known/x..y HTTP/1.1\r\nHost: bank.test\r\n\r\n",
    )
    .await;
    assert_eq!(resp.text(), "up /base/.well-known/x..y");
    let seen: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(seen, ["/base/.well-known/x..y"]);
}

/// A request target the `http` crate's URI parser refuses gets the proxy's JSON 400, not
/// hyper's bare one.
#[tokio::test]
async fn unparsable_targets_get_the_json_400() {
    let p = proxy("", "").await;
    for target in [
        "http://[::1/",
        "http://[::1]]:80/",
        "http://a:b:c/x",
        "http:///x",
    ] {
        let resp = raw(
            p.addr,
            format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(resp.status, 400, "{target}");
        assert_eq!(
            resp.proxy_error().as_deref(),
            Some("bad_request"),
            "{target}"
        );
    }
}
