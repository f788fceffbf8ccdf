//! The proxy port: the accept loop, each client connection's life, and graceful shutdown.
//!
//! Layout, in the order a request meets it:
//! * this file: [`Proxy`] (built once from the configuration), [`Proxy::serve`] (the accept
//!   loop, over `crate::listener::accept`), connection tasks and draining;
//! * `wire/`: the bytes of a client connection, checked before hyper parses them: `framer.rs`
//!   (the framing state machine, no I/O) and `guard.rs` (`WireGuard`, the socket wrapper hyper
//!   reads through: held heads, refusals, header and idle timeouts);
//! * `service.rs`: the service entry point (`Inner::handle`, `dispatch`, `refuse`);
//! * `target.rs`: the routing decision (`Inner::target`, `Target`, `Origin`);
//! * `route.rs`: the route table and host matching;
//! * `sanitise.rs`: the security-critical header sequence of a routed request, and hop-by-hop
//!   stripping;
//! * `underscore.rs`: request header names containing `_` (`proxy.underscore_headers`);
//! * `forward.rs`: sending (token wait, replay, consent probe, response checks);
//! * `upstream.rs`: the pooled upstream clients (one per credential) and their error classes;
//! * `tunnel.rs`: `CONNECT`;
//! * `intercept.rs`: `CONNECT` to a routed host with `[proxy.intercept]` (the decision, leaf
//!   certificates, serving the decrypted requests through `Inner::handle`);
//! * `body.rs`, `error.rs`: the body type and the proxy's own answers.
//!
//! Back-pressure: a connection slot (semaphore permit) is taken *before* `accept`, so above
//! `max_connections` the listener simply stops accepting and new connections wait in the
//! kernel's backlog instead of costing us file descriptors and memory.
//!
//! Shutdown: at `Stopping` the listener closes, every connection is told to finish (idle
//! keep-alive connections close at once, in-flight requests complete, then their connections
//! close) and `serve` returns when all are gone; open `CONNECT` tunnels run until they end or
//! `Terminated`. At `Terminated` everything is aborted and `serve` returns.

mod body;
mod error;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod intercept;
mod route;
mod sanitise;
mod service;
mod target;
mod tunnel;
mod underscore;
mod upstream;
mod wire;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::config::{Config, ConnectPolicy, UnderscoreHeaders, Unmatched};
use crate::listener::accept;
use crate::metrics::{Metrics, RejectReason, RouteMetrics};
use crate::shutdown::{Phase, Shutdown};
use crate::subject::Subjects;
use crate::tls::TlsError;
use crate::token::TokenCell;

use route::RouteTable;
use upstream::Upstreams;
use wire::{MAX_HEADERS, WireGuard, WireLimits};

/// hyper's read buffer is this much larger than `max_header_bytes`, so that the wire guard's
/// JSON 431 always comes first (hyper answers a bare 431 once a partial head fills its buffer).
/// The extra room also lets a body read take one more segment per call.
const READ_BUFFER_SLACK: usize = 16 * 1024;

/// The proxy could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    /// A route names a token for which no cell was given.
    #[error("routes[{index}] ({route}): no token cell for [tokens.{token}]")]
    MissingToken {
        /// Position in `[[routes]]`.
        index: usize,
        /// The route's label.
        route: String,
        /// The token it names.
        token: String,
    },
    /// A route cannot be turned into an upstream target.
    #[error("routes[{index}] ({route}): {reason}")]
    Route {
        /// Position in `[[routes]]`.
        index: usize,
        /// The route's label.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// The upstream TLS configuration (trust store, `proxy.ca_file`) failed.
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
    /// The operator CA of `[proxy.intercept]` cannot be used.
    #[error("proxy.intercept: {0}")]
    Intercept(#[from] crate::ca::CaError),
}

/// The forward proxy. Cheap to clone; clones share the configuration [`Proxy::replace`] swaps.
#[derive(Clone)]
pub struct Proxy {
    /// The configuration in force. Each request loads it once, at its start, and uses that
    /// copy to the end, so it sees the old or the new configuration of a reload, never a mix.
    current: Arc<ArcSwap<Inner>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("routes", &self.current.load().routes)
            .finish_non_exhaustive()
    }
}

/// Everything resolved from one configuration that the request path reads.
pub(crate) struct Inner {
    /// Routes, with their tokens, upstreams and metric handles.
    routes: RouteTable,
    /// The pooled upstream clients, one per credential.
    upstreams: Upstreams,
    /// For rejects and gauges.
    metrics: Arc<Metrics>,
    /// Policy for unrouted hosts.
    unmatched: Unmatched,
    /// Policy for `CONNECT` to unrouted hosts.
    connect: ConnectPolicy,
    /// Metrics label `unmatched` (also origin-form requests that match no route).
    unmatched_metrics: RouteMetrics,
    /// Metrics label `connect`.
    connect_metrics: RouteMetrics,
    /// `1.1 <pseudonym>`, appended to every forwarded request.
    via: HeaderValue,
    /// This process's pseudonym, looked for in incoming `Via` headers.
    pseudonym: &'static str,
    /// `subjects.header` when per-subject tokens are configured: read on per-subject routes,
    /// removed from every request.
    subject_header: Option<HeaderName>,
    /// `proxy.token_wait`.
    token_wait: Duration,
    /// `proxy.response_timeout`.
    response_timeout: Duration,
    /// `proxy.connect_timeout` (for `CONNECT`; the client has its own copy).
    connect_timeout: Duration,
    /// `proxy.replay_body_limit`.
    replay_body_limit: usize,
    /// `log.access`.
    access_log: bool,
    /// `proxy.underscore_headers`.
    underscore_headers: UnderscoreHeaders,
    /// Limits for each connection's wire guard.
    wire: Arc<WireLimits>,
    /// `proxy.max_connections`.
    max_connections: usize,
    /// hyper's HTTP/1 server settings.
    server: auto::Builder<TokioExecutor>,
    /// `proxy.fast_path`: plain connections start on the fast path (`h1/`).
    fast_path: bool,
    /// `[proxy.intercept]`: the operator CA and its leaves; `None` refuses `CONNECT` to routed
    /// hosts.
    intercept: Option<intercept::Interceptor>,
    /// Closed when this configuration is dropped, that is when no request uses it any more
    /// (see [`Proxy::released`]).
    in_use: tokio::sync::watch::Sender<()>,
}

/// This process's `Via` pseudonym, `bearer-proxy-<8 hex digits>`: random per process so that a
/// request looping back through the same proxy is recognised, and nothing about the host leaks.
pub fn pseudonym() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| format!("bearer-proxy-{:08x}", rand::random::<u32>()))
}

/// `1.1 <pseudonym>`, the `Via` entry appended to forwarded requests.
fn via() -> HeaderValue {
    static VIA: OnceLock<HeaderValue> = OnceLock::new();
    VIA.get_or_init(|| {
        #[allow(clippy::expect_used)] // an invariant, see the message
        HeaderValue::from_str(&format!("1.1 {}", pseudonym())).expect(
            "`1.1 bearer-proxy-<hex>` is a valid header value because it is visible ASCII and spaces",
        )
    })
    .clone()
}

/// Loads the client certificate of every route that has one, one per distinct (token,
/// certificate file, key file), and points each such route at that identity's pooled client
/// (numbered after the `credentials` per-token ones).
fn client_identities(
    config: &Config,
    routes: &mut RouteTable,
    credentials: usize,
    metrics: &Metrics,
) -> Result<Vec<Arc<crate::identity::ClientIdentity>>, ProxyBuildError> {
    let mut keys: Vec<(&str, &std::path::Path, &std::path::Path)> = Vec::new();
    let mut identities = Vec::new();
    for (index, rc) in config.routes.iter().enumerate() {
        let (Some(cert), Some(key)) = (&rc.client_cert_file, &rc.client_key_file) else {
            continue;
        };
        let k = (rc.token.as_str(), cert.as_path(), key.as_path());
        let position = match keys.iter().position(|x| *x == k) {
            Some(position) => position,
            None => {
                let identity = crate::identity::ClientIdentity::load(cert, key).map_err(|e| {
                    ProxyBuildError::Route {
                        index,
                        route: rc.label().to_owned(),
                        reason: format!("client_cert_file: {e}"),
                    }
                })?;
                keys.push(k);
                identities.push(identity);
                keys.len() - 1
            }
        };
        // Every route has its own status entry, even when it shares a pair (and a pool).
        metrics.watch_client_certificate("route", rc.label(), identities[position].probe());
        routes.set_pool(index, credentials + position);
    }
    Ok(identities)
}

impl Proxy {
    /// Resolves the routes against their token cells, builds the upstream client and the
    /// server settings. For a configuration without per-subject tokens.
    pub fn new(
        config: &Config,
        tokens: &BTreeMap<String, Arc<TokenCell>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ProxyBuildError> {
        Self::with_subjects(config, tokens, None, metrics)
    }

    /// [`Proxy::new`], with the per-subject token entries routes may name (`tokens` then
    /// holds the named tokens only). With `subjects`, the subject header is removed from
    /// every request before it is forwarded, routed or not.
    pub fn with_subjects(
        config: &Config,
        tokens: &BTreeMap<String, Arc<TokenCell>>,
        subjects: Option<&Arc<Subjects>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ProxyBuildError> {
        let p = &config.proxy;
        let mut routes = RouteTable::build(config, tokens, subjects.map(AsRef::as_ref), &metrics)?;
        let pools = tokens.len() + subjects.map_or(0, |s| s.token_names().count());
        let identities = client_identities(config, &mut routes, pools, &metrics)?;
        let upstreams =
            Upstreams::new(p.ca_file.as_deref(), p.connect_timeout, pools, &identities)?;
        let intercept = p
            .intercept
            .as_ref()
            .map(|i| intercept::Interceptor::new(i, &config.routes))
            .transpose()?;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            // The wire guard times a head from its first byte (header_read_timeout) and the wait
            // for that first byte (idle_timeout), on every connection hyper serves here (plain
            // and intercepted). hyper's own header timer would only repeat that, at the price of
            // a boxed timer armed and dropped for every request, so it is off.
            .header_read_timeout(None)
            .max_buf_size(p.max_header_bytes + READ_BUFFER_SLACK)
            .max_headers(MAX_HEADERS)
            // The end of a client's input does not cancel the request it already sent: a client
            // that half-closes after its request still gets the answer, and so does a valid
            // request pipelined before one the wire guard refuses (the guard ends hyper's input
            // there). A client that is really gone is noticed when the answer is written.
            .half_close(true)
            .keep_alive(true);
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(Inner {
                subject_header: subjects.map(|s| s.header().clone()),
                unmatched_metrics: metrics.route("unmatched"),
                connect_metrics: metrics.route("connect"),
                routes,
                upstreams,
                unmatched: p.unmatched(),
                connect: p.connect(),
                via: via(),
                pseudonym: pseudonym(),
                token_wait: p.token_wait,
                response_timeout: p.response_timeout,
                connect_timeout: p.connect_timeout,
                replay_body_limit: p.replay_body_limit,
                access_log: config.log.access,
                underscore_headers: p.underscore_headers,
                wire: Arc::new(WireLimits {
                    max_head: p.max_header_bytes,
                    header_timeout: p.header_read_timeout,
                    idle_timeout: p.idle_timeout,
                }),
                max_connections: p.max_connections,
                server,
                fast_path: p.fast_path,
                intercept,
                metrics,
                in_use: tokio::sync::watch::Sender::new(()),
            })),
        })
    }

    /// Puts `next`'s configuration in force for every request that starts from now on (on
    /// every connection, old and new); requests already running finish with the one they
    /// started with. Connection settings (`max_connections`, hyper's settings, the wire
    /// limits) are read when a connection is accepted.
    pub fn replace(&self, next: &Proxy) {
        self.current.store(next.current.load_full());
    }

    /// Resolves once no request uses the configuration in force now (after a [`replace`]
    /// and the end of the requests that started before it), or at once if it is gone.
    ///
    /// [`replace`]: Proxy::replace
    pub fn released(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.current.load().in_use.subscribe();
        async move {
            // Only the sender's drop ends this: it never sends.
            while rx.changed().await.is_ok() {}
        }
    }

    /// Serves until `shutdown` reaches Phase::Stopping (then stops accepting and drains
    /// in-flight connections gracefully, returning when they are done) or Phase::Terminated
    /// (return at once).
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) {
        let current = self.current;
        // Fixed for the life of the listener (a reload reports it as needing a restart).
        let slots = Arc::new(Semaphore::new(current.load().max_connections));
        let graceful = GracefulShutdown::new();
        let mut tasks = JoinSet::new();
        {
            let stopping = shutdown.reached(Phase::Stopping);
            tokio::pin!(stopping);
            // A slot before `accept` (see the module documentation); a connection task that
            // ends meanwhile is reported, and the wait starts over.
            loop {
                let permit = tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    Some(done) = tasks.join_next() => {
                        report_task_end(done);
                        continue;
                    }
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let stream = tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    Some(done) = tasks.join_next() => {
                        report_task_end(done);
                        continue;
                    }
                    stream = accept(&listener, "proxy") => stream,
                };
                let inner = current.load_full();
                tasks.spawn(inner.connection(
                    &current,
                    stream,
                    permit,
                    &graceful,
                    shutdown.clone(),
                ));
            }
        }
        drop(listener);
        drain(graceful, &mut tasks, &shutdown).await;
        // Nothing left after a drain; after Terminated this aborts what is left and waits for
        // the aborted tasks to release their slots and gauges.
        tasks.shutdown().await;
    }
}

/// Lets every connection finish (idle ones close at once), reporting each task's end, unless
/// `Terminated` comes first.
async fn drain(graceful: GracefulShutdown, tasks: &mut JoinSet<()>, shutdown: &Shutdown) {
    let drain = async {
        graceful.shutdown().await;
        while let Some(done) = tasks.join_next().await {
            report_task_end(done);
        }
    };
    tokio::select! {
        biased;
        () = shutdown.reached(Phase::Terminated) => {}
        () = drain => {}
    }
}

fn report_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "connection task panicked");
    }
}

/// A boxed tunnel copy, handed from the service to the connection task.
type TunnelFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What one client connection's requests share.
pub(crate) struct ConnShared {
    /// The proxy's configuration in force; each request loads it once.
    current: Arc<ArcSwap<Inner>>,
    /// A tunnel to run once hyper hands over the socket (after a successful `CONNECT`).
    tunnel: Mutex<Option<TunnelFuture>>,
    /// The server's phases, for an intercepted connection to drain at `Stopping`.
    shutdown: Shutdown,
}

/// Closes a client socket with a reset: a zero linger time makes `close` send RST.
fn reset_socket(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

impl ConnShared {
    fn set_tunnel(&self, tunnel: TunnelFuture) {
        *self.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
    }

    fn take_tunnel(&self) -> Option<TunnelFuture> {
        self.tunnel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A connection's slot: releases the permit and decrements `open_connections` when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Inner {
    /// The task serving one client connection (and its tunnel, if it becomes one).
    fn connection(
        self: &Arc<Self>,
        current: &Arc<ArcSwap<Inner>>,
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        graceful: &GracefulShutdown,
        shutdown: Shutdown,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = stream.set_nodelay(true);
        self.metrics.open_connections.inc();
        let slot = Slot {
            _permit: permit,
            gauge: self.metrics.open_connections.clone(),
        };
        let shared = Arc::new(ConnShared {
            current: current.clone(),
            tunnel: Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        let for_service = shared.clone();
        let service = hyper::service::service_fn(move |req| {
            let conn = for_service.clone();
            async move {
                // The one configuration load of this request.
                let inner = conn.current.load_full();
                Ok::<_, Infallible>(inner.handle(req, &conn).await)
            }
        });
        // Set when an answer was cut short, so the socket closes with a reset.
        let cut = Arc::new(AtomicBool::new(false));
        let mut guard = WireGuard::new(stream, self.wire.clone(), self.metrics.clone())
            .reset_on_drop(cut.clone(), reset_socket);
        let fast_path = self.fast_path;
        // Cloned (not borrowed from this configuration) so that an open connection does not
        // keep a replaced configuration alive.
        let server = self.server.clone();
        let watcher = graceful.watcher();
        let metrics = self.metrics.clone();
        async move {
            let _slot = slot;
            // The fast path first; hyper serves what it hands over.
            let pending = if fast_path {
                // No watch for `Terminated` here (it would be polled at every wake-up of
                // every request): `serve` aborts every connection task at `Terminated`.
                match h1::serve(&shared.current, &mut guard, &shutdown, &cut).await {
                    h1::Outcome::Closed => return,
                    h1::Outcome::Handoff(pending) => pending,
                }
            } else {
                bytes::Bytes::new()
            };
            let io = TokioIo::new(h1::Rewind::with_pending(guard, pending));
            // Boxed: hyper's connection state is large, and a connection the fast path serves
            // to its end never needs room for it.
            let mut conn = Box::pin(
                watcher.watch(
                    server
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                ),
            );
            {
                // Kept alive past its result, so the socket is still open when `cut` is set.
                tokio::select! {
                    biased;
                    () = shutdown.reached(Phase::Terminated) => return,
                    result = &mut conn => {
                        if let Err(e) = result {
                            connection_error(&metrics, e.as_ref());
                            if answer_was_cut(e.as_ref()) {
                                cut.store(true, Ordering::Release);
                            }
                        }
                    }
                }
            }
            if let Some(tunnel) = shared.take_tunnel() {
                tokio::select! {
                    biased;
                    () = shutdown.reached(Phase::Terminated) => {}
                    () = tunnel => {}
                }
            }
        }
    }
}

/// Whether the connection ended because the answer being written failed (the upstream's body
/// broke off): hyper reports errors of the response body as user errors.
fn answer_was_cut(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_user)
}

/// Logs a connection that ended with an error, and counts the requests hyper refused itself.
fn connection_error(metrics: &Metrics, e: &(dyn std::error::Error + 'static)) {
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        // The wire guard answers oversized or malformed heads first (every byte hyper's parser
        // and the URI parser would refuse included); these are what hyper would still refuse
        // on its own with a bare 400, or a bare 431 if a head could ever outgrow its buffer.
        if h.is_parse_too_large() {
            metrics.reject(RejectReason::HeaderTooLarge);
        } else if h.is_parse() {
            metrics.reject(RejectReason::BadRequest);
        }
    }
    tracing::debug!(error = %e, "client connection ended with an error");
}

/// The route table for the criterion benchmarks (`benches/hot_path.rs`; the sanitiser and the
/// wire guard are reached through [`fuzzing`]). Not a stable API.
#[doc(hidden)]
pub mod hot_path {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::ProxyBuildError;
    use super::route::RouteTable;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::token::TokenCell;

    /// A configuration's route table.
    pub struct Routes(RouteTable);

    impl Routes {
        /// Resolves the routes of `config`.
        pub fn build(
            config: &Config,
            tokens: &BTreeMap<String, Arc<TokenCell>>,
            metrics: &Metrics,
        ) -> Result<Self, ProxyBuildError> {
            RouteTable::build(config, tokens, None, metrics).map(Self)
        }

        /// The label of the route an absolute-form `http://` request to `host[:port]` takes.
        pub fn by_host(&self, host: &str, port: Option<u16>) -> Option<&str> {
            self.0.by_host(host, port, &[80]).map(|r| &*r.label)
        }

        /// The label of the route an origin-form request for `path` takes by `path_prefix`.
        pub fn by_prefix(&self, path: &str, host: Option<&str>) -> Option<&str> {
            self.0.by_prefix(path, host).map(|m| &*m.route.label)
        }
    }
}
