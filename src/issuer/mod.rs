//! The built-in dev issuer: a local OAuth2 token endpoint speaking Flinks'
//! `POST /api/v1/token` contract, with failure switches and observation hooks for the local demo,
//! the integration tests (in-process) and the benchmarks (as a subprocess the CLI starts). For
//! Flinks' Data Recipient flow it also serves many end users: `GET /api/v1/authorize` (a code
//! per user), `DELETE /api/v1/revoke` and an FDX-like resource under `/api/fdx/` that says whose
//! token it received.
//!
//! It is dev tooling, compiled only with the default-on `dev-tools` cargo feature: a sidecar
//! built with `--no-default-features` has neither this module nor its fault-injection API.
//!
//! This file binds and serves ([`DevIssuer`]) and routes a request to its endpoint. The parts:
//! - `endpoint.rs`: the token endpoint: client authentication and the grants;
//! - `authorize.rs`: `GET /api/v1/authorize`, the consent redirect with a one-time code;
//! - `revoke.rs`: `DELETE /api/v1/revoke`, ending a user's consent with their access token;
//! - `fdx.rs`: `/api/fdx/...`, the resource that names the token's user (or answers 602);
//! - `users.rs`: end users: their codes, refresh tokens, consent, access tokens and counters;
//! - `client_auth.rs`: client certificates and `private_key_jwt` assertions ([`ClientAuthOptions`]);
//! - `control.rs`: [`IssuerControl`] and the `/control/...` HTTP switches;
//! - `fault.rs`: the injectable failures ([`Fault`]) and their answers;
//! - `state.rs`: [`IssuerOptions`], the shared state and request log, token minting;
//! - `params.rs`: reading a body and its parameters; `response.rs`: JSON and OAuth error answers.

mod authorize;
mod client_auth;
mod control;
mod endpoint;
mod fault;
mod fdx;
#[cfg(test)]
mod harness;
mod params;
mod response;
mod revoke;
mod state;
mod users;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::listener::accept;

pub use client_auth::{AssertionKeySpec, ClientAuthOptions, MAX_ASSERTION_LIFETIME};
pub use control::IssuerControl;
pub use fault::Fault;
pub use state::{IssuedToken, IssuerOptions, RecordedRequest};
pub use users::{Retired, UserStats};

use response::error_response;
use state::Shared;

/// The token endpoint path (Flinks').
const TOKEN_PATH: &str = "/api/v1/token";
/// A second path for the token endpoint, the common OAuth2 spelling.
const TOKEN_ALIAS: &str = "/token";
/// Flinks' authorize endpoint path.
const AUTHORIZE_PATH: &str = "/api/v1/authorize";
/// Flinks' revoke endpoint path.
const REVOKE_PATH: &str = "/api/v1/revoke";
/// Prefix of the FDX-like resource paths (Flinks' data endpoints live under it).
const FDX_PREFIX: &str = "/api/fdx/";
/// Prefix of the control API paths.
const CONTROL_PREFIX: &str = "/control/";
/// How long `serve` lets in-flight requests finish after shutdown before cutting connections:
/// ample for a loopback token request, short enough that a configured delay cannot hold up a
/// test that stops the issuer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// A TLS client has this long to finish its handshake: generous for loopback, and a client that
/// never completes one cannot hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound, not yet serving, dev issuer.
pub struct DevIssuer {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Serve HTTPS with this configuration ([`ClientAuthOptions::tls`]).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Binds the listening socket (`127.0.0.1:0` picks a free port). Nothing is served until
    /// [`DevIssuer::serve`] runs, but connections queue in the backlog meanwhile.
    pub async fn bind(addr: SocketAddr, opts: IssuerOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let tls = opts
            .client_auth
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from);
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(Shared::new(opts)),
            tls,
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>` (`https://` when serving TLS) with no trailing slash; an unspecified bind address (`0.0.0.0`, `::`)
    /// is replaced by loopback so the URL can be connected to.
    pub fn base_url(&self) -> String {
        let mut addr = self.local_addr;
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }

    /// The token endpoint URL, `<base_url>/api/v1/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// The authorize endpoint URL, `<base_url>/api/v1/authorize`; add `client_id`,
    /// `redirect_uri`, `state` and optionally `user` as the query.
    pub fn authorize_url(&self) -> String {
        format!("{}{AUTHORIZE_PATH}", self.base_url())
    }

    /// The revoke endpoint URL, `<base_url>/api/v1/revoke`.
    pub fn revoke_url(&self) -> String {
        format!("{}{REVOKE_PATH}", self.base_url())
    }

    /// A handle on the switches and observations; it stays usable after `serve` returns.
    pub fn control(&self) -> IssuerControl {
        IssuerControl {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` resolves, each connection in its own task. Then it stops
    /// accepting, lets in-flight requests finish for up to a second, closes every connection
    /// and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let DevIssuer {
            listener,
            shared,
            tls,
            ..
        } = self;
        let mut http = hyper::server::conn::http1::Builder::new();
        // The timer enables hyper's header read timeout, so an idle half-open client cannot pin
        // a task forever.
        http.timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                stream = accept(&listener, "dev issuer") => {
                    let shared = Arc::clone(&shared);
                    let Some(tls) = tls.clone() else {
                        let service = service(shared, None);
                        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                        connections.spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "dev issuer: connection error");
                            }
                        });
                        continue;
                    };
                    let watcher = graceful.watcher();
                    let http = http.clone();
                    connections.spawn(async move {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "dev issuer: TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty())
                            .then_some(client_auth::VerifiedClientCert);
                        let conn = watcher.watch(http.serve_connection(TokioIo::new(stream), service(shared, cert)));
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "dev issuer: connection error");
                        }
                    });
                }
            }
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("dev issuer: cutting connections still busy after the grace period");
        }
        connections.shutdown().await;
    }
}

/// The service of one connection; `cert` marks a connection with a verified client certificate.
fn service(
    shared: Arc<Shared>,
    cert: Option<client_auth::VerifiedClientCert>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    service_fn(move |mut req: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        if let Some(cert) = cert {
            req.extensions_mut().insert(cert);
        }
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    })
}

/// Routes a request.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == TOKEN_PATH || path == TOKEN_ALIAS {
        return endpoint::token_endpoint(shared, req).await;
    }
    if path == AUTHORIZE_PATH {
        return authorize::authorize_endpoint(shared, &req);
    }
    if path == REVOKE_PATH {
        return revoke::revoke_endpoint(shared, &req);
    }
    if path.starts_with(FDX_PREFIX) {
        return fdx::fdx_endpoint(shared, &req);
    }
    if shared.control_api
        && let Some(command) = path.strip_prefix(CONTROL_PREFIX)
    {
        let command = command.to_owned();
        return control::control_endpoint(shared, &command, req).await;
    }
    error_response(StatusCode::NOT_FOUND, "invalid_request", "no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::harness::{cc_json, client, start};
    use super::*;

    #[tokio::test]
    async fn serve_returns_on_shutdown_and_stops_accepting() {
        let issuer = start(IssuerOptions::default()).await;
        let url = issuer.url.clone();
        let http = client();
        assert_eq!(
            http.post(&url)
                .json(&cc_json())
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        issuer.stop().await;
        // The pooled keep-alive connection was closed and no new one is accepted.
        assert!(http.post(&url).json(&cc_json()).send().await.is_err());
    }
}
