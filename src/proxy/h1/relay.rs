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

use std::io::{self, IoSlice};
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::chunked::{ChunkStep, ChunkedScanner};
use super::response::ResponseFraming;

/// Upstream reads are this large: an answer head with a 16 KiB body, or two 16 KiB TLS
/// records, in one read (and so in one write to the client). At 16 KiB such an answer took
/// two reads and two writes, each a system call and, on loopback, a segment the kernel
/// delivers on the proxy's time. Only the bytes read are touched.
pub(super) const READ_CHUNK: usize = 32 * 1024;

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
        let pass = self.take(input, out, data)?;
        out.extend_from_slice(&input[..pass]);
        Ok(())
    }

    /// Like [`Body::feed`], without copying what the client receives unchanged: that is
    /// `input[..n]` for the returned `n`, to be sent after `out` (which gets only what the
    /// relay makes itself, a re-chunked body's framing and data).
    pub(super) fn take(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, RelayError> {
        if input.is_empty() {
            return Ok(0);
        }
        match &mut self.state {
            State::Done => {
                self.trailing = true;
                Ok(0)
            }
            State::Length(left) => {
                let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                data(&input[..take]);
                *left -= take as u64;
                if *left == 0 {
                    self.state = State::Done;
                    self.trailing = take < input.len();
                }
                Ok(take)
            }
            State::Chunked(scanner) => match scanner.scan(input, data) {
                Ok(ChunkStep::More) => Ok(input.len()),
                Ok(ChunkStep::End(n)) => {
                    self.state = State::Done;
                    self.trailing = n < input.len();
                    Ok(n)
                }
                Err(_) => Err(RelayError::Upstream),
            },
            State::Close => {
                data(input);
                chunk(out, input);
                Ok(0)
            }
        }
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

/// Writes `out` (the head and what the relay made itself), then `buf[pass]` (body bytes
/// already read, passed on unchanged), then relays the rest of `body` from the upstream, each
/// read waiting at most `idle`. `buf` is the read buffer (reused between exchanges); what
/// passes unchanged is written from it, never copied.
pub(super) async fn pump<U, C>(
    upstream: &mut U,
    client: &mut C,
    body: &mut Body,
    out: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    mut pass: Range<usize>,
    idle: Duration,
) -> Result<(), RelayError>
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    loop {
        write_both(client, out, &buf[pass])
            .await
            .map_err(|_| RelayError::Client)?;
        out.clear();
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
        pass = if n == 0 {
            body.eof(out)?;
            0..0
        } else {
            0..body.take(buf, out, &mut |_| {})?
        };
    }
}

/// Writes `first`, then `second`, in one system call when the client takes both at once.
async fn write_both<C: AsyncWrite + Unpin>(
    client: &mut C,
    mut first: &[u8],
    mut second: &[u8],
) -> io::Result<()> {
    while !first.is_empty() || !second.is_empty() {
        let n = if first.is_empty() {
            client.write(second).await?
        } else if second.is_empty() {
            client.write(first).await?
        } else {
            client
                .write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_first = n.min(first.len());
        first = &first[from_first..];
        second = &second[n - from_first..];
    }
    Ok(())
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

    /// A client that takes at most `max` bytes per write, vectored or not.
    struct Trickle {
        written: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.written.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.written.extend_from_slice(&b[..take]);
                n += take;
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn passed_through_bytes_are_not_copied_and_rechunked_ones_are() {
        let mut body = Body::new(ResponseFraming::Length(5));
        let mut out = b"head".to_vec();
        assert_eq!(body.take(b"hel", &mut out, &mut |_| {}).unwrap(), 3);
        assert_eq!(body.take(b"loXY", &mut out, &mut |_| {}).unwrap(), 2);
        assert_eq!(out, b"head");
        assert!(body.is_done() && !body.reusable());
        let mut body = Body::new(ResponseFraming::Close);
        assert_eq!(body.take(b"ab", &mut out, &mut |_| {}).unwrap(), 0);
        assert_eq!(out, b"head2\r\nab\r\n");
    }

    #[tokio::test]
    async fn pump_writes_the_head_then_the_read_bytes_then_the_rest_in_order() {
        // Whole writes, and writes of three bytes that split every slice.
        for max in [usize::MAX, 3] {
            let mut upstream: &[u8] = b"world";
            let mut body = Body::new(ResponseFraming::Length(10));
            let mut out = b"HEAD|".to_vec();
            let mut buf = b"xxhello".to_vec();
            let pass = 2..2 + body.take(&buf[2..], &mut Vec::new(), &mut |_| {}).unwrap();
            let idle = Duration::from_secs(1);
            let mut client = Trickle {
                written: Vec::new(),
                max,
            };
            pump(
                &mut upstream,
                &mut client,
                &mut body,
                &mut out,
                &mut buf,
                pass,
                idle,
            )
            .await
            .unwrap();
            let written = client.written;
            assert_eq!(written, b"HEAD|helloworld", "at most {max} bytes per write");
            assert!(body.reusable());
        }
    }
}
