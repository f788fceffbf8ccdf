//! A client's request head on the HTTP/1 fast path: parsed once with `httparse` into borrowed
//! slices ([`RequestHead`]), judged eligible or left to hyper ([`Ineligible`]), and rewritten
//! for the upstream as bytes ([`write_upstream_head`]): hop-by-hop removal, `Host`, `Via`, the
//! route's static headers and exactly one `Authorization`, with no `HeaderMap` in between.
//!
//! The wire guard has already judged every head this sees (complete, within the limits, no
//! ambiguous framing, only bytes httparse accepts), so parsing here never refuses anything:
//! a head it does not handle is [`Ineligible`] and goes to hyper, which answers it as before.

use std::ops::Range;

use http::{HeaderMap, HeaderName, Method};

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
        let _ = (buf, pseudonym, max_body);
        todo!()
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
    let _ = (out, head, outgoing);
    todo!()
}
