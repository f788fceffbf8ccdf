//! The fast path (`proxy.fast_path = true`, the default) against the hyper path: the same
//! client bytes, sent through one proxy of each kind, must reach a recording upstream as the
//! same request (request line, every header's values in order, body) and come back to the
//! client as the same answer (status, headers, decoded body). Also: what the fast path leaves
//! to hyper is handed over mid-connection without losing a byte, and it never serves a request
//! hyper would have refused.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    RawResponse, TestProxy, config, connect, metric, read_head, read_pipelined, read_request_head,
};

const TOKEN: &str = "fast-path-differential-token";

/// The upstream's canned answers, chosen by the request path `/r/<n>`.
const ANSWERS: [&[u8]; 8] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nConnection: keep-alive, X-A\r\n\
      Keep-Alive: timeout=5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
      5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the close",
    b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nProxy-Authenticate: Basic\r\n\
      Trailer: x\r\nUpgrade: h2c\r\n\r\nnot found",
];

/// What the upstream received: the head's lines and the body.
#[derive(Clone, Debug)]
struct Received {
    head: Vec<u8>,
    body: Vec<u8>,
}

/// A plain-HTTP upstream that records every request and answers from [`ANSWERS`], keeping the
/// connection open unless the answer ends by closing it.
async fn recorder() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let n: usize = text
                        .split_once("/r/")
                        .and_then(|(_, rest)| rest.get(..1))
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(0);
                    let answer = if text.starts_with("head ") {
                        // The head only: a HEAD answer has no body, whatever its length says.
                        let end = ANSWERS[n]
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .unwrap();
                        &ANSWERS[n][..end + 4]
                    } else {
                        ANSWERS[n]
                    };
                    record.lock().unwrap().push(Received { head, body });
                    if s.write_all(answer).await.is_err() || n == 2 {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A proxy with one route `bank` for `bank.test` (with a static header) and one `pfx` by path
/// prefix onto a base path, to `upstream`, the token published.
async fn proxy(upstream: SocketAddr, fast_path: bool) -> TestProxy {
    let cfg = config(&format!(
        r#"
        [proxy]
        fast_path = {fast_path}
        unmatched = "deny"
        [[routes]]
        name = "bank"
        host = "bank.test"
        upstream = "http://{upstream}"
        token = "flinks"
        headers = {{ "x-static" = "from-the-route" }}
        [[routes]]
        name = "pfx"
        host = "gw.test"
        path_prefix = "/pfx"
        upstream = "http://{upstream}/base"
        token = "flinks"
        "#
    ));
    let p = TestProxy::start(&cfg).await;
    p.publish(TOKEN);
    p
}

/// A request line and its headers, names in lower case, grouped by name in first-seen order
/// (each name's values keep their order): what HTTP says is the same message.
fn normalise_head(head: &[u8]) -> (String, Vec<(String, Vec<String>)>) {
    // Each proxy has its own recorder: their addresses differ.
    let head: String = String::from_utf8_lossy(head)
        .split("\r\n")
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("host:") {
                "host: <the recorder>"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n");
    let head = head.as_bytes();
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap().to_owned();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_owned();
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => groups.push((name, vec![value])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    (first, groups)
}

/// A response's status, headers (sorted, without `date`, which hyper adds) and body.
fn normalise_response(r: &RawResponse) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(n, _)| n != "date")
        .cloned()
        .collect();
    headers.sort();
    (r.status, headers, r.body.clone())
}

/// Sends `requests` on one connection to each proxy and compares everything both ends saw.
async fn same_on_both_paths(requests: &[&[u8]]) {
    let (up_fast, seen_fast) = recorder().await;
    let (up_hyper, seen_hyper) = recorder().await;
    let fast = proxy(up_fast, true).await;
    let hyper = proxy(up_hyper, false).await;
    for (p, label) in [(&fast, "fast"), (&hyper, "hyper")] {
        let mut s = connect(p.addr).await;
        let mut carry = Vec::new();
        for req in requests {
            s.write_all(req).await.unwrap();
            let r = read_pipelined(&mut s, &mut carry)
                .await
                .unwrap_or_else(|e| panic!("{label}: {e} after {}", String::from_utf8_lossy(req)));
            assert!(r.status != 0);
            if r.header("connection") == Some("close") {
                s = connect(p.addr).await;
                carry.clear();
            }
        }
    }
    // Compare the answers by sending again, now reading them side by side.
    let mut fs = connect(fast.addr).await;
    let mut hs = connect(hyper.addr).await;
    let (mut fc, mut hc) = (Vec::new(), Vec::new());
    for req in requests {
        fs.write_all(req).await.unwrap();
        hs.write_all(req).await.unwrap();
        let f = read_pipelined(&mut fs, &mut fc).await.unwrap();
        let h = read_pipelined(&mut hs, &mut hc).await.unwrap();
        assert_eq!(
            normalise_response(&f),
            normalise_response(&h),
            "answers differ for {}",
            String::from_utf8_lossy(req)
        );
        if f.header("connection") == Some("close") {
            fs = connect(fast.addr).await;
            hs = connect(hyper.addr).await;
            fc.clear();
            hc.clear();
        }
    }
    let fast_seen = seen_fast.lock().unwrap().clone();
    let hyper_seen = seen_hyper.lock().unwrap().clone();
    assert_eq!(fast_seen.len(), hyper_seen.len(), "requests forwarded");
    for (f, h) in fast_seen.iter().zip(&hyper_seen) {
        assert_eq!(
            normalise_head(&f.head),
            normalise_head(&h.head),
            "upstream heads differ:\n{}\n{}",
            String::from_utf8_lossy(&f.head),
            String::from_utf8_lossy(&h.head)
        );
        assert_eq!(f.body, h.body);
    }
    // Every one of these was the fast path's: it handed nothing to hyper.
    let handoffs = fast.metrics.encode();
    assert!(
        !handoffs
            .lines()
            .any(|l| l.starts_with("bearer_proxy_fast_path_handoffs_total") && !l.ends_with(" 0")),
        "{handoffs}"
    );
}

#[tokio::test]
async fn routed_requests_reach_the_upstream_and_come_back_the_same_on_both_paths() {
    let mut requests: Vec<Vec<u8>> = vec![
        // Every header the sanitiser touches.
        b"GET http://bank.test/r/0?q=1&b=%20 HTTP/1.1\r\nHost: bank.test\r\n\
          Authorization: Bearer from-the-client\r\nConnection: keep-alive, X-Drop\r\n\
          X-Drop: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic eDp5\r\n\
          Proxy-Connection: keep-alive\r\nVia: 1.1 other\r\nX-Keep: a\r\nx-keep: b\r\n\
          TE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\
          X-Static: from-the-client\r\nAccept: */*\r\n\r\n"
            .to_vec(),
        // The absolute URI names the host; the client's Host is replaced.
        b"GET http://bank.test/r/0 HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        b"POST http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nContent-Length: 9\r\n\
          Content-Type: application/json\r\n\r\n{\"a\":\"b\"}"
            .to_vec(),
        b"PUT http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
        b"OPTIONS http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n".to_vec(),
        b"DELETE http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n".to_vec(),
        b"PATCH http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nContent-Length: 2\r\n\r\n{}"
            .to_vec(),
        // Gateway mode: origin-form, prefix stripped, base path added.
        b"GET /pfx/r/0/x?y HTTP/1.1\r\nHost: gw.test\r\n\r\n".to_vec(),
        b"GET /pfx HTTP/1.1\r\nHost: gw.test\r\n\r\n".to_vec(),
    ];
    for n in [1, 3, 4, 5, 6, 7, 2] {
        requests.push(
            format!("GET http://bank.test/r/{n} HTTP/1.1\r\nHost: bank.test\r\n\r\n").into_bytes(),
        );
    }
    let requests: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    same_on_both_paths(&requests).await;
}

#[tokio::test]
async fn head_answers_keep_their_length_and_carry_no_body() {
    let (up, seen) = recorder().await;
    for fast_path in [true, false] {
        let p = proxy(up, fast_path).await;
        let mut s = connect(p.addr).await;
        s.write_all(b"HEAD http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        // The next answer starts right after the head: no body bytes in between.
        s.write_all(b"GET http://bank.test/r/3 HTTP/1.1\r\nHost: bank.test\r\n\r\n")
            .await
            .unwrap();
        let next = read_head(&mut s).await;
        assert!(
            next.starts_with("HTTP/1.1 204"),
            "fast_path = {fast_path}: {next}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_both_paths() {
    let (up, seen) = recorder().await;
    let p = proxy(up, true).await;
    let mut s = connect(p.addr).await;
    s.write_all(
        b"GET http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n\
          POST http://bank.test/r/1 HTTP/1.1\r\nHost: bank.test\r\nContent-Length: 3\r\n\r\nabc\
          GET http://bank.test/r/3 HTTP/1.1\r\nHost: bank.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut carry = Vec::new();
    let a = read_pipelined(&mut s, &mut carry).await.unwrap();
    let b = read_pipelined(&mut s, &mut carry).await.unwrap();
    let c = read_pipelined(&mut s, &mut carry).await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (200, "hello"));
    assert_eq!((b.status, b.text().as_str()), (200, "hello world"));
    assert_eq!(c.status, 204);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body, b"abc");
    for r in seen.iter() {
        let (_, headers) = normalise_head(&r.head);
        let auth: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0].1, vec![format!("Bearer {TOKEN}")]);
    }
}

#[tokio::test]
async fn a_request_the_fast_path_does_not_serve_hands_the_connection_to_hyper_whole() {
    for fast_path in [true, false] {
        let (up, seen) = recorder().await;
        let p = proxy(up, fast_path).await;
        let mut s: TcpStream = connect(p.addr).await;
        // Fast path first, then an HTTP/1.0 request (hyper's), then more requests on the same
        // connection: all answered, in order, none lost at the hand-over.
        s.write_all(
            b"GET http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n\
              GET http://bank.test/r/0 HTTP/1.0\r\nHost: bank.test\r\nConnection: keep-alive\r\n\r\n\
              GET http://bank.test/r/3 HTTP/1.1\r\nHost: bank.test\r\n\r\n\
              TRACE http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n",
        )
        .await
        .unwrap();
        let mut carry = Vec::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = read_pipelined(&mut s, &mut carry).await;
            got.push(
                r.unwrap_or_else(|e| {
                    let m = p.metrics.encode();
                    let h: Vec<_> = m.lines().filter(|l| l.contains("handoffs")).collect();
                    panic!("fast_path = {fast_path}: {e} after {got:?} {h:#?}")
                })
                .status,
            );
        }
        assert_eq!(got, [200, 200, 204, 405]);
        assert_eq!(seen.lock().unwrap().len(), 3);
        let handoffs =
            p.metric(metric("bearer_proxy_fast_path_handoffs_total").label("reason", "version"));
        assert_eq!(handoffs, Some(if fast_path { 1.0 } else { 0.0 }));
    }
}

#[tokio::test]
async fn heads_hyper_refuses_are_refused_the_same_with_the_fast_path_on() {
    let (up, seen) = recorder().await;
    let fast = proxy(up, true).await;
    let hyper = proxy(up, false).await;
    let looped = format!(
        "GET http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nVia: 1.1 {}\r\n\r\n",
        bearer_proxy::proxy::pseudonym()
    );
    for req in [
        looped.as_bytes(),
        b"GET http://unrouted.test/ HTTP/1.1\r\nHost: unrouted.test\r\n\r\n",
        b"GET http://user:pw@bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\n\r\n",
        b"GET /pfx/../r/0 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"GET http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nContent-Length: 1\r\n\
          Content-Length: 2\r\n\r\n",
        b"GET http://bank.test/r/0 HTTP/1.1\r\nHost: bank.test\r\nX_Under: 1\r\n\r\n",
    ] {
        let f = crate::support::raw(fast.addr, req).await;
        let h = crate::support::raw(hyper.addr, req).await;
        assert_eq!(
            (f.status, f.header("x-bearer-proxy-error")),
            (h.status, h.header("x-bearer-proxy-error")),
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    let seen = seen.lock().unwrap();
    let mut lines: Vec<String> = seen
        .iter()
        .map(|r| {
            String::from_utf8_lossy(&r.head)
                .lines()
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    lines.sort();
    // The origin-form request for gw.test matches the `pfx` route by host alone; the
    // underscore header was dropped. Nothing else reached the upstream, on either path.
    assert_eq!(
        lines,
        [
            "GET /base/nowhere HTTP/1.1",
            "GET /base/nowhere HTTP/1.1",
            "GET /r/0 HTTP/1.1",
            "GET /r/0 HTTP/1.1"
        ]
    );
}
