//! The wire guard's framing state machine, free of I/O: it follows HTTP/1 request framing byte
//! by byte (heads, `Content-Length` and chunked bodies, `CONNECT` tunnels) and judges each
//! complete head (see the module documentation of `wire`). [`Framer::scan`] says which bytes
//! are complete and accepted, which are an incomplete head, and where a refused head starts.

use crate::proxy::error::{ErrorCode, ProxyError};

/// Header lines accepted in one request head; hyper's own default limit, whose bare 431 we
/// pre-empt with our JSON one.
pub(crate) const MAX_HEADERS: usize = 100;

const TOO_LARGE: ProxyError = ProxyError::new(
    ErrorCode::HeaderTooLarge,
    "the request's header section is larger than the proxy accepts (proxy.max_header_bytes) \
     or has too many header lines",
);
const AMBIGUOUS: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "ambiguous request framing: Content-Length together with Transfer-Encoding, Content-Length \
     repeated or not a number, a transfer coding other than one \"chunked\", or a folded header \
     line; the request was not forwarded",
);
const BAD_CHUNK: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "malformed chunked request body: the request was not forwarded completely",
)
.closing();
const BAD_URI: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "malformed request target: the URL cannot be parsed (check brackets around IPv6 \
     addresses, the port and the characters used)",
);
const MALFORMED: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "malformed request head: expected an HTTP/1.1 or HTTP/1.0 request line and \"name: value\" \
     header lines, without control characters",
);

/// What the framer decided about the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Every byte belongs to complete, accepted message parts.
    All,
    /// Bytes from this offset on are an incomplete request head.
    Partial(usize),
    /// The head starting at this offset is refused.
    Reject(usize, ProxyError),
}

/// What the framer expects next, as the fuzz harness sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A request head.
    Head,
    /// This many more body bytes.
    Fixed(u64),
    /// A chunked body.
    Chunked,
    /// No more framing (after `CONNECT`, or a refusal).
    Opaque,
}

/// The length of the complete head at the start of `data` (through its empty line), if there
/// is one; the framer's own search (for the fuzz harness).
pub(crate) fn head_len(data: &[u8]) -> Option<usize> {
    find_head_end(data, 0).ok()
}

/// The framer's verdict on one complete head: how its body is framed, or the refusal.
pub(crate) fn judge_head(head: &[u8]) -> Result<Framing, ErrorCode> {
    check_head(head)
        .map(|state| {
            Framer {
                state,
                max_head: usize::MAX,
            }
            .framing()
        })
        .map_err(|e| e.code)
}

/// Where in the message stream the framer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting (or inside) a request head; `searched` bytes of it were already searched for
    /// its end.
    Head { searched: usize },
    /// A `Content-Length` body with this many bytes left.
    Fixed(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// No longer framed: after `CONNECT` (a tunnel), or after a refusal (no byte after it is
    /// handed to hyper).
    Opaque,
}

/// Position inside a chunked body; mirrors hyper's decoder so both agree on where it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// First hex digit of a size line.
    Start,
    /// More hex digits; the value so far.
    Size(u64),
    /// Spaces after the size.
    SizeLws(u64),
    /// A chunk extension, up to CR.
    Extension(u64),
    /// LF ending the size line.
    SizeLf(u64),
    /// Data bytes left.
    Data(u64),
    /// CR after data.
    DataCr,
    /// LF after data.
    DataLf,
    /// Start of a trailer line, or CR of the final empty line.
    EndCr,
    /// Inside a trailer line.
    Trailer,
    /// LF ending a trailer line.
    TrailerLf,
    /// LF of the final empty line.
    EndLf,
}

/// The framing state machine, free of I/O so it can be tested byte by byte.
#[derive(Debug)]
pub(crate) struct Framer {
    state: State,
    max_head: usize,
}

impl Framer {
    /// A framer expecting a request head of at most `max_head` bytes.
    pub(crate) fn new(max_head: usize) -> Self {
        Self {
            state: State::Head { searched: 0 },
            max_head,
        }
    }

    /// Whether the framer is inside a body.
    pub(super) fn in_body(&self) -> bool {
        matches!(self.state, State::Fixed(_) | State::Chunked(_))
    }

    /// Stops following the framing: after a refusal (nothing more is parsed) or a `CONNECT`.
    pub(super) fn set_opaque(&mut self) {
        self.state = State::Opaque;
    }

    pub(super) fn is_opaque(&self) -> bool {
        self.state == State::Opaque
    }

    /// What the framer expects next (for the fuzz harness).
    pub(crate) fn framing(&self) -> Framing {
        match self.state {
            State::Head { .. } => Framing::Head,
            State::Fixed(n) => Framing::Fixed(n),
            State::Chunked(_) => Framing::Chunked,
            State::Opaque => Framing::Opaque,
        }
    }

    /// Follows `data`. While a head is incomplete, the next call must pass the same head again
    /// from its start, with more bytes after it.
    pub(crate) fn scan(&mut self, data: &[u8]) -> Scan {
        let mut pos = 0;
        while pos < data.len() {
            match self.state {
                State::Opaque => return Scan::All,
                State::Head { searched } => {
                    // Empty lines before a request line are skipped by hyper too.
                    if searched == 0 && matches!(data[pos], b'\r' | b'\n') {
                        pos += 1;
                        continue;
                    }
                    let head = &data[pos..];
                    // A head that arrives whole (the usual case) is checked in the same pass
                    // that finds its end; one that arrives in pieces is only searched for its
                    // end, resuming where the last search stopped, and checked once complete.
                    let found = if searched == 0 {
                        scan_head(head)
                    } else {
                        find_head_end(head, searched).map(|end| (end, check_head(&head[..end])))
                    };
                    match found {
                        Err(searched) => {
                            if head.len() > self.max_head {
                                return Scan::Reject(pos, TOO_LARGE);
                            }
                            self.state = State::Head { searched };
                            return Scan::Partial(pos);
                        }
                        Ok((end, checked)) => {
                            if end > self.max_head {
                                return Scan::Reject(pos, TOO_LARGE);
                            }
                            match checked {
                                Ok(next) => self.state = next,
                                Err(e) => return Scan::Reject(pos, e),
                            }
                            pos += end;
                        }
                    }
                }
                State::Fixed(left) => {
                    let take = left.min((data.len() - pos) as u64);
                    pos += take as usize;
                    self.state = match left - take {
                        0 => State::Head { searched: 0 },
                        left => State::Fixed(left),
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let take = left.min((data.len() - pos) as u64);
                    pos += take as usize;
                    self.state = State::Chunked(match left - take {
                        0 => Chunk::DataCr,
                        left => Chunk::Data(left),
                    });
                }
                State::Chunked(chunk) => match chunk_byte(chunk, data[pos]) {
                    Some(next) => {
                        self.state = next;
                        pos += 1;
                    }
                    // hyper would fail the body here and close; the guard ends the input
                    // at this byte, so nothing after it is ever parsed.
                    None => return Scan::Reject(pos, BAD_CHUNK),
                },
            }
        }
        Scan::All
    }
}

/// The next state after one framing byte of a chunked body, or `None` where hyper's decoder
/// (`proto/h1/decode.rs`) would refuse the byte. The rules are hyper's: a size is hex digits
/// whose *value* must fit a u64 (any number of leading zeros is fine), then optional spaces or
/// tabs, an optional extension up to CR (an LF inside it is refused), CR LF; data; CR LF; after
/// the zero-size chunk, trailer lines each ending in CR LF, then an empty line. The guard
/// refuses whatever hyper refuses, so it never has to stop following the stream.
fn chunk_byte(chunk: Chunk, b: u8) -> Option<State> {
    let next = match (chunk, b) {
        (Chunk::Start, _) => Chunk::Size(u64::from(hex(b)?)),
        (Chunk::Size(size), _) if hex(b).is_some() => {
            Chunk::Size(size.checked_mul(16)?.checked_add(u64::from(hex(b)?))?)
        }
        (Chunk::Size(size) | Chunk::SizeLws(size), b' ' | b'\t') => Chunk::SizeLws(size),
        (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Chunk::Extension(size),
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => {
            Chunk::SizeLf(size)
        }
        (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(size), _) => Chunk::Extension(size),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::EndLf, b'\n') => return Some(State::Head { searched: 0 }),
        _ => return None,
    };
    Some(State::Chunked(next))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// The length of the head (through its empty line), or how far the search got.
fn find_head_end(head: &[u8], searched: usize) -> Result<usize, usize> {
    let mut i = searched;
    while let Some(off) = head.get(i..).and_then(|h| memchr::memchr(b'\n', h)) {
        let lf = i + off;
        match head.get(lf + 1..lf + 3) {
            Some([b'\n', _]) => return Ok(lf + 2),
            Some([b'\r', b'\n']) => return Ok(lf + 3),
            Some(_) => i = lf + 1,
            None => match head.get(lf + 1) {
                Some(b'\n') => return Ok(lf + 2),
                // Not enough bytes to tell: look at this LF again next time.
                _ => return Err(lf),
            },
        }
    }
    Err(head.len())
}

/// One pass over a head from its start: each line is checked as its end is found. Returns the
/// head's length (through its empty line) with the verdict [`check_head`] would give, or, if
/// the head is incomplete, where [`find_head_end`] should resume.
fn scan_head(head: &[u8]) -> Result<(usize, Result<State, ProxyError>), usize> {
    let mut checker = HeadChecker::default();
    let mut first_error = None;
    let mut start = 0;
    while let Some(off) = memchr::memchr(b'\n', &head[start..]) {
        let lf = start + off;
        let line = &head[start..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() && start > 0 {
            let verdict = match first_error {
                Some(e) => Err(e),
                None => checker.finish(),
            };
            return Ok((lf + 1, verdict));
        }
        if first_error.is_none()
            && let Err(e) = checker.line(line)
        {
            first_error = Some(e);
        }
        start = lf + 1;
    }
    // Resume at the last LF (it may be followed by the start of the empty line), or after
    // everything if there is none yet. Never 0: the head does not start with an LF.
    Err(if start == 0 { head.len() } else { start - 1 })
}

/// Checks a complete head and says how its body is framed.
fn check_head(head: &[u8]) -> Result<State, ProxyError> {
    let mut checker = HeadChecker::default();
    for line in head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
    {
        checker.line(line)?;
    }
    checker.finish()
}

/// What the lines of a head said so far.
#[derive(Default)]
struct HeadChecker {
    /// Lines seen (the request line included).
    lines: usize,
    http10: bool,
    connect: bool,
    length: Option<u64>,
    lengths: usize,
    codings: usize,
}

impl HeadChecker {
    /// Checks one non-empty line, without its CR LF.
    fn line(&mut self, line: &[u8]) -> Result<(), ProxyError> {
        self.lines += 1;
        if self.lines == 1 {
            return self.request_line(line);
        }
        if matches!(line[0], b' ' | b'\t') {
            return Err(AMBIGUOUS);
        }
        if self.lines - 1 > MAX_HEADERS {
            return Err(TOO_LARGE);
        }
        let colon = memchr::memchr(b':', line).ok_or(MALFORMED)?;
        let (name, raw) = (&line[..colon], &line[colon + 1..]);
        // A token name; a value of visible bytes, spaces and tabs (no CR, NUL or other
        // control character).
        if name.is_empty()
            || !name.iter().all(|&b| is_tchar(b))
            || !raw.iter().all(|&b| is_value_byte(b))
        {
            return Err(MALFORMED);
        }
        let value = trim(raw);
        if name.eq_ignore_ascii_case(b"content-length") {
            self.lengths += 1;
            // At most 19 digits: any u64 below 10^19 fits.
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(AMBIGUOUS);
            }
            self.length = Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.codings += 1;
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(AMBIGUOUS);
            }
        }
        Ok(())
    }

    fn request_line(&mut self, line: &[u8]) -> Result<(), ProxyError> {
        // `method SP target SP version`: the method ends at the first space, the version starts
        // after the last one.
        let (method, target, version) =
            match (memchr::memchr(b' ', line), memchr::memrchr(b' ', line)) {
                (Some(first), Some(last)) if first < last => {
                    (&line[..first], &line[first + 1..last], &line[last + 1..])
                }
                _ => return Err(MALFORMED),
            };
        // The bytes hyper's parser (httparse) accepts: anything it would refuse gets our JSON
        // answer instead of hyper's bare 400.
        if method.is_empty()
            || !method.iter().all(|&b| is_tchar(b))
            || target.is_empty()
            || !target.iter().all(|&b| b > b' ' && b != 0x7f)
            || std::str::from_utf8(target).is_err()
        {
            return Err(MALFORMED);
        }
        // hyper hands the target to the `http` crate's URI parser and answers a bare 400 if it
        // refuses it (`http://[::1/`, a bad authority, …): refuse those here with the JSON one.
        if !uri_is_plainly_valid(target) && http::Uri::try_from(target).is_err() {
            return Err(BAD_URI);
        }
        self.http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return Err(MALFORMED),
        };
        self.connect = method == b"CONNECT";
        Ok(())
    }

    /// The verdict on the whole head: how its body is framed.
    fn finish(self) -> Result<State, ProxyError> {
        if self.lines == 0 {
            return Err(MALFORMED);
        }
        let (lengths, codings) = (self.lengths, self.codings);
        if lengths > 1
            || codings > 1
            || (lengths > 0 && codings > 0)
            || (codings > 0 && self.http10)
        {
            return Err(AMBIGUOUS);
        }
        Ok(if self.connect {
            State::Opaque
        } else if codings > 0 {
            State::Chunked(Chunk::Start)
        } else {
            match self.length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head { searched: 0 },
            }
        })
    }
}

/// The longest request target the `http` crate parses.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// Whether `target` has a shape the `http` crate's URI parser certainly accepts: origin-form
/// (`/path?query`) or `http(s)://host[:port]/path?query` with a plain DNS-style host, in the
/// unreserved, sub-delimiter, `:@/?%` bytes. Nearly every request takes this check, which
/// allocates nothing; anything else (IPv6 literals, user info, unusual bytes, `CONNECT`'s
/// `host:port`) is parsed by the `http` crate itself, which copies the target once.
fn uri_is_plainly_valid(target: &[u8]) -> bool {
    fn plain(b: u8) -> bool {
        CLASS[usize::from(b)] & URI_PLAIN != 0
    }
    if target.len() > MAX_URI_LEN {
        return false;
    }
    let path = if target.first() == Some(&b'/') {
        target
    } else {
        let rest = match target.iter().position(|&b| b == b':') {
            Some(4) if target[..4].eq_ignore_ascii_case(b"http") => &target[4..],
            Some(5) if target[..5].eq_ignore_ascii_case(b"https") => &target[5..],
            _ => return false,
        };
        let Some(rest) = rest.strip_prefix(b"://") else {
            return false;
        };
        let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (host, port) = match authority.iter().position(|&b| b == b':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
            None => (authority, None),
        };
        if host.is_empty()
            || !host
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || port
                .is_some_and(|p| p.is_empty() || p.len() > 5 || !p.iter().all(u8::is_ascii_digit))
        {
            return false;
        }
        path
    };
    path.iter().all(|&b| plain(b))
}

/// A `tchar` (RFC 9110 §5.6.2): the bytes of a method or a header name.
fn is_tchar(b: u8) -> bool {
    CLASS[usize::from(b)] & TCHAR != 0
}

/// A byte a header value may hold: visible bytes, spaces and tabs (no CR, LF, NUL, DEL or
/// other control character).
fn is_value_byte(b: u8) -> bool {
    CLASS[usize::from(b)] & VALUE != 0
}

/// [`CLASS`] bits: a `tchar`.
const TCHAR: u8 = 1;
/// [`CLASS`] bits: a byte of a plainly valid URI path (unreserved, sub-delims, `:@/?%`).
const URI_PLAIN: u8 = 2;
/// [`CLASS`] bits: a header value byte.
const VALUE: u8 = 4;

/// Each byte's classes: one lookup per byte of a head instead of a search through a list of
/// punctuation (the framer looks at every byte of every head).
static CLASS: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    const fn one_of(b: u8, set: &[u8]) -> bool {
        let mut i = 0;
        while i < set.len() {
            if set[i] == b {
                return true;
            }
            i += 1;
        }
        false
    }
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < table.len() {
        #[allow(clippy::cast_possible_truncation)] // i < 256
        let b = i as u8;
        let alnum = b.is_ascii_alphanumeric();
        if alnum || one_of(b, b"!#$%&'*+-.^_`|~") {
            table[i] |= TCHAR;
        }
        if alnum || one_of(b, b"-._~!$&'()*+,;=:@/?%") {
            table[i] |= URI_PLAIN;
        }
        if b == b'\t' || (b >= b' ' && b != 0x7f) {
            table[i] |= VALUE;
        }
        i += 1;
    }
    table
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn byte_classes_are_the_rfc_sets() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            let plain = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
            let value = b == b'\t' || (b >= b' ' && b != 0x7f);
            assert_eq!(is_tchar(b), tchar, "tchar {b:#04x}");
            assert_eq!(
                CLASS[usize::from(b)] & URI_PLAIN != 0,
                plain,
                "uri {b:#04x}"
            );
            assert_eq!(is_value_byte(b), value, "value {b:#04x}");
        }
    }

    fn scan_all(input: &[u8]) -> (Scan, Framer) {
        let mut f = Framer::new(1024);
        let s = f.scan(input);
        (s, f)
    }

    #[test]
    fn simple_requests_pass_and_return_to_head_state() {
        let req =
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let (s, f) = scan_all(req);
        assert_eq!(s, Scan::All);
        assert_eq!(f.state, State::Head { searched: 0 });
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end() {
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5;ext=1\r\nhello\r\n10 \r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n\
                    GET / HTTP/1.1\r\n";
        let (s, f) = scan_all(req);
        let partial_at = req.len() - b"GET / HTTP/1.1\r\n".len();
        assert_eq!(s, Scan::Partial(partial_at));
        assert!(matches!(f.state, State::Head { .. }));
    }

    #[test]
    fn byte_at_a_time_feeding_agrees_with_one_shot() {
        let req: &[u8] = b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                           3\r\nabc\r\n0\r\n\r\nPUT / HTTP/1.1\r\nContent-Length: 2\r\n\r\nxy";
        let mut f = Framer::new(1024);
        // Simulate the guard: held head bytes are re-offered from the head start.
        let mut start = 0;
        for end in 1..=req.len() {
            match f.scan(&req[start..end]) {
                Scan::All => start = end,
                Scan::Partial(k) => start += k,
                Scan::Reject(..) => panic!("rejected at {end}"),
            }
        }
        assert_eq!(start, req.len());
        assert_eq!(f.state, State::Head { searched: 0 });
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for req in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (s, _) = scan_all(req);
            assert_eq!(
                s,
                Scan::Reject(0, AMBIGUOUS),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn malformed_heads_and_http2_preface_are_refused() {
        for req in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length : 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n",
            b"GET /\0 HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX\x01A: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\x7f\r\n\r\n",
        ] {
            let (s, _) = scan_all(req);
            assert_eq!(
                s,
                Scan::Reject(0, MALFORMED),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn targets_the_uri_parser_refuses_get_a_json_400() {
        for target in [
            "http://[::1/",
            "http://[::1]]/",
            "http://a:b:c/",
            "http://%/",
            "http:///x",
        ] {
            let head = format!("GET {target} HTTP/1.1\r\n\r\n");
            let (s, _) = scan_all(head.as_bytes());
            assert_eq!(s, Scan::Reject(0, BAD_URI), "{target}");
        }
        for target in [
            "/a?b=c",
            "http://[::1]:8080/x",
            "http://h.example:99999/",
            "a.example:443",
            "*",
        ] {
            let head = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(scan_all(head.as_bytes()).0, Scan::All, "{target}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_allocation_free_uri_check_never_accepts_what_http_refuses(
            target in "(/|https?://|HTTP://)[a-z0-9.:\\[\\]@%/?#\\-]{0,24}"
        ) {
            if uri_is_plainly_valid(target.as_bytes()) {
                proptest::prop_assert!(http::Uri::try_from(target.as_str()).is_ok(), "{}", target);
            }
        }
    }

    #[test]
    fn oversized_heads_are_refused_before_they_end() {
        let mut f = Framer::new(64);
        let mut req = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(f.scan(&req), Scan::Reject(0, TOO_LARGE));

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(Framer::new(1 << 20).scan(&many), Scan::Reject(0, TOO_LARGE));
    }

    #[test]
    fn second_head_is_refused_at_its_own_offset() {
        let first = b"GET / HTTP/1.1\r\n\r\n";
        let mut req = first.to_vec();
        req.extend_from_slice(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        let (s, _) = scan_all(&req);
        assert_eq!(s, Scan::Reject(first.len(), AMBIGUOUS));
    }

    /// The two-step check (find the end, then check the lines) that the one-pass scan of a
    /// head arriving whole must agree with.
    fn two_pass(head: &[u8]) -> Option<(usize, Result<State, ProxyError>)> {
        find_head_end(head, 0)
            .ok()
            .map(|end| (end, check_head(&head[..end])))
    }

    proptest::proptest! {
        #[test]
        fn one_pass_scan_agrees_with_search_then_check(
            lines in proptest::collection::vec(
                proptest::sample::select(vec![
                    "GET / HTTP/1.1", "POST /x HTTP/1.0", "CONNECT a:443 HTTP/1.1", "GET /",
                    "PUT / HTTP/1.2", "Content-Length: 5", "content-length:0", "Content-Length: 3, 3",
                    "Transfer-Encoding: chunked", "transfer-encoding: gzip", " folded", "\tfolded",
                    "X: y", "no colon", "Bad Name: 1", ": empty", "", "\r", "x\r",
                ]),
                1..12,
            ),
            crlf in proptest::bool::ANY,
            tail in proptest::collection::vec(proptest::sample::select(b"\r\nab: ".to_vec()), 0..4),
        ) {
            let sep = if crlf { "\r\n" } else { "\n" };
            let mut head = lines.join(sep).into_bytes();
            head.extend_from_slice(&tail);
            proptest::prop_assume!(!matches!(head.first(), None | Some(b'\r' | b'\n')));
            match (scan_head(&head), two_pass(&head)) {
                (Ok(one), Some(two)) => proptest::prop_assert_eq!(one, two),
                (Err(resume), None) => {
                    // Resuming the search where the scan stopped finds no end either.
                    proptest::prop_assert!(resume > 0 && resume <= head.len());
                    proptest::prop_assert!(find_head_end(&head, resume).is_err());
                }
                (one, two) => proptest::prop_assert!(false, "{one:?} vs {two:?}"),
            }
        }
    }

    #[test]
    fn connect_makes_the_stream_opaque() {
        let (s, f) = scan_all(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01garbage\r\n\r\n");
        assert_eq!(s, Scan::All);
        assert!(f.is_opaque());
    }

    #[test]
    fn bad_chunk_framing_is_refused_where_hyper_would_refuse_it() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, at) in [
            (&b"zz\r\n"[..], 0),
            (b"11111111111111111\r\n", 16),
            (b"3\r\nabcX", 6),
            (b"3;ext\nabc", 5),
            (b"0\r\nX-T: 1\rX", 10),
        ] {
            let mut req = head.to_vec();
            req.extend_from_slice(body);
            let (s, _) = scan_all(&req);
            assert_eq!(
                s,
                Scan::Reject(head.len() + at, BAD_CHUNK),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn leading_zeros_in_a_chunk_size_are_followed_like_hyper() {
        // 20 hex digits whose value fits a u64: hyper accepts it, so the guard keeps framing
        // and refuses the smuggling shapes that follow.
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                    00000000000000000005\r\nhello\r\n0\r\n\r\n";
        let (s, f) = scan_all(req);
        assert_eq!(s, Scan::All);
        assert_eq!(f.state, State::Head { searched: 0 });
        let mut next = req.to_vec();
        next.extend_from_slice(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(scan_all(&next).0, Scan::Reject(req.len(), AMBIGUOUS));
        let max = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0000ffffffffffffffff\r\n";
        let (s, f) = scan_all(max);
        assert_eq!(s, Scan::All);
        assert_eq!(f.state, State::Chunked(Chunk::Data(u64::MAX)));
    }
}
