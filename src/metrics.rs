//! Prometheus metrics: the project's own registry, every metric family, and per-token and
//! per-route handles resolved once so that recording on the request path takes no lock and
//! allocates nothing.
//!
//! Metric names and labels are a contract with dashboards and alerts. Label values come only from
//! the configuration (token and route names) and from the fixed sets in this file, never from
//! request data, so the number of series is bounded whatever the traffic.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::token::TokenCell;

/// Request latency buckets: from sub-millisecond (the proxy's own overhead on loopback) to the
/// 60s response timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Token request latency buckets: a healthy endpoint answers in tens of milliseconds; the top
/// bucket is the default 10s timeout.
const TOKEN_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Outcome of one refresh attempt (`result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshResult {
    /// A token was obtained.
    Ok,
    /// A failure a retry can fix.
    TransientError,
    /// The token endpoint refused the credentials.
    Rejected,
}

impl RefreshResult {
    const ALL: [RefreshResult; 3] = [Self::Ok, Self::TransientError, Self::Rejected];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::TransientError => "transient_error",
            Self::Rejected => "rejected",
        }
    }
}

/// Reasons a token refresh failed (`reason` label): transport classes plus the OAuth error codes
/// of RFC 6749 §5.2 and Flinks' list; anything else is `other`.
pub const REFRESH_ERROR_REASONS: &[&str] = &[
    "timeout",
    "connect",
    "http_5xx",
    "http_429",
    "malformed",
    "access_denied",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "unauthorized_client",
    "unsupported_grant_type",
    "unsupported_response_type",
    "unsupported_token_type",
    "server_error",
    "temporarily_unavailable",
    "credentials_unreadable",
    "not_oauth",
    "other",
];

/// Maps a free-form reason to a bounded label value.
pub fn refresh_error_reason(reason: &str) -> &'static str {
    REFRESH_ERROR_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

/// Why the proxy answered a request itself (`reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// No valid token within `token_wait`.
    TokenUnavailable,
    /// Policy: unrouted host with `unmatched = "deny"`, or CONNECT refused.
    Denied,
    /// Malformed request.
    BadRequest,
    /// Header section over `max_header_bytes`.
    HeaderTooLarge,
    /// The request already passed through this proxy.
    Loop,
    /// `TRACE` and other refused methods.
    MethodNotAllowed,
}

impl RejectReason {
    const ALL: [RejectReason; 6] = [
        Self::TokenUnavailable,
        Self::Denied,
        Self::BadRequest,
        Self::HeaderTooLarge,
        Self::Loop,
        Self::MethodNotAllowed,
    ];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenUnavailable => "token_unavailable",
            Self::Denied => "denied",
            Self::BadRequest => "bad_request",
            Self::HeaderTooLarge => "header_too_large",
            Self::Loop => "loop",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// What happened to a request header whose name contains `_` (`action` label of
/// `bearer_proxy_underscore_headers_total`). Headers forwarded under `allow` are not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderscoreAction {
    /// Removed before forwarding (`underscore_headers = "drop"`).
    Dropped,
    /// Its request was refused with 400.
    Refused,
}

impl UnderscoreAction {
    const ALL: [UnderscoreAction; 2] = [Self::Dropped, Self::Refused];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "dropped",
            Self::Refused => "refused",
        }
    }
}

/// Class of upstream failure (`kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed or was refused.
    Connect,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// Connect or response timeout.
    Timeout,
    /// The connection broke mid-exchange.
    Reset,
    /// The response body stopped moving for `idle_timeout` (the answer was cut).
    BodyTimeout,
    /// The response's framing was refused (a transfer coding other than one `chunked`).
    BadResponse,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 6] = [
        Self::Connect,
        Self::Tls,
        Self::Timeout,
        Self::Reset,
        Self::BodyTimeout,
        Self::BadResponse,
    ];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::BodyTimeout => "body_timeout",
            Self::BadResponse => "bad_response",
        }
    }
}

/// What happened after an upstream answered a `replay_statuses` status (`result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayResult {
    /// Replayed with a new token and the upstream accepted it.
    Ok,
    /// Replayed with a new token and rejected again.
    RejectedAgain,
    /// No newer token could be had (rate limit, token endpoint failing).
    NoNewToken,
    /// Not replayable: method not idempotent or body over `replay_body_limit`.
    NotReplayable,
    /// The rejection means the user's consent is gone (Flinks code 602): no refresh attempted.
    ConsentRevoked,
}

impl ReplayResult {
    const ALL: [ReplayResult; 5] = [
        Self::Ok,
        Self::RejectedAgain,
        Self::NoNewToken,
        Self::NotReplayable,
        Self::ConsentRevoked,
    ];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RejectedAgain => "rejected_again",
            Self::NoNewToken => "no_new_token",
            Self::NotReplayable => "not_replayable",
            Self::ConsentRevoked => "consent_revoked",
        }
    }
}

/// Every metric family, registered in the project's own registry.
pub struct Metrics {
    registry: Registry,
    token_refreshes: IntCounterVec,
    token_refresh_errors: IntCounterVec,
    token_refresh_duration: HistogramVec,
    token_expiry: prometheus::GaugeVec,
    token_last_success: prometheus::GaugeVec,
    token_valid: IntGaugeVec,
    token_forced: IntCounterVec,
    token_state_persisted: IntGaugeVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    replays: IntCounterVec,
    rejected: [IntCounter; RejectReason::ALL.len()],
    underscore_headers: [IntCounter; UnderscoreAction::ALL.len()],
    /// Every route handle handed out, for the status page (filled at start-up only).
    routes: std::sync::Mutex<Vec<RouteMetrics>>,
    /// Connections from clients currently open on the proxy port.
    pub open_connections: IntGauge,
    /// CONNECT tunnels currently open.
    pub open_tunnels: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Registration fails only for a duplicate or inconsistent name, which is a programming
    // error caught by this module's tests; the metric still works, unexported.
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(panic_free),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    buckets: &[f64],
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &[label],
        )
        .unwrap_or_else(panic_free),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str) -> prometheus::GaugeVec {
    register(
        registry,
        prometheus::GaugeVec::new(Opts::new(name, help), &["token"]).unwrap_or_else(panic_free),
    )
}

/// Metric constructors fail only on invalid names or label sets, which are constants here and
/// covered by tests; there is no sensible recovery at run time.
#[allow(clippy::panic)]
fn panic_free<T>(e: prometheus::Error) -> T {
    panic!("invalid metric definition: {e}")
}

impl Metrics {
    /// Creates every metric family in a fresh registry, with the process collector.
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        if let Err(e) = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::error!(error = %e, "process collector registration failed");
        }
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("bearer_proxy_build_info", "Build information; always 1."),
                &["version", "commit", "features"],
            )
            .unwrap_or_else(panic_free),
        );
        build_info
            .with_label_values(&[
                crate::build::VERSION,
                crate::build::COMMIT,
                crate::build::FEATURES,
            ])
            .set(1);
        let rejected_vec = counter_vec(
            &r,
            "bearer_proxy_rejected_requests_total",
            "Requests the proxy answered itself instead of forwarding, by reason.",
            &["reason"],
        );
        let rejected = RejectReason::ALL.map(|k| rejected_vec.with_label_values(&[k.as_str()]));
        let underscore_vec = counter_vec(
            &r,
            "bearer_proxy_underscore_headers_total",
            "Request headers whose name contains '_', dropped or refused with their request.",
            &["action"],
        );
        let underscore_headers =
            UnderscoreAction::ALL.map(|a| underscore_vec.with_label_values(&[a.as_str()]));
        let m = Self {
            token_refreshes: counter_vec(
                &r,
                "bearer_proxy_token_refreshes_total",
                "Token refresh attempts by result.",
                &["token", "result"],
            ),
            token_refresh_errors: counter_vec(
                &r,
                "bearer_proxy_token_refresh_errors_total",
                "Failed token refresh attempts by reason.",
                &["token", "reason"],
            ),
            token_refresh_duration: histogram_vec(
                &r,
                "bearer_proxy_token_refresh_duration_seconds",
                "Duration of token requests.",
                "token",
                TOKEN_BUCKETS,
            ),
            token_expiry: gauge_vec(
                &r,
                "bearer_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the current token expires.",
            ),
            token_last_success: gauge_vec(
                &r,
                "bearer_proxy_token_last_success_timestamp_seconds",
                "Unix time of the last successful token refresh.",
            ),
            token_valid: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "bearer_proxy_token_valid",
                        "1 if a valid token is held, else 0.",
                    ),
                    &["token"],
                )
                .unwrap_or_else(panic_free),
            ),
            token_forced: counter_vec(
                &r,
                "bearer_proxy_token_forced_refreshes_total",
                "Refreshes forced by an upstream rejecting the token.",
                &["token"],
            ),
            token_state_persisted: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "bearer_proxy_token_state_persisted",
                        "0 while a refresh token the server rotated is kept only in memory \
                         (state_dir unwritable or unset: a restart loses it), else 1.",
                    ),
                    &["token"],
                )
                .unwrap_or_else(panic_free),
            ),
            requests: counter_vec(
                &r,
                "bearer_proxy_requests_total",
                "Requests answered, by route and status code.",
                &["route", "code"],
            ),
            request_duration: histogram_vec(
                &r,
                "bearer_proxy_request_duration_seconds",
                "Time from request received to response headers sent.",
                "route",
                REQUEST_BUCKETS,
            ),
            upstream_errors: counter_vec(
                &r,
                "bearer_proxy_upstream_errors_total",
                "Failures reaching or talking to an upstream, by kind.",
                &["route", "kind"],
            ),
            replays: counter_vec(
                &r,
                "bearer_proxy_replays_total",
                "What happened after an upstream rejected a token.",
                &["route", "result"],
            ),
            rejected,
            underscore_headers,
            routes: std::sync::Mutex::new(Vec::new()),
            open_connections: register(
                &r,
                IntGauge::new(
                    "bearer_proxy_open_connections",
                    "Client connections open on the proxy port.",
                )
                .unwrap_or_else(panic_free),
            ),
            open_tunnels: register(
                &r,
                IntGauge::new("bearer_proxy_open_tunnels", "CONNECT tunnels open.")
                    .unwrap_or_else(panic_free),
            ),
            registry: r,
        };
        Arc::new(m)
    }

    /// The registry, for the admin port.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Handles for one token's metrics, creating its series at zero so alerts see them.
    pub fn token(&self, name: &str) -> TokenMetrics {
        let reasons = REFRESH_ERROR_REASONS
            .iter()
            .map(|r| (*r, self.token_refresh_errors.with_label_values(&[name, r])))
            .collect();
        TokenMetrics {
            refreshes: RefreshResult::ALL
                .map(|r| self.token_refreshes.with_label_values(&[name, r.as_str()])),
            errors: reasons,
            duration: self.token_refresh_duration.with_label_values(&[name]),
            expiry: self.token_expiry.with_label_values(&[name]),
            last_success: self.token_last_success.with_label_values(&[name]),
            valid: self.token_valid.with_label_values(&[name]),
            forced: self.token_forced.with_label_values(&[name]),
            state_persisted: {
                let g = self.token_state_persisted.with_label_values(&[name]);
                // Nothing is held only in memory until a refresh token is rotated.
                g.set(1);
                g
            },
        }
    }

    /// Handles for one route's metrics (`route` is a route name, `unmatched` or `connect`).
    /// Call once per route at start-up: the handle is remembered for [`Metrics::routes`].
    pub fn route(&self, route: &str) -> RouteMetrics {
        let handle = RouteMetrics {
            inner: Arc::new(RouteInner {
                name: route.to_owned(),
                requests: self.requests.clone(),
                codes: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
                duration: self.request_duration.with_label_values(&[route]),
                upstream_errors: UpstreamErrorKind::ALL
                    .map(|k| self.upstream_errors.with_label_values(&[route, k.as_str()])),
                replays: ReplayResult::ALL
                    .map(|k| self.replays.with_label_values(&[route, k.as_str()])),
            }),
        };
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle.clone());
        handle
    }

    /// Every route handle created so far.
    pub fn routes(&self) -> Vec<RouteMetrics> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a request the proxy answered itself.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].inc();
    }

    /// Counts `n` request headers whose name contains `_`.
    pub fn underscore_headers(&self, action: UnderscoreAction, n: u64) {
        self.underscore_headers[action as usize].inc_by(n);
    }

    /// Brings `bearer_proxy_token_valid` up to date with the tokens' validity at this moment
    /// (called before each scrape: validity changes with the clock, not only on refresh).
    pub fn observe_tokens(&self, cells: &[Arc<TokenCell>]) {
        for cell in cells {
            self.token_valid
                .with_label_values(&[cell.name()])
                .set(i64::from(cell.current().is_some()));
        }
    }
}

/// Status codes 100..=599 each get a lazily created counter slot.
const STATUS_SLOTS: usize = 500;

/// One token's metric handles.
#[derive(Clone)]
pub struct TokenMetrics {
    refreshes: [IntCounter; 3],
    errors: Vec<(&'static str, IntCounter)>,
    /// Token request duration.
    pub duration: Histogram,
    /// Unix time of expiry.
    pub expiry: prometheus::Gauge,
    /// Unix time of last success.
    pub last_success: prometheus::Gauge,
    /// 1 while a valid token is held.
    pub valid: IntGauge,
    /// Forced refreshes.
    pub forced: IntCounter,
    /// 0 while a rotated refresh token is kept only in memory.
    pub state_persisted: IntGauge,
}

impl TokenMetrics {
    /// Counts one attempt.
    pub fn refresh(&self, result: RefreshResult) {
        self.refreshes[result as usize].inc();
    }

    /// Counts one failure under a bounded reason.
    pub fn error(&self, reason: &str) {
        let reason = refresh_error_reason(reason);
        if let Some((_, c)) = self.errors.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
    }
}

/// One route's metric handles; cheap to clone.
#[derive(Clone)]
pub struct RouteMetrics {
    inner: Arc<RouteInner>,
}

struct RouteInner {
    name: String,
    requests: IntCounterVec,
    /// Counter per status code, created on first use: the first request with a given status
    /// takes the vector's lock once; every later one is a plain atomic increment.
    codes: Box<[OnceLock<IntCounter>]>,
    duration: Histogram,
    upstream_errors: [IntCounter; 6],
    replays: [IntCounter; 5],
}

impl RouteMetrics {
    /// Records an answered request.
    pub fn request(&self, status: u16, seconds: f64) {
        let i = self.inner.as_ref();
        if let Some(slot) = usize::from(status)
            .checked_sub(100)
            .and_then(|n| i.codes.get(n))
        {
            slot.get_or_init(|| {
                i.requests
                    .with_label_values(&[i.name.as_str(), &status.to_string()])
            })
            .inc();
        }
        i.duration.observe(seconds);
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.inner.upstream_errors[kind as usize].inc();
    }

    /// Counts a replay decision.
    pub fn replay(&self, result: ReplayResult) {
        self.inner.replays[result as usize].inc();
    }

    /// Requests answered so far, by status code (codes never seen are left out).
    pub fn counts(&self) -> Vec<(u16, u64)> {
        self.inner
            .codes
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let n = slot.get()?.get();
                Some((u16::try_from(i + 100).ok()?, n))
            })
            .collect()
    }

    /// The route label.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exported_with_fixed_labels() {
        let m = Metrics::new();
        let t = m.token("flinks");
        t.refresh(RefreshResult::Ok);
        t.error("invalid_grant");
        t.error("something odd");
        let r = m.route("fdx");
        r.request(200, 0.01);
        r.request(200, 0.01);
        r.request(999, 0.01);
        r.upstream_error(UpstreamErrorKind::Tls);
        m.reject(RejectReason::Loop);
        m.underscore_headers(UnderscoreAction::Dropped, 2);
        let text = m.encode();
        for needle in [
            "bearer_proxy_token_refreshes_total{result=\"ok\",token=\"flinks\"} 1",
            "bearer_proxy_token_refresh_errors_total{reason=\"invalid_grant\",token=\"flinks\"} 1",
            "bearer_proxy_token_refresh_errors_total{reason=\"other\",token=\"flinks\"} 1",
            "bearer_proxy_requests_total{code=\"200\",route=\"fdx\"} 2",
            "bearer_proxy_upstream_errors_total{kind=\"tls\",route=\"fdx\"} 1",
            "bearer_proxy_rejected_requests_total{reason=\"loop\"} 1",
            "bearer_proxy_underscore_headers_total{action=\"dropped\"} 2",
            "bearer_proxy_underscore_headers_total{action=\"refused\"} 0",
            "bearer_proxy_open_connections 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("code=\"999\""));
        let build_info = format!(
            "bearer_proxy_build_info{{commit=\"{}\",features=\"{}\",version=\"{}\"}} 1",
            crate::build::COMMIT,
            crate::build::FEATURES,
            crate::build::VERSION
        );
        assert!(
            text.contains(&build_info),
            "missing {build_info} in\n{text}"
        );
    }
}
