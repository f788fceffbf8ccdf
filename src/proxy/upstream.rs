//! The one pooled client every forwarded request goes through, and how its failures are told
//! apart.
//!
//! TLS always verifies the upstream's certificate against the trust store of `tls.rs` (plus
//! `proxy.ca_file`); ALPN offers HTTP/2 and HTTP/1.1 and the pool uses whichever the upstream
//! picks. The whole connect, TCP and TLS, is bounded by `connect_timeout`. Each stage tags its
//! errors so that a refused connection (502 `upstream_unreachable`) is never confused with a
//! certificate problem (502 `upstream_tls`); either way no request bytes, and so no token, were
//! sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use super::body::ProxyBody;
use crate::metrics::UpstreamErrorKind;
use crate::tls::TlsError;

/// Idle pooled connections to upstreams are closed after this: below the idle timeouts of
/// common load balancers (AWS ALB 60s, nginx `keepalive_timeout` 75s), so we close first and a
/// request rarely races the upstream's close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared client.
pub(crate) type UpstreamClient = Client<Connector, ProxyBody>;

/// Builds the shared client.
pub(crate) fn client(
    ca_file: Option<&std::path::Path>,
    connect_timeout: Duration,
) -> Result<UpstreamClient, TlsError> {
    // hyper-rustls sets ALPN itself (`enable_all_versions`: h2, http/1.1) and refuses a
    // configuration that already has some.
    let tls = crate::tls::client_config(ca_file, &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(Tcp(http));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        // The request path always sets Host itself.
        .set_host(false)
        .timer(TokioTimer::new())
        .build(Connector {
            inner: https,
            timeout: connect_timeout,
        }))
}

/// Why a connection to an upstream could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} failure connecting to upstream: {source}")]
pub(crate) struct ConnectError {
    /// Which stage failed.
    pub(crate) kind: ConnectFailure,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// The stage a connection failed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectFailure {
    /// DNS or TCP.
    Tcp,
    /// The TLS handshake, including certificate verification.
    Tls,
    /// `connect_timeout` elapsed.
    Timeout,
}

/// Marks errors from the TCP stage, so the TLS stage's own errors can be told apart.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct TcpError(Box<dyn std::error::Error + Send + Sync>);

/// `HttpConnector` with its errors tagged.
#[derive(Clone, Debug)]
pub(crate) struct Tcp(HttpConnector);

impl Service<Uri> for Tcp {
    type Response = TokioIo<TcpStream>;
    type Error = TcpError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, TcpError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TcpError>> {
        self.0.poll_ready(cx).map_err(|e| TcpError(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.0.call(uri);
        Box::pin(async move { fut.await.map_err(|e| TcpError(Box::new(e))) })
    }
}

/// The TLS connector with `connect_timeout` over both stages and classified errors.
#[derive(Clone, Debug)]
pub(crate) struct Connector {
    inner: HttpsConnector<Tcp>,
    timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx).map_err(classify)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result.map_err(classify),
                Err(elapsed) => Err(ConnectError {
                    kind: ConnectFailure::Timeout,
                    source: Box::new(elapsed),
                }),
            }
        })
    }
}

fn classify(e: Box<dyn std::error::Error + Send + Sync>) -> ConnectError {
    let kind = if e.is::<TcpError>() {
        ConnectFailure::Tcp
    } else {
        ConnectFailure::Tls
    };
    ConnectError { kind, source: e }
}

/// How a failed exchange is reported: the answer's code and the metric kind.
pub(crate) fn classify_request_error(
    e: &hyper_util::client::legacy::Error,
) -> (super::error::ErrorCode, UpstreamErrorKind) {
    use super::error::ErrorCode;
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return match c.kind {
                ConnectFailure::Tcp => (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Connect),
                ConnectFailure::Timeout => {
                    (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Timeout)
                }
                ConnectFailure::Tls => (ErrorCode::UpstreamTls, UpstreamErrorKind::Tls),
            };
        }
        source = err.source();
    }
    if e.is_connect() {
        (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Connect)
    } else {
        (ErrorCode::UpstreamReset, UpstreamErrorKind::Reset)
    }
}
