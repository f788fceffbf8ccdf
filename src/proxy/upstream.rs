//! The pooled clients forwarded requests go through, and how their failures are told apart.
//!
//! There is one pooled client per credential (`[tokens.<name>]`) and one for requests sent
//! without a token (`unmatched = "forward"`), all sharing one connector. hyper-util's pool is
//! keyed by scheme and authority only, so separate pools are what keep a connection that
//! carried one credential's requests from ever carrying another's: two routes with different
//! tokens to the same upstream use different connections, and even a desync we cannot see (an
//! upstream reading a header differently) cannot answer one credential's request with another's
//! exchange. A route holds its client's index, so choosing it costs nothing per request.
//!
//! A route with a client certificate (`[[routes]] client_cert_file`) gets a pooled client of
//! its own per (credential, certificate and key files), with a connector that presents that
//! certificate: the pool key is (token, client identity), so two routes with different
//! certificates, or one with and one without, never share a connection. Those clients come after
//! the per-credential ones, so a route without a certificate keeps its token's index.
//!
//! TLS always verifies the upstream's certificate against the trust store of `tls.rs` (plus
//! `proxy.ca_file`); ALPN offers HTTP/2 and HTTP/1.1 and the pool uses whichever the upstream
//! picks. The whole connect, TCP and TLS, is bounded by `connect_timeout`. Each stage tags its
//! errors so that a refused connection (502 `upstream_unreachable`) is never confused with a
//! certificate problem (502 `upstream_tls`); either way no request bytes, and so no token, were
//! sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tower::Service;

use super::body::ProxyBody;
use super::h1::H1Pool;
use crate::error::cause_ref;
use crate::identity::ClientIdentity;
use crate::metrics::UpstreamErrorKind;
use crate::tls::TlsError;

/// Idle pooled connections to upstreams (the hyper clients' and the fast path's, `h1/pool.rs`)
/// are closed after this: below the idle timeouts of common load balancers (AWS ALB 60s, nginx
/// `keepalive_timeout` 75s), so we close first and a request rarely races the upstream's close.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One pooled client.
pub(crate) type UpstreamClient = Client<Connector, ProxyBody>;

/// The pooled clients: one per credential, one per (credential, client certificate), one for
/// requests without a token.
pub(crate) struct Upstreams {
    /// Indexed by `Route::pool`: the position of the route's token in `[tokens]`, or for a route
    /// with a client certificate, `[tokens]`'s length plus the position of its identity.
    credentials: Box<[UpstreamClient]>,
    /// For `unmatched = "forward"`: the app's own headers, no token.
    unmatched: UpstreamClient,
    /// The fast path's connections (`h1/pool.rs`), keyed by the same pool indices.
    #[allow(dead_code)] // read by the connection driver (in progress)
    h1: H1Pool,
}

impl Upstreams {
    /// `credentials` pooled clients and the unmatched one over one connector, then one pooled
    /// client with a connector of its own for each of `identities`.
    pub(crate) fn new(
        ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
        credentials: usize,
        identities: &[Arc<ClientIdentity>],
    ) -> Result<Self, TlsError> {
        // hyper-rustls sets ALPN itself (`enable_all_versions`: h2, http/1.1) and refuses a
        // configuration that already has some; the fast path's copies get theirs from
        // `H1Pool::tls_config`.
        let shared_tls = crate::tls::client_config(ca_file, &[], None)?;
        let shared = connector(&shared_tls, connect_timeout);
        let mut clients: Vec<UpstreamClient> =
            (0..credentials).map(|_| client(shared.clone())).collect();
        // The fast path's TLS settings, numbered like `clients`: the shared ones for every
        // credential, then one per identity.
        let mut h1_tls = vec![H1Pool::tls_config(&shared_tls); credentials];
        for identity in identities {
            let tls = crate::tls::client_config(ca_file, &[], Some(identity.clone()))?;
            clients.push(client(connector(&tls, connect_timeout)));
            h1_tls.push(H1Pool::tls_config(&tls));
        }
        Ok(Self {
            credentials: clients.into_boxed_slice(),
            unmatched: client(shared),
            h1: H1Pool::new(&h1_tls, connect_timeout),
        })
    }

    /// The client of the credential at `pool`.
    pub(crate) fn credential(&self, pool: usize) -> &UpstreamClient {
        // An invariant of `Proxy::new`, not a run-time condition: there is no sensible fallback
        // (another credential's pool is exactly what must never be used).
        #[allow(clippy::expect_used)]
        self.credentials
            .get(pool)
            .expect("a route's pool is in range because routes and clients come from one token map")
    }

    /// The fast path's connections.
    #[allow(dead_code)] // used by the connection driver (in progress)
    pub(crate) fn h1(&self) -> &H1Pool {
        &self.h1
    }

    /// The client for requests without a token.
    pub(crate) fn unmatched(&self) -> &UpstreamClient {
        &self.unmatched
    }
}

/// A connector with the TLS settings `tls` (trust store and client identity, no ALPN). The
/// pooled clients without a client certificate share one (TLS settings and the trust store,
/// loaded once).
fn connector(tls: &ClientConfig, connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(Tcp(http));
    Connector {
        inner: https,
        timeout: connect_timeout,
    }
}

/// A pooled client over `connector`, with a pool of its own.
fn client(connector: Connector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        // The request path always sets Host itself.
        .set_host(false)
        .timer(TokioTimer::new())
        .build(connector)
}

/// Why a connection to an upstream could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} failure connecting to upstream: {source}")]
pub(crate) struct ConnectError {
    /// Which stage failed.
    pub(crate) kind: ConnectFailure,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl ConnectError {
    /// A failure of stage `kind` (for the fast path's connector, `h1/pool.rs`).
    pub(crate) fn new(
        kind: ConnectFailure,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }
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
    if let Some(c) = cause_ref::<ConnectError>(e) {
        return match c.kind {
            ConnectFailure::Tcp => (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Connect),
            ConnectFailure::Timeout => (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Timeout),
            ConnectFailure::Tls => (ErrorCode::UpstreamTls, UpstreamErrorKind::Tls),
        };
    }
    if e.is_connect() {
        (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Connect)
    } else {
        (ErrorCode::UpstreamReset, UpstreamErrorKind::Reset)
    }
}
