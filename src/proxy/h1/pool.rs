//! The fast path's upstream connections: connecting (TCP, then TLS verified against the same
//! trust store and client certificates as the pooled hyper clients, all within
//! `connect_timeout`) and the idle connections between client connections.
//!
//! A client connection's task owns the upstream connection it uses and keeps it across its
//! requests, so a keep-alive client costs no pool operation per request; the pool is only
//! consulted when a client connection needs its first connection to a key, and takes it back
//! when the client connection ends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::upstream::ConnectError;

/// What an upstream connection is for: a connection carries one credential's requests to one
/// origin, never another's (see `upstream.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// The route's pool index (`Route::pool`): the credential and client certificate.
    pub(crate) pool: usize,
    /// `https` (TLS) or `http`.
    pub(crate) tls: bool,
    /// `host[:port]` connected to.
    pub(crate) authority: Authority,
}

/// A new or idle connection.
pub(crate) enum Connected {
    /// An HTTP/1.1 connection.
    Http1(H1Conn),
    /// The upstream chose HTTP/2 in the TLS handshake: the fast path leaves this origin to
    /// the hyper clients (the connection is closed).
    Http2,
}

/// One upstream HTTP/1.1 connection.
pub(crate) struct H1Conn {}

impl H1Conn {
    /// Whether it came from the idle pool (and so may have been closed by the upstream
    /// meanwhile).
    pub(crate) fn reused(&self) -> bool {
        todo!()
    }

    /// Its key.
    pub(crate) fn key(&self) -> &PoolKey {
        todo!()
    }
}

impl AsyncRead for H1Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        todo!()
    }
}

impl AsyncWrite for H1Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _data: &[u8],
    ) -> Poll<io::Result<usize>> {
        todo!()
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        todo!()
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        todo!()
    }
}

/// Idle connections, and how to make new ones.
#[derive(Default)]
pub(crate) struct H1Pool {}

impl H1Pool {
    /// An idle connection for `key` that still looks open, or a new one.
    pub(crate) async fn get(&self, key: &PoolKey) -> Result<Connected, ConnectError> {
        let _ = key;
        todo!()
    }

    /// A new connection for `key`, never an idle one (for the retry after an idle one turned
    /// out to be closed).
    pub(crate) async fn connect(&self, key: &PoolKey) -> Result<Connected, ConnectError> {
        let _ = key;
        todo!()
    }

    /// Takes back a connection that finished an exchange cleanly and may carry another.
    pub(crate) fn put(&self, conn: H1Conn) {
        let _ = conn;
        todo!()
    }
}
