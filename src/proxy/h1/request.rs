//! A client's request head on the HTTP/1 fast path: parsed once with `httparse` into borrowed
//! slices ([`RequestHead`]), judged eligible or left to hyper ([`Ineligible`]), and rewritten
//! for the upstream as bytes ([`write_upstream_head`]): hop-by-hop removal, `Host`, `Via`, the
//! route's static headers and exactly one `Authorization`, with no `HeaderMap` in between.
//!
//! The wire guard has already judged every head this sees (complete, within the limits, no
//! ambiguous framing, only bytes httparse accepts), so parsing here never refuses anything:
//! a head it does not handle is [`Ineligible`] and goes to hyper, which answers it as before.

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

/// A complete request head, borrowing the client's buffer.
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
    headers: [httparse::Header<'b>; MAX_HEADERS],
    count: usize,
    /// Whether a `Connection` value lists a name other than `close` and the fixed hop-by-hop
    /// ones, so that [`write_upstream_head`] must look for the names it lists (most heads
    /// carry only `keep-alive` or nothing).
    names_listed: bool,
}

impl<'b> RequestHead<'b> {
    /// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete. `pseudonym`
    /// is looked for in `Via` values (a loop); bodies longer than `max_body` are left to
    /// hyper.
    pub(crate) fn parse(
        buf: &'b [u8],
        pseudonym: &[u8],
        max_body: u64,
    ) -> Result<Option<Self>, Ineligible> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (status, method, target, version, count) = {
            let mut req = httparse::Request::new(&mut headers);
            // The guard refused whatever httparse refuses; an error here is a head it was never
            // shown, which hyper answers as it always did.
            let status = req.parse(buf).map_err(|_| Ineligible::Unusual)?;
            (status, req.method, req.path, req.version, req.headers.len())
        };
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
        for h in &headers[..count] {
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
            count,
            names_listed,
        };
        Ok(Some(head))
    }

    /// The header lines, in order, as (name, value).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers[..self.count].iter().map(|h| (h.name, h.value))
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
            + 2 * head.count
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
