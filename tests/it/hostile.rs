//! Hostile input on the proxy port, over raw TCP: smuggling shapes, header limits split across
//! writes, absolute-URI tricks, `Expect: 100-continue`, upgrade and h2c attempts, HTTP/1.0.
//! Every test checks the answer *and* what each upstream received: the token goes to the
//! routed upstream and nowhere else, and a refused request reaches no upstream at all.
//!
//! Extends `proxy.rs`, which already covers: CL+TE in both orders, repeated and conflicting
//! lengths, `chunked, chunked`, a folded `Transfer-Encoding`
//! (`ambiguous_framing_is_refused_and_the_upstream_never_contacted`); one oversized header
//! section, whole and in 100-byte writes (`oversized_header_sections_get_a_json_431_even_when_split`);
//! `host.evil`, `evil.host`, `xhost`, an unexpected port, `host@evil`, `user:pw@host`, uppercase
//! with a trailing dot (`lookalike_hosts_never_get_the_token`); `CONNECT` to routed hosts;
//! `TRACE`; loops; origin-form without a route.

use std::net::SocketAddr;
use std::time::Duration;

use bearer_proxy::proxy::pseudonym;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

const TOKEN: &str = "tok-hostile";
/// A name route: exact host `localhost`, default port only.
const NAMED: &str = "localhost";
/// An IP-literal route.
const IP: &str = "10.9.8.7";

/// Two upstreams and a proxy: `bank` (TLS, behind three routes: `localhost`, `*.wild.test`,
/// `10.9.8.7`) must get the token on every request; `evil` (plain, `127.0.0.1:<port>`) is what
/// unrouted requests reach and must never see it.
struct Hostile {
    /// `bank` is the fixture's upstream, behind the routes `fdx` (host [`NAMED`]), `wild` and
    /// `ip`.
    f: ProxyFixture,
    evil: Upstream,
}

impl Hostile {
    /// `unmatched` is `forward` or `deny`; `extra` more `[proxy]` TOML.
    async fn start(unmatched: &str, extra: &str) -> Self {
        let f = fixture(NAMED)
            .proxy(&format!(
                "unmatched = \"{unmatched}\"\nconnect = \"deny\"\ntoken_wait = \"100ms\"\n{extra}"
            ))
            .also_route("wild", "*.wild.test")
            .also_route("ip", IP)
            .in_process(|r, _| Reply::ok(&format!("bank {} {}", r.method, r.target)))
            .await;
        let evil = Upstream::plain(|r, _| Reply::ok(&format!("evil {}", r.target))).await;
        f.proxy.publish(TOKEN);
        Self { f, evil }
    }

    fn evil_addr(&self) -> SocketAddr {
        self.evil.addr
    }

    /// Every request `bank` saw carried exactly our token; `evil` never saw one.
    fn assert_token_only_at_the_bank(&self) {
        for r in self.f.upstream().requests() {
            assert_eq!(
                r.all("authorization"),
                [format!("Bearer {TOKEN}")],
                "{}",
                r.target
            );
        }
        for r in self.evil.requests() {
            assert!(
                r.all("authorization").is_empty(),
                "the unrouted upstream got {:?} on {}",
                r.all("authorization"),
                r.target
            );
        }
    }

    /// All client connections closed and their tasks ended.
    async fn settled(&self) {
        let deadline = Instant::now() + PATIENCE;
        while self.f.proxy.metric(metric("bearer_proxy_open_connections")) != Some(0.0) {
            assert!(Instant::now() < deadline, "a connection was left open");
            tokio::task::yield_now().await;
        }
    }
}

/// A refusal by the proxy: `status`, the JSON body and `x-bearer-proxy-error: code`.
fn assert_refused(resp: &RawResponse, status: u16, code: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", resp.text());
    assert_eq!(resp.proxy_error().as_deref(), Some(code), "{what}");
}

// ---------------------------------------------------------------------------------------------
// Request smuggling

/// Framing shapes beyond the ones `proxy.rs` covers: signed, hex, negative, empty, spaced and
/// overflowing lengths; transfer codings other than exactly `chunked`; a folded line on any
/// header; a `Transfer-Encoding` on HTTP/1.0. Each gets 400 with the JSON body, the connection
/// closes, and neither upstream is contacted.
#[tokio::test]
async fn more_smuggling_shapes_are_refused_before_any_upstream() {
    let h = Hostile::start("forward", "").await;
    let shapes = [
        "Content-Length: +3\r\n",
        "Content-Length: -3\r\n",
        "Content-Length: 0x3\r\n",
        "Content-Length: 3 3\r\n",
        "Content-Length:\r\n",
        "Content-Length: 99999999999999999999\r\n",
        "Content-Length: 3\r\ncontent-length: 3\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked;q=1\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: chunked\r\nTRANSFER-ENCODING: chunked\r\n",
        "Transfer-Encoding: \"chunked\"\r\n",
        "X-Folded: a\r\n b\r\n",
        "X-Folded: a\r\n\tb\r\nContent-Length: 3\r\n",
    ];
    for shape in shapes {
        let req = format!(
            "POST http://{NAMED}/x HTTP/1.1\r\nHost: {NAMED}\r\n{shape}\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let (resp, closed) = exchange(h.f.proxy.addr, req.as_bytes()).await;
        assert_refused(&resp, 400, "bad_request", shape);
        assert!(closed, "{shape:?}: connection left open");
    }
    let (resp, closed) = exchange(
        h.f.proxy.addr,
        format!(
            "POST http://{NAMED}/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_refused(&resp, 400, "bad_request", "TE on HTTP/1.0");
    assert!(closed);
    assert!(h.f.upstream().requests().is_empty() && h.evil.requests().is_empty());
    assert_eq!(
        h.f.proxy
            .metric(metric("bearer_proxy_rejected_requests_total").label("reason", "bad_request")),
        Some(shapes.len() as f64 + 1.0)
    );
    h.settled().await;
}

/// A smuggled request hidden in a body: whatever the framing the proxy accepts, a body stays a
/// body. The upstream receives exactly one request per request the client framed, with the
/// body bytes intact, and a second request written after a chunked body is a separate request
/// with its own token.
#[tokio::test]
async fn a_request_inside_a_body_stays_a_body() {
    let h = Hostile::start("forward", "").await;
    let inner = format!("GET http://{NAMED}/smuggled HTTP/1.1\r\nHost: {NAMED}\r\n\r\n");
    let chunked_body = format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len());
    let mut s = connect(h.f.proxy.addr).await;
    s.write_all(
        format!(
            "POST http://{NAMED}/a HTTP/1.1\r\nHost: {NAMED}\r\nContent-Length: {}\r\n\r\n{inner}\
             POST http://{NAMED}/b HTTP/1.1\r\nHost: {NAMED}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}\
             GET http://{NAMED}/c HTTP/1.1\r\nHost: {NAMED}\r\n\r\n",
            inner.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut carry = Vec::new();
    for want in ["bank POST /a", "bank POST /b", "bank GET /c"] {
        let resp = read_pipelined(&mut s, &mut carry).await.unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (200, want));
    }
    let reqs = h.f.upstream().requests();
    let targets: Vec<&str> = reqs.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/a", "/b", "/c"]);
    assert_eq!(&reqs[0].body[..], inner.as_bytes());
    assert_eq!(&reqs[1].body[..], inner.as_bytes());
    h.assert_token_only_at_the_bank();
}

/// Bytes the HTTP grammar forbids (a bare CR in a value, NUL or DEL in a value or the target, a
/// control character or a non-token byte in a name or the method, a space before the colon,
/// two spaces in the request line, a target that is not UTF-8): 400 with the proxy's JSON body
/// and `x-bearer-proxy-error` (not hyper's bare 400), the connection closes, nothing is
/// forwarded.
#[tokio::test]
async fn control_characters_in_the_head_are_refused() {
    let h = Hostile::start("forward", "").await;
    for (what, req) in [
        (
            "bare CR in a value",
            format!("GET http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\nX-A: a\rb\r\n\r\n"),
        ),
        (
            "NUL in a value",
            format!("GET http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\nX-A: a\0b\r\n\r\n"),
        ),
        (
            "NUL in the target",
            format!("GET http://{NAMED}/\0x HTTP/1.1\r\nHost: {NAMED}\r\n\r\n"),
        ),
        (
            "control character in a name",
            format!("GET http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\nX-\x01A: a\r\n\r\n"),
        ),
        (
            "bare CR ending the request line",
            format!("GET http://{NAMED}/ HTTP/1.1\rHost: {NAMED}\r\n\r\n"),
        ),
        (
            "space before the colon",
            format!("GET http://{NAMED}/ HTTP/1.1\r\nHost : {NAMED}\r\n\r\n"),
        ),
        (
            "DEL in a value",
            format!("GET http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\nX-A: a\x7f\r\n\r\n"),
        ),
        (
            "two spaces in the request line",
            format!("GET  http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\n\r\n"),
        ),
        (
            "a method that is not a token",
            format!("G(T http://{NAMED}/ HTTP/1.1\r\nHost: {NAMED}\r\n\r\n"),
        ),
    ] {
        let (resp, closed) = exchange(h.f.proxy.addr, req.as_bytes()).await;
        assert_refused(&resp, 400, "bad_request", what);
        assert!(closed, "{what}: connection left open");
    }
    // A target that is not UTF-8.
    let mut req = format!("GET http://{NAMED}/").into_bytes();
    req.extend_from_slice(b"\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n");
    let (resp, closed) = exchange(h.f.proxy.addr, &req).await;
    assert_refused(&resp, 400, "bad_request", "non-UTF-8 target");
    assert!(closed);
    assert!(h.f.upstream().requests().is_empty() && h.evil.requests().is_empty());
    h.settled().await;
}

// ---------------------------------------------------------------------------------------------
// Header limits split across writes

/// Writes `bytes` in pieces of `piece` bytes, each its own segment.
async fn trickle(s: &mut TcpStream, bytes: &[u8], piece: usize) {
    s.set_nodelay(true).unwrap();
    for chunk in bytes.chunks(piece) {
        s.write_all(chunk).await.unwrap();
        s.flush().await.unwrap();
    }
}

/// The limits hold whatever the segmentation: exactly `max_header_bytes` and exactly 100 header
/// lines pass, one byte or one line more is 431 with the JSON body; a head written one byte at
/// a time, or split inside its CRLFs, is one request with one token.
#[tokio::test]
async fn header_limits_hold_when_the_head_arrives_in_pieces() {
    const MAX: usize = 2048;
    let h = Hostile::start("forward", &format!("max_header_bytes = {MAX}")).await;
    let head_of = |len: usize| {
        let start = format!("GET http://{NAMED}/size HTTP/1.1\r\nHost: {NAMED}\r\nX-Pad: ");
        let pad = len - start.len() - 4;
        format!("{start}{}\r\n\r\n", "p".repeat(pad))
    };
    for (len, piece, status) in [(MAX, 7, 200), (MAX + 1, 7, 431), (MAX, 1, 200)] {
        let head = head_of(len);
        assert_eq!(head.len(), len);
        let mut s = connect(h.f.proxy.addr).await;
        trickle(&mut s, head.as_bytes(), piece).await;
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.status, status, "{len} bytes in pieces of {piece}");
        if status == 431 {
            assert_refused(&resp, 431, "header_too_large", "one byte over");
        }
    }
    for (lines, status) in [(100, 200), (101, 431)] {
        let mut head = format!("GET http://{NAMED}/lines HTTP/1.1\r\nHost: {NAMED}\r\n");
        for i in 1..lines {
            head.push_str(&format!("X-L{i}: {i}\r\n"));
        }
        head.push_str("\r\n");
        let mut s = connect(h.f.proxy.addr).await;
        s.set_nodelay(true).unwrap();
        for line in head.split_inclusive("\r\n") {
            s.write_all(line.as_bytes()).await.unwrap();
        }
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.status, status, "{lines} header lines: {resp:?}");
    }
    // Split inside the line endings.
    let mut s = connect(h.f.proxy.addr).await;
    s.set_nodelay(true).unwrap();
    for piece in [
        format!("GET http://{NAMED}/crlf HTTP/1.1\r"),
        format!("\nHost: {NAMED}\r\n\r"),
        "\n".to_owned(),
    ] {
        s.write_all(piece.as_bytes()).await.unwrap();
    }
    assert_eq!(
        read_response(&mut s).await.unwrap().text(),
        "bank GET /crlf"
    );
    drop(s);
    let targets: Vec<String> =
        h.f.upstream()
            .requests()
            .into_iter()
            .map(|r| r.target)
            .collect();
    assert_eq!(targets, ["/size", "/size", "/lines", "/crlf"]);
    h.assert_token_only_at_the_bank();
    h.settled().await;
}

// ---------------------------------------------------------------------------------------------
// Absolute-URI tricks

/// What must happen to one request.
#[derive(Debug)]
enum Expect {
    /// The bank answers (with the token): its answer text.
    Bank(&'static str),
    /// The unrouted upstream answers (without the token).
    Evil(&'static str),
    /// The proxy refuses.
    Refused(u16, &'static str),
}

async fn check(h: &Hostile, request: &str, expect: Expect) {
    let resp = raw(h.f.proxy.addr, request.as_bytes()).await;
    match expect {
        Expect::Bank(text) | Expect::Evil(text) => {
            assert_eq!(
                (resp.status, resp.text().as_str()),
                (200, text),
                "{request:?}"
            );
        }
        Expect::Refused(status, code) => assert_refused(&resp, status, code, request),
    }
}

fn get_line(target: &str, host: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// With `unmatched = "forward"`: tricks aimed at sending the token to a host of the client's
/// choosing. Unexpected ports, IP literals for a name route, a `Host` header that disagrees
/// with the URL, userinfo either way round: the token goes to the route's upstream only when
/// the URL names the route, and otherwise the request (if forwarded at all) carries none.
#[tokio::test]
async fn absolute_uri_tricks_never_move_the_token() {
    let h = Hostile::start("forward", "").await;
    let evil = h.evil_addr();
    let ep = evil.port();
    let cases = [
        (
            get_line(&format!("http://{NAMED}/a"), NAMED),
            Expect::Bank("bank GET /a"),
        ),
        (
            get_line("http://LocalHost./b", "x"),
            Expect::Bank("bank GET /b"),
        ),
        (
            get_line(&format!("http://{NAMED}:80/c"), NAMED),
            Expect::Bank("bank GET /c"),
        ),
        (
            get_line(&format!("HTTPS://{NAMED}/d"), NAMED),
            Expect::Bank("bank GET /d"),
        ),
        (
            get_line(&format!("http://{NAMED}/e"), &evil.to_string()),
            Expect::Bank("bank GET /e"),
        ),
        (
            get_line(&format!("http://{NAMED}:{ep}/f"), NAMED),
            Expect::Evil("evil /f"),
        ),
        (
            get_line(&format!("http://{evil}/g"), NAMED),
            Expect::Evil("evil /g"),
        ),
        (
            get_line(&format!("http://[::ffff:127.0.0.1]:{ep}/h"), NAMED),
            Expect::Evil("evil /h"),
        ),
        (
            get_line(&format!("http://{NAMED}@{evil}/i"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line(&format!("http://{evil}@{NAMED}/j"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line(&format!("http://:@{NAMED}/k"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line(&format!("ftp://{NAMED}/l"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        // A port that is not a number is not the default port.
        (
            get_line(&format!("http://{NAMED}:99999/q"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line(&format!("http://{NAMED}:8o/r"), NAMED),
            Expect::Refused(400, "bad_request"),
        ),
        // Origin-form: a route's host in Host is that route; anything else goes nowhere.
        (get_line("/m", NAMED), Expect::Bank("bank GET /m")),
        (
            get_line("/n", &evil.to_string()),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line("/o", &format!("{NAMED}:{ep}")),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line("/p", &format!("user@{NAMED}")),
            Expect::Refused(400, "bad_request"),
        ),
    ];
    for (request, expect) in cases {
        check(&h, &request, expect).await;
    }
    // The Host the bank saw is its own, never the client's.
    for r in h.f.upstream().requests() {
        assert_eq!(
            r.one("host").as_deref(),
            Some(format!("localhost:{}", h.f.upstream().addr.port()).as_str())
        );
    }
    assert_eq!(h.f.upstream().requests().len(), 6);
    assert_eq!(h.evil.requests().len(), 3);
    h.assert_token_only_at_the_bank();
    h.settled().await;
}

/// With `unmatched = "deny"`: wildcard and IP-literal routes. Subdomains of the wildcard get the
/// token, the apex and look-alikes do not; the IP route matches only its canonical spelling
/// (octal, hex, decimal and IPv4-mapped spellings of the same address are other hosts).
#[tokio::test]
async fn wildcard_and_ip_routes_match_exactly() {
    let h = Hostile::start("deny", "").await;
    let denied = || Expect::Refused(403, "denied");
    let cases = [
        (
            get_line("http://a.wild.test/w1", "x"),
            Expect::Bank("bank GET /w1"),
        ),
        (
            get_line("http://A.B.WILD.TEST./w2", "x"),
            Expect::Bank("bank GET /w2"),
        ),
        (get_line("http://wild.test/", "x"), denied()),
        (get_line("http://awild.test/", "x"), denied()),
        (get_line("http://a.wild.test.evil/", "x"), denied()),
        (get_line("http://a.wild.test:8080/", "x"), denied()),
        (get_line("http://.wild.test/", "x"), denied()),
        (
            get_line("http://a.wild.test:65536/", "x"),
            Expect::Refused(400, "bad_request"),
        ),
        (
            get_line(&format!("http://{IP}/i1"), "x"),
            Expect::Bank("bank GET /i1"),
        ),
        (
            get_line(&format!("http://{IP}:80/i2"), "x"),
            Expect::Bank("bank GET /i2"),
        ),
        (get_line("http://010.9.8.7/", "x"), denied()),
        (get_line("http://0x0a.9.8.7/", "x"), denied()),
        (get_line("http://168364039/", "x"), denied()),
        (get_line("http://[::ffff:10.9.8.7]/", "x"), denied()),
        (get_line("http://10.9.8.7.nip.io/", "x"), denied()),
        (get_line("http://10.9.8.7:8443/", "x"), denied()),
    ];
    for (request, expect) in cases {
        check(&h, &request, expect).await;
    }
    assert_eq!(h.f.upstream().requests().len(), 4);
    assert!(h.evil.requests().is_empty());
    h.assert_token_only_at_the_bank();
    h.settled().await;
}

/// A `Host` header whose host part hides a colon (`127.0.0.1:.open.test:443`) used to match a
/// wildcard route (the host part "ends with" `.open.test`) and then send the token to the host
/// an authority parser reads out of it, `127.0.0.1:443` (found by the `route` fuzz target;
/// RELIABILITY.md shows the token arriving there). Such a `Host` names no route: 400, and no
/// connection is attempted anywhere.
#[tokio::test]
async fn a_colon_in_the_host_header_cannot_redirect_a_wildcard_route() {
    let ca = TestCa::new();
    let cfg = config(&format!(
        r#"
        [proxy]
        ca_file = "{}"
        unmatched = "deny"
        [[routes]]
        name = "open"
        host = "*.open.test"
        token = "flinks"
        [[routes]]
        name = "pfx"
        host = "*.pfx.test"
        path_prefix = "/pfx"
        token = "flinks"
        "#,
        ca.pem_file().display()
    ));
    let proxy = TestProxy::start(&cfg).await;
    proxy.publish(TOKEN);
    let router = bearer_proxy::proxy::fuzzing::Router::new(&cfg).unwrap();
    for (target, host) in [
        ("/x", "127.0.0.1:.open.test:443"),
        ("/x", "evil.test:x.open.test:80"),
        ("/x", "127.0.0.1:.open.test"),
        ("/pfx/x", "127.0.0.1:.pfx.test:443"),
    ] {
        let resp = raw(
            proxy.addr,
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_refused(&resp, 400, "bad_request", host);
        let req = http::Request::builder()
            .uri(target)
            .header("host", host)
            .body(())
            .unwrap();
        assert_eq!(
            router.route(&req),
            bearer_proxy::proxy::fuzzing::Routing::Refused("bad_request"),
            "{host}"
        );
    }
    for route in ["open", "pfx"] {
        assert_eq!(
            proxy.metric(
                metric("bearer_proxy_upstream_errors_total")
                    .label("kind", "connect")
                    .label("route", route)
            ),
            Some(0.0),
            "a connection was attempted for {route}"
        );
    }
    // The legitimate spellings still route.
    let req = http::Request::builder()
        .uri("/x")
        .header("host", "API.Open.Test.:443")
        .body(())
        .unwrap();
    assert!(matches!(
        router.route(&req),
        bearer_proxy::proxy::fuzzing::Routing::Route { ref authority, .. } if authority == "api.open.test"
    ));
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue

/// `Expect: 100-continue` to a routed host: the proxy says `100 Continue`, then forwards the
/// body with the token. To an unrouted host that is denied, or a routed one without a token:
/// the refusal comes without `100 Continue`, and a body the client sends anyway is never read
/// as a request (here it is one, aimed at the bank).
#[tokio::test]
async fn expect_100_continue_routed_and_refused() {
    let h = Hostile::start("deny", "").await;
    let mut s = connect(h.f.proxy.addr).await;
    s.write_all(
        format!(
            "PUT http://{NAMED}/upload HTTP/1.1\r\nHost: {NAMED}\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    s.write_all(b"hello").await.unwrap();
    let resp = read_response(&mut s).await.unwrap();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "bank PUT /upload")
    );
    assert_eq!(&h.f.upstream().requests()[0].body[..], b"hello");
    drop(s);

    let smuggled = format!("GET http://{NAMED}/smuggled HTTP/1.1\r\nHost: {NAMED}\r\n\r\n");
    let refused = |target: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            smuggled.len()
        )
    };
    // Denied host; then routed, but no valid token.
    let expired = bearer_proxy::token::AccessToken::new(
        "expired",
        Instant::now() - Duration::from_secs(10),
        std::time::SystemTime::now(),
        Duration::from_secs(5),
        None,
    )
    .unwrap();
    let mut expired = Some(expired);
    for (target, status, code) in [
        ("http://elsewhere.test/".to_owned(), 403, "denied"),
        (format!("http://{NAMED}/no-token"), 503, "token_unavailable"),
    ] {
        if status == 503
            && let Some(t) = expired.take()
        {
            h.f.proxy.cell().publish(t);
        }
        let mut s = connect(h.f.proxy.addr).await;
        s.write_all(refused(&target).as_bytes()).await.unwrap();
        let mut carry = Vec::new();
        let resp = read_pipelined(&mut s, &mut carry).await.unwrap();
        assert_refused(&resp, status, code, &target);
        // The client sends its body anyway, then a request of its own: the next answer is
        // that request's (or the connection was closed), never the smuggled GET's.
        let sentinel = "GET http://elsewhere.test/sentinel HTTP/1.1\r\nHost: x\r\n\r\n";
        let _ = s.write_all(smuggled.as_bytes()).await;
        let _ = s.write_all(sentinel.as_bytes()).await;
        if let Ok(next) = read_pipelined(&mut s, &mut carry).await {
            assert_refused(&next, 403, "denied", "the sentinel");
        }
    }

    let targets: Vec<String> =
        h.f.upstream()
            .requests()
            .into_iter()
            .map(|r| r.target)
            .collect();
    assert_eq!(targets, ["/upload"], "the smuggled GET reached the bank");
    h.assert_token_only_at_the_bank();
    h.settled().await;
}

// ---------------------------------------------------------------------------------------------
// Upgrade, h2c, HTTP/2 preface

/// Upgrade attempts are not honoured: `h2c` and WebSocket upgrades are forwarded as plain
/// HTTP/1.1 requests without `Upgrade` (and without the headers `Connection` names), the
/// answer is an ordinary response, and the client's socket is never handed to the upstream.
/// An upstream that answers 101 anyway gets the client a 502. The HTTP/2 preface is refused.
#[tokio::test]
async fn upgrade_and_h2c_attempts_stay_plain_http() {
    let h = Hostile::start("deny", "").await;
    let (resp, _) = exchange(
        h.f.proxy.addr,
        format!(
            "GET http://{NAMED}/h2c HTTP/1.1\r\nHost: {NAMED}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "bank GET /h2c"));
    let (resp, _) = exchange(
        h.f.proxy.addr,
        format!(
            "GET http://{NAMED}/ws HTTP/1.1\r\nHost: {NAMED}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "bank GET /ws"));
    for r in h.f.upstream().requests() {
        for name in ["upgrade", "http2-settings", "connection"] {
            assert!(r.headers.get(name).is_none(), "{name} reached the upstream");
        }
        assert_eq!(r.version, http::Version::HTTP_11);
    }
    let (resp, closed) = exchange(h.f.proxy.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert_refused(&resp, 400, "bad_request", "HTTP/2 preface");
    assert!(closed);
    h.assert_token_only_at_the_bank();

    // An upstream that switches protocols although nobody asked.
    let switching = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw bytes",
    )
    .await;
    let ca = TestCa::new();
    let cfg = config(&format!(
        r#"
        [proxy]
        ca_file = "{}"
        [[routes]]
        host = "{NAMED}"
        token = "flinks"
        upstream = "http://{switching}"
        "#,
        ca.pem_file().display()
    ));
    let proxy = TestProxy::start(&cfg).await;
    proxy.publish(TOKEN);
    let resp = raw(
        proxy.addr,
        format!(
            "GET http://{NAMED}/ws HTTP/1.1\r\nHost: {NAMED}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_refused(&resp, 502, "upstream_reset", "unrequested 101");
    h.settled().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.0

/// HTTP/1.0 requests: routed without a `Host` header (the URL names the host) they get the
/// token and an HTTP/1.0 answer, and the connection closes unless keep-alive was asked for;
/// unrouted ones are forwarded without it. The upstream always gets HTTP/1.1 with its own Host.
#[tokio::test]
async fn http10_requests_are_proxied_with_the_same_rules() {
    let h = Hostile::start("forward", "").await;
    let (resp, closed) = exchange(
        h.f.proxy.addr,
        format!("GET http://{NAMED}/old HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "bank GET /old"));
    assert!(closed, "HTTP/1.0 without keep-alive must close");

    // Keep-alive asked for: two requests on one connection.
    let mut s = connect(h.f.proxy.addr).await;
    for path in ["/ka1", "/ka2"] {
        s.write_all(
            format!("GET http://{NAMED}{path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.text(), format!("bank GET {path}"));
    }
    drop(s);

    let (resp, _) = exchange(
        h.f.proxy.addr,
        format!("GET http://{}/plain HTTP/1.0\r\n\r\n", h.evil_addr()).as_bytes(),
    )
    .await;
    assert_eq!(resp.text(), "evil /plain");
    let (resp, _) = exchange(
        h.f.proxy.addr,
        format!("POST http://{NAMED}/form HTTP/1.0\r\nContent-Length: 3\r\n\r\na=b").as_bytes(),
    )
    .await;
    assert_eq!(resp.text(), "bank POST /form");
    for r in h.f.upstream().requests() {
        assert_eq!(r.version, http::Version::HTTP_11);
        assert_eq!(
            r.one("host").as_deref(),
            Some(format!("localhost:{}", h.f.upstream().addr.port()).as_str())
        );
        assert!(r.all("via").join(",").contains(pseudonym()));
    }
    assert_eq!(h.f.upstream().requests().len(), 4);
    h.assert_token_only_at_the_bank();
    h.settled().await;
}
