//! Relaying an upstream response body to the client on the fast path, by the framing the
//! upstream's head declared ([`ResponseFraming`]): a `Content-Length` body byte for byte, a
//! chunked body as it is (followed with [`ChunkedScanner`] to find its end), a body delimited
//! by the upstream's close re-chunked for the client. Memory is constant: one buffer per
//! exchange, whatever the size.
//!
//! A body that breaks off (the upstream closes early, resets, sends malformed chunks or stalls
//! for `idle_timeout`) is an error: the caller resets the client connection, so an answer cut
//! short never looks complete. An upstream connection is reusable only when its body ended
//! exactly where its framing said and nothing followed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::chunked::{ChunkStep, ChunkedScanner};
use super::response::ResponseFraming;

/// Upstream body reads are this large: a 16 KiB TLS record, or a few TCP segments.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// Why a body could not be relayed whole.
#[derive(Debug, thiserror::Error)]
pub(super) enum RelayError {
    /// The upstream's body broke off or was malformed.
    #[error("the upstream's body broke off")]
    Upstream,
    /// The upstream's body did not move for `idle_timeout`.
    #[error("the upstream's body stalled")]
    Stalled,
    /// The client could not be written to (gone, or not reading for `idle_timeout`).
    #[error("the client stopped reading")]
    Client,
}

/// Where in the upstream's body the relay is.
#[derive(Debug)]
pub(super) struct Body {
    state: State,
    /// Whether bytes followed the body's end (the connection cannot be reused).
    trailing: bool,
}

#[derive(Debug)]
enum State {
    /// Ended.
    Done,
    /// This many bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(ChunkedScanner),
    /// Until the upstream closes; re-chunked for the client.
    Close,
}

impl Body {
    /// At the start of a body with `framing`.
    pub(super) fn new(framing: ResponseFraming) -> Self {
        let state = match framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => State::Done,
            ResponseFraming::Length(n) => State::Length(n),
            ResponseFraming::Chunked => State::Chunked(ChunkedScanner::new()),
            ResponseFraming::Close => State::Close,
        };
        Self {
            state,
            trailing: false,
        }
    }

    /// Whether the body has ended.
    pub(super) fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the upstream connection may carry another request (the body ended exactly at
    /// its framing's end, and the upstream did not ask to close).
    pub(super) fn reusable(&self) -> bool {
        self.is_done() && !self.trailing
    }

    /// Takes the body's part of `input` (the next bytes read from the upstream), passing the
    /// decoded content to `data`, and appends what the client must receive to `out`.
    pub(super) fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RelayError> {
        if input.is_empty() {
            return Ok(());
        }
        match &mut self.state {
            State::Done => self.trailing = true,
            State::Length(left) => {
                let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                out.extend_from_slice(&input[..take]);
                data(&input[..take]);
                *left -= take as u64;
                if *left == 0 {
                    self.state = State::Done;
                    self.trailing = take < input.len();
                }
            }
            State::Chunked(scanner) => match scanner.scan(input, data) {
                Ok(ChunkStep::More) => out.extend_from_slice(input),
                Ok(ChunkStep::End(n)) => {
                    out.extend_from_slice(&input[..n]);
                    self.state = State::Done;
                    self.trailing = n < input.len();
                }
                Err(_) => return Err(RelayError::Upstream),
            },
            State::Close => {
                data(input);
                chunk(out, input);
            }
        }
        Ok(())
    }

    /// The upstream closed its side: the end of a close-delimited body (the last chunk is
    /// appended to `out`), a truncation of any other.
    pub(super) fn eof(&mut self, out: &mut Vec<u8>) -> Result<(), RelayError> {
        match self.state {
            State::Done => Ok(()),
            State::Close => {
                out.extend_from_slice(b"0\r\n\r\n");
                self.state = State::Done;
                // The connection is closed: never reusable.
                self.trailing = true;
                Ok(())
            }
            State::Length(_) | State::Chunked(_) => Err(RelayError::Upstream),
        }
    }
}

/// Appends `data` as one chunk.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Writes `out` (the head and whatever body bytes are already there) to the client, then
/// relays the rest of `body` from the upstream, each read waiting at most `idle`. `buf` is
/// the read buffer (reused between exchanges).
pub(super) async fn pump<U, C>(
    upstream: &mut U,
    client: &mut C,
    body: &mut Body,
    out: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> Result<(), RelayError>
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    loop {
        if !out.is_empty() {
            client
                .write_all(out)
                .await
                .map_err(|_| RelayError::Client)?;
            out.clear();
        }
        if body.is_done() {
            return Ok(());
        }
        buf.clear();
        buf.reserve(READ_CHUNK);
        let n = match tokio::time::timeout(idle, upstream.read_buf(buf)).await {
            Err(_) => return Err(RelayError::Stalled),
            Ok(Err(_)) => return Err(RelayError::Upstream),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            body.eof(out)?;
        } else {
            body.feed(buf, out, &mut |_| {})?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(framing: ResponseFraming, reads: &[&[u8]]) -> (Result<(), RelayError>, Vec<u8>, bool) {
        let mut body = Body::new(framing);
        let mut out = Vec::new();
        for r in reads {
            if let Err(e) = body.feed(r, &mut out, &mut |_| {}) {
                return (Err(e), out, false);
            }
        }
        (Ok(()), out, body.reusable())
    }

    #[test]
    fn length_bodies_end_at_their_length_and_extra_bytes_spoil_reuse() {
        let (r, out, reuse) = run(ResponseFraming::Length(5), &[b"he", b"llo"]);
        assert!(r.is_ok() && reuse);
        assert_eq!(out, b"hello");
        let (_, out, reuse) = run(ResponseFraming::Length(5), &[b"hello", b"HTTP/1.1 200"]);
        assert_eq!(out, b"hello");
        assert!(!reuse);
    }

    #[test]
    fn a_length_body_cut_short_is_an_error() {
        let mut body = Body::new(ResponseFraming::Length(5));
        let mut out = Vec::new();
        body.feed(b"hel", &mut out, &mut |_| {}).unwrap();
        assert!(body.eof(&mut out).is_err());
    }

    #[test]
    fn close_delimited_bodies_are_rechunked_and_end_with_the_last_chunk() {
        let mut body = Body::new(ResponseFraming::Close);
        let mut out = Vec::new();
        body.feed(&[b'a'; 26], &mut out, &mut |_| {}).unwrap();
        body.eof(&mut out).unwrap();
        let mut want = b"1a\r\n".to_vec();
        want.extend_from_slice(&[b'a'; 26]);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, want);
        assert!(!body.reusable());
    }

    #[test]
    fn empty_bodies_are_done_at_once() {
        for f in [ResponseFraming::Empty, ResponseFraming::Length(0)] {
            let body = Body::new(f);
            assert!(body.is_done() && body.reusable());
        }
    }
}
