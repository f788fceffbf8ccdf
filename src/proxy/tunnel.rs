//! `CONNECT`: blind TCP tunnels to hosts no route names.
//!
//! A tunnel carries the app's own TLS, which the proxy cannot read or add a header to, so a
//! `CONNECT` to a routed host is refused with an explanation instead of silently sending the
//! request without its token. Other hosts follow `proxy.connect`: `tunnel` connects (within
//! `connect_timeout`), answers 200 and copies bytes both ways until either side closes;
//! `deny` answers 403.
//!
//! The copy runs in the client connection's own task after hyper hands the socket over (see
//! `ConnShared`), so a tunnel keeps its connection slot, counts in `open_connections` and
//! `open_tunnels`, delays a graceful stop like any connection, and ends at `Terminated`.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::error::{ErrorCode, ProxyError};
use super::route::normalise;
use super::{ConnShared, Inner};
use crate::config::ConnectPolicy;
use crate::metrics::UpstreamErrorKind;

const ROUTED: ProxyError = ProxyError::new(
    ErrorCode::ConnectToRoutedHost,
    "CONNECT to a routed host is refused: an HTTPS tunnel is encrypted end to end, so the proxy \
     cannot inject the access token into it. Call http:// URLs through the proxy instead (for \
     example http://ob.flinksapp.com/api/...); the proxy itself connects to the upstream over \
     TLS and adds the token.",
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
        if self.routes.is_routed_host(host) {
            return self.refuse(ROUTED);
        }
        if self.connect == ConnectPolicy::Deny {
            return self.refuse(DENIED);
        }
        let dial = TcpStream::connect((normalise(host), port));
        let mut upstream = match tokio::time::timeout(self.connect_timeout, dial).await {
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
            let mut client = TokioIo::new(upgraded);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }));
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::OK;
        resp
    }
}
