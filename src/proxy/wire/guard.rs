//! [`WireGuard`]: the client socket as hyper sees it. It feeds every byte read to the
//! [`Framer`], holds a request head back until the framer has judged it, writes the proxy's
//! own answer to a refused head followed by a lingering close, and owns the connection's
//! header-read and idle timers (see the module documentation of `wire`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::framer::{Framer, Scan};
use crate::metrics::Metrics;
use crate::proxy::error::ProxyError;

/// After writing a refusal, input is read and dropped for up to this long (or until the
/// client closes), as nginx's lingering close does: closing a socket with unread input makes the
/// kernel send a reset, which can destroy the answer before the client has read it.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// …and for at most this many bytes, so a client cannot keep us reading.
const LINGER_BYTES: usize = 1 << 20;

/// Bytes read at a time while a partial head is held back. A head usually arrives in one read
/// straight into hyper's buffer; this only serves heads split over several TCP segments.
const HELD_READ_CHUNK: usize = 4096;

/// Limits the guard enforces.
#[derive(Clone, Debug)]
pub(crate) struct WireLimits {
    /// `max_header_bytes`.
    pub(crate) max_head: usize,
    /// `header_read_timeout`, from a head's first byte.
    pub(crate) header_timeout: Duration,
    /// `idle_timeout`, while a body or response is stuck.
    pub(crate) idle_timeout: Duration,
}

/// The socket as hyper sees it. See the module documentation.
pub(crate) struct WireGuard<T> {
    /// The client's socket.
    io: T,
    framer: Framer,
    limits: Arc<WireLimits>,
    metrics: Arc<Metrics>,
    /// Bytes read but not handed to hyper yet: checked ones first, then a partial head.
    held: Vec<u8>,
    /// Start of the bytes in `held` not yet handed over.
    held_pos: usize,
    /// Of those, how many are checked and may be handed over.
    approved: usize,
    /// When the head being held must be complete.
    head_deadline: Option<Instant>,
    /// Timer for `head_deadline`; created on first need (most heads arrive in one read).
    head_timer: Option<Pin<Box<Sleep>>>,
    /// When a stalled body read or response write gives up; `None` while bytes move.
    stall_deadline: Option<Instant>,
    /// Timer for `stall_deadline`; created on first need.
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// A refusal to write before closing.
    refusal: Option<Refusal>,
    /// When the flag is set at drop, the connection ends with a reset (see
    /// [`WireGuard::reset_on_drop`]).
    reset: Option<ResetOnDrop<T>>,
}

/// A flag, and what to do to the socket if it is set at drop.
type ResetOnDrop<T> = (Arc<AtomicBool>, fn(&T));

/// An answer written by the guard itself, then a lingering close.
struct Refusal {
    /// The raw HTTP/1.1 answer.
    bytes: Vec<u8>,
    /// How much of it is written.
    written: usize,
    /// Whether our side is shut down (the client has seen the end of the answer).
    shut: bool,
    /// Input dropped while lingering.
    lingered: usize,
    /// When lingering ends.
    linger_until: Option<Instant>,
}

impl<T> WireGuard<T> {
    /// Wraps a client socket.
    pub(crate) fn new(io: T, limits: Arc<WireLimits>, metrics: Arc<Metrics>) -> Self {
        Self {
            io,
            framer: Framer::new(limits.max_head),
            limits,
            metrics,
            held: Vec::new(),
            held_pos: 0,
            approved: 0,
            head_deadline: None,
            head_timer: None,
            stall_deadline: None,
            stall_timer: None,
            refusal: None,
            reset: None,
        }
    }

    /// If `flag` is set when the guard is dropped, `reset` is applied to the socket first (for
    /// a TCP socket: a zero linger time, so closing it sends a reset instead of a FIN). An
    /// answer cut short must not end like a complete one: for a body delimited by the end of
    /// the connection (an HTTP/1.0 client without a length) a FIN would do exactly that.
    pub(crate) fn reset_on_drop(mut self, flag: Arc<AtomicBool>, reset: fn(&T)) -> Self {
        self.reset = Some((flag, reset));
        self
    }

    fn refuse(&mut self, error: ProxyError) {
        tracing::debug!(
            error = error.code.as_str(),
            "request refused before parsing"
        );
        // Inside a body, hyper already has the request: it sees its body end early and the
        // request path answers (400 `bad_request`, counted there); the guard only ends the
        // input. Writing its own answer too would put a second response on the wire.
        let silent = self.framer.in_body();
        if !silent && let Some(reason) = error.code.reject_reason() {
            self.metrics.reject(reason);
        }
        self.framer.set_opaque();
        self.refusal = Some(Refusal {
            bytes: if silent {
                Vec::new()
            } else {
                error.http1_bytes()
            },
            written: 0,
            shut: false,
            lingered: 0,
            linger_until: None,
        });
    }

    /// Something moved: a stall starts counting again from the next wait.
    fn progressed(&mut self) {
        self.stall_deadline = None;
    }

    /// Called when a read or write would block: polls whichever deadline applies.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<io::Error> {
        if reading && self.held.len() > self.held_pos {
            let Some(deadline) = self.head_deadline else {
                return Poll::Pending;
            };
            ready!(poll_timer(&mut self.head_timer, deadline, cx));
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within header_read_timeout",
            ));
        }
        if reading && self.framer.is_opaque() {
            return Poll::Pending;
        }
        // Waiting for the first byte of a head (the first request, or the next one on a
        // keep-alive connection), for body bytes, or for a blocked write: all count as idle.
        // hyper reads nothing while the app's response is pending (`half_close`), so this
        // never times a slow upstream.
        let idle = self.limits.idle_timeout;
        let deadline = *self
            .stall_deadline
            .get_or_insert_with(|| Instant::now() + idle);
        ready!(poll_timer(&mut self.stall_timer, deadline, cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "no progress within idle_timeout",
        ))
    }

    /// Notes progress of a write, or times a blocked one (not in a tunnel, which may idle).
    fn after_write(
        &mut self,
        polled: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.progressed();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if !self.framer.is_opaque() => self.poll_deadline(cx, false).map(Err),
            other => other,
        }
    }

    /// Records the outcome of scanning bytes that start a held region.
    fn after_scan(&mut self, scan: Scan, len: usize) -> usize {
        match scan {
            Scan::All => {
                self.head_deadline = None;
                len
            }
            Scan::Partial(k) => {
                if k > 0 || self.head_deadline.is_none() {
                    self.head_deadline = Some(Instant::now() + self.limits.header_timeout);
                }
                k
            }
            Scan::Reject(k, error) => {
                self.refuse(error);
                k
            }
        }
    }
}

impl WireGuard<tokio::net::TcpStream> {
    /// Resolves when a read would not wait for the socket (bytes held for the reader, a
    /// refusal to report, the socket readable or failed), timing the wait as a read is timed.
    /// An idle keep-alive connection waits here without a read buffer (the fast path).
    pub(crate) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.approved > 0 || self.refusal.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.io.poll_read_ready(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.poll_deadline(cx, true).map(Err),
        }
    }
}

impl<T> Drop for WireGuard<T> {
    fn drop(&mut self) {
        if let Some((flag, reset)) = &self.reset
            && flag.load(Ordering::Acquire)
        {
            reset(&self.io);
        }
    }
}

/// Polls a lazily created timer set to `deadline`.
fn poll_timer(
    slot: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = match slot {
        Some(t) => {
            if t.deadline() != deadline {
                t.as_mut().reset(deadline);
            }
            t
        }
        None => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    timer.as_mut().poll(cx)
}

impl<T: AsyncRead + Unpin> AsyncRead for WireGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.approved > 0 {
                let n = this.approved.min(buf.remaining());
                buf.put_slice(&this.held[this.held_pos..this.held_pos + n]);
                this.held_pos += n;
                this.approved -= n;
                if this.held_pos == this.held.len() {
                    this.held.clear();
                    this.held_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() {
                // End of input for hyper: it finishes and shuts the socket down, which is
                // when the refusal is written (see poll_shutdown).
                return Poll::Ready(Ok(()));
            }
            if this.held.is_empty() {
                if this.framer.is_opaque() {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                // Nothing held: read straight into hyper's buffer and check in place.
                let before = buf.filled().len();
                match Pin::new(&mut this.io).poll_read(cx, buf) {
                    Poll::Pending => return this.poll_deadline(cx, true).map(Err),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let len = buf.filled().len() - before;
                if len == 0 {
                    return Poll::Ready(Ok(()));
                }
                this.progressed();
                let scan = this.framer.scan(&buf.filled()[before..]);
                let keep = this.after_scan(scan, len);
                if let Scan::Partial(k) = scan {
                    this.held.extend_from_slice(&buf.filled()[before + k..]);
                }
                buf.set_filled(before + keep);
                if keep > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A partial head is held: read more behind it.
            if this.held_pos > 0 {
                this.held.drain(..this.held_pos);
                this.held_pos = 0;
            }
            let len = this.held.len();
            this.held.resize(len + HELD_READ_CHUNK, 0);
            let mut rb = ReadBuf::new(&mut this.held[len..]);
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut rb);
            let got = rb.filled().len();
            this.held.truncate(len + got);
            match polled {
                Poll::Pending => return this.poll_deadline(cx, true).map(Err),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            if got == 0 {
                // The client went away mid-head: hyper sees a clean end of input.
                this.held.clear();
                return Poll::Ready(Ok(()));
            }
            this.progressed();
            let scan = this.framer.scan(&this.held);
            this.approved = this.after_scan(scan, this.held.len());
            if this.refusal.is_some() {
                // Only what came before the refused head is still handed over.
                this.held.truncate(this.approved);
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WireGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        this.after_write(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(r) = &mut this.refusal else {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        };
        while r.written < r.bytes.len() {
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, &r.bytes[r.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            r.written += n;
        }
        if !r.shut {
            ready!(Pin::new(&mut this.io).poll_flush(cx))?;
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            r.shut = true;
        }
        // Lingering close: drop input until the client closes, for a bounded time and size.
        let until = *r
            .linger_until
            .get_or_insert_with(|| Instant::now() + LINGER_TIME);
        let mut scratch = [0u8; 4096];
        while r.lingered < LINGER_BYTES {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => r.lingered += rb.filled().len(),
                Poll::Ready(Err(_)) => break,
                Poll::Pending => {
                    ready!(poll_timer(&mut this.stall_timer, until, cx));
                    break;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn guard(
        io: tokio::io::DuplexStream,
        header_timeout: Duration,
    ) -> WireGuard<tokio::io::DuplexStream> {
        WireGuard::new(
            io,
            Arc::new(WireLimits {
                max_head: 256,
                header_timeout,
                idle_timeout: Duration::from_secs(60),
            }),
            Metrics::new(),
        )
    }

    #[tokio::test]
    async fn split_heads_are_delivered_whole_and_bodies_pass_through() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = guard(server, Duration::from_secs(5));
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-")
            .await
            .unwrap();
        client.write_all(b"Length: 4\r\n\r\nbody").await.unwrap();
        drop(client);
        let mut out = Vec::new();
        g.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody");
    }

    #[tokio::test]
    async fn refused_heads_never_reach_the_reader_and_the_answer_is_written_on_shutdown() {
        let (mut client, server) = tokio::io::duplex(4096);
        let metrics = Metrics::new();
        let mut g = WireGuard::new(
            server,
            Arc::new(WireLimits {
                max_head: 256,
                header_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(60),
            }),
            metrics.clone(),
        );
        client
            .write_all(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            g.read(&mut buf).await.unwrap(),
            0,
            "reader sees end of input"
        );
        g.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\"error\":\"bad_request\""));
        assert!(
            metrics
                .encode()
                .contains("bearer_proxy_rejected_requests_total{reason=\"bad_request\"} 1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_completes_times_out() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = guard(server, Duration::from_millis(200));
        client
            .write_all(b"GET / HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_after_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = guard(server, Duration::from_secs(1));
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
            .await
            .unwrap();
        let mut buf = [0u8; 128];
        let n = g.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let start = Instant::now();
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(60) && waited < Duration::from_secs(61));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_after_idle_timeout() {
        let (client, server) = tokio::io::duplex(1024);
        let mut g = guard(server, Duration::from_millis(10));
        let mut buf = [0u8; 16];
        let start = Instant::now();
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_the_next_head_times_out_after_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = guard(server, Duration::from_millis(10));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(g.read(&mut buf).await.unwrap() > 0);
        let start = Instant::now();
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }
}
