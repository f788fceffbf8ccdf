//! The request path: which target a request has, the checks every forwarded request passes,
//! header sanitising and token injection, sending through the credential's pooled client, and
//! the replay after an upstream rejects the token.
//!
//! A routed request is never forwarded without a valid token, and the token goes only to the
//! route's own upstream. Its headers are sanitised in this order: header names containing `_`
//! dropped or refused (`underscore.rs`, before any wait for a token), hop-by-hop headers (and
//! those `Connection` names) removed, any client `Authorization` removed, `Host` set from the
//! target, our `Via` appended, the route's static headers set, and last the token's pre-built
//! `Authorization` value inserted, so that nothing (not even `Connection: Authorization`) can
//! remove or duplicate it. Inserting it clones a `HeaderValue`, a reference-count bump.
//!
//! An idempotent request whose body was kept (at most `replay_body_limit`) is also sent once
//! more, on a new connection, when the upstream closes a pooled connection without answering:
//! the upstream's keep-alive timeout raced the request.
//!
//! Bodies stream in both directions. The only buffering is the replay copy of a small request
//! body (at most `replay_body_limit`) and, after a replay status, at most
//! [`CONSENT_PROBE_LIMIT`] bytes of the upstream's answer.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Extensions, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{BodyError, ProxyBody};
use super::error::{ErrorCode, ProxyError};
use super::route::{Route, Upstream, normalise, split_host_port};
use super::upstream::{UpstreamClient, classify_request_error};
use super::{ConnShared, Inner};
use crate::config::Unmatched;
use crate::metrics::{ReplayResult, RouteMetrics, UpstreamErrorKind};

/// At most this much of an answer with a replay status is read to look for Flinks' consent
/// error (`{"code": 602, …}`); FDX error bodies are a few hundred bytes, and anything longer is
/// not one.
pub(crate) const CONSENT_PROBE_LIMIT: usize = 64 * 1024;

/// The Flinks FDX error code for a revoked or expired user consent: a new access token cannot
/// fix it.
const CONSENT_REVOKED_CODE: u64 = 602;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy
/// credentials meant for us.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_CONNECTION,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

const USERINFO: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "request URLs with user:password@ are refused: credentials in the URL would be sent to the \
     upstream; remove them",
);
const BAD_SCHEME: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "only http:// (and https://) request URLs can be proxied",
);
const NO_ROUTE: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "this is a forward proxy: send absolute-form requests (set HTTP_PROXY to this address and \
     call http://<host>/...) or configure a route whose path_prefix or host matches this \
     origin-form request",
);
const BAD_TARGET: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "the request target cannot be forwarded",
);
const TRACE_REFUSED: ProxyError = ProxyError::new(
    ErrorCode::MethodNotAllowed,
    "TRACE and TRACK are not forwarded (in any letter case): they would echo the injected \
     Authorization header back",
);
const DOT_SEGMENT: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "request paths with \".\" or \"..\" segments (also percent-encoded) are refused on routes \
     with a base path: the upstream could resolve them outside the route's base path",
);
const BAD_RESPONSE: ProxyError = ProxyError::new(
    ErrorCode::UpstreamReset,
    "the upstream's response used a transfer coding other than one \"chunked\"; it was not \
     passed on",
);
const BODY_STALLED: ProxyError = ProxyError::new(
    ErrorCode::UpstreamTimeout,
    "the upstream sent a response head, then its body did not move within idle_timeout",
);
const LOOP: ProxyError = ProxyError::new(
    ErrorCode::Loop,
    "the request already passed through this proxy (its Via header names us): it is routed \
     back to the proxy itself",
);
const DENIED: ProxyError = ProxyError::new(
    ErrorCode::Denied,
    "no route matches this host and proxy.unmatched is \"deny\"",
);
const NO_TOKEN: ProxyError = ProxyError::new(
    ErrorCode::TokenUnavailable,
    "no valid access token for this route yet (the token endpoint has not answered); retry \
     shortly",
);
const BODY_UNREADABLE: ProxyError =
    ProxyError::new(ErrorCode::BadRequest, "the request body could not be read").closing();

fn upstream_error(code: ErrorCode) -> ProxyError {
    let message = match code {
        ErrorCode::UpstreamTls => {
            "TLS handshake with the upstream failed (certificate not trusted or invalid); \
             nothing was sent"
        }
        ErrorCode::UpstreamTimeout => "the upstream did not answer within response_timeout",
        ErrorCode::UpstreamReset => "the upstream closed the connection without a valid answer",
        _ => "the upstream could not be reached",
    };
    ProxyError::new(code, message)
}

/// Where a request goes.
pub(super) enum Target<'a> {
    /// A route's upstream.
    Routed {
        /// The route.
        route: &'a Route,
        /// Its upstream origin for this request.
        origin: Origin,
        /// Path bytes to strip (gateway mode).
        strip: usize,
    },
    /// No route: `proxy.unmatched` decides.
    Unmatched,
}

/// Scheme, authority and `Host` of an upstream request.
pub(super) struct Origin {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    base_path: Option<Box<str>>,
}

impl Origin {
    /// `host[:port]` the request is sent to.
    pub(super) fn authority(&self) -> &str {
        self.authority.as_str()
    }

    fn of(upstream: &Upstream, request_host: &str) -> Result<Self, ProxyError> {
        match upstream {
            Upstream::Fixed {
                scheme,
                authority,
                host,
                base_path,
            } => Ok(Self {
                scheme: scheme.clone(),
                authority: authority.clone(),
                host: host.clone(),
                base_path: base_path.clone(),
            }),
            Upstream::RequestHost { port } => {
                // The one allocation of a routed request: the wildcard's target host,
                // normalised (it matched the pattern, so it is a plain DNS name).
                let host = normalise(request_host);
                let mut s = String::with_capacity(host.len() + 6);
                s.extend(host.chars().map(|c| c.to_ascii_lowercase()));
                if let Some(p) = port {
                    s.push(':');
                    s.push_str(itoa(*p, &mut [0; 5]));
                }
                let bytes = Bytes::from(s);
                let authority =
                    Authority::from_maybe_shared(bytes.clone()).map_err(|_| BAD_TARGET)?;
                // What the connector will connect to must be exactly the host that matched the
                // wildcard, on the route's port: never another host an authority parser reads
                // out of it.
                if !authority.host().eq_ignore_ascii_case(host) || authority.port_u16() != *port {
                    return Err(BAD_TARGET);
                }
                Ok(Self {
                    scheme: Scheme::HTTPS,
                    authority,
                    host: HeaderValue::from_maybe_shared(bytes).map_err(|_| BAD_TARGET)?,
                    base_path: None,
                })
            }
        }
    }
}

/// Formats a port without `format!`.
fn itoa(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// The request's details kept for the access log.
struct AccessInfo {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
}

impl AccessInfo {
    fn of(req: &Request<Incoming>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(HOST).cloned(),
        }
    }

    fn emit(&self, route: &str, status: StatusCode, start: Instant, headers: &HeaderMap) {
        let host = self
            .uri
            .host()
            .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        tracing::info!(
            target: "bearer_proxy::access",
            method = %self.method,
            route,
            host,
            path = self.uri.path(),
            status = status.as_u16(),
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            ob_correlation_id = header("ob-correlation-id"),
            ob_trace_id = header("ob-trace-id"),
        );
    }
}

impl Inner {
    /// Answers one request from the app.
    pub(super) async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnShared,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let log = self.access_log.then(|| AccessInfo::of(&req));
        let (resp, metrics) = self.dispatch(req, conn).await;
        metrics.request(resp.status().as_u16(), start.elapsed().as_secs_f64());
        if let Some(info) = log {
            info.emit(metrics.name(), resp.status(), start, resp.headers());
        }
        resp
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        conn: &ConnShared,
    ) -> (Response<ProxyBody>, &RouteMetrics) {
        if req.method() == Method::CONNECT {
            return (self.connect(req, conn).await, &self.connect_metrics);
        }
        let target = self.target(&req);
        let metrics = match &target {
            Ok(Target::Routed { route, .. }) => &route.metrics,
            _ => &self.unmatched_metrics,
        };
        // Before the target is judged: a request that looped back arrives in origin-form,
        // which would otherwise be refused as unroutable and hide the loop.
        if self.is_loop(req.headers()) {
            return (self.refuse(LOOP), metrics);
        }
        if is_trace(req.method()) {
            return (self.refuse(TRACE_REFUSED), metrics);
        }
        let target = match target {
            Ok(t) => t,
            Err(e) => return (self.refuse(e), metrics),
        };
        let resp = match target {
            Target::Routed {
                route,
                origin,
                strip,
            } => self.forward_routed(route, origin, strip, req).await,
            Target::Unmatched => match self.unmatched {
                Unmatched::Deny => self.refuse(DENIED),
                Unmatched::Forward => self.forward_unmatched(req).await,
            },
        };
        (resp, metrics)
    }

    /// Counts, logs and builds an answer of the proxy's own.
    pub(super) fn refuse(&self, e: ProxyError) -> Response<ProxyBody> {
        if let Some(reason) = e.code.reject_reason() {
            self.metrics.reject(reason);
        }
        tracing::info!(
            error = e.code.as_str(),
            status = e.code.status().as_u16(),
            "request answered by the proxy"
        );
        e.response()
    }

    /// Finds where `req` goes, without side effects.
    pub(super) fn target<'a, B>(&'a self, req: &Request<B>) -> Result<Target<'a>, ProxyError> {
        let uri = req.uri();
        if let Some(authority) = uri.authority() {
            // Absolute-form: the URL names the host.
            if authority.as_str().contains('@') {
                return Err(USERINFO);
            }
            // A port that is not a number (`:99999`) is not "no port": it names no route.
            if authority.port_u16().is_none() && names_a_port(authority) {
                return Err(BAD_TARGET);
            }
            let defaults: &[u16] = match uri.scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("http") => &[80],
                Some(s) if s.eq_ignore_ascii_case("https") => &[443],
                _ => return Err(BAD_SCHEME),
            };
            let host = authority.host();
            return match self.routes.by_host(host, authority.port_u16(), defaults) {
                Some(route) => Ok(Target::Routed {
                    route,
                    origin: Origin::of(&route.upstream, host)?,
                    strip: 0,
                }),
                None => Ok(Target::Unmatched),
            };
        }
        // Origin-form: only routes can say where it goes; it is never sent anywhere else
        // (in particular not back to this proxy).
        if !uri.path().starts_with('/') {
            return Err(NO_ROUTE);
        }
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(split_host_port);
        if let Some(m) = self.routes.by_prefix(uri.path(), host.map(|h| h.0)) {
            return Ok(Target::Routed {
                route: m.route,
                origin: Origin::of(&m.route.upstream, host.map_or("", |h| h.0))?,
                strip: m.strip,
            });
        }
        if let Some((h, port)) = host
            && let Some(route) = self.routes.by_host(h, port, &[80, 443])
        {
            return Ok(Target::Routed {
                route,
                origin: Origin::of(&route.upstream, h)?,
                strip: 0,
            });
        }
        Err(NO_ROUTE)
    }

    /// Whether the request already carries our `Via` entry.
    fn is_loop(&self, headers: &HeaderMap) -> bool {
        let us = self.pseudonym.as_bytes();
        headers
            .get_all(VIA)
            .iter()
            .any(|v| v.as_bytes().windows(us.len()).any(|w| w == us))
    }

    async fn forward_routed(
        &self,
        route: &Route,
        origin: Origin,
        strip: usize,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        if let Some(refused) = self.underscore_names(req.headers_mut()) {
            return refused;
        }
        let token = match route.token.current() {
            Some(t) => t,
            None => match route.token.wait_valid(self.token_wait).await {
                Some(t) => t,
                None => return self.refuse(NO_TOKEN),
            },
        };
        let (mut parts, body) = req.into_parts();
        if origin.base_path.is_some()
            && has_dot_segment(parts.uri.path().get(strip..).unwrap_or(""))
        {
            return self.refuse(DOT_SEGMENT);
        }
        let Ok(uri) = target_uri(&origin, std::mem::take(&mut parts.uri), strip) else {
            return self.refuse(BAD_TARGET);
        };
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(AUTHORIZATION);
        headers.insert(HOST, origin.host);
        headers.append(VIA, self.via.clone());
        for (name, value) in &route.headers {
            headers.insert(name, value.clone());
        }
        headers.insert(AUTHORIZATION, token.header().clone());

        // Keep a copy for one replay when it can be replayed: idempotent and small. This
        // clones the header map (the cost of being able to replay); other requests move it.
        // The copy also serves a retry when a pooled connection turns out to be closed.
        let replayable = is_idempotent(&parts.method);
        let (body, replay) = match body.size_hint().exact() {
            Some(n) if replayable && n <= self.replay_body_limit as u64 => {
                let bytes = match read_small_body(body).await {
                    Ok(b) => b,
                    Err(_) => return self.refuse(BODY_UNREADABLE),
                };
                let replay = Replay {
                    method: parts.method.clone(),
                    uri: uri.clone(),
                    headers: parts.headers.clone(),
                    body: bytes.clone(),
                };
                (ProxyBody::full(bytes), Some(replay))
            }
            _ => (ProxyBody::request(body), None),
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.extensions = Extensions::new();
        let client = self.upstreams.credential(route.pool);
        let mut sent = self
            .send_once(client, Request::from_parts(parts, body))
            .await;
        // The upstream closed the (pooled) connection before answering: its keep-alive timeout
        // raced this request. Nothing was answered and the request is idempotent: send it once
        // more, on a new connection, with the current token.
        if let (Err(SendError::Request(e)), Some(replay)) = (&sent, &replay)
            && closed_unanswered(e)
            && let Some(current) = route.token.current()
        {
            tracing::info!(
                route = %route.label,
                error = %ErrorChain(e),
                "upstream closed the connection without answering; retrying once"
            );
            sent = self
                .send_once(client, replay.clone().into_request(current.header()))
                .await;
        }
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return self.send_failed(&route.metrics, e),
        };
        if !route.is_replay_status(resp.status().as_u16()) {
            return self.pass_through(&route.metrics, resp);
        }
        self.after_rejection(route, resp, token.generation(), replay)
            .await
    }

    /// The upstream answered a replay status to a request sent with token generation `seen`.
    async fn after_rejection(
        &self,
        route: &Route,
        resp: Response<Incoming>,
        seen: u64,
        replay: Option<Replay>,
    ) -> Response<ProxyBody> {
        let (mut parts, mut body) = resp.into_parts();
        if check_response_framing(&mut parts.headers).is_err() {
            route.metrics.upstream_error(UpstreamErrorKind::BadResponse);
            return self.refuse(BAD_RESPONSE);
        }
        let idle = self.wire.idle_timeout;
        let (prefix, complete) = match read_prefix(&mut body, CONSENT_PROBE_LIMIT, idle).await {
            Ok(p) => p,
            Err(ProbeError::Stalled) => {
                tracing::warn!(route = %route.label, "upstream body stalled during the probe");
                route.metrics.upstream_error(UpstreamErrorKind::BodyTimeout);
                return self.refuse(BODY_STALLED);
            }
            Err(ProbeError::Body(e)) => {
                tracing::warn!(route = %route.label, error = %e, "upstream body failed");
                route.metrics.upstream_error(UpstreamErrorKind::Reset);
                return self.refuse(upstream_error(ErrorCode::UpstreamReset));
            }
        };
        let metrics = &route.metrics;
        let original = || {
            respond(
                parts,
                ProxyBody::prefixed(prefix.clone(), body, idle, metrics),
            )
        };
        if complete && is_consent_revoked(&prefix) {
            route.metrics.replay(ReplayResult::ConsentRevoked);
            return original();
        }
        let Some(replay) = replay else {
            // Ask for a new token for the next request without making this one wait.
            let _ = route.token.invalidate(seen, Duration::ZERO).await;
            route.metrics.replay(ReplayResult::NotReplayable);
            return original();
        };
        let Some(fresh) = route.token.invalidate(seen, self.token_wait).await else {
            route.metrics.replay(ReplayResult::NoNewToken);
            return original();
        };
        match self
            .send(
                self.upstreams.credential(route.pool),
                &route.metrics,
                replay.into_request(fresh.header()),
            )
            .await
        {
            Ok(resp) => {
                route
                    .metrics
                    .replay(if route.is_replay_status(resp.status().as_u16()) {
                        ReplayResult::RejectedAgain
                    } else {
                        ReplayResult::Ok
                    });
                self.pass_through(&route.metrics, resp)
            }
            Err(answer) => answer,
        }
    }

    async fn forward_unmatched(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        if let Some(refused) = self.underscore_names(&mut parts.headers) {
            return refused;
        }
        let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        else {
            return self.refuse(BAD_TARGET);
        };
        // The app's own headers go through untouched, its Authorization included; only what
        // belongs to the hop is removed.
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(HOST, host);
        parts.headers.append(VIA, self.via.clone());
        parts.version = Version::HTTP_11;
        parts.extensions = Extensions::new();
        let req = Request::from_parts(parts, ProxyBody::request(body));
        match self
            .send(self.upstreams.unmatched(), &self.unmatched_metrics, req)
            .await
        {
            Ok(resp) => self.pass_through(&self.unmatched_metrics, resp),
            Err(answer) => answer,
        }
    }

    /// Sends through `client`, bounded by `response_timeout` (until the response headers).
    /// Failures become the proxy's own answers.
    async fn send(
        &self,
        client: &UpstreamClient,
        metrics: &RouteMetrics,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Response<ProxyBody>> {
        self.send_once(client, req)
            .await
            .map_err(|e| self.send_failed(metrics, e))
    }

    /// One exchange through `client` (the credential's own pool), bounded by
    /// `response_timeout`.
    async fn send_once(
        &self,
        client: &UpstreamClient,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        match tokio::time::timeout(self.response_timeout, client.request(req)).await {
            // We never ask for an upgrade (Upgrade is stripped), so this is a broken upstream;
            // passing it on would make hyper hand over the client's socket.
            Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Err(SendError::Upgrade)
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(SendError::Request(e)),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// The upstream response, minus hop-by-hop headers, its body streaming and timed per read;
    /// a 502 if its framing is refused.
    fn pass_through(
        &self,
        metrics: &RouteMetrics,
        resp: Response<Incoming>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        if check_response_framing(&mut parts.headers).is_err() {
            metrics.upstream_error(UpstreamErrorKind::BadResponse);
            return self.refuse(BAD_RESPONSE);
        }
        respond(
            parts,
            ProxyBody::response(body, self.wire.idle_timeout, metrics),
        )
    }

    /// Counts, logs and answers a failed exchange.
    fn send_failed(&self, metrics: &RouteMetrics, e: SendError) -> Response<ProxyBody> {
        if let SendError::Request(e) = &e
            && client_body_failed(e)
        {
            // The app's own request body was malformed or cut short: its fault, not the
            // upstream's.
            return self.refuse(BODY_UNREADABLE);
        }
        let (code, kind) = match &e {
            SendError::Upgrade => (ErrorCode::UpstreamReset, UpstreamErrorKind::Reset),
            SendError::Timeout => (ErrorCode::UpstreamTimeout, UpstreamErrorKind::Timeout),
            SendError::Request(e) => {
                tracing::warn!(
                    route = metrics.name(),
                    error = %ErrorChain(e),
                    "upstream request failed"
                );
                classify_request_error(e)
            }
        };
        metrics.upstream_error(kind);
        self.refuse(upstream_error(code))
    }
}

/// Why an exchange with the upstream failed.
enum SendError {
    /// The client failed (connect, TLS, or the connection broke).
    Request(hyper_util::client::legacy::Error),
    /// No response headers within `response_timeout`.
    Timeout,
    /// The upstream answered 101 to a request that asked for no upgrade.
    Upgrade,
}

/// Whether the upstream closed an established connection (FIN or reset) before any answer:
/// what a pooled connection whose server has just closed it looks like. Connect and TLS
/// failures are not this.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if e.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err.is::<super::upstream::ConnectError>() {
            return false;
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A buffered request, ready to be sent again with a new token.
#[derive(Clone)]
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Replay {
    /// The request again, carrying `authorization` (exactly one).
    fn into_request(self, authorization: &HeaderValue) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::full(self.body));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req.headers_mut()
            .insert(AUTHORIZATION, authorization.clone());
        req
    }
}

/// Displays an error with its sources (`outer: inner: root`). Client errors carry no headers,
/// so no token can appear here.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Whether `authority` has a non-empty port part (after the host, outside IPv6 brackets).
fn names_a_port(authority: &Authority) -> bool {
    let s = authority.as_str();
    let after_host = s.rfind(']').map_or(s, |i| &s[i + 1..]);
    after_host
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty())
}

/// GET, HEAD, PUT, DELETE and OPTIONS may be sent twice (RFC 9110 §9.2.2; TRACE is refused).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// Removes hop-by-hop headers: those `Connection` names, then the fixed list.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (comparing standard names is an integer compare) says
    // which of the nine are there; most messages carry none, and only those present cost a
    // hashed removal.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    match headers.get_all(CONNECTION).iter().take(2).count() {
        0 => {}
        1 => {
            if let Some(value) = headers.remove(CONNECTION) {
                remove_named(headers, &value);
            }
            present &= !1; // CONNECTION is HOP_BY_HOP[0]
        }
        _ => {
            let values: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
            for value in &values {
                remove_named(headers, value);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes every header a `Connection` value lists. Names on the fixed hop-by-hop list (such
/// as `keep-alive`) are skipped: [`strip_hop_by_hop`] removes those that are present anyway.
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    for token in connection.as_bytes().split(|&b| b == b',') {
        let name = token.trim_ascii();
        if name.is_empty()
            || HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
        {
            continue;
        }
        // `&str` names are looked up without allocating; invalid ones match nothing.
        if let Ok(name) = std::str::from_utf8(name) {
            headers.remove(name);
        }
    }
}

/// Whether the exchange failed because the client's request body did (see [`BodyError`]).
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if matches!(err.downcast_ref::<BodyError>(), Some(BodyError::Client(_))) {
            return true;
        }
        source = err.source();
    }
    false
}

/// An upstream response's framing as hyper's client read it, checked before it is passed on.
/// With `Transfer-Encoding`, hyper framed the body by the coding and ignored any
/// `Content-Length`, which is removed here so the app cannot read the body by a length the
/// message did not have; a coding other than exactly one `chunked` (such as `gzip, chunked`,
/// whose decoded bytes would still be gzip) is refused.
fn check_response_framing(headers: &mut HeaderMap) -> Result<(), ()> {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            headers.remove(CONTENT_LENGTH);
            Ok(())
        }
        _ => Err(()),
    }
}

/// TRACE, and TRACK (its IIS twin), in any letter case: method names are case-sensitive
/// tokens, so `trace` is a different method to hyper but the same to many servers.
fn is_trace(method: &Method) -> bool {
    let m = method.as_str().as_bytes();
    m.eq_ignore_ascii_case(b"TRACE") || m.eq_ignore_ascii_case(b"TRACK")
}

/// Whether `path` has a `.` or `..` segment, also percent-encoded (`%2e`, `.%2E`, …). Some
/// servers also split segments at `\\` or an encoded slash (`%2f`, `%5c`) and ignore `;…`
/// parameters (`..;`), so those count too: refusing a strange path costs nothing, letting one
/// climb out of the base path could send the token to another API on the host.
fn has_dot_segment(path: &str) -> bool {
    let mut rest = path.as_bytes();
    // Dots in the current segment so far; `None` once it has anything else.
    let mut dots = Some(0u8);
    let mut params = false;
    loop {
        let (sep, skip) = match rest {
            [] => (true, 0),
            [b'/' | b'\\', ..] => (true, 1),
            [b'%', b'2', f, ..] if f.eq_ignore_ascii_case(&b'f') => (true, 3),
            [b'%', b'5', c, ..] if c.eq_ignore_ascii_case(&b'c') => (true, 3),
            _ => (false, 0),
        };
        if sep {
            if matches!(dots, Some(1 | 2)) {
                return true;
            }
            if rest.is_empty() {
                return false;
            }
            rest = &rest[skip..];
            dots = Some(0);
            params = false;
            continue;
        }
        if params {
            rest = &rest[1..];
            continue;
        }
        match rest {
            [b'.', tail @ ..] => {
                dots = dots.map(|d| d.saturating_add(1));
                rest = tail;
            }
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => {
                dots = dots.map(|d| d.saturating_add(1));
                rest = tail;
            }
            [b';', tail @ ..] => {
                params = true;
                rest = tail;
            }
            [_, tail @ ..] => {
                dots = None;
                rest = tail;
            }
            [] => unreachable!("handled as a separator"),
        }
    }
}

/// An upstream response's head, sanitised, with `body`.
fn respond(mut parts: http::response::Parts, body: ProxyBody) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body)
}

/// The upstream request URI: the origin, its base path, the request path minus `strip` bytes.
fn target_uri(origin: &Origin, original: Uri, strip: usize) -> Result<Uri, http::Error> {
    let mut parts = original.into_parts();
    let pq = parts
        .path_and_query
        .take()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let pq = if strip == 0 && origin.base_path.is_none() {
        pq
    } else {
        let rest = pq.path().get(strip..).unwrap_or("");
        let base = origin.base_path.as_deref().unwrap_or("");
        let mut s = BytesMut::with_capacity(base.len() + rest.len() + pq.as_str().len() + 2);
        s.put_slice(base.as_bytes());
        if rest.is_empty() {
            if base.is_empty() {
                s.put_u8(b'/');
            }
        } else {
            if !rest.starts_with('/') {
                s.put_u8(b'/');
            }
            s.put_slice(rest.as_bytes());
        }
        if let Some(q) = pq.query() {
            s.put_u8(b'?');
            s.put_slice(q.as_bytes());
        }
        PathAndQuery::from_maybe_shared(s.freeze())?
    };
    parts.scheme = Some(origin.scheme.clone());
    parts.authority = Some(origin.authority.clone());
    parts.path_and_query = Some(pq);
    Ok(Uri::from_parts(parts)?)
}

/// Reads a body already known to be small.
async fn read_small_body(body: Incoming) -> Result<Bytes, hyper::Error> {
    Ok(body.collect().await?.to_bytes())
}

/// Why the consent probe could not read the start of a body.
enum ProbeError {
    /// The body broke off.
    Body(hyper::Error),
    /// No frame within `idle_timeout`.
    Stalled,
}

/// Reads up to about `limit` bytes, each read waiting at most `idle`; says whether that was
/// the whole body. Trailers met here are dropped (FDX answers have none).
async fn read_prefix(
    body: &mut Incoming,
    limit: usize,
    idle: Duration,
) -> Result<(Bytes, bool), ProbeError> {
    let mut buf = BytesMut::new();
    while buf.len() < limit {
        if body.is_end_stream() {
            return Ok((buf.freeze(), true));
        }
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(ProbeError::Stalled),
            Ok(None) => return Ok((buf.freeze(), true)),
            Ok(Some(frame)) => {
                if let Ok(data) = frame.map_err(ProbeError::Body)?.into_data() {
                    buf.put(data);
                }
            }
        }
    }
    Ok((buf.freeze(), false))
}

/// Whether an FDX error body says the user's consent is gone (`code` 602, number or string).
pub(crate) fn is_consent_revoked(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct FdxError {
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<FdxError>(body) {
        Ok(FdxError {
            code: Some(serde_json::Value::Number(n)),
        }) => n.as_u64() == Some(CONSENT_REVOKED_CODE),
        Ok(FdxError {
            code: Some(serde_json::Value::String(s)),
        }) => s.trim().parse::<u64>().ok() == Some(CONSENT_REVOKED_CODE),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret-Hop , close"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("accept", "application/json"),
            ("x-end-to-end", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-end-to-end"]);
    }

    #[test]
    fn connection_authorization_cannot_remove_the_injected_token() {
        let token = HeaderValue::from_static("Bearer injected");
        let mut h = headers(&[
            ("connection", "Authorization"),
            ("authorization", "Bearer from-the-app"),
            ("authorization", "Basic second"),
        ]);
        // The same order as forward_routed.
        strip_hop_by_hop(&mut h);
        h.remove(AUTHORIZATION);
        h.insert(AUTHORIZATION, token.clone());
        let all: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(all, [&token]);
    }

    #[test]
    fn invalid_names_in_connection_are_ignored() {
        let mut h = headers(&[("accept", "x")]);
        h.insert(
            CONNECTION,
            HeaderValue::from_bytes(b"bad name, , \xff\xfe, accept\xff").unwrap(),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    fn origin(base: Option<&str>) -> Origin {
        Origin {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("up.example:8443"),
            host: HeaderValue::from_static("up.example:8443"),
            base_path: base.map(Into::into),
        }
    }

    #[test]
    fn target_uris_keep_the_query_and_strip_the_prefix() {
        let cases = [
            (
                None,
                "http://a/x/y?q=1",
                0,
                "https://up.example:8443/x/y?q=1",
            ),
            (None, "/f/x?q=1", 2, "https://up.example:8443/x?q=1"),
            (None, "/f", 2, "https://up.example:8443/"),
            (None, "/f?q", 2, "https://up.example:8443/?q"),
            (Some("/base"), "/f/x", 2, "https://up.example:8443/base/x"),
            (Some("/base"), "/f", 2, "https://up.example:8443/base"),
            (
                Some("/base"),
                "http://a/",
                0,
                "https://up.example:8443/base/",
            ),
        ];
        for (base, input, strip, want) in cases {
            let got = target_uri(&origin(base), input.parse().unwrap(), strip).unwrap();
            assert_eq!(got.to_string(), want, "{input}");
        }
    }

    #[test]
    fn wildcard_origins_use_the_normalised_request_host() {
        let up = Upstream::RequestHost { port: Some(8443) };
        let o = Origin::of(&up, "API.Example.COM.").unwrap();
        assert_eq!(o.authority.as_str(), "api.example.com:8443");
        assert_eq!(o.host, "api.example.com:8443");
        assert_eq!(o.scheme, Scheme::HTTPS);
    }

    #[test]
    fn wildcard_origins_refuse_hosts_an_authority_parser_reads_differently() {
        for host in ["evil:.example.com", "evil.test:443", "a@b.example.com"] {
            assert!(
                Origin::of(&Upstream::RequestHost { port: None }, host).is_err(),
                "{host}"
            );
        }
        assert!(Origin::of(&Upstream::RequestHost { port: Some(8443) }, "a.example.com").is_ok());
    }

    #[test]
    fn unparsable_ports_are_named_ports() {
        for (a, named) in [
            ("a:99999", true),
            ("a:8o", true),
            ("a:80", true),
            ("a:", false),
            ("a", false),
            ("[::1]", false),
            ("[::1]:70000", true),
        ] {
            assert_eq!(names_a_port(&Authority::from_static(a)), named, "{a}");
        }
    }

    #[test]
    fn consent_errors_are_recognised() {
        assert!(is_consent_revoked(
            br#"{"code": 602, "message": "consent revoked"}"#
        ));
        assert!(is_consent_revoked(br#"{"code":"602","debugMessage":"x"}"#));
        assert!(!is_consent_revoked(br#"{"code": 401}"#));
        assert!(!is_consent_revoked(br#"{"message": "602"}"#));
        assert!(!is_consent_revoked(b"602"));
        assert!(!is_consent_revoked(b"not json"));
        assert!(!is_consent_revoked(b""));
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for p in [
            "/..",
            "/../x",
            "/a/./b",
            "/a/.",
            "/%2e%2E/x",
            "/.%2e/x",
            "/%2e./x",
            "/%2E",
            "/a/..;/b",
            "/a/..;x=1/b",
            "/a\\..\\b",
            "/a%2f..%2fb",
            "/a%5C..",
            "..",
            ".",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in [
            "/",
            "/a/b",
            "/.well-known/x",
            "/a..b",
            "/.../x",
            "/a/b.",
            "/%2ex",
            "",
            "/a/;..",
            "/x%2",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }

    #[test]
    fn trace_and_track_are_recognised_in_any_case() {
        for m in ["TRACE", "trace", "Trace", "TRACK", "track", "tRaCk"] {
            assert!(is_trace(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["GET", "TRACES", "TRAC"] {
            assert!(!is_trace(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }

    #[test]
    fn response_framing_drops_a_length_beside_chunked_and_refuses_other_codings() {
        let mut h = headers(&[("transfer-encoding", "Chunked"), ("content-length", "5")]);
        assert!(check_response_framing(&mut h).is_ok());
        assert!(h.get(CONTENT_LENGTH).is_none());
        let mut h = headers(&[("content-length", "5")]);
        assert!(check_response_framing(&mut h).is_ok());
        assert!(h.get(CONTENT_LENGTH).is_some());
        for te in [
            &["gzip, chunked"][..],
            &["gzip"],
            &["chunked", "chunked"],
            &["chunked, chunked"],
        ] {
            let mut h = HeaderMap::new();
            for v in te {
                h.append(TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            assert!(check_response_framing(&mut h).is_err(), "{te:?}");
        }
    }

    #[test]
    fn idempotent_methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m));
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m));
        }
    }

    #[test]
    fn ports_format_without_allocating() {
        for p in [0u16, 7, 80, 443, 8443, 65535] {
            assert_eq!(itoa(p, &mut [0; 5]), p.to_string());
        }
    }
}
