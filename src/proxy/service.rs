//! The service entry point: [`Inner::handle`] answers each request hyper parses on a client
//! connection. It times the request, lets `dispatch` choose between a `CONNECT` tunnel
//! (`tunnel.rs`), a refusal (a loop, `TRACE`, an unroutable target) and forwarding
//! (`forward.rs`), then records the route's metrics and the access log line. Every answer the
//! proxy makes itself goes through [`Inner::refuse`].

use http::header::{HOST, HeaderMap, HeaderValue, VIA};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::{ErrorCode, ProxyError};
use super::target::Target;
use super::{ConnShared, Inner};
use crate::config::Unmatched;
use crate::metrics::RouteMetrics;

const TRACE_REFUSED: ProxyError = ProxyError::new(
    ErrorCode::MethodNotAllowed,
    "TRACE and TRACK are not forwarded (in any letter case): they would echo the injected \
     Authorization header back",
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
        log_access(
            &self.method,
            route,
            host,
            self.uri.path(),
            status.as_u16(),
            start,
            header("ob-correlation-id"),
            header("ob-trace-id"),
        );
    }
}

/// One access log line (`log.access`), for both request paths.
#[allow(clippy::too_many_arguments)] // the fields of one log line
pub(super) fn log_access(
    method: &Method,
    route: &str,
    host: &str,
    path: &str,
    status: u16,
    start: Instant,
    ob_correlation_id: Option<&str>,
    ob_trace_id: Option<&str>,
) {
    tracing::info!(
        target: "bearer_proxy::access",
        method = %method,
        route,
        host,
        path,
        status,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        ob_correlation_id,
        ob_trace_id,
    );
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

    /// The answer, and the metric handles of the route (or `unmatched`, `connect`) it counts
    /// under.
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
        self.count_refusal(e);
        e.response()
    }

    /// Counts and logs an answer of the proxy's own (the fast path writes it itself).
    pub(super) fn count_refusal(&self, e: ProxyError) {
        if let Some(reason) = e.code.reject_reason() {
            self.metrics.reject(reason);
        }
        tracing::info!(
            error = e.code.as_str(),
            status = e.code.status().as_u16(),
            "request answered by the proxy"
        );
    }

    /// Whether the request already carries our `Via` entry.
    fn is_loop(&self, headers: &HeaderMap) -> bool {
        let us = self.pseudonym.as_bytes();
        headers
            .get_all(VIA)
            .iter()
            .any(|v| v.as_bytes().windows(us.len()).any(|w| w == us))
    }
}

/// TRACE, and TRACK (its IIS twin), in any letter case: method names are case-sensitive
/// tokens, so `trace` is a different method to hyper but the same to many servers.
fn is_trace(method: &Method) -> bool {
    let m = method.as_str().as_bytes();
    m.eq_ignore_ascii_case(b"TRACE") || m.eq_ignore_ascii_case(b"TRACK")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_and_track_are_recognised_in_any_case() {
        for m in ["TRACE", "trace", "Trace", "TRACK", "track", "tRaCk"] {
            assert!(is_trace(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["GET", "TRACES", "TRAC"] {
            assert!(!is_trace(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }
}
