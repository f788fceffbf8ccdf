//! An upstream's response head on the HTTP/1 fast path: parsed with `httparse`
//! ([`ResponseHead::parse`]), its framing decided with the rules of the hyper path
//! (`forward::check_response_framing`: a `Content-Length` beside `chunked` is dropped, any other
//! transfer coding refused), and rewritten for the client ([`write_client_head`]) without
//! hop-by-hop headers.

use super::request::{Slots, decimal, line};
use crate::proxy::sanitise::is_hop_by_hop;

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

/// A complete response head, borrowing the upstream buffer and the [`Slots`] it was parsed
/// into.
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
    headers: &'b [httparse::Header<'b>],
    /// Whether the upstream sent `Transfer-Encoding: chunked` (then its `Content-Length`, if
    /// any, is not passed on, as `check_response_framing` removes it).
    chunked_coding: bool,
}

impl<'b> ResponseHead<'b> {
    /// Parses the head at the start of `buf` into `slots`: `Ok(None)` while incomplete.
    /// `head_request`: the request was `HEAD`, so no body follows whatever the head says.
    pub(crate) fn parse<'a: 'b>(
        buf: &'a [u8],
        slots: &'b mut Slots<'a>,
        head_request: bool,
    ) -> Result<Option<Self>, ResponseError> {
        let mut resp = httparse::Response::new(&mut []);
        let status = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, slots)
        {
            Ok(s) => s,
            Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
            Err(_) => return Err(ResponseError::Malformed),
        };
        let httparse::Response {
            version,
            code,
            reason,
            headers,
        } = resp;
        let headers: &'b [httparse::Header<'a>] = headers;
        let len = match status {
            httparse::Status::Complete(len) if len > MAX_RESPONSE_HEAD => {
                return Err(ResponseError::TooLarge);
            }
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial if buf.len() >= MAX_RESPONSE_HEAD => {
                return Err(ResponseError::TooLarge);
            }
            httparse::Status::Partial => return Ok(None),
        };
        let (Some(version), Some(status), Some(reason)) = (version, code, reason) else {
            return Err(ResponseError::Malformed);
        };
        // hyper's `StatusCode` starts at 100.
        if status < 100 {
            return Err(ResponseError::Malformed);
        }
        // One pass: the transfer codings, the lengths and the connection options.
        let (mut codings, mut chunked, mut length) = (0usize, false, None::<u64>);
        let (mut bad_length, mut close, mut keep_alive) = (false, false, false);
        for h in headers {
            let (name, value) = (h.name.as_bytes(), h.value);
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings += 1;
                chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case(b"content-length") {
                // hyper accepts identical repeats (and lists of them): the body length is not
                // in doubt, and it is written once. Anything but digits is refused, stricter
                // than hyper's lists (`5, 5`), which no API sends.
                match (decimal(value), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => bad_length = true,
                }
            } else if name.eq_ignore_ascii_case(b"connection") && is_visible_text(value) {
                // A value with other bytes is not text to hyper (`HeaderValue::to_str`), so it
                // names neither `close` nor `keep-alive` there; nor here.
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        // `check_response_framing` runs on every response the hyper path passes on, whatever
        // its status: a coding other than exactly one `chunked` is refused.
        if codings > 1 || (codings == 1 && !chunked) {
            return Err(ResponseError::Framing);
        }
        // hyper's client decoder (`role.rs`, RFC 9112 §6.3): no body for these, whatever the
        // head says; then the coding; then the length; else until the connection closes.
        let framing = if head_request || (100..200).contains(&status) || matches!(status, 204 | 304)
        {
            ResponseFraming::Empty
        } else if codings == 1 {
            // HTTP/1.0 has no transfer codings: hyper refuses the message.
            if version == 0 {
                return Err(ResponseError::Framing);
            }
            ResponseFraming::Chunked
        } else if bad_length {
            return Err(ResponseError::Framing);
        } else if let Some(n) = length {
            ResponseFraming::Length(n)
        } else {
            ResponseFraming::Close
        };
        // hyper's keep-alive rule: `close` anywhere wins; HTTP/1.0 needs `keep-alive`. A 101
        // hands the connection over (hyper never reuses it).
        let close = close
            || (version == 0 && !keep_alive)
            || status == 101
            || framing == ResponseFraming::Close;
        Ok(Some(Self {
            status,
            reason,
            len,
            framing,
            close,
            headers,
            chunked_coding: codings == 1,
        }))
    }

    /// The header lines, in order, as (name, value).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers.iter().map(|h| (h.name, h.value))
    }
}

/// Whether `value` is visible ASCII, spaces and tabs: what `HeaderValue::to_str` accepts.
fn is_visible_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Writes the client's response head for `head` into `out` (appending): `HTTP/1.1 status
/// reason`, the upstream's header lines minus hop-by-hop ones (and every name a `Connection`
/// value lists) and minus `Content-Length` when chunked; then `Transfer-Encoding: chunked` for
/// [`ResponseFraming::Chunked`] and [`ResponseFraming::Close`], and `Connection: close` when
/// `close_client`.
pub(crate) fn write_client_head(out: &mut Vec<u8>, head: &ResponseHead<'_>, close_client: bool) {
    // A client line grows by at most two bytes (`name:value` LF becomes `name: value` CR LF).
    out.reserve(head.len + 2 * head.headers.len() + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = [0u8; 3];
    // httparse reads exactly three digits.
    code[0] = b'0' + (head.status / 100 % 10) as u8;
    code[1] = b'0' + (head.status / 10 % 10) as u8;
    code[2] = b'0' + (head.status % 10) as u8;
    out.extend_from_slice(&code);
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let names_listed = head
        .values(b"connection")
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| !t.trim_ascii().is_empty() && !is_hop_by_hop(t.trim_ascii()));
    // The body's framing headers are ours: a length is written once, however many times the
    // upstream repeated it (and even if a `Connection` value listed it).
    let own_length = matches!(head.framing, ResponseFraming::Length(_));
    for (name, value) in head.headers() {
        let name = name.as_bytes();
        if is_hop_by_hop(name)
            || (name.eq_ignore_ascii_case(b"content-length") && (own_length || head.chunked_coding))
            || (names_listed && listed_by_connection(head, name))
        {
            continue;
        }
        line(out, name, value);
    }
    match head.framing {
        ResponseFraming::Length(n) => {
            let mut digits = [0u8; 20];
            line(out, b"content-length", format_decimal(n, &mut digits));
        }
        ResponseFraming::Chunked | ResponseFraming::Close => {
            line(out, b"transfer-encoding", b"chunked");
        }
        ResponseFraming::Empty => {}
    }
    if close_client {
        line(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

impl ResponseHead<'_> {
    /// Every value of header `name` (matched without regard to case).
    fn values<'s>(&'s self, name: &'s [u8]) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.as_bytes().eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// Whether a `Connection` value lists `name` (the rules of `sanitise::strip_hop_by_hop`).
fn listed_by_connection(head: &ResponseHead<'_>, name: &[u8]) -> bool {
    head.values(b"connection").any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    })
}

/// `n` in decimal, written into `buf` without allocating.
fn format_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::request::slots;

    fn parse(raw: &str) -> Result<Option<ResponseHead<'_>>, ResponseError> {
        // Leaked: a test's heads outlive this helper.
        ResponseHead::parse(raw.as_bytes(), Box::leak(Box::new(slots())), false)
    }

    fn head(raw: &str) -> ResponseHead<'_> {
        parse(raw)
            .unwrap_or_else(|e| panic!("{raw:?}: {e}"))
            .unwrap_or_else(|| panic!("{raw:?}: incomplete"))
    }

    fn written(head: &ResponseHead<'_>, close_client: bool) -> String {
        let mut out = Vec::new();
        write_client_head(&mut out, head, close_client);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_typical_response_keeps_its_headers_and_length() {
        let raw = "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Type: application/json\r\n\
                   Content-Length: 1432\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n{";
        let h = head(raw);
        assert_eq!((h.status, h.reason, h.len), (200, "OK", raw.len() - 1));
        assert_eq!(h.framing, ResponseFraming::Length(1432));
        assert!(!h.close);
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Type: application/json\r\n\
             content-length: 1432\r\n\r\n"
        );
        assert_eq!(
            written(&h, true),
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Type: application/json\r\n\
             content-length: 1432\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn bodiless_responses_are_empty_whatever_they_say() {
        for (raw, head_request) in [
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 100 Continue\r\n\r\n", false),
            ("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.0 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let mut s = slots();
            let h = ResponseHead::parse(raw.as_bytes(), &mut s, head_request)
                .unwrap()
                .unwrap();
            assert_eq!(h.framing, ResponseFraming::Empty, "{raw:?}");
        }
        // The length of a HEAD answer is the client's to read; no coding is added.
        let mut s = slots();
        let h = ResponseHead::parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &mut s,
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        );
        // A 101 is parsed (the driver refuses it) and never reused.
        let h = head("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n");
        assert_eq!((h.framing, h.close), (ResponseFraming::Empty, true));
    }

    #[test]
    fn chunked_wins_over_a_length_which_is_dropped() {
        for te in ["chunked", "Chunked", " CHUNKED "] {
            let raw = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: {te}\r\nX-A: 1\r\n\r\n"
            );
            let h = head(&raw);
            assert_eq!(h.framing, ResponseFraming::Chunked);
            assert!(!h.close);
            assert_eq!(
                written(&h, false),
                "HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n"
            );
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            // check_response_framing looks at every response.
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(ResponseError::Framing), "{raw:?}");
        }
    }

    #[test]
    fn identical_lengths_are_written_once() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length:  5\r\n\r\n");
        assert_eq!(h.framing, ResponseFraming::Length(5));
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        );
        // Even a `Connection` value listing it cannot take the body's length away.
        let h = head("HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn a_body_until_close_is_rechunked_and_ends_the_connection() {
        let h = head("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n");
        assert_eq!((h.framing, h.close), (ResponseFraming::Close, true));
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn keep_alive_follows_hypers_rules() {
        for (raw, close) in [
            // Found by h1_differential: a value hyper cannot read as text names nothing, so
            // an HTTP/1.0 answer with it closes.
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, X-\u{80}A\r\n\r\n",
                true,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            (
                "HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: x, close\r\nContent-Length: 0\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\
                 Content-Length: 0\r\n\r\n",
                true,
            ),
            ("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", true),
            (
                "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
                true,
            ),
        ] {
            assert_eq!(head(raw).close, close, "{raw:?}");
        }
        // The fuzzer's input, byte for byte (a lone 0x80, not UTF-8).
        let raw =
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, X-\x80A\r\n\r\n";
        let mut s = slots();
        let h = ResponseHead::parse(raw, &mut s, false).unwrap().unwrap();
        assert!(h.close);
    }

    #[test]
    fn hop_by_hop_and_listed_headers_are_not_passed_on() {
        let h = head(
            "HTTP/1.1 404 Not Here\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n\
             Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: x\r\nUpgrade: h2\r\n\
             Set-Cookie: a\r\nset-cookie: b\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!(
            written(&h, false),
            "HTTP/1.1 404 Not Here\r\nSet-Cookie: a\r\nset-cookie: b\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn the_status_line_is_http11_with_the_reason_as_sent() {
        let h = head("HTTP/1.0 299 Custom Thing\r\nContent-Length: 0\r\n\r\n");
        assert!(written(&h, false).starts_with("HTTP/1.1 299 Custom Thing\r\n"));
        let h = head("HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n");
        assert!(written(&h, false).starts_with("HTTP/1.1 200 \r\n"));
        let h = head("HTTP/1.1 999 Top\nContent-Length: 0\n\n");
        assert!(written(&h, false).starts_with("HTTP/1.1 999 Top\r\n"));
    }

    #[test]
    fn malformed_incomplete_and_oversized_heads() {
        for raw in ["HTTP/1.1 200 OK\r\nX-A: 1\r\n", "HTTP/1.1 200", ""] {
            assert!(matches!(parse(raw), Ok(None)), "{raw:?}");
        }
        for raw in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\0b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX A: 1\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(ResponseError::Malformed), "{raw:?}");
        }
        let many: String = (0..=crate::proxy::wire::MAX_HEADERS)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(parse(&raw).err(), Some(ResponseError::TooLarge));
        let big = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        assert_eq!(parse(&big).err(), Some(ResponseError::TooLarge));
        let complete = format!("{big}\r\n");
        assert_eq!(parse(&complete).err(), Some(ResponseError::TooLarge));
    }
}
