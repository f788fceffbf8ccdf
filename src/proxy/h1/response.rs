//! An upstream's response head on the HTTP/1 fast path: parsed with `httparse`
//! ([`ResponseHead::parse`]), its framing decided with the rules of the hyper path
//! (`forward::check_response_framing`: a `Content-Length` beside `chunked` is dropped, any other
//! transfer coding refused), and rewritten for the client ([`write_client_head`]) without
//! hop-by-hop headers.

/// A response head at most this long (the hyper client's default read buffer limit is larger,
/// but no API answers with 64 KiB of headers).
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How the response body is delimited, as the upstream sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body (`HEAD`, 1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`, passed through as is.
    Chunked,
    /// Until the upstream closes; re-chunked for the client.
    Close,
}

/// Why an upstream response head is refused (the client gets a 502).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResponseError {
    /// Not a parsable HTTP/1.x response head.
    #[error("malformed response head")]
    Malformed,
    /// Longer than [`MAX_RESPONSE_HEAD`] or too many header lines.
    #[error("response head too large")]
    TooLarge,
    /// A transfer coding other than one `chunked`, or conflicting lengths.
    #[error("response framing refused")]
    Framing,
}

/// A complete response head, borrowing the upstream buffer.
pub(crate) struct ResponseHead<'b> {
    /// The status code.
    pub(crate) status: u16,
    /// The reason phrase.
    pub(crate) reason: &'b str,
    /// The head's length in bytes, through its empty line.
    pub(crate) len: usize,
    /// How its body is delimited.
    pub(crate) framing: ResponseFraming,
    /// Whether the upstream connection cannot carry another request afterwards
    /// (`Connection: close`, HTTP/1.0 without keep-alive, or a body delimited by the close).
    pub(crate) close: bool,
    headers: [httparse::Header<'b>; crate::proxy::wire::MAX_HEADERS],
    count: usize,
}

impl<'b> ResponseHead<'b> {
    /// Parses the head at the start of `buf`: `Ok(None)` while incomplete. `head_request`:
    /// the request was `HEAD`, so no body follows whatever the head says.
    pub(crate) fn parse(buf: &'b [u8], head_request: bool) -> Result<Option<Self>, ResponseError> {
        let _ = (buf, head_request);
        todo!()
    }

    /// The header lines, in order, as (name, value).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers[..self.count].iter().map(|h| (h.name, h.value))
    }
}

/// Writes the client's response head for `head` into `out` (appending): `HTTP/1.1 status
/// reason`, the upstream's header lines minus hop-by-hop ones (and every name a `Connection`
/// value lists) and minus `Content-Length` when chunked; then `Transfer-Encoding: chunked` for
/// [`ResponseFraming::Chunked`] and [`ResponseFraming::Close`], and `Connection: close` when
/// `close_client`.
pub(crate) fn write_client_head(out: &mut Vec<u8>, head: &ResponseHead<'_>, close_client: bool) {
    let _ = (out, head, close_client);
    todo!()
}
