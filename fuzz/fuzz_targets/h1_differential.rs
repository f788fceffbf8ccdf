//! Differential fuzzing of the HTTP/1 fast path's codec (`src/proxy/h1/`) against the hyper
//! path it replaces. The first input byte picks the side and the options, the rest is the wire:
//! - a client's request head: the fast path (`RequestHead::parse` + `write_upstream_head`,
//!   re-parsed with httparse) against the reference (the framer's `head_len` and `judge_head`,
//!   httparse into a `HeaderMap`, `sanitise` + `inject`). They must agree on where the head
//!   ends, how its body is framed, what goes upstream (request line, every header's values in
//!   order) and what is left to hyper; the fast path never takes a head the framer refuses
//!   (except for a target only the `http` crate's URI parser refuses: the driver sees heads
//!   after the guard, which refuses those);
//! - an upstream's response head: `ResponseHead::parse` + `write_client_head` against httparse,
//!   a model of hyper's client decoder (`role.rs`), `check_response_framing` and
//!   `strip_hop_by_hop` on a `HeaderMap`: same refusals (the fast path may also refuse a
//!   `Content-Length` list such as `5, 5`, which hyper reads), same framing and keep-alive,
//!   same headers to the client;
//! - a chunked body: the fast path's scanner, in any segmentation, against the framer fed a
//!   chunked request head and the body: the same end or the same refused byte.
#![no_main]

use std::collections::BTreeMap;

use bearer_proxy::config::UnderscoreHeaders;
use bearer_proxy::proxy::fuzzing::{
    ChunkedScanner, Framer, Framing, H1Framing, H1Outgoing, Scan, check_response_framing,
    h1_request, h1_response, head_len, judge_head, sanitise, strip_hop_by_hop,
};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const PSEUDONYM: &[u8] = b"bearer-proxy-f022";
const VIA: &str = "1.1 bearer-proxy-f022";
const TOKEN: &str = "Bearer fuzz-token";
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

fuzz_target!(|input: &[u8]| {
    let [mode, data @ ..] = input else {
        return;
    };
    match mode % 3 {
        0 => request(mode / 3, data),
        1 => response(mode / 3, data),
        _ => chunked(mode / 3, data),
    }
});

/// Header lines grouped by lower-case name, values in order.
type Grouped = BTreeMap<String, Vec<Vec<u8>>>;

fn grouped_map(map: &HeaderMap) -> Grouped {
    let mut g = Grouped::new();
    for (n, v) in map {
        g.entry(n.to_string()).or_default().push(v.as_bytes().to_vec());
    }
    g
}

fn grouped_lines(headers: &[httparse::Header<'_>]) -> Grouped {
    let mut g = Grouped::new();
    for h in headers {
        g.entry(h.name.to_ascii_lowercase()).or_default().push(h.value.to_vec());
    }
    g
}

/// httparse's headers in a `HeaderMap`, as hyper builds it.
fn header_map(headers: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).expect("httparse names are tokens");
        let value = HeaderValue::from_bytes(h.value).expect("httparse values are valid");
        map.append(name, value);
    }
    map
}

fn request(options: u8, data: &[u8]) {
    let mut statics = HeaderMap::new();
    match options % 3 {
        0 => {}
        1 => {
            statics.insert("x-static", HeaderValue::from_static("route"));
        }
        _ => {
            statics.insert("via", HeaderValue::from_static("1.1 gateway"));
        }
    }
    let subject = HeaderName::from_static("x-subject");
    let remove = (options & 4 != 0).then_some(&subject);
    let max_body = if options & 8 != 0 { 1 << 16 } else { 10 };
    let outgoing = H1Outgoing {
        path_and_query: b"/base/p?q=1",
        host: b"upstream.example",
        via: VIA.as_bytes(),
        statics: &statics,
        remove,
        authorization: TOKEN.as_bytes(),
    };
    let mut out = b"earlier".to_vec();
    let fast = h1_request(&mut out, data, PSEUDONYM, max_body, &outgoing);

    // The reference: the framer, where hyper's head would start (it skips empty lines).
    let skip = data.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    let framer_len = head_len(&data[skip..]);
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(data);
    let len = match (parsed, &fast) {
        (Err(_), Err(why)) => {
            assert_eq!(*why, "unusual");
            return;
        }
        (Ok(httparse::Status::Partial), Ok(None)) => return,
        (Ok(httparse::Status::Complete(len)), _) => len,
        (p, f) => panic!("httparse {p:?}, fast path {f:?}"),
    };
    // httparse found a complete head: the framer finds the same end.
    assert_eq!(framer_len.map(|n| skip + n), Some(len), "the head ends elsewhere");
    let verdict = judge_head(&data[skip..len]);

    // Why the hyper path must keep this head (any one of these is a right answer).
    let map = header_map(req.headers);
    let mut reasons: Vec<&str> = Vec::new();
    if req.version != Some(1) {
        reasons.push("version");
    }
    let method = req.method.expect("complete");
    if !["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"].contains(&method) {
        reasons.push("method");
    }
    if map.keys().any(|k| k.as_str().contains('_')) {
        reasons.push("underscore");
    }
    if map.contains_key("expect") {
        reasons.push("expect");
    }
    if map.contains_key("transfer-encoding") {
        reasons.push("transfer-encoding");
    }
    let lengths: Vec<&HeaderValue> = map.get_all(CONTENT_LENGTH).iter().collect();
    match lengths[..] {
        [] => {}
        [v] => {
            let v = v.as_bytes();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                reasons.push("unusual");
            } else if std::str::from_utf8(v).unwrap().parse::<u64>().unwrap() > max_body {
                reasons.push("large-body");
            }
        }
        _ => reasons.push("unusual"),
    }
    let hosts: Vec<&HeaderValue> = map.get_all("host").iter().collect();
    if hosts.len() > 1 || hosts.first().is_some_and(|h| std::str::from_utf8(h.as_bytes()).is_err()) {
        reasons.push("unusual");
    }
    if map
        .get_all("via")
        .iter()
        .any(|v| v.as_bytes().windows(PSEUDONYM.len()).any(|w| w == PSEUDONYM))
    {
        reasons.push("loop");
    }

    let taken = match fast {
        Err(why) => {
            assert!(reasons.contains(&why), "left to hyper as {why}, reasons {reasons:?}");
            // The framer's framing for a chunked head: never the fast path's.
            if verdict == Ok(Framing::Chunked) {
                assert!(reasons.contains(&"transfer-encoding"));
            }
            return;
        }
        Ok(None) => panic!("the fast path wants more of a complete head"),
        Ok(Some(t)) => t,
    };
    assert!(reasons.is_empty(), "taken, but hyper's: {reasons:?}");
    assert_eq!(taken.len, len, "the fast path ends the head elsewhere");
    match verdict {
        Ok(framing) => {
            let want = if taken.content_length == 0 {
                Framing::Head
            } else {
                Framing::Fixed(taken.content_length)
            };
            assert_eq!(framing, want, "the body is framed differently");
        }
        // Refused by the framer: only a target the URI parser refuses may get this far.
        Err(code) => {
            let target = req.path.expect("complete");
            assert!(
                http::Uri::try_from(target).is_err(),
                "the fast path takes a head the framer refuses ({code})"
            );
            return;
        }
    }

    // What goes upstream.
    assert!(out.starts_with(b"earlier"));
    let written = &out[b"earlier".len()..];
    assert_eq!(&out[taken.authorization.clone()], TOKEN.as_bytes());
    let mut up_headers = [httparse::EMPTY_HEADER; 120];
    let mut up = httparse::Request::new(&mut up_headers);
    assert_eq!(
        up.parse(written),
        Ok(httparse::Status::Complete(written.len())),
        "the upstream head is not one complete head"
    );
    assert_eq!(up.method, Some(method));
    assert_eq!(up.path, Some("/base/p?q=1"));
    assert_eq!(up.version, Some(1));
    let mut reference = map.clone();
    if let Some(subject) = remove {
        reference.remove(subject);
    }
    sanitise(
        &mut reference,
        UnderscoreHeaders::Allow,
        HeaderValue::from_static("upstream.example"),
        &HeaderValue::from_static(VIA),
        &statics,
        &HeaderValue::from_static(TOKEN),
    )
    .expect("no underscore names here");
    assert_eq!(grouped_lines(up.headers), grouped_map(&reference), "different headers upstream");
    // The upstream frames the body as the client did.
    let upstream_framing = match judge_head(written) {
        Ok(framing) => framing,
        // A client head may use the framer's whole line budget; Host, Via, the statics and
        // Authorization come on top, on the hyper path too. The framer's limit is for what
        // clients send, not for what goes upstream.
        Err("header_too_large") => return,
        Err(e) => panic!("the framer refuses what goes upstream: {e}"),
    };
    let client_framing = judge_head(&data[skip..len]).expect("checked above");
    assert_eq!(upstream_framing, client_framing);
}

/// hyper's client decoder (`role.rs` `Client::decoder`) and keep-alive rule: the framing and
/// whether the connection closes, or `None` where hyper refuses the response.
fn hyper_response(
    version: u8,
    status: u16,
    head_request: bool,
    map: &HeaderMap,
) -> Option<(H1Framing, bool)> {
    let mut keep_alive = version == 1;
    let mut saw_close = false;
    for v in map.get_all(CONNECTION) {
        let has = |needle: &str| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(needle)))
        };
        if saw_close || has("close") {
            saw_close = true;
            keep_alive = false;
        } else if !keep_alive {
            keep_alive = has("keep-alive");
        }
    }
    let framing = match status {
        101 => return Some((H1Framing::Empty, true)),
        100..=199 | 204 | 304 => H1Framing::Empty,
        _ if head_request => H1Framing::Empty,
        _ if map.contains_key("transfer-encoding") => {
            if version == 0 {
                return None;
            }
            let last = map.get_all("transfer-encoding").iter().next_back()?;
            let chunked = last.to_str().is_ok_and(|s| {
                s.rsplit(',')
                    .next()
                    .is_some_and(|e| e.trim().eq_ignore_ascii_case("chunked"))
            });
            if chunked { H1Framing::Chunked } else { H1Framing::Close }
        }
        _ if map.contains_key(CONTENT_LENGTH) => {
            let mut length = None;
            for v in map.get_all(CONTENT_LENGTH) {
                for part in v.to_str().ok()?.split(',') {
                    let part = part.trim();
                    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    let n: u64 = part.parse().ok()?;
                    if length.is_some_and(|l| l != n) {
                        return None;
                    }
                    length = Some(n);
                }
            }
            let n = length?;
            if n > u64::MAX - 2 {
                return None;
            }
            H1Framing::Length(n)
        }
        _ => H1Framing::Close,
    };
    Some((framing, !keep_alive || framing == H1Framing::Close))
}

fn response(options: u8, data: &[u8]) {
    let head_request = options & 1 != 0;
    let close_client = options & 2 != 0;
    let mut out = Vec::new();
    let fast = h1_response(&mut out, data, head_request, close_client);

    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(data) {
        Err(httparse::Error::TooManyHeaders) => {
            assert_eq!(fast, Err("too-large"));
            return;
        }
        Err(_) => {
            assert_eq!(fast, Err("malformed"));
            return;
        }
        Ok(httparse::Status::Partial) => {
            let want = if data.len() >= MAX_RESPONSE_HEAD { Err("too-large") } else { Ok(None) };
            assert_eq!(fast, want);
            return;
        }
        Ok(httparse::Status::Complete(len)) if len > MAX_RESPONSE_HEAD => {
            assert_eq!(fast, Err("too-large"));
            return;
        }
        Ok(httparse::Status::Complete(len)) => len,
    };
    let status = resp.code.expect("complete");
    if status < 100 {
        assert_eq!(fast, Err("malformed"), "hyper has no status {status}");
        return;
    }
    let version = resp.version.expect("complete");
    let mut map = header_map(resp.headers);
    let reference = hyper_response(version, status, head_request, &map)
        .filter(|_| check_response_framing(&mut map));
    let Some((framing, close)) = reference else {
        assert_eq!(fast, Err("framing"), "hyper's path refuses this response");
        return;
    };
    let taken = match fast {
        Ok(Some(t)) => t,
        Err("framing") => {
            // Stricter on purpose: a length that is a list, or longer than 19 digits.
            assert!(
                map.get_all(CONTENT_LENGTH)
                    .iter()
                    .any(|v| v.as_bytes().contains(&b',') || v.as_bytes().trim_ascii().len() > 19),
                "the fast path refuses a response hyper's path passes on"
            );
            return;
        }
        other => panic!("fast path {other:?}, hyper's path passes it on"),
    };
    assert_eq!((taken.status, taken.len), (status, len));
    assert_eq!(taken.framing, framing, "the body is framed differently");
    assert_eq!(taken.close, close, "keep-alive differs");

    // What goes to the client: the hyper path's headers, the framing headers ours.
    strip_hop_by_hop(&mut map);
    let mut client_headers = [httparse::EMPTY_HEADER; 110];
    let mut client = httparse::Response::new(&mut client_headers);
    assert_eq!(client.parse(&out), Ok(httparse::Status::Complete(out.len())));
    assert_eq!(client.version, Some(1));
    assert_eq!(client.code, Some(status));
    assert_eq!(client.reason, resp.reason);
    let mut got = grouped_lines(client.headers);
    let mut want = grouped_map(&map);
    let transfer = got.remove("transfer-encoding");
    let connection = got.remove("connection");
    let length = got.remove("content-length");
    let want_length = want.remove("content-length");
    assert_eq!(got, want, "different headers to the client");
    let chunked = Some(vec![b"chunked".to_vec()]);
    match framing {
        H1Framing::Empty => {
            assert_eq!(transfer, None);
            assert_eq!(length, want_length);
        }
        H1Framing::Length(n) => {
            assert_eq!(transfer, None);
            assert_eq!(length, Some(vec![n.to_string().into_bytes()]));
        }
        H1Framing::Chunked | H1Framing::Close => {
            assert_eq!(transfer, chunked);
            assert_eq!(length, None);
        }
    }
    assert_eq!(connection, close_client.then(|| vec![b"close".to_vec()]));
}

fn chunked(seed: u8, body: &[u8]) {
    const HEAD: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    // The framer, byte by byte: where it expects the next head, or the byte it refuses.
    let mut framer = Framer::new(1024);
    assert_eq!(framer.scan(HEAD), Scan::All);
    let mut reference = Ok(None);
    for (i, b) in body.iter().enumerate() {
        match framer.scan(std::slice::from_ref(b)) {
            Scan::Reject(..) => {
                reference = Err(i);
                break;
            }
            _ if framer.framing() == Framing::Head => {
                reference = Ok(Some(i + 1));
                break;
            }
            _ => {}
        }
    }
    // The scanner, byte by byte.
    let mut scanner = ChunkedScanner::new();
    let mut bytewise = Ok(None);
    let mut bytewise_data = Vec::new();
    for (i, b) in body.iter().enumerate() {
        match scanner.scan(std::slice::from_ref(b), &mut |d| bytewise_data.extend_from_slice(d)) {
            Ok(None) => {}
            Ok(Some(n)) => {
                assert_eq!(n, 1);
                bytewise = Ok(Some(i + 1));
                break;
            }
            Err(_) => {
                bytewise = Err(i);
                break;
            }
        }
    }
    assert_eq!(bytewise, reference, "the scanner and the framer disagree");
    // In pieces (cut by a generator seeded from the input), and at once.
    for step in [usize::MAX, 1 + usize::from(seed % 23)] {
        let mut scanner = ChunkedScanner::new();
        let mut data = Vec::new();
        let mut verdict = Ok(None);
        let mut at = 0;
        while at < body.len() {
            let end = at.saturating_add(step).min(body.len());
            match scanner.scan(&body[at..end], &mut |d| data.extend_from_slice(d)) {
                Ok(None) => at = end,
                Ok(Some(n)) => {
                    verdict = Ok(Some(at + n));
                    break;
                }
                Err(_) => {
                    verdict = Err(());
                    break;
                }
            }
        }
        assert_eq!(verdict, bytewise.map_err(|_| ()), "segmentation changes the verdict");
        assert_eq!(data, bytewise_data, "segmentation changes the data");
    }
}
