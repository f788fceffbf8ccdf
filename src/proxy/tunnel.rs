//! `CONNECT`: blind TCP tunnels to hosts no route names.
//!
//! A tunnel carries the app's own TLS, which the proxy cannot read or add a header to, so a
//! `CONNECT` to a routed host is refused with an explanation instead of silently sending the
//! request without its token, unless `[proxy.intercept]` is configured: then the proxy
//! terminates that TLS itself (`intercept.rs`, which also makes the decision). Other hosts
//! follow `proxy.connect`: `tunnel` connects (within
//! `connect_timeout`), answers 200 and copies bytes both ways until either side closes;
//! `deny` answers 403.
//!
//! A tunnel through which no byte moves in either direction for `idle_timeout` is closed
//! (the check runs every `idle_timeout`, so a silent tunnel ends between one and two of them):
//! a client that has gone while the remote host stays silent (or the reverse) would otherwise
//! keep its slot forever, since a half-closed tunnel waits for the other side's end.
//!
//! The copy runs in the client connection's own task after hyper hands the socket over (see
//! `ConnShared`), so a tunnel keeps its connection slot, counts in `open_connections` and
//! `open_tunnels`, delays a graceful stop like any connection, and ends at `Terminated`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::error::{ErrorCode, ProxyError};
use super::intercept::{ConnectDecision, decide};
use super::route::normalise;
use super::{ConnShared, Inner};
use crate::metrics::UpstreamErrorKind;

const ROUTED: ProxyError = ProxyError::new(
    ErrorCode::ConnectToRoutedHost,
    "CONNECT to a routed host is refused: an HTTPS tunnel is encrypted end to end, so the proxy \
     cannot inject the access token into it. Call http:// URLs through the proxy instead (for \
     example http://ob.flinksapp.com/api/...); the proxy itself connects to the upstream over \
     TLS and adds the token. (Or let the proxy terminate the app's TLS with an operator CA: \
     [proxy.intercept].)",
)
.closing();
const DENIED: ProxyError = ProxyError::new(
    ErrorCode::Denied,
    "CONNECT tunnels are disabled (proxy.connect = \"deny\")",
)
.closing();
const BAD_AUTHORITY: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "CONNECT needs a host:port target without user:password@",
)
.closing();
const UNREACHABLE: ProxyError = ProxyError::new(
    ErrorCode::UpstreamUnreachable,
    "the CONNECT target could not be reached",
)
.closing();

/// Decrements `open_tunnels` when a tunnel ends, however it ends.
struct TunnelGauge(prometheus::IntGauge);

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Inner {
    /// Answers a `CONNECT`, leaving the tunnel to the connection task.
    pub(super) async fn connect(
        &self,
        req: Request<Incoming>,
        conn: &ConnShared,
    ) -> Response<ProxyBody> {
        let Some(authority) = req.uri().authority() else {
            return self.refuse(BAD_AUTHORITY);
        };
        let (Some(port), false) = (authority.port_u16(), authority.as_str().contains('@')) else {
            return self.refuse(BAD_AUTHORITY);
        };
        let host = authority.host();
        match decide(
            &self.routes,
            host,
            port,
            self.intercept.is_some(),
            self.connect,
        ) {
            ConnectDecision::Intercept(route) => {
                tracing::debug!(route = &*route.label, "CONNECT intercepted");
                let host: Box<str> = normalise(host).to_ascii_lowercase().into();
                let on_upgrade = hyper::upgrade::on(req);
                conn.set_tunnel(conn.current.load_full().intercept(
                    conn.current.clone(),
                    on_upgrade,
                    host,
                    port,
                    conn.shutdown.clone(),
                ));
                let mut resp = Response::new(ProxyBody::empty());
                *resp.status_mut() = StatusCode::OK;
                return resp;
            }
            ConnectDecision::RefuseRouted => return self.refuse(ROUTED),
            ConnectDecision::Deny => return self.refuse(DENIED),
            ConnectDecision::Tunnel => {}
        }
        let dial = TcpStream::connect((normalise(host), port));
        let upstream = match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "CONNECT target unreachable");
                self.connect_metrics
                    .upstream_error(UpstreamErrorKind::Connect);
                return self.refuse(UNREACHABLE);
            }
            Err(_) => {
                self.connect_metrics
                    .upstream_error(UpstreamErrorKind::Timeout);
                return self.refuse(UNREACHABLE);
            }
        };
        let _ = upstream.set_nodelay(true);
        let on_upgrade = hyper::upgrade::on(req);
        let gauge = self.metrics.open_tunnels.clone();
        let idle = self.wire.idle_timeout;
        conn.set_tunnel(Box::pin(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            gauge.inc();
            let _gauge = TunnelGauge(gauge);
            copy_until_idle(TokioIo::new(upgraded), upstream, idle).await;
        }));
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::OK;
        resp
    }
}

/// Copies both ways until either side's copy ends with the other, or nothing moved for a
/// whole `idle` period.
async fn copy_until_idle<A, B>(client: A, upstream: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let moved = Arc::new(AtomicU64::new(0));
    let mut client = Counted(client, moved.clone());
    let mut upstream = Counted(upstream, moved.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let mut seen = 0;
    loop {
        tokio::select! {
            result = &mut copy => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(idle) => {
                let now = moved.load(Ordering::Relaxed);
                if now == seen {
                    tracing::debug!("tunnel idle for idle_timeout; closing");
                    return;
                }
                seen = now;
            }
        }
    }
}

/// A stream that adds the bytes read from it to a shared counter.
struct Counted<T>(T, Arc<AtomicU64>);

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.0).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.1.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_moving_bytes_stays_and_a_silent_one_closes() {
        let (client, mut app) = tokio::io::duplex(64);
        let (upstream, mut remote) = tokio::io::duplex(64);
        let idle = Duration::from_secs(10);
        let start = Instant::now();
        let tunnel = tokio::spawn(copy_until_idle(client, upstream, idle));
        // Traffic every 6 s for a minute keeps it open.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            app.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            remote.read_exact(&mut b).await.unwrap();
        }
        assert!(!tunnel.is_finished());
        // The app goes; the remote host stays silent: closed within two idle periods.
        drop(app);
        tunnel.await.unwrap();
        assert!(start.elapsed() <= Duration::from_secs(60 + 20));
    }
}
