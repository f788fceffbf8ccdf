//! Header names containing `_` (`proxy.underscore_headers`) and one upstream pool per
//! credential (issue #19), over real sockets.
//!
//! The attack: an upstream that reads `_` as `-` (CGI-style, written below as [`CgiUpstream`])
//! sees `Transfer_Encoding: chunked` as a framing the proxy never honoured, keeps the rest of
//! the body as the start of its next request, and, if that next request came from another
//! route over the same pooled connection, runs it with the other route's token and sends the
//! answer to the other client. Both defences are checked: the underscore spelling never reaches
//! an upstream, and two credentials never share an upstream connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::support::*;

const TOKEN_A: &str = "tok-route-a";
const TOKEN_B: &str = "tok-route-b";
const SETTINGS: [&str; 3] = ["drop", "reject", "allow"];

/// `[tokens.a]`, `[tokens.b]` and two routes, `a.test` with token `a` and `b.test` with token
/// `b`, both forwarding to `upstream`; `proxy` is more `[proxy]` TOML.
fn two_routes(upstream: &str, proxy: &str) -> String {
    format!(
        r#"
        [proxy]
        token_wait = "100ms"
        {proxy}
        [tokens.a]
        token_url = "https://127.0.0.1:9/token"
        grant_type = "client_credentials"
        client_id = "a"
        client_secret = "test-secret"
        [tokens.b]
        token_url = "https://127.0.0.1:9/token"
        grant_type = "client_credentials"
        client_id = "b"
        client_secret = "test-secret"
        [[routes]]
        name = "a"
        host = "a.test"
        token = "a"
        upstream = "{upstream}"
        [[routes]]
        name = "b"
        host = "b.test"
        token = "b"
        upstream = "{upstream}"
        "#
    )
}

/// A proxy for [`two_routes`] with both tokens published.
async fn proxy_for(upstream: &str, proxy: &str) -> TestProxy {
    let p = TestProxy::start(&config(&two_routes(upstream, proxy))).await;
    p.tokens["a"].publish(token(TOKEN_A));
    p.tokens["b"].publish(token(TOKEN_B));
    p
}

fn underscore_metric(p: &TestProxy, action: &str) -> f64 {
    p.metric(metric("bearer_proxy_underscore_headers_total").label("action", action))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The three settings

#[tokio::test]
async fn each_setting_drops_refuses_or_forwards_underscore_names() {
    let up = Upstream::plain(|r, _| Reply::ok(&r.target)).await;
    for setting in SETTINGS {
        let p = proxy_for(
            &up.url(false),
            &format!("underscore_headers = \"{setting}\"\nunmatched = \"forward\""),
        )
        .await;
        let before = up.requests().len();
        let headers = [
            "X_Api_Key: k1",
            "x_api_key: k2",
            "X-Trace_Id: t",
            "X-Ok: yes",
        ];
        let routed = get(p.addr, "http://a.test/routed", &headers).await;
        // Unrouted traffic follows the same setting (it carries the app's own credentials).
        let unrouted = get(p.addr, &format!("{}/unrouted", up.url(false)), &headers).await;
        let seen = up.requests()[before..].to_vec();
        match setting {
            "drop" => {
                for resp in [&routed, &unrouted] {
                    assert_eq!(resp.status, 200, "{setting}: {}", resp.text());
                }
                assert_eq!(seen.len(), 2);
                for r in &seen {
                    let mut names: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
                    names.sort_unstable();
                    assert!(!names.iter().any(|n| n.contains('_')), "{names:?}");
                    assert_eq!(r.one("x-ok").as_deref(), Some("yes"));
                }
                assert_eq!(underscore_metric(&p, "dropped"), 6.0);
                assert_eq!(underscore_metric(&p, "refused"), 0.0);
            }
            "reject" => {
                for resp in [&routed, &unrouted] {
                    assert_eq!(resp.status, 400, "{setting}: {}", resp.text());
                    assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));
                }
                assert!(seen.is_empty(), "a refused request reached the upstream");
                assert_eq!(underscore_metric(&p, "dropped"), 0.0);
                assert_eq!(underscore_metric(&p, "refused"), 6.0);
                assert_eq!(
                    p.metric(
                        metric("bearer_proxy_rejected_requests_total")
                            .label("reason", "bad_request")
                    ),
                    Some(2.0)
                );
            }
            "allow" => {
                for resp in [&routed, &unrouted] {
                    assert_eq!(resp.status, 200, "{setting}: {}", resp.text());
                }
                assert_eq!(seen.len(), 2);
                for r in &seen {
                    assert_eq!(r.all("x_api_key"), ["k1", "k2"]);
                    assert_eq!(r.one("x-trace_id").as_deref(), Some("t"));
                }
                assert_eq!(underscore_metric(&p, "dropped"), 0.0);
                assert_eq!(underscore_metric(&p, "refused"), 0.0);
            }
            _ => unreachable!(),
        }
        // The token is still exactly the route's, whatever was dropped or forwarded.
        if let Some(r) = seen.first() {
            assert_eq!(r.all("authorization"), [format!("Bearer {TOKEN_A}")]);
        }
    }
}

/// Every underscore spelling of a framing or hop-by-hop header, any `Proxy_*`: 400 with the JSON
/// body under every setting, the connection closed (the client may have framed its body by it),
/// and no upstream contacted, on routed and unrouted requests alike.
#[tokio::test]
async fn underscore_spellings_of_sensitive_headers_are_refused_under_every_setting() {
    let up = Upstream::plain(|r, _| Reply::ok(&r.target)).await;
    let sensitive = [
        "Transfer_Encoding: chunked",
        "transfer_encoding: chunked",
        "TRANSFER_ENCODING: chunked",
        "Transfer_encoding: chunked",
        "Content_Length: 5",
        "content_length: 0",
        "Keep_Alive: timeout=5",
        "Proxy_Authorization: Basic eA==",
        "Proxy_Connection: keep-alive",
        "proxy_authenticate: Basic",
        "Proxy_Anything: 1",
    ];
    for setting in SETTINGS {
        let p = proxy_for(
            &up.url(false),
            &format!("underscore_headers = \"{setting}\"\nunmatched = \"forward\""),
        )
        .await;
        for header in sensitive {
            for url in ["http://a.test/x".to_owned(), format!("{}/x", up.url(false))] {
                let request = format!("GET {url} HTTP/1.1\r\nHost: a.test\r\n{header}\r\n\r\n");
                let (resp, closed) = exchange(p.addr, request.as_bytes()).await;
                assert_eq!(
                    resp.status,
                    400,
                    "{setting} {header} {url}: {}",
                    resp.text()
                );
                assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));
                assert!(closed, "{setting} {header}: the connection stayed open");
            }
        }
        let n = 2.0 * sensitive.len() as f64;
        assert_eq!(underscore_metric(&p, "refused"), n, "{setting}");
        assert_eq!(underscore_metric(&p, "dropped"), 0.0, "{setting}");
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // Names that are not sensitive once `_` is read as `-` are not refused for it: under the
    // default they are dropped like any other underscore name.
    let p = proxy_for(&up.url(false), "").await;
    let resp = get(
        p.addr,
        "http://a.test/y",
        &["Host_: x", "Authori_zation: x", "X_Content_Length: 1"],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(underscore_metric(&p, "dropped"), 3.0);
}

// ---------------------------------------------------------------------------------------------
// An upstream that reads `_` as `-`

/// One request as the CGI-style upstream parsed it.
#[derive(Clone, Debug)]
struct CgiRequest {
    /// Which upstream connection it came on.
    conn: usize,
    target: String,
    /// `Authorization`, under any spelling.
    authorization: Option<String>,
    /// `X-Who`, under any spelling: which client sent it.
    who: Option<String>,
}

/// A keep-alive HTTP/1.1 server that, like CGI, reads header names with `_` as `-` (and
/// case-insensitively), frames bodies by the result (`Transfer-Encoding: chunked` before
/// `Content-Length`), and leaves whatever follows a body in its buffer as the start of the
/// next request. It answers each request with its target.
struct CgiUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<CgiRequest>>>,
    count: watch::Sender<usize>,
    task: JoinHandle<()>,
}

impl Drop for CgiUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CgiUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, _) = watch::channel(0);
        let conns = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), count.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn = conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(cgi_connection(stream, conn, s.clone(), c.clone()));
            }
        });
        Self {
            addr,
            seen,
            count,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn seen(&self) -> Vec<CgiRequest> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_requests(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n))
            .await
            .expect("the upstream never saw the request")
            .unwrap();
    }
}

async fn cgi_connection(
    mut s: TcpStream,
    conn: usize,
    seen: Arc<Mutex<Vec<CgiRequest>>>,
    count: watch::Sender<usize>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = fill_until(&mut s, &mut buf, |b| {
            b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
        })
        .await
        else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let target = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_owned();
        // CGI: `HTTP_` + the name upper-cased with `-` as `_`; the last line of a name wins.
        let mut env = std::collections::HashMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if let Some((name, value)) = line.split_once(':') {
                env.insert(
                    name.trim().to_ascii_lowercase().replace('_', "-"),
                    value.trim().to_owned(),
                );
            }
        }
        let chunked = env
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            // Chunks until the last one; trailers are not expected.
            loop {
                let Some(line_end) = fill_until(&mut s, &mut buf, |b| {
                    b.windows(2).position(|w| w == b"\r\n")
                })
                .await
                else {
                    return;
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.trim(), 16).unwrap_or(0);
                buf.drain(..line_end + 2);
                let want = size + 2;
                if fill_until(&mut s, &mut buf, |b| (b.len() >= want).then_some(()))
                    .await
                    .is_none()
                {
                    return;
                }
                buf.drain(..want);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = env.get("content-length").and_then(|v| v.parse().ok()) {
            let len: usize = len;
            if fill_until(&mut s, &mut buf, |b| (b.len() >= len).then_some(()))
                .await
                .is_none()
            {
                return;
            }
            buf.drain(..len);
        }
        {
            let mut all = seen.lock().unwrap();
            all.push(CgiRequest {
                conn,
                target: target.clone(),
                authorization: env.get("authorization").cloned(),
                who: env.get("x-who").cloned(),
            });
            count.send_replace(all.len());
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{target}",
            target.len()
        );
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads into `buf` until `done` finds what it looks for; `None` if the peer closes first.
async fn fill_until<T>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(t) = done(buf) {
            return Some(t);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(PATIENCE, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Route A's client smuggles a request in its body behind `Transfer_Encoding: chunked`; route
/// B's client then sends its own requests. Under every setting the smuggling request is refused
/// before reaching the upstream, B gets the answers to its own requests, and no request the
/// upstream parsed carries the other route's token or shares a connection with it.
#[tokio::test]
async fn an_upstream_folding_underscores_never_runs_a_request_with_the_other_routes_token() {
    for setting in SETTINGS.map(Some).into_iter().chain([None]) {
        let up = CgiUpstream::start().await;
        let proxy_toml = setting.map_or(String::new(), |s| format!("underscore_headers = \"{s}\""));
        let p = proxy_for(&up.url(), &proxy_toml).await;

        // A's first request leaves a pooled upstream connection behind.
        let first = get(p.addr, "http://a.test/a-first", &["X-Who: a"]).await;
        assert_eq!(first.text(), "/a-first");
        up.wait_requests(1).await;

        // Length-framed for the proxy; chunked for an upstream reading `_` as `-`, which ends
        // the body at `0\r\n\r\n` and keeps the rest as the head of its next request.
        let smuggled = "GET /smuggled HTTP/1.1\r\nX-Who: a\r\nX-Swallow: ";
        let body = format!("0\r\n\r\n{smuggled}");
        let attack = format!(
            "POST http://a.test/a-attack HTTP/1.1\r\nHost: a.test\r\nX-Who: a\r\n\
             Content-Length: {}\r\nTransfer_Encoding: chunked\r\n\r\n{body}",
            body.len()
        );
        let mut s = connect(p.addr).await;
        s.write_all(attack.as_bytes()).await.unwrap();
        let resp = read_response(&mut s).await.unwrap();
        assert_eq!(resp.status, 400, "{setting:?}: {}", resp.text());
        assert_eq!(resp.proxy_error().as_deref(), Some("bad_request"));

        // B's requests: each gets its own answer.
        for i in 0..5 {
            let target = format!("/b-{i}");
            let resp = get(p.addr, &format!("http://b.test{target}"), &["X-Who: b"]).await;
            assert_eq!(resp.status, 200, "{setting:?}");
            assert_eq!(
                resp.text(),
                target,
                "{setting:?}: B got another request's answer"
            );
        }

        let seen = up.seen();
        let token_of = |who: &str| match who {
            "a" => format!("Bearer {TOKEN_A}"),
            _ => format!("Bearer {TOKEN_B}"),
        };
        for r in &seen {
            let who = r.who.as_deref().unwrap_or("?");
            assert_eq!(
                r.authorization.as_deref(),
                Some(token_of(who).as_str()),
                "{setting:?}: {} from client {who} ran with the wrong token",
                r.target
            );
            assert!(r.target != "/smuggled" && r.target != "/a-attack", "{r:?}");
            let others = seen
                .iter()
                .filter(|o| o.conn == r.conn && o.authorization != r.authorization)
                .count();
            assert_eq!(others, 0, "{setting:?}: one connection carried two tokens");
        }
        assert_eq!(seen.len(), 6, "{setting:?}: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// One pool per credential

/// Two routes with different tokens to the same upstream, used in turn over one keep-alive
/// client connection: every upstream connection carries one token only, and each credential's
/// connections are still reused.
#[tokio::test]
async fn two_credentials_never_share_an_upstream_connection() {
    let up = CgiUpstream::start().await;
    let p = proxy_for(&up.url(), "").await;
    let mut s = connect(p.addr).await;
    let rounds = 10;
    for i in 0..rounds {
        for (host, who) in [("a.test", "a"), ("b.test", "b")] {
            let target = format!("/{who}-{i}");
            let request = format!(
                "GET http://{host}{target} HTTP/1.1\r\nHost: {host}\r\nX-Who: {who}\r\n\r\n"
            );
            s.write_all(request.as_bytes()).await.unwrap();
            let resp = read_response(&mut s).await.unwrap();
            assert_eq!(resp.text(), target);
        }
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2 * rounds);
    let mut tokens_by_conn = std::collections::BTreeMap::<usize, Vec<String>>::new();
    for r in &seen {
        let token = r.authorization.clone().unwrap();
        let expected = if r.who.as_deref() == Some("a") {
            TOKEN_A
        } else {
            TOKEN_B
        };
        assert_eq!(token, format!("Bearer {expected}"), "{r:?}");
        let tokens = tokens_by_conn.entry(r.conn).or_default();
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    for (conn, tokens) in &tokens_by_conn {
        assert_eq!(
            tokens.len(),
            1,
            "upstream connection {conn} carried {tokens:?}"
        );
    }
    assert!(tokens_by_conn.len() >= 2, "{tokens_by_conn:?}");
    assert!(
        tokens_by_conn.len() < seen.len(),
        "no upstream connection was reused: {tokens_by_conn:?}"
    );
}
