//! HTTPS interception (`[proxy.intercept]`): the `CONNECT` decision ([`decide`]), the leaf
//! certificate cache ([`Interceptor`]), and serving an intercepted connection
//! ([`Inner::intercept`]).
//!
//! The decision is made on the `CONNECT` authority before any TLS: only a host:port a route
//! takes as `https://host:port` is intercepted, so no certificate is ever made for any other
//! host. An intercepted connection reads the app's ClientHello first (peek, then accept): a
//! server name other than the `CONNECT` host ends it before any certificate is sent. The
//! decrypted stream then goes through the same wire guard, hyper settings and service
//! (`Inner::handle`) as a connection on the proxy port, each request rewritten to
//! `https://<CONNECT host>/...` so it takes the very route the decision found; a request naming
//! another host is refused. At `Stopping` it drains like a proxy-port connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, ServerConfig};
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;

use super::body::ProxyBody;
use super::error::{ErrorCode, ProxyError};
use super::route::{HostPattern, Route, RouteTable, normalise, split_host_port};
use super::wire::WireGuard;
use super::{ConnShared, Inner, ProxyBuildError, TunnelFuture, connection_error};
use crate::ca::{Ca, renew_after};
use crate::config::{ConnectPolicy, InterceptConfig, RouteConfig};
use crate::metrics::TlsAcceptError;
use crate::shutdown::{Phase, Shutdown};

const OTHER_HOST: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "inside an intercepted CONNECT every request must be for the CONNECT's host and port: \
     open a new CONNECT for another host",
);
const NESTED_CONNECT: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "CONNECT inside an intercepted CONNECT is not supported",
);

/// What a `CONNECT` gets.
#[derive(Debug)]
pub(super) enum ConnectDecision<'a> {
    /// Terminate the app's TLS and serve its requests through this route.
    Intercept(&'a Route),
    /// A routed host without interception (or on a port no route takes): refused, since a
    /// blind tunnel could not carry the token.
    RefuseRouted,
    /// An unrouted host, `connect = "tunnel"`.
    Tunnel,
    /// An unrouted host, `connect = "deny"`.
    Deny,
}

/// The `CONNECT` decision, on the authority alone: a route that matches `https://host:port`
/// (a route without `port` matches 443) is intercepted when `intercept` is on; any other host a
/// route names is refused, whatever the port; everything else follows `policy`.
pub(super) fn decide<'a>(
    routes: &'a RouteTable,
    host: &str,
    port: u16,
    intercept: bool,
    policy: ConnectPolicy,
) -> ConnectDecision<'a> {
    if intercept && let Some(route) = routes.by_host(host, Some(port), &[443]) {
        return ConnectDecision::Intercept(route);
    }
    if routes.is_routed_host(host) {
        return ConnectDecision::RefuseRouted;
    }
    match policy {
        ConnectPolicy::Tunnel => ConnectDecision::Tunnel,
        ConnectPolicy::Deny => ConnectDecision::Deny,
    }
}

/// One host's leaf, ready to serve.
struct Leaf {
    /// A server configuration presenting only this leaf, offering `http/1.1`.
    config: Arc<ServerConfig>,
    /// When to make a new one (half its life).
    renew_at: Instant,
    /// Made for an exact route host at start (never evicted), or for a wildcard's host.
    pinned: bool,
}

/// The operator CA and the leaves it made.
pub(crate) struct Interceptor {
    ca: Ca,
    /// `proxy.intercept.leaf_validity`.
    validity: Duration,
    /// `proxy.intercept.max_cached_leaves`: wildcard hosts kept.
    max_cached: usize,
    /// Normalised lowercase host → leaf. Locked once per intercepted connection, never per
    /// request.
    leaves: Mutex<HashMap<Box<str>, Leaf>>,
}

impl Interceptor {
    /// Loads the CA and makes the leaves of every exact route host.
    pub(super) fn new(
        config: &InterceptConfig,
        routes: &[RouteConfig],
    ) -> Result<Self, ProxyBuildError> {
        let ca = Ca::load(&config.ca_cert_file, &config.ca_key_file)?;
        let this = Self {
            ca,
            validity: config.leaf_validity,
            max_cached: config.max_cached_leaves,
            leaves: Mutex::new(HashMap::new()),
        };
        for rc in routes {
            if let HostPattern::Exact(host) = HostPattern::parse(&rc.host) {
                this.server_config(&host, true)?;
            }
        }
        Ok(this)
    }

    /// The server configuration for `host` (normalised, lowercase): the cached one, or a new
    /// leaf when there is none or it is past half its life.
    fn server_config(
        &self,
        host: &str,
        pinned: bool,
    ) -> Result<Arc<ServerConfig>, ProxyBuildError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(leaf) = leaves.get(host)
            && leaf.renew_at > now
        {
            return Ok(leaf.config.clone());
        }
        let pinned = pinned || leaves.get(host).is_some_and(|l| l.pinned);
        let key = self.ca.leaf(host, self.validity)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(crate::tls::TlsError::from)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneLeaf(key)));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if !pinned && !leaves.contains_key(host) {
            let wildcard = leaves.values().filter(|l| !l.pinned).count();
            if wildcard >= self.max_cached {
                // The oldest wildcard leaf goes (the one to be renewed first).
                if let Some(oldest) = leaves
                    .iter()
                    .filter(|(_, l)| !l.pinned)
                    .min_by_key(|(_, l)| l.renew_at)
                    .map(|(h, _)| h.clone())
                {
                    leaves.remove(&oldest);
                }
            }
        }
        leaves.insert(
            host.into(),
            Leaf {
                config: config.clone(),
                renew_at: now + renew_after(self.validity),
                pinned,
            },
        );
        Ok(config)
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.leaves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A certificate resolver with one answer.
#[derive(Debug)]
struct OneLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for OneLeaf {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Why an intercepted handshake failed, with what to log.
fn classify(e: &io::Error) -> TlsAcceptError {
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::AlertReceived(AlertDescription::UnknownCA)) => {
            TlsAcceptError::UnknownCa
        }
        Some(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied,
        )) => TlsAcceptError::CertificateRejected,
        _ => TlsAcceptError::Handshake,
    }
}

impl Inner {
    /// The tunnel task of an intercepted `CONNECT` to `host:port`: TLS with the app, then its
    /// requests through [`Inner::handle`] until it closes.
    ///
    /// Boxed here rather than where it is stored: the task serves requests through `handle`,
    /// which reaches this function again through `connect`, and the compiler can only check
    /// such a cycle is `Send` across a named (boxed) type.
    pub(super) fn intercept(
        self: Arc<Self>,
        current: Arc<ArcSwap<Inner>>,
        on_upgrade: OnUpgrade,
        host: Box<str>,
        port: u16,
        shutdown: Shutdown,
    ) -> TunnelFuture {
        Box::pin(self.serve_intercepted(current, on_upgrade, host, port, shutdown))
    }

    async fn serve_intercepted(
        self: Arc<Self>,
        current: Arc<ArcSwap<Inner>>,
        on_upgrade: OnUpgrade,
        host: Box<str>,
        port: u16,
        shutdown: Shutdown,
    ) {
        let Some(interceptor) = self.intercept.as_ref() else {
            return;
        };
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let handshake = async {
            let start = LazyConfigAcceptor::new(Acceptor::default(), TokioIo::new(upgraded))
                .await
                .map_err(|e| classify(&e))?;
            if let Some(sni) = start.client_hello().server_name()
                && !normalise(sni).eq_ignore_ascii_case(&host)
            {
                tracing::warn!(
                    host = &*host,
                    sni,
                    "intercepted CONNECT refused: the app's TLS names another host than its \
                     CONNECT, and no certificate is made for a host the route did not name"
                );
                return Err(TlsAcceptError::SniMismatch);
            }
            let config = interceptor.server_config(&host, false).map_err(|e| {
                tracing::error!(host = &*host, error = %e, "cannot make a leaf certificate");
                TlsAcceptError::Handshake
            })?;
            start.into_stream(config).await.map_err(|e| {
                let reason = classify(&e);
                log_refusal(&host, reason, &e);
                reason
            })
        };
        let tls = match tokio::time::timeout(self.wire.header_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(reason)) => {
                self.metrics.tls_accept_error(reason);
                return;
            }
            Err(_) => {
                tracing::info!(
                    host = &*host,
                    "intercepted CONNECT: no TLS handshake within header_read_timeout"
                );
                self.metrics.tls_accept_error(TlsAcceptError::Timeout);
                return;
            }
        };
        self.metrics.intercepted_connections.inc();
        let authority = match authority(&host, port) {
            Some(a) => a,
            None => return,
        };
        // The TLS session keeps the leaf it was made with; each request inside it loads the
        // configuration in force, like a request on the proxy port.
        let shared = Arc::new(ConnShared {
            current,
            tunnel: Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        let service = hyper::service::service_fn(move |req| {
            let conn = shared.clone();
            let authority = authority.clone();
            async move {
                let inner = conn.current.load_full();
                Ok::<_, Infallible>(inner.intercepted(req, &conn, authority).await)
            }
        });
        let io = TokioIo::new(WireGuard::new(tls, self.wire.clone(), self.metrics.clone()));
        let conn = self.server.serve_connection(io, service);
        tokio::pin!(conn);
        // Like a connection on the proxy port: at `Stopping` an idle one closes at once and
        // one with a request in flight closes after its answer (`Terminated` is the connection
        // task's own business).
        let result = tokio::select! {
            result = &mut conn => result,
            () = shutdown.reached(Phase::Stopping) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            connection_error(&self.metrics, e.as_ref());
        }
    }

    /// One request inside an intercepted connection: refused unless it names the `CONNECT`'s
    /// host and port, else made absolute (`https://authority/...`) and answered as on the
    /// proxy port.
    async fn intercepted(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnShared,
        authority: Authority,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return self.refuse(NESTED_CONNECT);
        }
        if !names(&req, &authority) {
            return self.refuse(OTHER_HOST);
        }
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority)
            .path_and_query(pq)
            .build()
        {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return self.refuse(super::target::BAD_TARGET),
        }
        self.handle(req, conn).await
    }
}

/// `host[:port]` (the port only when not 443), as requests inside the tunnel are rewritten to.
fn authority(host: &str, port: u16) -> Option<Authority> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let text = if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    };
    Authority::from_maybe_shared(Bytes::from(text)).ok()
}

/// Whether the request's target (absolute-form authority, else `Host`) is `authority`'s host
/// and port (443 when it names none). A request naming no host at all is refused too.
fn names<B>(req: &Request<B>, authority: &Authority) -> bool {
    let named = match req.uri().authority() {
        Some(a) if a.as_str().contains('@') => return false,
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    let Some((host, port)) = named.and_then(split_host_port) else {
        return false;
    };
    normalise(host).eq_ignore_ascii_case(normalise(authority.host()))
        && port.unwrap_or(443) == authority.port_u16().unwrap_or(443)
}

/// Logs a handshake the app ended, in words for the commonest cause.
fn log_refusal(host: &str, reason: TlsAcceptError, e: &io::Error) {
    match reason {
        TlsAcceptError::UnknownCa => tracing::warn!(
            host,
            "intercepted CONNECT: the app does not trust the operator CA (it answered the TLS \
             handshake with unknown_ca); give it the bundle from `bearer-proxy ca bundle` \
             (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS or a Java truststore)"
        ),
        TlsAcceptError::CertificateRejected => tracing::warn!(
            host,
            error = %e,
            "intercepted CONNECT: the app rejected the leaf certificate; most often it does not \
             trust the operator CA (see `bearer-proxy ca bundle`)"
        ),
        _ => tracing::info!(host, error = %e, "intercepted CONNECT: TLS handshake failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::metrics::Metrics;
    use crate::token::TokenCell;

    fn table(routes: &[(String, Option<u16>)]) -> RouteTable {
        let mut text = String::from(
            r#"
            [tokens.t]
            token_url = "https://issuer.example/token"
            grant_type = "client_credentials"
            client_id = "id"
            client_secret = "secret"
            "#,
        );
        for (i, (host, port)) in routes.iter().enumerate() {
            text.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\nhost = \"{host}\"\ntoken = \"t\"\n"
            ));
            if let Some(p) = port {
                text.push_str(&format!("port = {p}\n"));
            }
        }
        let c = crate::config::from_str(&text, config::FileFormat::Toml, Some(Default::default()))
            .unwrap();
        let mut tokens = BTreeMap::new();
        tokens.insert("t".to_owned(), TokenCell::new("t", Duration::from_secs(5)));
        RouteTable::build(&c, &tokens, None, &Metrics::new()).unwrap()
    }

    /// An independent reading of the route rules: lowercase, one trailing dot ignored; `*.s`
    /// matches names ending in `.s` with a label before it; a route without a port takes 443.
    fn reference(routes: &[(String, Option<u16>)], host: &str, port: u16) -> (bool, bool) {
        let h = host.to_ascii_lowercase();
        let h = h.strip_suffix('.').unwrap_or(&h);
        let matches = |pattern: &str| match pattern.strip_prefix('*') {
            Some(suffix) => h.len() > suffix.len() && h.ends_with(suffix),
            None => h == pattern,
        };
        let any = routes.iter().any(|(p, _)| matches(p));
        let on_port = routes
            .iter()
            .any(|(p, rp)| matches(p) && rp.unwrap_or(443) == port);
        (any, on_port)
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a.test".to_owned()),
            Just("b.a.test".to_owned()),
            Just("A.TEST.".to_owned()),
            Just("xa.test".to_owned()),
            Just("test".to_owned()),
            "[ab.]{1,6}(test)?",
        ]
    }

    fn route() -> impl Strategy<Value = (String, Option<u16>)> {
        (
            prop_oneof![
                Just("a.test".to_owned()),
                Just("*.a.test".to_owned()),
                Just("*.test".to_owned()),
                Just("b.a.test".to_owned())
            ],
            prop_oneof![
                Just(None),
                Just(Some(443)),
                Just(Some(8443)),
                Just(Some(80))
            ],
        )
    }

    proptest! {
        #[test]
        fn connect_decision_follows_the_route_matcher(
            routes in prop::collection::vec(route(), 0..4),
            host in host(),
            port in prop_oneof![Just(443u16), Just(8443), Just(80), Just(1)],
            intercept: bool,
            tunnel: bool,
        ) {
            // Two routes with the same host and port are refused by validation; skip them.
            let mut seen = std::collections::HashSet::new();
            prop_assume!(routes.iter().all(|r| seen.insert(r.clone())));
            let t = table(&routes);
            let policy = if tunnel { ConnectPolicy::Tunnel } else { ConnectPolicy::Deny };
            let (routed, on_port) = reference(&routes, &host, port);
            let d = decide(&t, &host, port, intercept, policy);
            match d {
                ConnectDecision::Intercept(r) => {
                    prop_assert!(intercept && on_port);
                    prop_assert!(r.pattern.matches(&host));
                }
                ConnectDecision::RefuseRouted => prop_assert!(routed && !(intercept && on_port)),
                ConnectDecision::Tunnel => prop_assert!(!routed && tunnel),
                ConnectDecision::Deny => prop_assert!(!routed && !tunnel),
            }
        }
    }

    #[test]
    fn requests_must_name_the_connect_host_and_port() {
        let a443 = authority("api.test", 443).unwrap();
        let a8443 = authority("api.test", 8443).unwrap();
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap()
        };
        assert!(names(&req("/x", Some("api.test")), &a443));
        assert!(names(&req("/x", Some("API.test.:443")), &a443));
        assert!(names(&req("https://api.test/x", None), &a443));
        assert!(names(&req("/x", Some("api.test:8443")), &a8443));
        assert!(!names(&req("/x", Some("api.test")), &a8443));
        assert!(!names(&req("/x", Some("api.test:8443")), &a443));
        assert!(!names(&req("/x", Some("evil.test")), &a443));
        assert!(!names(&req("/x", Some("api.test.evil")), &a443));
        assert!(!names(&req("/x", None), &a443));
        assert!(!names(&req("https://evil.test/x", Some("api.test")), &a443));
        assert!(!names(&req("https://u@api.test/x", None), &a443));
    }

    #[tokio::test(start_paused = true)]
    async fn leaves_are_cached_renewed_at_half_life_and_wildcards_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = crate::ca::init(dir.path(), &[]).unwrap();
        let cfg = InterceptConfig {
            ca_cert_file: c,
            ca_key_file: k,
            leaf_validity: Duration::from_secs(3600),
            max_cached_leaves: 2,
        };
        let routes: Vec<RouteConfig> = Vec::new();
        let i = Interceptor::new(&cfg, &routes).unwrap();
        let first = i.server_config("exact.test", true).unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &i.server_config("exact.test", false).unwrap()
        ));
        for h in ["a.w.test", "b.w.test", "c.w.test"] {
            i.server_config(h, false).unwrap();
        }
        // Two wildcard leaves and the pinned one.
        assert_eq!(i.cached(), 3);
        tokio::time::advance(Duration::from_secs(1801)).await;
        let renewed = i.server_config("exact.test", false).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        for h in ["d.w.test", "e.w.test", "f.w.test"] {
            i.server_config(h, false).unwrap();
        }
        assert_eq!(
            i.cached(),
            3,
            "the pinned leaf stays, wildcards stay bounded"
        );
    }
}
