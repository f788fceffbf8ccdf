//! The request path after routing: the checks every forwarded request passes, header
//! sanitising and token injection (`sanitise.rs`), sending through the credential's pooled
//! client, and the replay after an upstream rejects the token.
//!
//! A routed request is never forwarded without a valid token, and the token goes only to the
//! route's own upstream. Its headers go through `sanitise::sanitise` before any wait for a
//! token (so a refused request never waits), and the token's pre-built `Authorization` value
//! is inserted last (`Sanitised::inject`), a reference-count bump.
//!
//! An idempotent request whose body was kept (at most `replay_body_limit`) is also sent once
//! more, on a new connection, when the upstream closes a pooled connection without answering:
//! the upstream's keep-alive timeout raced the request.
//!
//! Bodies stream in both directions. The only buffering is the replay copy of a small request
//! body (at most `replay_body_limit`) and, after a replay status, at most
//! [`CONSENT_PROBE_LIMIT`] bytes of the upstream's answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    AUTHORIZATION, CONTENT_LENGTH, HOST, HeaderMap, HeaderValue, TRANSFER_ENCODING, VIA,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Extensions, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::Inner;
use super::body::{BodyError, ProxyBody};
use super::error::{ErrorCode, ProxyError};
use super::route::{Route, RouteToken};
use super::sanitise::{sanitise, strip_hop_by_hop};
use super::target::{BAD_TARGET, Origin};
use super::upstream::{UpstreamClient, classify_request_error};
use crate::error::{Chain, chain};
use crate::metrics::{ReplayResult, RouteMetrics, SubjectRejectReason, UpstreamErrorKind};
use crate::subject::SubjectId;
use crate::subject::tokens::{SubjectTokenError, SubjectTokens};
use crate::token::client::TokenClient;
use crate::token::{AccessToken, TokenCell};

/// At most this much of an answer with a replay status is read to look for Flinks' consent
/// error (`{"code": 602, …}`); FDX error bodies are a few hundred bytes, and anything longer is
/// not one.
pub(crate) const CONSENT_PROBE_LIMIT: usize = 64 * 1024;

/// The Flinks FDX error code for a revoked or expired user consent: a new access token cannot
/// fix it.
const CONSENT_REVOKED_CODE: u64 = 602;

const DOT_SEGMENT: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "request paths with \".\" or \"..\" segments (also percent-encoded) are refused on routes \
     with a base path: the upstream could resolve them outside the route's base path",
);
pub(super) const BAD_RESPONSE: ProxyError = ProxyError::new(
    ErrorCode::UpstreamReset,
    "the upstream's response used a transfer coding other than one \"chunked\"; it was not \
     passed on",
);
pub(super) const BODY_STALLED: ProxyError = ProxyError::new(
    ErrorCode::UpstreamTimeout,
    "the upstream sent a response head, then its body did not move within idle_timeout",
);
pub(super) const NO_TOKEN: ProxyError = ProxyError::new(
    ErrorCode::TokenUnavailable,
    "no valid access token for this route yet (the token endpoint has not answered); retry \
     shortly",
);
const SUBJECT_REQUIRED: ProxyError = ProxyError::new(
    ErrorCode::SubjectRequired,
    "this route injects a per-subject token: send the subject header (subjects.header, \
     x-bearer-proxy-subject by default) naming the enrolled subject",
);
const INVALID_SUBJECT: ProxyError = ProxyError::new(
    ErrorCode::InvalidSubject,
    "the subject header must appear exactly once and hold 1 to 128 characters of \
     A-Z a-z 0-9 . _ : -",
);
const UNKNOWN_SUBJECT: ProxyError = ProxyError::new(
    ErrorCode::UnknownSubject,
    "this subject is not enrolled for the route's token: enrol it through the subjects API \
     first",
);
const REAUTH_REQUIRED: ProxyError = ProxyError::new(
    ErrorCode::ReauthRequired,
    "this subject's consent is gone (the token endpoint said invalid_grant, or the API \
     answered code 602): the customer must authorize again and the new code be enrolled",
);
pub(super) const BODY_UNREADABLE: ProxyError =
    ProxyError::new(ErrorCode::BadRequest, "the request body could not be read").closing();

pub(super) fn upstream_error(code: ErrorCode) -> ProxyError {
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

/// Whose token a routed request carries.
pub(super) enum Holder<'r> {
    /// The route's one token.
    Named(&'r TokenCell),
    /// The token of the subject the request named.
    Subject(&'r Arc<SubjectTokens<TokenClient>>, SubjectId),
}

impl Holder<'_> {
    /// A valid token for a second send after `sent`.
    pub(super) fn current(&self, sent: &Arc<AccessToken>) -> Option<Arc<AccessToken>> {
        match self {
            Holder::Named(cell) => cell.current(),
            Holder::Subject(..) => sent
                .is_valid_at(tokio::time::Instant::now())
                .then(|| sent.clone()),
        }
    }

    /// A token newer than `seen`, which the upstream rejected (see `TokenCell::invalidate`
    /// and `SubjectTokens::invalidate`).
    pub(super) async fn invalidate(
        &self,
        seen: &Arc<AccessToken>,
        wait: Duration,
    ) -> Option<Arc<AccessToken>> {
        match self {
            Holder::Named(cell) => cell.invalidate(seen.generation(), wait).await,
            Holder::Subject(entry, subject) => entry.invalidate(subject, seen, wait).await,
        }
    }
}

impl Inner {
    /// Removes the subject header (when per-subject tokens are configured) from a request
    /// that does not use it: one hashed removal.
    pub(super) fn strip_subject(&self, headers: &mut HeaderMap) {
        if let Some(name) = &self.subject_header {
            headers.remove(name);
        }
    }

    /// The subject a request on a per-subject route names; the header is removed either way.
    fn take_subject(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<SubjectId, (ProxyError, SubjectRejectReason)> {
        let Some(name) = &self.subject_header else {
            return Err((SUBJECT_REQUIRED, SubjectRejectReason::SubjectRequired));
        };
        let mut values = headers.get_all(name).iter();
        let subject = match (values.next(), values.next()) {
            (None, _) => Err((SUBJECT_REQUIRED, SubjectRejectReason::SubjectRequired)),
            // Two headers could be read as either subject by different parsers: neither is
            // chosen.
            (Some(_), Some(_)) => Err((INVALID_SUBJECT, SubjectRejectReason::InvalidSubject)),
            (Some(v), None) => v
                .to_str()
                .ok()
                .and_then(|v| SubjectId::parse(v).ok())
                .ok_or((INVALID_SUBJECT, SubjectRejectReason::InvalidSubject)),
        };
        headers.remove(name);
        subject
    }

    /// Counts, logs (naming the subject, if known) and answers a refused per-subject request.
    fn refuse_subject(
        &self,
        entry: &SubjectTokens<TokenClient>,
        subject: Option<&SubjectId>,
        refusal: (ProxyError, SubjectRejectReason),
    ) -> Response<ProxyBody> {
        self.refuse(count_subject_refusal(entry, subject, refusal))
    }

    /// Sends a routed request: sanitised, with the route's token (or its subject's),
    /// replayed once if the upstream rejects the token.
    pub(super) async fn forward_routed(
        &self,
        route: &Route,
        origin: Origin,
        strip: usize,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let holder = match &route.token {
            RouteToken::Named(cell) => {
                self.strip_subject(&mut parts.headers);
                Holder::Named(cell)
            }
            RouteToken::PerSubject(entry) => match self.take_subject(&mut parts.headers) {
                Ok(subject) => Holder::Subject(entry, subject),
                Err(refusal) => return self.refuse_subject(entry, None, refusal),
            },
        };
        let Origin {
            scheme,
            authority,
            host,
            base_path,
        } = origin;
        // Every header change but the token, before any wait for one: a refused request never
        // waits.
        let sanitised = match sanitise(
            &mut parts.headers,
            self.underscore_headers,
            host,
            &self.via,
            &route.headers,
        ) {
            Ok(s) => s,
            Err(refusal) => return self.underscore_refused(refusal),
        };
        self.underscore_dropped(sanitised.dropped);
        let token = match &holder {
            Holder::Named(cell) => match cell.current() {
                Some(t) => t,
                None => match cell.wait_valid(self.token_wait).await {
                    Some(t) => t,
                    None => return self.refuse(NO_TOKEN),
                },
            },
            Holder::Subject(entry, subject) => match entry.get(subject).await {
                Ok(t) => t,
                Err(e) => return self.refuse_subject(entry, Some(subject), subject_refusal(&e)),
            },
        };
        if base_path.is_some() && has_dot_segment(parts.uri.path().get(strip..).unwrap_or("")) {
            return self.refuse(DOT_SEGMENT);
        }
        let original = std::mem::take(&mut parts.uri);
        let Ok(uri) = target_uri(scheme, authority, base_path.as_deref(), original, strip) else {
            return self.refuse(BAD_TARGET);
        };
        sanitised.inject(token.header());

        // Keep a copy for one replay when it can be replayed: idempotent and small. This
        // clones the header map (the cost of being able to replay); other requests move it.
        // The copy also serves a retry when a pooled connection turns out to be closed.
        let replayable = is_idempotent(&parts.method);
        let (body, replay) = match body.size_hint().exact() {
            Some(n) if replayable && n <= self.replay_body_limit as u64 => {
                // Most replayable requests (a GET) have no body: nothing to read.
                let bytes = if n == 0 {
                    Bytes::new()
                } else {
                    match read_small_body(body).await {
                        Ok(b) => b,
                        Err(_) => return self.refuse(BODY_UNREADABLE),
                    }
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
            && let Some(current) = holder.current(&token)
        {
            tracing::info!(
                route = %route.label,
                error = %Chain(e),
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
        self.after_rejection(route, resp, &holder, &token, replay)
            .await
    }

    /// The upstream answered a replay status to a request sent with token `seen`.
    async fn after_rejection(
        &self,
        route: &Route,
        resp: Response<Incoming>,
        holder: &Holder<'_>,
        seen: &Arc<AccessToken>,
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
            // The upstream's own answer goes back to the app (it says why); later requests
            // for this subject are answered `reauth_required` without a token request.
            if let Holder::Subject(entry, subject) = holder {
                entry.consent_revoked(subject, seen).await;
            }
            return original();
        }
        let Some(replay) = replay else {
            // Ask for a new token for the next request without making this one wait.
            let _ = holder.invalidate(seen, Duration::ZERO).await;
            route.metrics.replay(ReplayResult::NotReplayable);
            return original();
        };
        let Some(fresh) = holder.invalidate(seen, self.token_wait).await else {
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

    /// Sends a request no route claims (`unmatched = "forward"`): only hop-by-hop headers
    /// change, and no token is added.
    pub(super) async fn forward_unmatched(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        if let Some(refused) = self.underscore_names(&mut parts.headers) {
            return refused;
        }
        self.strip_subject(&mut parts.headers);
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
                // Client errors carry no headers, so no token can appear in the chain.
                tracing::warn!(
                    route = metrics.name(),
                    error = %Chain(e),
                    "upstream request failed"
                );
                classify_request_error(e)
            }
        };
        metrics.upstream_error(kind);
        self.refuse(upstream_error(code))
    }
}

/// The answer and metric reason for a subject whose token cannot be had.
pub(super) fn subject_refusal(e: &SubjectTokenError) -> (ProxyError, SubjectRejectReason) {
    match e {
        SubjectTokenError::UnknownSubject => (UNKNOWN_SUBJECT, SubjectRejectReason::UnknownSubject),
        SubjectTokenError::NeedsReauth => (REAUTH_REQUIRED, SubjectRejectReason::ReauthRequired),
        SubjectTokenError::Timeout | SubjectTokenError::Failed(_) => {
            (NO_TOKEN, SubjectRejectReason::TokenUnavailable)
        }
    }
}

/// Counts and logs (naming the subject, if known) a refused per-subject request; the answer
/// is `refusal`'s error, for `Inner::refuse` (or the fast path) to send.
pub(super) fn count_subject_refusal(
    entry: &SubjectTokens<TokenClient>,
    subject: Option<&SubjectId>,
    (e, reason): (ProxyError, SubjectRejectReason),
) -> ProxyError {
    entry.metrics().reject(reason);
    if let Some(subject) = subject {
        tracing::info!(token = entry.name(), subject = %subject, error = e.code.as_str(), "per-subject request refused");
    }
    e
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
    for err in chain(e) {
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

/// GET, HEAD, PUT, DELETE and OPTIONS may be sent twice (RFC 9110 §9.2.2; TRACE is refused).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// Whether the exchange failed because the client's request body did (see [`BodyError`]).
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    chain(e).any(|err| matches!(err.downcast_ref::<BodyError>(), Some(BodyError::Client(_))))
}

/// An upstream response's framing as hyper's client read it, checked before it is passed on.
/// With `Transfer-Encoding`, hyper framed the body by the coding and ignored any
/// `Content-Length`, which is removed here so the app cannot read the body by a length the
/// message did not have; a coding other than exactly one `chunked` (such as `gzip, chunked`,
/// whose decoded bytes would still be gzip) is refused.
pub(super) fn check_response_framing(headers: &mut HeaderMap) -> Result<(), ()> {
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

/// Whether `path` has a `.` or `..` segment, also percent-encoded (`%2e`, `.%2E`, …). Some
/// servers also split segments at `\\` or an encoded slash (`%2f`, `%5c`) and ignore `;…`
/// parameters (`..;`), so those count too: refusing a strange path costs nothing, letting one
/// climb out of the base path could send the token to another API on the host.
pub(super) fn has_dot_segment(path: &str) -> bool {
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
fn target_uri(
    scheme: Scheme,
    authority: Authority,
    base_path: Option<&str>,
    original: Uri,
    strip: usize,
) -> Result<Uri, http::Error> {
    let mut parts = original.into_parts();
    let pq = parts
        .path_and_query
        .take()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let pq = if strip == 0 && base_path.is_none() {
        pq
    } else {
        let mut s = BytesMut::with_capacity(base_path.map_or(0, str::len) + pq.as_str().len() + 2);
        rebase(&mut s, base_path, pq.path(), pq.query(), strip);
        PathAndQuery::from_maybe_shared(s.freeze())?
    };
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(pq);
    Ok(Uri::from_parts(parts)?)
}

/// Appends the upstream path and query: `base_path`, then `path` minus its first `strip`
/// bytes (a route's prefix), then `?query`. Never empty: at least `/`.
pub(super) fn rebase(
    out: &mut impl BufMut,
    base_path: Option<&str>,
    path: &str,
    query: Option<&str>,
    strip: usize,
) {
    let rest = path.get(strip..).unwrap_or("");
    let base = base_path.unwrap_or("");
    out.put_slice(base.as_bytes());
    if rest.is_empty() {
        if base.is_empty() {
            out.put_u8(b'/');
        }
    } else {
        if !rest.starts_with('/') {
            out.put_u8(b'/');
        }
        out.put_slice(rest.as_bytes());
    }
    if let Some(q) = query {
        out.put_u8(b'?');
        out.put_slice(q.as_bytes());
    }
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
    use http::header::HeaderName;

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
            let authority = Authority::from_static("up.example:8443");
            let got = target_uri(
                Scheme::HTTPS,
                authority,
                base,
                input.parse().unwrap(),
                strip,
            )
            .unwrap();
            assert_eq!(got.to_string(), want, "{input}");
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
}
