//! The proxy port end to end: token injection, sanitising, refusals, limits, tunnels,
//! streaming, replay and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearer_proxy::proxy::pseudonym;
use bearer_proxy::shutdown::Phase;
use bearer_proxy::token::TokenCell;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::*;

const HOST: &str = "ob.flinksapp.test";

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
];

fn assert_no_hop_by_hop(r: &Recorded) {
    for h in HOP_BY_HOP {
        assert!(r.headers.get(h).is_none(), "{h} reached the upstream");
    }
}

#[tokio::test]
async fn curl_through_the_proxy_gets_exactly_one_token() {
    let f = fixture(HOST)
        .in_process(|_, _| Reply::ok(r#"{"accounts":[]}"#).header("ob-correlation-id", "corr-1"))
        .await;
    f.proxy.publish("tok-1");
    let proxy = f.proxy.addr;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/curl")
            .args([
                "-sS",
                "-i",
                "--max-time",
                "20",
                "-H",
                "Authorization: Bearer from-the-app",
                "-H",
                "TE: trailers",
                &format!("http://{HOST}/api/fdx/5/accounts?offset=0"),
            ])
            .env("http_proxy", format!("http://{proxy}"))
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("HTTP/1.1 200"), "{stdout}");
    assert!(stdout.contains(r#"{"accounts":[]}"#));
    assert!(
        stdout
            .to_ascii_lowercase()
            .contains("ob-correlation-id: corr-1")
    );

    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.target, "/api/fdx/5/accounts?offset=0");
    assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    assert_eq!(
        r.one("host").as_deref(),
        Some(format!("localhost:{}", f.upstream().addr.port()).as_str())
    );
    let via = r.all("via").join(", ");
    assert!(via.contains(&format!("1.1 {}", pseudonym())), "{via}");
    assert_no_hop_by_hop(r);
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_requests_total")
                .label("code", "200")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn unrouted_hosts_are_forwarded_without_a_token_and_with_the_apps_headers() {
    let plain = Upstream::plain(|_, _| Reply::ok("plain")).await;
    let f = fixture(HOST)
        .proxy(r#"unmatched = "forward""#)
        .in_process_to("https://localhost:9")
        .await;
    let proxy = &f.proxy;
    proxy.publish("tok-1");
    let url = format!("{}/plain?x=1", plain.url(false));
    let resp = get(
        proxy.addr,
        &url,
        &[
            "Authorization: Basic YXBwOnB3",
            "X-App: kept",
            "Connection: keep-alive, X-Hop",
            "X-Hop: gone",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: Basic cHJveHk6cHc=",
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "plain");
    let r = &plain.requests()[0];
    assert_eq!(r.target, "/plain?x=1");
    assert_eq!(r.all("authorization"), ["Basic YXBwOnB3"]);
    assert_eq!(r.one("x-app").as_deref(), Some("kept"));
    assert!(r.headers.get("x-hop").is_none());
    assert!(r.all("via").join(",").contains(pseudonym()));
    assert_no_hop_by_hop(r);
    assert_eq!(
        proxy.metric(
            metric("bearer_proxy_requests_total")
                .label("code", "200")
                .label("route", "unmatched")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_apps_authorization_is_replaced_even_if_connection_names_it() {
    let f = fixture(HOST).in_process(|_, _| Reply::ok("ok")).await;
    f.proxy.publish("tok-1");
    let resp = get(
        f.proxy.addr,
        &format!("http://{HOST}/a"),
        &[
            "Authorization: Bearer from-the-app",
            "Authorization: Basic second",
            "Connection: Authorization, keep-alive",
            "Keep-Alive: timeout=5",
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let resp = get(
        f.proxy.addr,
        &format!("http://{HOST}/b"),
        &["Connection: Authorization"],
    )
    .await;
    assert_eq!(resp.status, 200);
    for r in f.upstream().requests() {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"], "{}", r.target);
        assert_no_hop_by_hop(&r);
    }
}

#[tokio::test]
async fn lookalike_hosts_never_get_the_token() {
    let f = fixture(HOST)
        .proxy(r#"unmatched = "deny""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    f.proxy.publish("tok-1");
    for (url, status, code) in [
        (format!("http://{HOST}.evil/"), 403, "denied"),
        (format!("http://evil.{HOST}/"), 403, "denied"),
        (format!("http://x{HOST}/"), 403, "denied"),
        (format!("http://{HOST}:8443/"), 403, "denied"),
        (format!("http://{HOST}@evil.test/"), 400, "bad_request"),
        (format!("http://user:pw@{HOST}/"), 400, "bad_request"),
    ] {
        let resp = get(f.proxy.addr, &url, &[]).await;
        assert_eq!(resp.status, status, "{url}");
        assert_eq!(resp.proxy_error().as_deref(), Some(code), "{url}");
    }
    assert_eq!(
        f.upstream()
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The same host spelt differently is the route.
    let resp = get(f.proxy.addr, "http://OB.FlinksApp.TEST./x", &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        f.upstream().requests()[0].all("authorization"),
        ["Bearer tok-1"]
    );
}

#[tokio::test]
async fn connect_to_a_routed_host_is_refused_with_an_explanation() {
    let f = fixture(HOST).in_process(|_, _| Reply::ok("ok")).await;
    for port in [443, 8443] {
        let resp = raw(
            f.proxy.addr,
            format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(resp.status, 403);
        assert_eq!(
            resp.proxy_error().as_deref(),
            Some("connect_to_routed_host")
        );
        let message = resp.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("http://"), "{message}");
        assert!(message.contains("token"), "{message}");
    }
    assert_eq!(
        f.proxy
            .metric(metric("bearer_proxy_rejected_requests_total").label("reason", "denied")),
        Some(2.0)
    );
}

#[tokio::test]
async fn connect_tunnels_unrouted_hosts_end_to_end() {
    let echo = echo_server().await;
    let f = fixture(HOST)
        .proxy(r#"connect = "tunnel""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    let mut s = connect(f.proxy.addr).await;
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for message in [
        &b"hello through the tunnel"[..],
        &[0u8, 1, 2, 255, 13, 10, 13, 10],
    ] {
        s.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, message);
    }
    assert_eq!(
        f.proxy.metric(metric("bearer_proxy_open_tunnels")),
        Some(1.0)
    );
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_requests_total")
                .label("code", "200")
                .label("route", "connect")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn connect_can_be_denied() {
    let echo = echo_server().await;
    let f = fixture(HOST)
        .proxy(r#"connect = "deny""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    let resp = raw(
        f.proxy.addr,
        format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.proxy_error().as_deref(), Some("denied"));
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_the_upstream_never_contacted() {
    let f = fixture(HOST).in_process(|_, _| Reply::ok("ok")).await;
    f.proxy.publish("tok-1");
    let shapes = [
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        "Content-Length: 3\r\nContent-Length: 3\r\n",
        "Content-Length: 3\r\nContent-Length: 4\r\n",
        "Content-Length: 3, 3\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding:\r\n chunked\r\n",
    ];
    for shape in shapes {
        let mut s = connect(f.proxy.addr).await;
        let req = format!(
            "POST http://{HOST}/x HTTP/1.1\r\nHost: {HOST}\r\n{shape}\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.status, 400, "{shape:?}");
        assert_eq!(
            resp.proxy_error().as_deref(),
            Some("bad_request"),
            "{shape:?}"
        );
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(closed(&mut s).await, "{shape:?}: connection left open");
    }
    assert_eq!(
        f.upstream()
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        f.proxy
            .metric(metric("bearer_proxy_rejected_requests_total").label("reason", "bad_request")),
        Some(shapes.len() as f64)
    );
    // A well-framed chunked request on the same proxy still works.
    let resp = raw(
        f.proxy.addr,
        format!("POST http://{HOST}/ok HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(&f.upstream().requests()[0].body[..], b"abc");
}

#[tokio::test]
async fn oversized_header_sections_get_a_json_431_even_when_split() {
    let f = fixture(HOST)
        .proxy("max_header_bytes = 4096")
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    f.proxy.publish("tok-1");
    let big = "a".repeat(8000);
    let resp = get(
        f.proxy.addr,
        &format!("http://{HOST}/"),
        &[&format!("X-Big: {big}")],
    )
    .await;
    assert_eq!(resp.status, 431);
    assert_eq!(resp.proxy_error().as_deref(), Some("header_too_large"));

    // Many small writes, far beyond hyper's own buffer.
    let mut s = connect(f.proxy.addr).await;
    s.set_nodelay(true).unwrap();
    let head = format!("GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ");
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..400 {
        if s.write_all(&[b'b'; 100]).await.is_err() {
            break;
        }
    }
    let resp = read_response(&mut s).await.unwrap();
    assert_eq!(resp.status, 431);
    assert_eq!(resp.proxy_error().as_deref(), Some("header_too_large"));
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_rejected_requests_total").label("reason", "header_too_large")
        ),
        Some(2.0)
    );
    assert_eq!(
        f.upstream()
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn slowloris_is_cut_by_header_read_timeout() {
    let f = fixture(HOST)
        .proxy(r#"header_read_timeout = "200ms""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    let s = connect(f.proxy.addr).await;
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    // One byte every 50ms: each write is progress, but the head never completes.
    let trickle = tokio::spawn(async move {
        let head = format!("GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ");
        w.write_all(head.as_bytes()).await.ok();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if w.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    let mut sink = Vec::new();
    let read = tokio::time::timeout(PATIENCE, r.read_to_end(&mut sink)).await;
    let waited = start.elapsed();
    trickle.abort();
    assert!(read.is_ok(), "the connection was never closed");
    assert!(sink.is_empty(), "no answer is owed to a slowloris");
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn an_upstream_with_an_untrusted_certificate_gets_no_request() {
    let other = TestCa::new();
    let upstream = Upstream::tls(
        other.server_config(&["localhost"], &[b"http/1.1"]),
        |_, _| Reply::ok("should not happen"),
    )
    .await;
    let f = fixture(HOST).in_process_to(&upstream.url(true)).await;
    let proxy = &f.proxy;
    proxy.publish("tok-1");
    let resp = get(proxy.addr, &format!("http://{HOST}/"), &[]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_tls"));
    assert!(upstream.requests().is_empty());
    assert!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    assert_eq!(
        proxy.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "tls")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn without_a_token_the_answer_is_503_with_retry_after() {
    let f = fixture(HOST)
        .proxy(r#"token_wait = "200ms""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    let start = Instant::now();
    let resp = get(f.proxy.addr, &format!("http://{HOST}/"), &[]).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(resp.status, 503);
    assert_eq!(resp.proxy_error().as_deref(), Some("token_unavailable"));
    let retry: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry));
    assert_eq!(
        f.upstream()
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_rejected_requests_total").label("reason", "token_unavailable")
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_body_streams_through_in_constant_memory() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let upstream = Upstream::plain(|r, _| {
        if r.method == "POST" {
            Reply::ok(&r.body_len.to_string())
        } else {
            Reply {
                body: ReplyBody::Zeros(SIZE),
                ..Reply::status(200)
            }
        }
    })
    .await;
    let f = fixture(HOST).in_process_to(&upstream.url(false)).await;
    let proxy = &f.proxy;
    proxy.publish("tok-1");
    let before = peak_rss();

    // Upload, generated on the fly.
    let mut s = connect(proxy.addr).await;
    let head = format!(
        "POST http://{HOST}/upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {SIZE}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut left = SIZE;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n as u64;
    }
    let resp = read_response(&mut s).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.text(),
        SIZE.to_string(),
        "the upstream counted every byte"
    );
    assert_eq!(
        upstream.requests()[0].all("authorization"),
        ["Bearer tok-1"]
    );

    // Download, counted without keeping it.
    s.write_all(format!("GET http://{HOST}/download HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {SIZE}")),
        "{head}"
    );
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < SIZE {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "ended after {got} bytes");
        got += n as u64;
    }
    assert_eq!(got, SIZE);

    // The whole process (client, proxy and upstream run here) grew by far less than one body.
    // Other tests run concurrently in this process, so the bound is generous: buffering either
    // body would add at least 200 MiB.
    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS before {} MiB, growth {} KiB",
        before >> 20,
        grown >> 10
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "peak RSS grew by {} MiB",
        grown >> 20
    );
}

#[tokio::test]
async fn graceful_stop_finishes_the_request_in_flight_and_closes_idle_connections() {
    let gate = Gate::new();
    let held = gate.clone();
    let mut f = fixture(HOST)
        .in_process(move |r, _| {
            if r.target == "/slow" {
                Reply::ok("finished").gated(held.clone())
            } else {
                Reply::ok("fast")
            }
        })
        .await;
    f.proxy.publish("tok-1");

    let mut idle = connect(f.proxy.addr).await;
    idle.write_all(format!("GET http://{HOST}/fast HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.unwrap().status, 200);

    let mut busy = connect(f.proxy.addr).await;
    busy.write_all(format!("GET http://{HOST}/slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    f.upstream().wait_requests(2).await;

    f.proxy.shutdown.advance(Phase::Stopping);
    assert!(
        closed(&mut idle).await,
        "idle keep-alive connection stays open"
    );
    let serving = f.proxy.serving.take().unwrap();
    assert!(
        !serving.is_finished(),
        "serve returned with a request in flight"
    );
    assert!(
        tokio::net::TcpStream::connect(f.proxy.addr).await.is_err(),
        "still accepting"
    );

    gate.open();
    let resp = read_response(&mut busy).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "finished");
    tokio::time::timeout(PATIENCE, serving)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        f.proxy.metric(metric("bearer_proxy_open_connections")),
        Some(0.0)
    );
}

#[tokio::test]
async fn terminated_returns_at_once() {
    let gate = Gate::new();
    let held = gate.clone();
    let mut f = fixture(HOST)
        .in_process(move |_, _| Reply::ok("never").gated(held.clone()))
        .await;
    f.proxy.publish("tok-1");
    let mut busy = connect(f.proxy.addr).await;
    busy.write_all(format!("GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    f.upstream().wait_requests(1).await;
    f.proxy.stop(Phase::Terminated).await;
    assert!(read_response(&mut busy).await.is_err());
    assert_eq!(
        f.proxy.metric(metric("bearer_proxy_open_connections")),
        Some(0.0)
    );
    drop(gate);
}

#[tokio::test]
async fn a_truncated_upstream_body_reaches_the_client_as_a_failure() {
    let cut_length =
        raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly a start").await;
    let cut_chunked = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwor",
    )
    .await;
    for upstream in [cut_length, cut_chunked] {
        let f = fixture(HOST)
            .in_process_to(&format!("http://{upstream}"))
            .await;
        let proxy = &f.proxy;
        proxy.publish("tok-1");
        assert_cut_short(proxy.addr, HOST, "/").await;
    }
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let f = fixture(HOST)
        .in_process(|_, _| {
            Reply::status(302).header("location", "https://elsewhere.test/statement.pdf")
        })
        .await;
    f.proxy.publish("tok-1");
    let resp = get(f.proxy.addr, &format!("http://{HOST}/statements/1"), &[]).await;
    assert_eq!(resp.status, 302);
    assert_eq!(
        resp.header("location"),
        Some("https://elsewhere.test/statement.pdf")
    );
    assert_eq!(f.upstream().requests().len(), 1);
}

/// A route whose upstream rejects the first request (publishing a new token first, as the
/// refresher would) and then answers with `then`.
async fn rejecting_fixture(then: u16, first_body: &'static str) -> (ProxyFixture, Arc<TokenCell>) {
    let cell = TokenCell::new("flinks", Duration::from_secs(5));
    cell.publish(token("tok-1"));
    let refresher = cell.clone();
    let handler = move |_: &Recorded, i: usize| {
        if i == 0 {
            refresher.publish(token("tok-2"));
            Reply::status(401).body(first_body)
        } else {
            Reply::status(then).body("second")
        }
    };
    let f = fixture(HOST)
        .proxy(r#"token_wait = "300ms""#)
        .cell(cell.clone())
        .in_process(handler)
        .await;
    (f, cell)
}

#[tokio::test]
async fn a_get_rejected_with_401_is_replayed_once_with_the_new_token() {
    let (f, _) = rejecting_fixture(200, r#"{"code":401,"message":"expired"}"#).await;
    let resp = raw(
        f.proxy.addr,
        format!(
            "PUT http://{HOST}/r?x=1 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\r\nbody"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "second");
    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].all("authorization"), ["Bearer tok-1"]);
    assert_eq!(reqs[1].all("authorization"), ["Bearer tok-2"]);
    for r in &reqs {
        assert_eq!((r.method.as_str(), r.target.as_str()), ("PUT", "/r?x=1"));
        assert_eq!(&r.body[..], b"body");
    }
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "ok")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_post_rejected_with_401_is_not_replayed() {
    let (f, _) = rejecting_fixture(200, r#"{"code":401}"#).await;
    let resp = raw(
        f.proxy.addr,
        format!("POST http://{HOST}/p HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n{{}}")
            .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.text(), r#"{"code":401}"#);
    assert_eq!(f.upstream().requests().len(), 1);
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "not_replayable")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
    // The next request uses the new token.
    let resp = get(f.proxy.addr, &format!("http://{HOST}/next"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        f.upstream().requests()[1].all("authorization"),
        ["Bearer tok-2"]
    );
}

#[tokio::test]
async fn a_revoked_consent_is_passed_through_without_a_refresh() {
    for body in [
        r#"{"code":602,"message":"consent revoked","debugMessage":"x"}"#,
        r#"{"code":"602","message":"consent expired"}"#,
    ] {
        let (f, cell) = rejecting_fixture(200, body).await;
        let resp = get(f.proxy.addr, &format!("http://{HOST}/accounts"), &[]).await;
        assert_eq!(resp.status, 401);
        assert_eq!(resp.text(), body, "the body is passed through intact");
        assert_eq!(f.upstream().requests().len(), 1);
        assert_eq!(
            f.proxy.metric(
                metric("bearer_proxy_replays_total")
                    .label("result", "consent_revoked")
                    .label("route", "fdx")
            ),
            Some(1.0)
        );
        // The handler published tok-2 itself; the proxy did not ask for anything.
        assert_eq!(cell.current().unwrap().generation(), 2);
    }
}

#[tokio::test]
async fn a_replay_rejected_again_is_passed_through() {
    let (f, _) = rejecting_fixture(401, "{}").await;
    let resp = get(f.proxy.addr, &format!("http://{HOST}/x"), &[]).await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.text(), "second");
    assert_eq!(f.upstream().requests().len(), 2);
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "rejected_again")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn without_a_newer_token_the_401_is_passed_through() {
    let f = fixture(HOST)
        .proxy(r#"token_wait = "200ms""#)
        .in_process(|_, _| Reply::status(401).body("nope"))
        .await;
    f.proxy.publish("tok-1");
    let resp = get(f.proxy.addr, &format!("http://{HOST}/x"), &[]).await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.text(), "nope");
    assert_eq!(f.upstream().requests().len(), 1);
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "no_new_token")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn loops_are_detected() {
    let f = fixture(HOST)
        .proxy(r#"unmatched = "forward""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    f.proxy.publish("tok-1");
    let via = format!("Via: 1.0 corp-proxy, 1.1 {}", pseudonym());
    let resp = get(f.proxy.addr, &format!("http://{HOST}/"), &[&via]).await;
    assert_eq!(resp.status, 508);
    assert_eq!(resp.proxy_error().as_deref(), Some("loop"));
    // A real loop: an unrouted URL that is the proxy itself.
    let resp = get(f.proxy.addr, &format!("http://{}/again", f.proxy.addr), &[]).await;
    assert_eq!(resp.status, 508);
    assert_eq!(resp.proxy_error().as_deref(), Some("loop"));
    assert!(f.upstream().requests().is_empty());
}

#[tokio::test]
async fn trace_is_refused() {
    let f = fixture(HOST).in_process(|_, _| Reply::ok("ok")).await;
    f.proxy.publish("tok-1");
    let resp = raw(
        f.proxy.addr,
        format!("TRACE http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.proxy_error().as_deref(), Some("method_not_allowed"));
    assert!(f.upstream().requests().is_empty());
}

#[tokio::test]
async fn origin_form_needs_a_route() {
    let f = fixture(HOST)
        .route(r#"path_prefix = "/flinks""#)
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    f.proxy.publish("tok-1");
    let me = f.proxy.addr;
    // No route: never forwarded anywhere (and in particular not to the proxy itself).
    let resp = raw(
        me,
        format!("GET /metrics HTTP/1.1\r\nHost: {me}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));
    assert!(
        resp.json()["message"]
            .as_str()
            .unwrap()
            .contains("absolute-form")
    );
    // Gateway mode: the prefix chooses the route and is stripped.
    let resp = raw(
        me,
        format!("GET /flinks/api/fdx/5/accounts?limit=5 HTTP/1.1\r\nHost: {me}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    // Host matching a route works in origin-form too.
    let resp = raw(
        me,
        format!("GET /direct HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    let reqs = f.upstream().requests();
    assert_eq!(reqs[0].target, "/api/fdx/5/accounts?limit=5");
    assert_eq!(reqs[1].target, "/direct");
    for r in &reqs {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    }
}

#[tokio::test]
async fn http2_is_used_when_the_upstream_offers_it() {
    let f = fixture(HOST)
        .alpn(&[b"h2", b"http/1.1"])
        .in_process(|_, _| Reply::ok("h2"))
        .await;
    f.proxy.publish("tok-1");
    let resp = get(f.proxy.addr, &format!("http://{HOST}/"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "h2");
    let r = &f.upstream().requests()[0];
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
}

#[tokio::test]
async fn upstream_failures_are_classified() {
    // Nothing listens on the port of a dropped listener.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let f = fixture(HOST)
        .in_process_to(&format!("https://localhost:{closed_port}"))
        .await;
    let proxy = &f.proxy;
    proxy.publish("tok-1");
    let resp = get(proxy.addr, &format!("http://{HOST}/"), &[]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_unreachable"));
    assert_eq!(
        proxy.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "connect")
                .label("route", "fdx")
        ),
        Some(1.0)
    );

    let gate = Gate::new();
    let held = gate.clone();
    let f = fixture(HOST)
        .proxy(r#"response_timeout = "200ms""#)
        .in_process(move |_, _| Reply::ok("late").gated(held.clone()))
        .await;
    f.proxy.publish("tok-1");
    let resp = get(f.proxy.addr, &format!("http://{HOST}/"), &[]).await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_timeout"));
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "timeout")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
    gate.open();
}

#[tokio::test]
async fn above_max_connections_new_connections_wait() {
    let f = fixture(HOST)
        .proxy("max_connections = 1")
        .in_process(|_, _| Reply::ok("ok"))
        .await;
    f.proxy.publish("tok-1");
    let request = format!("GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let mut first = connect(f.proxy.addr).await;
    first.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut first).await.unwrap().status, 200);

    let mut second = connect(f.proxy.addr).await;
    second.write_all(request.as_bytes()).await.unwrap();
    let waiting =
        tokio::time::timeout(Duration::from_millis(300), read_response(&mut second)).await;
    assert!(
        waiting.is_err(),
        "the second connection was served while the first was open"
    );

    drop(first);
    assert_eq!(read_response(&mut second).await.unwrap().status, 200);
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_never_a_token() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture(HOST)
        .configure(|config| config.log.access = true)
        .in_process(|_, _| {
            Reply::ok("ok")
                .header("ob-correlation-id", "corr-77")
                .header("ob-trace-id", "trace-88")
        })
        .await;
    let proxy = &f.proxy;
    proxy.publish("tok-secret-123");
    let resp = get(
        proxy.addr,
        &format!("http://{HOST}/api/fdx/5/accounts?account=private-query"),
        &["Authorization: Bearer app-secret-456"],
    )
    .await;
    assert_eq!(resp.status, 200);
    drop(_guard);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("bearer_proxy::access"))
        .collect();
    assert_eq!(access.len(), 1, "{text}");
    let line = access[0];
    for needle in [
        "method=GET",
        "route=\"fdx\"",
        "path=\"/api/fdx/5/accounts\"",
        "status=200",
        "duration_ms=",
        "corr-77",
        "trace-88",
        HOST,
    ] {
        assert!(line.contains(needle), "{needle} missing from {line}");
    }
    assert!(
        !line.contains("private-query"),
        "query string logged: {line}"
    );
    for secret in ["tok-secret-123", "app-secret-456"] {
        assert!(!text.contains(secret), "{secret} appears in the logs");
    }
}

// ---------------------------------------------------------------------------------------------
// With the real refresher and the dev issuer

/// The proxy, with the `flinks` token kept by a real refresher against a dev issuer, in front
/// of a TLS upstream answering through `handler`. Returns once the first token is in place.
async fn with_refresher(
    handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    proxy: &str,
) -> (ProxyFixture, bearer_proxy::issuer::IssuerControl) {
    use bearer_proxy::issuer::{DevIssuer, IssuerOptions};
    use bearer_proxy::token::refresher::Refresher;

    let issuer = DevIssuer::bind("127.0.0.1:0".parse().unwrap(), IssuerOptions::default())
        .await
        .unwrap();
    let control = issuer.control();
    let token_url = issuer.token_url();
    tokio::spawn(issuer.serve(std::future::pending()));

    // The in-process issuer answers at once unless the machine starves the test: a token
    // request timed out there would be retried, and the tests here count token requests.
    let setup = fixture(HOST).proxy(proxy).token(&format!(
        "token_url = \"{token_url}\"\nclient_secret = \"demo-secret\"\n\
         backoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\ntimeout = \"{}s\"",
        PATIENCE.as_secs()
    ));
    // The token's settings as the proxy parses them (the upstream does not change them).
    let token_cfg = config(&setup.toml("https://localhost:9")).tokens["flinks"].clone();
    let cell = TokenCell::new("flinks", token_cfg.forced_refresh_interval);
    let metrics = bearer_proxy::metrics::Metrics::new();
    let f = setup
        .cell(cell.clone())
        .metrics(metrics.clone())
        .in_process(handler)
        .await;
    Refresher::new(token_cfg, cell.clone(), metrics.token("flinks"))
        .unwrap()
        .spawn(f.proxy.shutdown.watcher());
    cell.wait_valid(PATIENCE).await.expect("first token");
    (f, control)
}

/// The bearer token a recorded request carried.
fn bearer(r: &Recorded) -> String {
    let auth = r.all("authorization");
    assert_eq!(auth.len(), 1, "{auth:?}");
    auth[0].strip_prefix("Bearer ").unwrap().to_owned()
}

/// Answers 401 to any request carrying the first token it saw (or to `/always-401`), once
/// `hold` such requests have arrived (so they are all in flight together); 200 otherwise.
fn reject_first_token(hold: usize) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    let first = Mutex::new(None::<String>);
    let rejected = Mutex::new(0usize);
    let gate = Gate::new();
    move |r, _| {
        let token = bearer(r);
        let mut first = first.lock().unwrap();
        let first = first.get_or_insert_with(|| token.clone());
        if r.target == "/always-401" {
            return Reply::status(401).body(r#"{"code":401}"#);
        }
        if token != *first {
            return Reply::ok("accepted");
        }
        let mut n = rejected.lock().unwrap();
        *n += 1;
        if *n >= hold {
            gate.open();
        }
        Reply::status(401)
            .body(r#"{"code":401,"message":"token expired"}"#)
            .gated(gate.clone())
    }
}

#[tokio::test]
async fn refresher_get_is_replayed_with_a_fresh_token_and_post_is_not() {
    let (f, issuer) = with_refresher(reject_first_token(1), "").await;
    let resp = get(
        f.proxy.addr,
        &format!("http://{HOST}/api/fdx/5/accounts"),
        &[],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "accepted");
    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 2);
    let (old, new) = (bearer(&reqs[0]), bearer(&reqs[1]));
    assert_ne!(old, new);
    assert!(
        issuer.is_valid_token(&new),
        "the replay carries an issued token"
    );
    assert_eq!(
        issuer.request_count(),
        2,
        "one start-up token, one forced refresh"
    );
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "ok")
                .label("route", "fdx")
        ),
        Some(1.0)
    );

    let resp = raw(
        f.proxy.addr,
        format!("POST http://{HOST}/always-401 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.text(), r#"{"code":401}"#);
    let posts: Vec<_> = f
        .upstream()
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "a POST is never sent twice");
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "not_replayable")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_401s_cause_one_token_request() {
    const N: usize = 50;
    // No answer comes before all fifty requests reached the upstream (the 401s are held until
    // the fiftieth arrives), the refresh is done and fifty replays went out. On a loaded
    // machine that takes longer than the defaults allow for connecting to the TLS upstream
    // (connect_timeout, 5 s: one request that fails there never reaches the upstream, so the
    // others are held until they time out), for the held 401s (response_timeout) and for the
    // replays' wait for the new token (token_wait), and longer than PATIENCE. LOAD_PATIENCE
    // for all of them.
    let patience = format!(
        "connect_timeout = \"{0}s\"\ntoken_wait = \"{0}s\"\nresponse_timeout = \"{0}s\"",
        LOAD_PATIENCE.as_secs()
    );
    let (f, issuer) = with_refresher(reject_first_token(N), &patience).await;
    assert_eq!(issuer.request_count(), 1);
    let addr = f.proxy.addr;
    let requests: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(async move {
                get_within(addr, &format!("http://{HOST}/r/{i}"), &[], LOAD_PATIENCE).await
            })
        })
        .collect();
    for r in requests {
        let resp = r.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(
        issuer.request_count(),
        2,
        "the 50 rejections shared one refresh"
    );
    let reqs = f.upstream().requests();
    assert_eq!(
        reqs.len(),
        2 * N,
        "each request was sent twice: rejected, then replayed"
    );
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "ok")
                .label("route", "fdx")
        ),
        Some(N as f64)
    );
}

#[tokio::test]
async fn with_the_token_endpoint_down_past_expiry_requests_get_503() {
    use bearer_proxy::issuer::Fault;

    let (f, issuer) = with_refresher(|_, _| Reply::ok("ok"), r#"token_wait = "300ms""#).await;
    let resp = get(f.proxy.addr, &format!("http://{HOST}/before"), &[]).await;
    assert_eq!(resp.status, 200);

    issuer.fail_next(u32::MAX, Fault::Unavailable);
    let expiry = f.proxy.cell().current().unwrap().expires_at();
    // Jump past the token's expiry on tokio's clock instead of waiting for it; the refresher's
    // retries during the jump all fail.
    tokio::time::pause();
    tokio::time::advance(expiry.saturating_duration_since(Instant::now()) + Duration::from_secs(1))
        .await;
    tokio::time::resume();
    assert!(f.proxy.cell().current().is_none(), "the token has expired");

    let resp = get(f.proxy.addr, &format!("http://{HOST}/after"), &[]).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.proxy_error().as_deref(), Some("token_unavailable"));
    assert!(resp.header("retry-after").is_some());
    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 1, "nothing was sent without a valid token");
    assert!(issuer.request_count() > 1, "the refresher kept trying");
}

/// What bare hyper (no wire guard) does with the framings the proxy refuses: it lets most of
/// them through to the service, silently resolved. This is why the proxy checks heads itself;
/// if a hyper upgrade starts refusing them, this test says so.
#[tokio::test]
async fn bare_hyper_lets_ambiguous_framing_through() {
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<(Option<String>, Option<String>)>::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h =
                            |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                        record
                            .lock()
                            .unwrap()
                            .push((h("content-length"), h("transfer-encoding")));
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let send = |head: &'static str| async move {
        raw(
            addr,
            format!("POST / HTTP/1.1\r\nHost: x\r\n{head}\r\n3\r\nabc\r\n0\r\n\r\n").as_bytes(),
        )
        .await
        .status
    };
    // Length and coding, both orders: accepted, the length silently dropped.
    assert_eq!(
        send("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n").await,
        200
    );
    assert_eq!(
        send("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n").await,
        200
    );
    // Repeated coding: accepted as chunked.
    assert_eq!(send("Transfer-Encoding: chunked, chunked\r\n").await, 200);
    // A repeated identical length: accepted, merged (the body here is the 3 bytes "3\r\n").
    assert_eq!(
        send("Content-Length: 3\r\nContent-Length: 3\r\n").await,
        200
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (None, Some("chunked".to_owned())),
            (None, Some("chunked".to_owned())),
            (None, Some("chunked, chunked".to_owned())),
            (Some("3".to_owned()), None),
        ]
    );
    // Conflicting lengths are the one shape hyper refuses itself (a bare 400).
    assert_eq!(
        send("Content-Length: 3\r\nContent-Length: 4\r\n").await,
        400
    );
}
