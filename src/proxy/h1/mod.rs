//! The proxy port's purpose-built HTTP/1 request path, the "fast path" (`proxy.fast_path`,
//! on by default).
//!
//! A plain client connection starts here. Its task reads through the wire guard (which has
//! already judged every head: limits, ambiguous framing, bytes httparse refuses, timeouts),
//! parses each head once with httparse (`request.rs`), writes the upstream head as bytes, takes
//! an upstream connection from the pool (`pool.rs`) for the exchange, drives both sockets itself
//! and relays the answer by its framing (`response.rs`, `relay.rs`, `chunked.rs`). No
//! `HeaderMap`, no second task, no channel: one task per client connection, which holds its
//! upstream connection for the exchange and puts it back afterwards.
//!
//! The line with hyper: the fast path serves HTTP/1.1 requests with a method from GET, HEAD,
//! POST, PUT, DELETE, PATCH, OPTIONS, no `Expect`, no `Transfer-Encoding` and a body of at most
//! `replay_body_limit` (an idempotent request's read whole before it is sent, as hyper's path
//! keeps it for a replay; another's streamed), on a route (named token, or per-subject
//! with one valid subject header), to an upstream that speaks HTTP/1.1. The first head it does
//! not serve (HTTP/1.0, `CONNECT`, `TRACE`, unrouted or refused requests, a missing or invalid
//! subject header, chunked or larger bodies, an
//! origin whose TLS handshake chose HTTP/2, a `Via` loop, `_` in a header name) hands the
//! connection, with every byte read and not served, to hyper for the rest of its life
//! ([`Outcome::Handoff`]); hyper then answers exactly as it did before the fast path existed.
//! Intercepted (`CONNECT` + TLS) connections, the admin port and the dev issuer are hyper's.

pub(super) mod chunked;
mod exchange;
mod pool;
mod relay;
pub(super) mod request;
pub(super) mod response;
mod rewind;
mod spare;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) use pool::H1Pool;
pub(crate) use rewind::Rewind;

use self::exchange::{Next, Scratch, serve_one};
use super::Inner;
use super::wire::WireGuard;
use crate::shutdown::{Phase, Shutdown};

/// The client read buffer's size, like hyper's: a head and a small body fit in one read.
pub(super) const READ_BUFFER: usize = 8 * 1024;

/// How a connection left the fast path.
pub(crate) enum Outcome {
    /// It is finished (closed, dropped or reset as its last answer required).
    Closed,
    /// hyper serves the rest: these bytes were read and not served.
    Handoff(Bytes),
}

/// A client connection as the fast path reads it: through the wire guard, with a wait for
/// readability that needs no buffer.
pub(crate) trait Client: AsyncRead + AsyncWrite + Unpin {
    /// Resolves when a read would not wait (or has failed, or the guard's timers ran out).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Client for WireGuard<tokio::net::TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        WireGuard::poll_read_ready(self, cx)
    }
}

/// A client connection's read buffer and the buffers its exchanges reuse.
pub(crate) struct Connection {
    buf: Vec<u8>,
    /// Where the next unserved byte is in `buf`.
    start: usize,
    scratch: Scratch,
}

impl Connection {
    /// Reads more from the client; `false` at its end or on an error (including the wire
    /// guard's refusals and timeouts).
    async fn fill<C: AsyncRead + Unpin>(&mut self, io: &mut C) -> bool {
        self.make_room();
        matches!(io.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// A read buffer (a spare one if the connection has none) with the served bytes dropped
    /// and room for one read.
    fn make_room(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = spare::take();
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_BUFFER);
    }

    /// Reads what has arrived without waiting: `Some(true)` with bytes read, `Some(false)` at
    /// the end of input or on an error (the guard's refusals and timeouts included), `None` if
    /// there was nothing to read after all. The caller then waits for readability again,
    /// which registers its waker anew.
    fn fill_now<C: AsyncRead + Unpin>(&mut self, io: &mut C) -> Option<bool> {
        self.make_room();
        io.read_buf(&mut self.buf)
            .now_or_never()
            .map(|read| matches!(read, Ok(n) if n > 0))
    }

    /// Gives every buffer back while the connection waits for its next request: an idle
    /// keep-alive connection holds none.
    fn idle(&mut self) {
        spare::give(std::mem::take(&mut self.buf));
        self.start = 0;
        self.scratch.give();
    }

    /// Reads until `len` bytes from the read position are there.
    async fn fill_to<C: AsyncRead + Unpin>(&mut self, io: &mut C, len: usize) -> bool {
        while self.buf.len() - self.start < len {
            if !self.fill(io).await {
                return false;
            }
        }
        true
    }
}

/// Serves the connection's requests while the fast path can; returns when the connection is
/// finished or hyper must take over.
pub(crate) async fn serve<C: Client>(
    current: &ArcSwap<Inner>,
    io: &mut C,
    shutdown: &Shutdown,
    cut: &AtomicBool,
) -> Outcome {
    let mut conn = Connection {
        buf: Vec::new(),
        start: 0,
        scratch: Scratch::default(),
    };
    let stopping = shutdown.reached(Phase::Stopping);
    tokio::pin!(stopping);
    loop {
        if conn.start == conn.buf.len() {
            // Idle between requests, without buffers: a drain closes the connection now.
            let arrived = loop {
                conn.idle();
                // Readability first: a request that has arrived is served (and answered with
                // `Connection: close` if a drain has begun), and the usual wake-up, by the
                // next request, does not poll the shutdown watch.
                let ready = tokio::select! {
                    biased;
                    ready = std::future::poll_fn(|cx| io.poll_read_ready(cx)) => ready.is_ok(),
                    () = &mut stopping => false,
                };
                if !ready {
                    break false;
                }
                // A readiness report with nothing to read (a new connection's first one can
                // be) waits again without the buffer, instead of in a read that holds it.
                if let Some(read) = conn.fill_now(io) {
                    break read;
                }
            };
            if !arrived {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
        }
        // The one configuration load of this request.
        let inner = current.load_full();
        let draining = shutdown.phase() >= Phase::Stopping;
        // Boxed: a request's state (its exchange, timers, relay) is allocated while it runs,
        // so an idle keep-alive connection's task is only this loop's few words.
        match Box::pin(serve_one(&inner, io, &mut conn, draining)).await {
            Next::Continue => {}
            Next::Close => {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
            Next::Drop => return Outcome::Closed,
            Next::Cut => {
                cut.store(true, Ordering::Release);
                return Outcome::Closed;
            }
            Next::Handoff(why) => {
                inner.metrics.handoff(why);
                return Outcome::Handoff(Bytes::copy_from_slice(&conn.buf[conn.start..]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> Connection {
        Connection {
            buf: Vec::new(),
            start: 0,
            scratch: Scratch::default(),
        }
    }

    #[tokio::test]
    async fn a_read_without_data_says_so_instead_of_waiting_with_a_buffer() {
        let (mut app, mut proxy) = tokio::io::duplex(64);
        let mut conn = connection();
        // Nothing sent yet: a spurious readiness report must not leave a read pending.
        assert_eq!(conn.fill_now(&mut proxy), None);
        conn.idle();
        assert_eq!(
            conn.buf.capacity(),
            0,
            "the idle connection kept its buffer"
        );
        app.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(conn.fill_now(&mut proxy), Some(true));
        assert_eq!(&conn.buf[conn.start..], b"GET / HTTP/1.1\r\n");
        drop(app);
        conn.start = conn.buf.len();
        assert_eq!(conn.fill_now(&mut proxy), Some(false), "the end of input");
    }
}
