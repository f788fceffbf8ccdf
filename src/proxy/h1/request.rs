//! A client's request head on the HTTP/1 fast path: parsed once with `httparse` into borrowed
//! slices ([`RequestHead`]), judged eligible or left to hyper ([`Ineligible`]), and rewritten
//! for the upstream as bytes ([`write_upstream_head`]): hop-by-hop removal, `Host`, `Via`, the
//! route's static headers and exactly one `Authorization`, with no `HeaderMap` in between.
//!
//! The wire guard has already judged every head this sees (complete, within the limits, no
//! ambiguous framing, only bytes httparse accepts), so parsing here never refuses anything:
//! a head it does not handle is [`Ineligible`] and goes to hyper, which answers it as before.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::header::VIA;
use http::{HeaderMap, HeaderName, Method};

use crate::proxy::sanitise::is_hop_by_hop;

/// Header lines in one head: the wire guard's limit.
pub(crate) const MAX_HEADERS: usize = crate::proxy::wire::MAX_HEADERS;

/// Why a head is left to hyper. Not an error: hyper serves (or refuses) it as it always did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ineligible {
    /// Not HTTP/1.1 (HTTP/1.0 keep-alive and framing rules differ).
    Version,
    /// A method other than GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS (exact spelling).
    Method,
    /// `Expect` (hyper answers `100-continue`).
    Expect,
    /// `Transfer-Encoding` (a chunked request body).
    TransferEncoding,
    /// A body longer than the fast path buffers.
    LargeBody,
    /// A header name containing `_` (the underscore policy lives on the hyper path).
    Underscore,
    /// A `Via` value naming this proxy (hyper refuses the loop).
    Loop,
    /// `Host` repeated, or anything httparse would not parse.
    Unusual,
}

/// Room for a head's header lines, which httparse fills in place: a parsed head borrows it
/// rather than carrying (zeroing and moving) 100 slots of its own. Uninitialised: creating it
/// costs nothing.
pub(crate) type Slots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// Empty [`Slots`].
pub(crate) const fn slots<'b>() -> Slots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// A complete request head, borrowing the client's buffer and the [`Slots`] it was parsed into.
pub(crate) struct RequestHead<'b> {
    /// The method.
    pub(crate) method: Method,
    /// The request target, as sent.
    pub(crate) target: &'b str,
    /// The head's length in bytes, through its empty line.
    pub(crate) len: usize,
    /// `Content-Length` (0 when absent).
    pub(crate) content_length: u64,
    /// Whether the client asked to close after this exchange (`Connection: close`).
    pub(crate) close: bool,
    /// The `Host` value, if any (at most one, or the head is ineligible).
    pub(crate) host: Option<&'b str>,
    headers: &'b [httparse::Header<'b>],
    /// Whether a `Connection` value lists a name other than `close` and the fixed hop-by-hop
    /// ones, so that [`write_upstream_head`] must look for the names it lists (most heads
    /// carry only `keep-alive` or nothing).
    names_listed: bool,
}

impl<'b> RequestHead<'b> {
    /// Parses the head at the start of `buf` into `slots`: `Ok(None)` while it is
    /// incomplete. `pseudonym` is looked for in `Via` values (a loop); bodies longer than
    /// `max_body` are left to hyper.
    pub(crate) fn parse<'a: 'b>(
        buf: &'a [u8],
        slots: &'b mut Slots<'a>,
        pseudonym: &[u8],
        max_body: u64,
    ) -> Result<Option<Self>, Ineligible> {
        let mut req = httparse::Request::new(&mut []);
        // The guard refused whatever httparse refuses; an error here is a head it was never
        // shown, which hyper answers as it always did.
        let status = req
            .parse_with_uninit_headers(buf, slots)
            .map_err(|_| Ineligible::Unusual)?;
        let httparse::Request {
            method,
            path: target,
            version,
            headers,
        } = req;
        let headers: &'b [httparse::Header<'a>] = headers;
        let httparse::Status::Complete(len) = status else {
            return Ok(None);
        };
        if version != Some(1) {
            return Err(Ineligible::Version);
        }
        // Exact spellings only: `get` is another method to hyper, and a method the fast path
        // does not name (TRACE, CONNECT, extensions) keeps the hyper path's handling.
        let method = match method.ok_or(Ineligible::Unusual)? {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "DELETE" => Method::DELETE,
            "PATCH" => Method::PATCH,
            "OPTIONS" => Method::OPTIONS,
            _ => return Err(Ineligible::Method),
        };
        let target = target.ok_or(Ineligible::Unusual)?;
        let (mut length, mut close, mut host, mut names_listed) = (None, false, None, false);
        for h in headers {
            let (name, value) = (h.name.as_bytes(), h.value);
            if name.contains(&b'_') {
                return Err(Ineligible::Underscore);
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                if length.is_some() {
                    return Err(Ineligible::Unusual);
                }
                length = Some(decimal(value).ok_or(Ineligible::Unusual)?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return Err(Ineligible::TransferEncoding);
            } else if name.eq_ignore_ascii_case(b"expect") {
                return Err(Ineligible::Expect);
            } else if name.eq_ignore_ascii_case(b"host") {
                if host.is_some() {
                    return Err(Ineligible::Unusual);
                }
                host = Some(std::str::from_utf8(value).map_err(|_| Ineligible::Unusual)?);
            } else if name.eq_ignore_ascii_case(b"via") {
                // The hyper path's test (`Proxy::is_loop`): our pseudonym anywhere in a value.
                if memchr::memmem::find(value, pseudonym).is_some() {
                    return Err(Ineligible::Loop);
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !is_hop_by_hop(token) {
                        names_listed = true;
                    }
                }
            }
        }
        let content_length = length.unwrap_or(0);
        if content_length > max_body {
            return Err(Ineligible::LargeBody);
        }
        let head = Self {
            method,
            target,
            len,
            content_length,
            close,
            host,
            headers,
            names_listed,
        };
        Ok(Some(head))
    }

    /// The header lines, in order, as (name, value).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers.iter().map(|h| (h.name, h.value))
    }

    /// Every value of header `name` (matched without regard to case).
    pub(crate) fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// What the upstream head is made of, besides the client's own header lines.
pub(crate) struct Outgoing<'a> {
    /// Path and query as sent upstream (route prefix stripped, base path added).
    pub(crate) path_and_query: &'a [u8],
    /// The `Host` value.
    pub(crate) host: &'a [u8],
    /// Our `Via` entry (`1.1 <pseudonym>`), appended after the client's `Via` lines.
    pub(crate) via: &'a [u8],
    /// The route's static headers, each replacing any client header of that name.
    pub(crate) statics: &'a HeaderMap,
    /// A header removed from every request (the subject header), if configured.
    pub(crate) remove: Option<&'a HeaderName>,
    /// The one `Authorization` value, written last.
    pub(crate) authorization: &'a [u8],
}

/// Writes the upstream request head for `head` into `out` (appending): the request line
/// `METHOD path HTTP/1.1`, `Host`, the client's header lines in order minus hop-by-hop ones
/// (and every name a `Connection` value lists), `Authorization`, `Host`, `outgoing.remove` and
/// the static names; then `Via`, the statics and `Authorization`. Returns the byte range of
/// the `Authorization` value inside `out`, so a replay can swap the token.
pub(crate) fn write_upstream_head(
    out: &mut Vec<u8>,
    head: &RequestHead<'_>,
    outgoing: &Outgoing<'_>,
) -> Range<usize> {
    let statics = outgoing.statics;
    let statics_len: usize = statics
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    // A client line grows by at most two bytes (`name:value` LF becomes `name: value` CR LF);
    // the rest is ours. One reservation, no reallocation while writing.
    out.reserve(
        head.len
            + 2 * head.headers.len()
            + outgoing.path_and_query.len()
            + outgoing.host.len()
            + outgoing.via.len()
            + outgoing.authorization.len()
            + statics_len
            + 64,
    );
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(outgoing.path_and_query);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    line(out, b"host", outgoing.host);
    // A static `Via` replaces every other one, ours included, as `HeaderMap::insert` does on
    // the hyper path. (Static `Host` and `Authorization` are refused by the configuration.)
    let static_via = statics.keys().any(|k| k == VIA);
    for (name, value) in head.headers() {
        if !forwarded(head, outgoing, name.as_bytes()) {
            continue;
        }
        line(out, name.as_bytes(), value);
    }
    if !static_via {
        line(out, b"via", outgoing.via);
    }
    // `HeaderMap::insert` keeps the last value of a name; the iterator yields a name's values
    // together, in order.
    let mut entries = statics.iter().peekable();
    while let Some((name, value)) = entries.next() {
        if entries.peek().is_none_or(|(next, _)| *next != name) {
            line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"authorization: ");
    let start = out.len();
    out.extend_from_slice(outgoing.authorization);
    let end = out.len();
    out.extend_from_slice(b"\r\n\r\n");
    start..end
}

/// Whether the client's header line `name` goes upstream: not hop-by-hop, not listed by a
/// `Connection` value, not one the proxy sets (`Host`, `Authorization`, a static header) and
/// not the subject header.
fn forwarded(head: &RequestHead<'_>, outgoing: &Outgoing<'_>, name: &[u8]) -> bool {
    !(is_hop_by_hop(name)
        || name.eq_ignore_ascii_case(b"authorization")
        || name.eq_ignore_ascii_case(b"host")
        || outgoing
            .remove
            .is_some_and(|r| r.as_str().as_bytes().eq_ignore_ascii_case(name))
        || outgoing
            .statics
            .keys()
            .any(|k| k.as_str().as_bytes().eq_ignore_ascii_case(name))
        || (head.names_listed && listed_by_connection(head, name)))
}

/// Whether a `Connection` value lists `name` (comma-separated, blanks trimmed, any case: the
/// rules of `sanitise::strip_hop_by_hop`).
fn listed_by_connection(head: &RequestHead<'_>, name: &[u8]) -> bool {
    head.values("connection").any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    })
}

/// One header line.
pub(super) fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: decimal digits only (no sign, no list, no blanks; httparse has
/// already trimmed the value), at most 19 so that it fits a u64 (the guard's own rule).
pub(super) fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http::header::{AUTHORIZATION, HOST};

    use super::*;
    use crate::config::UnderscoreHeaders;

    const US: &[u8] = b"bearer-proxy-0000beef";
    const MAX_BODY: u64 = 1 << 20;

    fn parse(head: &[u8]) -> Result<Option<RequestHead<'_>>, Ineligible> {
        // Leaked: a test's heads outlive this helper.
        RequestHead::parse(head, Box::leak(Box::new(slots())), US, MAX_BODY)
    }

    fn ineligible(head: &str) -> Ineligible {
        match parse(head.as_bytes()) {
            Err(e) => e,
            Ok(h) => panic!("eligible: {head:?} ({:?})", h.map(|h| h.len)),
        }
    }

    fn eligible(head: &str) -> RequestHead<'_> {
        parse(head.as_bytes())
            .unwrap_or_else(|e| panic!("{head:?}: {e:?}"))
            .unwrap_or_else(|| panic!("{head:?}: incomplete"))
    }

    /// The upstream head for `head` with these statics and subject header.
    fn upstream(
        head: &RequestHead<'_>,
        statics: &HeaderMap,
        remove: Option<&HeaderName>,
    ) -> (Vec<u8>, Range<usize>) {
        let mut out = b"left alone".to_vec();
        let range = write_upstream_head(
            &mut out,
            head,
            &Outgoing {
                path_and_query: b"/base/x?q=1",
                host: b"up.example",
                via: b"1.1 bearer-proxy-0000beef",
                statics,
                remove,
                authorization: b"Bearer injected",
            },
        );
        assert!(out.starts_with(b"left alone"));
        (
            out.split_off(b"left alone".len()),
            range.start - 10..range.end - 10,
        )
    }

    #[test]
    fn a_typical_head_is_parsed_in_place() {
        let raw = "GET http://ob.flinksapp.com/a?b=1 HTTP/1.1\r\nHost: ob.flinksapp.com\r\n\
                   Accept: */*\r\nContent-Length: 12\r\n\r\nbody follows";
        let head = eligible(raw);
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.target, "http://ob.flinksapp.com/a?b=1");
        assert_eq!(head.len, raw.len() - "body follows".len());
        assert_eq!(head.content_length, 12);
        assert_eq!(head.host, Some("ob.flinksapp.com"));
        assert!(!head.close);
        assert_eq!(head.headers().count(), 3);
        assert_eq!(head.values("ACCEPT").collect::<Vec<_>>(), [b"*/*"]);
        // Empty lines before the request line are skipped and counted, as hyper does.
        assert_eq!(eligible("\r\n\nGET / HTTP/1.1\r\n\r\n").len, 21);
        // Bare LF line ends are HTTP/1.1 (and the guard accepts them).
        assert_eq!(
            eligible("PUT / HTTP/1.1\nContent-Length:  7 \n\n").content_length,
            7
        );
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        for cut in [
            "",
            "GET",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r",
        ] {
            assert!(matches!(parse(cut.as_bytes()), Ok(None)), "{cut:?}");
        }
    }

    #[test]
    fn every_method_the_fast_path_names_and_no_other() {
        for (m, want) in [
            ("GET", Method::GET),
            ("HEAD", Method::HEAD),
            ("POST", Method::POST),
            ("PUT", Method::PUT),
            ("DELETE", Method::DELETE),
            ("PATCH", Method::PATCH),
            ("OPTIONS", Method::OPTIONS),
        ] {
            assert_eq!(eligible(&format!("{m} / HTTP/1.1\r\n\r\n")).method, want);
        }
        for m in [
            "get", "Get", "TRACE", "TRACK", "CONNECT", "PROPFIND", "GETX",
        ] {
            let head = format!("{m} / HTTP/1.1\r\n\r\n");
            assert_eq!(ineligible(&head), Ineligible::Method, "{m}");
        }
    }

    #[test]
    fn heads_the_fast_path_leaves_to_hyper() {
        for (head, why) in [
            ("GET / HTTP/1.0\r\n\r\n", Ineligible::Version),
            (
                "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
                Ineligible::Expect,
            ),
            (
                "GET / HTTP/1.1\r\nexpect: nonsense\r\n\r\n",
                Ineligible::Expect,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ineligible::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ineligible::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n",
                Ineligible::LargeBody,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 9999999999999999999\r\n\r\n",
                Ineligible::LargeBody,
            ),
            (
                "GET / HTTP/1.1\r\nX_Api_Key: k\r\n\r\n",
                Ineligible::Underscore,
            ),
            (
                "GET / HTTP/1.1\r\nVia: 1.1 a, 1.1 bearer-proxy-0000beef\r\n\r\n",
                Ineligible::Loop,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                Ineligible::Unusual,
            ),
            // Length refusals the guard makes first; the fast path is defensive anyway.
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: -0\r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
                Ineligible::Unusual,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n",
                Ineligible::Unusual,
            ),
            // What httparse refuses.
            (
                "GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
                Ineligible::Unusual,
            ),
            ("GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n", Ineligible::Unusual),
            ("GET / HTTP/1.1\r\nX-A : 1\r\n\r\n", Ineligible::Unusual),
            (
                "GET / HTTP/1.1\r\nX-A: 1\rX-B: 2\r\n\r\n",
                Ineligible::Unusual,
            ),
            ("GET / HTTP/2.0\r\n\r\n", Ineligible::Unusual),
            ("\rGET / HTTP/1.1\r\n\r\n", Ineligible::Unusual),
        ] {
            assert_eq!(ineligible(head), why, "{head:?}");
        }
        // A pseudonym seen in another header, or another proxy's, is no loop.
        eligible(
            "GET / HTTP/1.1\r\nVia: 1.1 bearer-proxy-0000bee\r\nX-A: bearer-proxy-0000beef\r\n\r\n",
        );
        // Upgrade and HTTP2-Settings are hop-by-hop: stripped, not a reason to leave.
        eligible(
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            ineligible(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Ineligible::Unusual
        );
    }

    #[test]
    fn connection_close_is_any_close_token() {
        for (value, close) in [
            ("close", true),
            ("Keep-Alive, CLOSE", true),
            (" x-a ,close ", true),
            ("closed", false),
            ("keep-alive", false),
            ("x-close", false),
        ] {
            let head = format!("GET / HTTP/1.1\r\nConnection: {value}\r\n\r\n");
            assert_eq!(eligible(&head).close, close, "{value}");
        }
        let two = "GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n";
        assert!(eligible(two).close);
    }

    #[test]
    fn the_upstream_head_is_written_as_bytes() {
        let head = eligible(
            "GET http://ob.flinksapp.com/a?b=1 HTTP/1.1\r\nHost: ob.flinksapp.com\r\n\
             User-Agent: python-requests/2.31.0\r\nConnection: keep-alive\r\n\
             Proxy-Connection: keep-alive\r\nAccept: application/json\r\n\r\n",
        );
        let (out, auth) = upstream(&head, &HeaderMap::new(), None);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "GET /base/x?q=1 HTTP/1.1\r\nhost: up.example\r\n\
             User-Agent: python-requests/2.31.0\r\nAccept: application/json\r\n\
             via: 1.1 bearer-proxy-0000beef\r\nauthorization: Bearer injected\r\n\r\n"
        );
        assert_eq!(&out[auth], b"Bearer injected");
    }

    #[test]
    fn hop_by_hop_listed_and_replaced_headers_never_go_upstream() {
        let head = eligible(
            "POST /x HTTP/1.1\r\nConnection: Authorization, Host, X-Secret-Hop, via\r\n\
             Authorization: Bearer from-the-app\r\nauthorization: Basic second\r\n\
             Host: attacker.example\r\nX-Secret-Hop: 1\r\nVia: 1.0 earlier\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\nUpgrade: websocket\r\n\
             Proxy-Authorization: Basic abc\r\nProxy-Authenticate: x\r\nx-static: app\r\n\
             X-Subject: alice\r\nContent-Length: 3\r\nX-End-To-End: kept\r\n\r\n",
        );
        let mut statics = HeaderMap::new();
        statics.insert("x-static", HeaderValue::from_static("route"));
        let subject = HeaderName::from_static("x-subject");
        let (out, auth) = upstream(&head, &statics, Some(&subject));
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /base/x?q=1 HTTP/1.1\r\nhost: up.example\r\nContent-Length: 3\r\n\
             X-End-To-End: kept\r\nvia: 1.1 bearer-proxy-0000beef\r\nx-static: route\r\n\
             authorization: Bearer injected\r\n\r\n"
        );
        assert_eq!(&out[auth], b"Bearer injected");
    }

    #[test]
    fn client_via_lines_are_kept_before_ours_and_a_static_via_replaces_all() {
        let head = eligible("GET / HTTP/1.1\r\nVia: 1.0 a\r\nX-A: 1\r\nvia: 1.1 b\r\n\r\n");
        let (out, _) = upstream(&head, &HeaderMap::new(), None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /base/x?q=1 HTTP/1.1\r\nhost: up.example\r\nVia: 1.0 a\r\nX-A: 1\r\n\
             via: 1.1 b\r\nvia: 1.1 bearer-proxy-0000beef\r\nauthorization: Bearer injected\r\n\r\n"
        );
        let mut statics = HeaderMap::new();
        statics.append("via", HeaderValue::from_static("first"));
        statics.append("via", HeaderValue::from_static("1.1 gateway"));
        let (out, _) = upstream(&head, &statics, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /base/x?q=1 HTTP/1.1\r\nhost: up.example\r\nX-A: 1\r\nvia: 1.1 gateway\r\n\
             authorization: Bearer injected\r\n\r\n"
        );
    }

    /// Header values grouped by lowercased name, in order, sorted by name.
    type Grouped = Vec<(String, Vec<Vec<u8>>)>;

    /// What the hyper path sends for `raw`: httparse into a `HeaderMap`, the subject header
    /// removed, `sanitise`, `inject`. Names lowercased, values in order per name.
    fn reference(
        raw: &[u8],
        statics: &HeaderMap,
        remove: &HeaderName,
    ) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(raw).unwrap();
        let mut map = HeaderMap::new();
        for h in req.headers.iter() {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        map.remove(remove);
        crate::proxy::sanitise::sanitise(
            &mut map,
            UnderscoreHeaders::Allow,
            HeaderValue::from_static("up.example"),
            &HeaderValue::from_static("1.1 bearer-proxy-0000beef"),
            statics,
        )
        .unwrap()
        .inject(&HeaderValue::from_static("Bearer injected"));
        let mut got: Vec<(String, Vec<Vec<u8>>)> = map
            .keys()
            .map(|k| {
                (
                    k.to_string(),
                    map.get_all(k)
                        .iter()
                        .map(|v| v.as_bytes().to_vec())
                        .collect(),
                )
            })
            .collect();
        got.sort();
        got
    }

    /// The header lines of a written head, grouped by lowercased name.
    fn grouped(out: &[u8]) -> (String, Grouped) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
        let mut req = httparse::Request::new(&mut headers);
        assert_eq!(
            req.parse(out).unwrap(),
            httparse::Status::Complete(out.len())
        );
        let line = format!(
            "{} {} HTTP/1.{}",
            req.method.unwrap(),
            req.path.unwrap(),
            req.version.unwrap()
        );
        let mut got: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
        for h in req.headers.iter() {
            got.entry(h.name.to_ascii_lowercase())
                .or_default()
                .push(h.value.to_vec());
        }
        (line, got.into_iter().collect())
    }

    proptest::proptest! {
        #[test]
        fn the_upstream_head_carries_what_sanitise_and_inject_leave(
            lines in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "Host", "host", "Authorization", "AUTHORIZATION", "Connection",
                        "connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection",
                        "Proxy-Authorization", "Proxy-Authenticate", "Via", "VIA", "X-Static",
                        "x-subject", "X-A", "x-a", "X-B", "Accept", "Content-Length", "Cookie",
                    ]),
                    proptest::sample::select(vec![
                        "1", "x-a", "X-B, keep-alive", "close", "authorization, host",
                        " via ,x-static", "x-subject", "Bearer app", "a.example", "1.0 other",
                        "", "te, trailer", "x-a,,x-b", "upgrade",
                    ]),
                ),
                0..12,
            ),
            with_static in proptest::bool::ANY,
        ) {
            let mut raw = b"GET /p HTTP/1.1\r\n".to_vec();
            for (n, v) in &lines {
                raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let mut statics = HeaderMap::new();
            if with_static {
                statics.insert("x-static", HeaderValue::from_static("route"));
            }
            let subject = HeaderName::from_static("x-subject");
            let head = match parse(&raw) {
                Ok(Some(h)) => h,
                // Two Hosts or two lengths: hyper's business.
                Err(Ineligible::Unusual) => return Ok(()),
                Ok(None) => panic!("incomplete"),
                Err(e) => panic!("{e:?}"),
            };
            let (out, auth) = upstream(&head, &statics, Some(&subject));
            let (line, got) = grouped(&out);
            proptest::prop_assert_eq!(line, "GET /base/x?q=1 HTTP/1.1");
            proptest::prop_assert_eq!(got, reference(&raw, &statics, &subject));
            proptest::prop_assert_eq!(&out[auth], b"Bearer injected");
            proptest::prop_assert!(out.ends_with(b"authorization: Bearer injected\r\n\r\n"));
            let mut s = slots();
            let again = RequestHead::parse(&out, &mut s, b"another-proxy", MAX_BODY).unwrap().unwrap();
            proptest::prop_assert_eq!(again.values(AUTHORIZATION.as_str()).count(), 1);
            proptest::prop_assert_eq!(again.values(HOST.as_str()).collect::<Vec<_>>(), [b"up.example"]);
        }
    }
}
