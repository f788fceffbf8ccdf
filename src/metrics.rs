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

/// Request latency buckets: from sub-millisecond (the proxy's own overhead on loopback) to the
/// 60s response timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Token request latency buckets: a healthy endpoint answers in tens of milliseconds; the top
/// bucket is the default 10s timeout.
const TOKEN_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Defines metric label enums from one list of `Variant => "label value"` lines each: the enum,
/// `as_str`, `COUNT` and `ALL` (every variant in declaration order, so `ALL[v as usize] == v`).
/// The counter arrays a variant indexes are sized by `COUNT` and built from `ALL`, so a new
/// variant is one new line here and no array or list can be left without it.
macro_rules! label_enums {
    ($(
        $(#[$doc:meta])*
        pub enum $name:ident {
            $( $(#[$vdoc:meta])* $variant:ident => $label:literal, )+
        }
    )+) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vdoc])* $variant, )+
        }

        impl $name {
            /// How many variants there are.
            pub(crate) const COUNT: usize = [$(stringify!($variant)),+].len();
            /// Every variant, in declaration order (the order of their discriminants).
            pub(crate) const ALL: [Self; Self::COUNT] = [$(Self::$variant),+];

            /// The label value.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }
        }
    )+};
}

label_enums! {
    /// Outcome of one configuration reload (`result` label).
    pub enum ReloadResult {
        /// The new configuration is in force.
        Ok => "ok",
        /// The new configuration was refused; the running one stays.
        Invalid => "invalid",
    }
}

label_enums! {
    /// Outcome of one refresh attempt (`result` label).
    pub enum RefreshResult {
        /// A token was obtained.
        Ok => "ok",
        /// A failure a retry can fix.
        TransientError => "transient_error",
        /// The token endpoint refused the credentials.
        Rejected => "rejected",
    }

    /// Why the proxy answered a request itself (`reason` label).
    pub enum RejectReason {
        /// No valid token within `token_wait`.
        TokenUnavailable => "token_unavailable",
        /// Policy: unrouted host with `unmatched = "deny"`, or CONNECT refused.
        Denied => "denied",
        /// Malformed request.
        BadRequest => "bad_request",
        /// Header section over `max_header_bytes`.
        HeaderTooLarge => "header_too_large",
        /// The request already passed through this proxy.
        Loop => "loop",
        /// `TRACE` and other refused methods.
        MethodNotAllowed => "method_not_allowed",
        /// A per-subject route without the subject header.
        SubjectRequired => "subject_required",
        /// A subject header that is not one valid subject id.
        InvalidSubject => "invalid_subject",
        /// A subject that is not enrolled.
        UnknownSubject => "unknown_subject",
        /// A subject that must consent again.
        ReauthRequired => "reauth_required",
    }

    /// Why the fast path handed a client connection to hyper (`reason` label of
    /// `bearer_proxy_fast_path_handoffs_total`).
    pub enum Handoff {
        /// Not HTTP/1.1.
        Version => "version",
        /// A method the fast path does not serve (`CONNECT`, `TRACE`, others).
        Method => "method",
        /// `Expect`.
        Expect => "expect",
        /// A chunked request body.
        TransferEncoding => "transfer_encoding",
        /// A body over `replay_body_limit`.
        LargeBody => "large_body",
        /// A header name containing `_`.
        Underscore => "underscore",
        /// Our own `Via` (a loop).
        Loop => "loop",
        /// A head the fast path does not parse the way hyper would.
        Unusual => "unusual",
        /// Not a routed request the fast path serves (unrouted, refused, no or an invalid subject
        /// header, a dot segment).
        Route => "route",
        /// The upstream chose HTTP/2.
        Http2 => "http2",
    }

    /// What happened to a request header whose name contains `_` (`action` label of
    /// `bearer_proxy_underscore_headers_total`). Headers forwarded under `allow` are not counted.
    pub enum UnderscoreAction {
        /// Removed before forwarding (`underscore_headers = "drop"`).
        Dropped => "dropped",
        /// Its request was refused with 400.
        Refused => "refused",
    }

    /// Class of upstream failure (`kind` label).
    pub enum UpstreamErrorKind {
        /// TCP connect failed or was refused.
        Connect => "connect",
        /// TLS handshake or certificate verification failed.
        Tls => "tls",
        /// Connect or response timeout.
        Timeout => "timeout",
        /// The connection broke mid-exchange.
        Reset => "reset",
        /// The response body stopped moving for `idle_timeout` (the answer was cut).
        BodyTimeout => "body_timeout",
        /// The response's framing was refused (a transfer coding other than one `chunked`).
        BadResponse => "bad_response",
    }

    /// Why the TLS handshake of an intercepted `CONNECT` failed (`reason` label of
    /// `bearer_proxy_tls_accept_errors_total`).
    pub enum TlsAcceptError {
        /// The app refused our leaf with `unknown_ca`: it does not trust the operator CA.
        UnknownCa => "unknown_ca",
        /// The app refused our leaf with another certificate alert (`bad_certificate`,
        /// `certificate_unknown`: Java's answer to an untrusted CA, or a name it did not expect).
        CertificateRejected => "certificate_rejected",
        /// The ClientHello named another host than the `CONNECT` (SNI).
        SniMismatch => "sni_mismatch",
        /// No handshake within `header_read_timeout`.
        Timeout => "timeout",
        /// Anything else: no TLS at all, no common protocol or cipher, the app went away.
        Handshake => "handshake",
    }

    /// What happened after an upstream answered a `replay_statuses` status (`result` label).
    pub enum ReplayResult {
        /// Replayed with a new token and the upstream accepted it.
        Ok => "ok",
        /// Replayed with a new token and rejected again.
        RejectedAgain => "rejected_again",
        /// No newer token could be had (rate limit, token endpoint failing).
        NoNewToken => "no_new_token",
        /// Not replayable: method not idempotent or body over `replay_body_limit`.
        NotReplayable => "not_replayable",
        /// The rejection means the user's consent is gone (Flinks code 602): no refresh attempted.
        ConsentRevoked => "consent_revoked",
    }

    /// A shared-store operation that failed (`op` label of `bearer_proxy_store_errors_total`).
    pub enum StoreOp {
        /// Reading a subject's record.
        Get => "get",
        /// Writing a subject's record (compare-and-set).
        Put => "put",
        /// Listing subjects.
        List => "list",
        /// Forgetting a subject.
        Delete => "delete",
        /// Recording a spent authorization code.
        SpendCode => "spend_code",
        /// Taking or renewing a lease.
        Lock => "lock",
        /// Releasing a lease.
        Unlock => "unlock",
        /// Reading a shared access token.
        AccessTokenGet => "access_token_get",
        /// Writing a shared access token.
        AccessTokenPut => "access_token_put",
        /// The health check behind `/readyz` and `/status`.
        Ping => "ping",
    }

    /// Outcome of one per-subject refresh (`result` label of
    /// `bearer_proxy_subject_refreshes_total`).
    pub enum SubjectRefreshResult {
        /// A token was obtained.
        Ok => "ok",
        /// The token endpoint said `invalid_grant`: the subject now needs to consent again.
        InvalidGrant => "invalid_grant",
        /// Any other failure (endpoint down or refusing, store or key trouble).
        Error => "error",
    }

    /// Why a request on a per-subject route was answered by the proxy (`reason` label of
    /// `bearer_proxy_subject_rejected_requests_total`).
    pub enum SubjectRejectReason {
        /// No subject header.
        SubjectRequired => "subject_required",
        /// A subject header outside the id alphabet, or more than one.
        InvalidSubject => "invalid_subject",
        /// A subject that is not enrolled.
        UnknownSubject => "unknown_subject",
        /// A subject in `needs_reauth`.
        ReauthRequired => "reauth_required",
        /// No token for the subject within `token_wait`, or its refresh failed.
        TokenUnavailable => "token_unavailable",
    }

    /// Outcome of one enrolment through the subjects API, a code exchange or a refresh-token
    /// import (`result` label of `bearer_proxy_subject_enrolments_total`).
    pub enum EnrolResult {
        /// The subject was enrolled (its record written).
        Ok => "ok",
        /// The code had been spent before; nothing was sent.
        CodeSpent => "code_already_used",
        /// The token endpoint refused the code or refresh token (an OAuth error).
        Rejected => "rejected",
        /// The token endpoint could not be reached, failed or answered something unusable.
        Unavailable => "unavailable",
        /// The token endpoint did not answer within the token's `timeout`.
        Timeout => "timeout",
        /// A local failure (store, key, credentials file).
        Failed => "failed",
    }
}

/// Every metric family, registered in the project's own registry.
pub struct Metrics {
    registry: Registry,
    /// `bearer_proxy_build_info`, set once by [`Metrics::set_build_info`].
    build_info: IntGaugeVec,
    token_refreshes: IntCounterVec,
    token_refresh_errors: IntCounterVec,
    token_refresh_duration: HistogramVec,
    token_expiry: prometheus::GaugeVec,
    token_last_success: prometheus::GaugeVec,
    token_valid: IntGaugeVec,
    token_forced: IntCounterVec,
    token_adoptions: IntCounterVec,
    token_shared_fallbacks: IntCounterVec,
    token_state_persisted: IntGaugeVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    replays: IntCounterVec,
    rejected: [IntCounter; RejectReason::COUNT],
    subjects: IntGaugeVec,
    subject_refreshes: IntCounterVec,
    subject_rejected: IntCounterVec,
    underscore_headers: [IntCounter; UnderscoreAction::COUNT],
    handoffs: [IntCounter; Handoff::COUNT],
    /// Every route handle handed out, for the status page (filled at start-up only).
    routes: std::sync::Mutex<Vec<RouteMetrics>>,
    /// Connections from clients currently open on the proxy port.
    pub(crate) open_connections: IntGauge,
    /// CONNECT tunnels currently open.
    pub(crate) open_tunnels: IntGauge,
    store_errors: [IntCounter; StoreOp::COUNT],
    /// `bearer_proxy_store_up`, registered by the first [`Metrics::set_store_up`] (only a
    /// process with `[redis]` has the series).
    store_up: std::sync::OnceLock<IntGauge>,
    /// `bearer_proxy_subject_enrolments_total{token,result}` (the subjects API).
    subject_enrolments: IntCounterVec,
    /// `bearer_proxy_client_certificate_expiry_timestamp_seconds{kind,name}`, set from
    /// `client_certificates` at each scrape.
    client_cert_expiry: prometheus::GaugeVec,
    /// The client certificates in use (filled at start-up only).
    client_certificates: std::sync::Mutex<Vec<WatchedCertificate>>,
    /// `CONNECT`s to routed hosts whose TLS the proxy terminated (`[proxy.intercept]`).
    pub(crate) intercepted_connections: IntCounter,
    tls_accept_errors: [IntCounter; TlsAcceptError::COUNT],
    /// The configuration reload families.
    config: ConfigMetrics,
}

/// `bearer_proxy_config_*`: reloads and the configuration in force.
struct ConfigMetrics {
    reloads: [IntCounter; ReloadResult::COUNT],
    last_success: prometheus::Gauge,
    info: IntGaugeVec,
}

impl ConfigMetrics {
    fn new(r: &Registry) -> Self {
        let reloads = counter_vec(
            r,
            "bearer_proxy_config_reloads_total",
            "Configuration reloads (SIGHUP, POST /-/reload, file watch), by result: ok (in \
             force) or invalid (refused, the running configuration stays).",
            &["result"],
        );
        Self {
            reloads: ReloadResult::ALL.map(|k| reloads.with_label_values(&[k.as_str()])),
            last_success: register(
                r,
                prometheus::Gauge::new(
                    "bearer_proxy_config_last_reload_success_timestamp_seconds",
                    "When the configuration in force was loaded (at start or by the last \
                     successful reload), in seconds since the Unix epoch.",
                ),
            ),
            info: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "bearer_proxy_config_info",
                        "The configuration in force, by the first 16 hex digits of the SHA-256 \
                         of its file; always 1.",
                    ),
                    &["hash"],
                ),
            ),
        }
    }
}

/// Reads a client certificate's subject and expiry (Unix seconds) as they are now: a rotation on
/// disk changes them.
pub type CertificateProbe = Box<dyn Fn() -> (String, i64) + Send + Sync>;

struct WatchedCertificate {
    kind: &'static str,
    name: String,
    probe: CertificateProbe,
}

/// One client certificate as the status page shows it.
#[derive(Clone, Debug)]
pub(crate) struct CertificateView {
    /// `token` or `route`.
    pub(crate) kind: &'static str,
    /// The token's or the route's name.
    pub(crate) name: String,
    /// The certificate's subject.
    pub(crate) subject: String,
    /// Its expiry, Unix seconds.
    pub(crate) not_after: i64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    c: prometheus::Result<C>,
) -> C {
    let c = defined(c);
    // Registration fails only for a duplicate or inconsistent name, which is a programming
    // error caught by this module's tests; the metric still works, unexported.
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
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
        ),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str) -> prometheus::GaugeVec {
    register(
        registry,
        prometheus::GaugeVec::new(Opts::new(name, help), &["token"]),
    )
}

/// A metric built from this file's constant names, help texts and label sets. Construction
/// fails only for an invalid name or label set, which is a programming error that every test
/// constructing [`Metrics`] would hit at once; there is nothing to serve instead.
#[expect(
    clippy::expect_used,
    reason = "the definitions are constants, so a failure is a bug found by any test"
)]
fn defined<T>(built: prometheus::Result<T>) -> T {
    built.expect("metric definitions are valid because they are constants checked by the tests")
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
            ),
        );
        let rejected_vec = counter_vec(
            &r,
            "bearer_proxy_rejected_requests_total",
            "Requests the proxy answered itself instead of forwarding, by reason.",
            &["reason"],
        );
        let rejected = RejectReason::ALL.map(|k| rejected_vec.with_label_values(&[k.as_str()]));
        let handoff_vec = counter_vec(
            &r,
            "bearer_proxy_fast_path_handoffs_total",
            "Client connections the fast path handed to hyper, by the reason of the first request \
             it did not serve.",
            &["reason"],
        );
        let handoffs = Handoff::ALL.map(|k| handoff_vec.with_label_values(&[k.as_str()]));
        let underscore_vec = counter_vec(
            &r,
            "bearer_proxy_underscore_headers_total",
            "Request headers whose name contains '_', dropped or refused with their request.",
            &["action"],
        );
        let underscore_headers =
            UnderscoreAction::ALL.map(|a| underscore_vec.with_label_values(&[a.as_str()]));
        let store_errors_vec = counter_vec(
            &r,
            "bearer_proxy_store_errors_total",
            "Failed operations on the shared subject store (Redis), by operation.",
            &["op"],
        );
        let store_errors = StoreOp::ALL.map(|o| store_errors_vec.with_label_values(&[o.as_str()]));
        let tls_accept_vec = counter_vec(
            &r,
            "bearer_proxy_tls_accept_errors_total",
            "Intercepted CONNECTs whose TLS handshake with the app failed, by reason.",
            &["reason"],
        );
        let tls_accept_errors =
            TlsAcceptError::ALL.map(|k| tls_accept_vec.with_label_values(&[k.as_str()]));
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
                ),
            ),
            token_forced: counter_vec(
                &r,
                "bearer_proxy_token_forced_refreshes_total",
                "Refreshes forced by an upstream rejecting the token.",
                &["token"],
            ),
            token_adoptions: counter_vec(
                &r,
                "bearer_proxy_token_adoptions_total",
                "Tokens taken from the shared slot (shared = true) instead of being requested.",
                &["token"],
            ),
            token_shared_fallbacks: counter_vec(
                &r,
                "bearer_proxy_token_shared_fallbacks_total",
                "Refreshes of a shared token that requested their own token because Redis \
                 could not be used.",
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
                ),
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
            subjects: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "bearer_proxy_subjects",
                        "Enrolled subjects of a per-subject token, by state.",
                    ),
                    &["token", "state"],
                ),
            ),
            subject_refreshes: counter_vec(
                &r,
                "bearer_proxy_subject_refreshes_total",
                "Per-subject token requests (refresh grant), by result.",
                &["token", "result"],
            ),
            subject_rejected: counter_vec(
                &r,
                "bearer_proxy_subject_rejected_requests_total",
                "Requests on per-subject routes the proxy answered itself, by reason.",
                &["token", "reason"],
            ),
            underscore_headers,
            handoffs,
            routes: std::sync::Mutex::new(Vec::new()),
            open_connections: register(
                &r,
                IntGauge::new(
                    "bearer_proxy_open_connections",
                    "Client connections open on the proxy port.",
                ),
            ),
            open_tunnels: register(
                &r,
                IntGauge::new("bearer_proxy_open_tunnels", "CONNECT tunnels open."),
            ),
            subject_enrolments: counter_vec(
                &r,
                "bearer_proxy_subject_enrolments_total",
                "Subject enrolments through the subjects API (code exchanges and refresh-token \
                 imports), by result.",
                &["token", "result"],
            ),
            client_cert_expiry: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "bearer_proxy_client_certificate_expiry_timestamp_seconds",
                        "When the client certificate presented for a token endpoint (kind=token) or an upstream (kind=route) expires, in seconds since the Unix epoch.",
                    ),
                    &["kind", "name"],
                ),
            ),
            client_certificates: std::sync::Mutex::new(Vec::new()),
            intercepted_connections: register(
                &r,
                IntCounter::new(
                    "bearer_proxy_intercepted_connections_total",
                    "CONNECTs to routed hosts whose TLS the proxy terminated with the operator CA.",
                ),
            ),
            tls_accept_errors,
            config: ConfigMetrics::new(&r),
            build_info,
            registry: r,
            store_errors,
            store_up: std::sync::OnceLock::new(),
        };
        Arc::new(m)
    }

    /// Counts a configuration reload; an `ok` one also records `hash` and `loaded_at` (Unix
    /// seconds) as the configuration in force (so does the start, with `result` `None`).
    pub fn config_loaded(&self, result: Option<ReloadResult>, hash: Option<&str>, loaded_at: f64) {
        if let Some(r) = result {
            self.config.reloads[r as usize].inc();
        }
        if let Some(hash) = hash {
            self.config.info.reset();
            self.config.info.with_label_values(&[hash]).set(1);
            self.config.last_success.set(loaded_at);
        }
    }

    /// Stops showing the client certificates for which `keep(kind, name)` is false (a reload
    /// removed their route or token).
    pub fn retain_client_certificates(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut watched = self
            .client_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watched.retain(|w| {
            let kept = keep(w.kind, &w.name);
            if !kept {
                let _ = self
                    .client_cert_expiry
                    .remove_label_values(&[w.kind, w.name.as_str()]);
            }
            kept
        });
    }

    /// Shows a client certificate (`kind` `token` or `route`) on the status page and in the
    /// expiry gauge; `probe` is read at each scrape. Watching the same kind and name again
    /// (after a reload) replaces the earlier probe.
    pub fn watch_client_certificate(
        &self,
        kind: &'static str,
        name: &str,
        probe: CertificateProbe,
    ) {
        let mut watched = self
            .client_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watched.retain(|w| !(w.kind == kind && w.name == name));
        watched.push(WatchedCertificate {
            kind,
            name: name.to_owned(),
            probe,
        });
    }

    /// Every watched client certificate as it is now.
    pub(crate) fn client_certificates(&self) -> Vec<CertificateView> {
        self.client_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|w| {
                let (subject, not_after) = (w.probe)();
                CertificateView {
                    kind: w.kind,
                    name: w.name.clone(),
                    subject,
                    not_after,
                }
            })
            .collect()
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        for c in self.client_certificates() {
            self.client_cert_expiry
                .with_label_values(&[c.kind, c.name.as_str()])
                .set(c.not_after as f64);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        #[expect(
            clippy::expect_used,
            reason = "the text format is UTF-8 by definition, from UTF-8 names and label values"
        )]
        String::from_utf8(buf).expect("the text encoder writes UTF-8 because every name, label and help text is a Rust string")
    }

    /// Handles for one token's metrics, creating its series at zero so alerts see them (the
    /// failure reasons' series once the token side names them: [`TokenMetrics::count_errors`]).
    pub fn token(&self, name: &str) -> TokenMetrics {
        TokenMetrics {
            name: name.into(),
            refreshes: RefreshResult::ALL
                .map(|r| self.token_refreshes.with_label_values(&[name, r.as_str()])),
            error_family: self.token_refresh_errors.clone(),
            errors: Vec::new(),
            duration: self.token_refresh_duration.with_label_values(&[name]),
            expiry: self.token_expiry.with_label_values(&[name]),
            last_success: self.token_last_success.with_label_values(&[name]),
            forced: self.token_forced.with_label_values(&[name]),
            adoptions: self.token_adoptions.with_label_values(&[name]),
            shared_fallbacks: self.token_shared_fallbacks.with_label_values(&[name]),
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
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A reload builds the routes again: the same name keeps its handle (and counts).
        if let Some(existing) = routes.iter().find(|r| r.name() == route) {
            return existing.clone();
        }
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
        routes.push(handle.clone());
        handle
    }

    /// Handles for one per-subject token's metrics, every series created at zero. `states`
    /// lists the subject states (the subject module owns them; this module only labels).
    pub fn subject(&self, token: &str, states: &[&'static str]) -> SubjectMetrics {
        SubjectMetrics {
            states: states
                .iter()
                .map(|s| (*s, self.subjects.with_label_values(&[token, s])))
                .collect(),
            refreshes: SubjectRefreshResult::ALL.map(|r| {
                self.subject_refreshes
                    .with_label_values(&[token, r.as_str()])
            }),
            rejected: SubjectRejectReason::ALL.map(|r| {
                self.subject_rejected
                    .with_label_values(&[token, r.as_str()])
            }),
        }
    }

    /// Every route handle created so far.
    pub(crate) fn routes(&self) -> Vec<RouteMetrics> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts an intercepted `CONNECT` whose TLS handshake failed.
    pub(crate) fn tls_accept_error(&self, reason: TlsAcceptError) {
        self.tls_accept_errors[reason as usize].inc();
    }

    /// Counts a request the proxy answered itself.
    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].inc();
    }

    /// Counts a client connection the fast path handed to hyper.
    pub(crate) fn handoff(&self, reason: Handoff) {
        self.handoffs[reason as usize].inc();
    }

    /// Counts `n` request headers whose name contains `_`.
    pub(crate) fn underscore_headers(&self, action: UnderscoreAction, n: u64) {
        self.underscore_headers[action as usize].inc_by(n);
    }

    /// Counts a failed operation on the shared subject store.
    pub(crate) fn store_error(&self, op: StoreOp) {
        self.store_errors[op as usize].inc();
    }

    /// Failed operations on the shared store so far, by operation (for `/status`).
    pub fn store_errors(&self) -> Vec<(&'static str, u64)> {
        StoreOp::ALL
            .iter()
            .map(|op| (op.as_str(), self.store_errors[*op as usize].get()))
            .collect()
    }

    /// Sets `bearer_proxy_store_up` (1: the shared store answered its last health check).
    pub(crate) fn set_store_up(&self, up: bool) {
        self.store_up
            .get_or_init(|| {
                register(
                    &self.registry,
                    IntGauge::new(
                        "bearer_proxy_store_up",
                        "Whether the shared subject store (Redis) answered its last health \
                         check (1) or not (0).",
                    ),
                )
            })
            .set(i64::from(up));
    }

    /// Sets `bearer_proxy_build_info{version,commit,features}` to 1 (the server passes its
    /// `crate::build` identity; this module depends on nothing of the crate's).
    pub(crate) fn set_build_info(&self, version: &str, commit: &str, features: &str) {
        self.build_info
            .with_label_values(&[version, commit, features])
            .set(1);
    }

    /// Sets `bearer_proxy_token_valid` for token `name` (the admin port calls it for every token
    /// before each scrape: validity changes with the clock, not only on refresh).
    pub(crate) fn set_token_valid(&self, name: &str, valid: bool) {
        self.token_valid
            .with_label_values(&[name])
            .set(i64::from(valid));
    }

    /// Creates the enrolment series of per-subject token `token` at zero (so alerts see them
    /// before the first enrolment).
    pub(crate) fn subject_enrolment_series(&self, token: &str) {
        for r in EnrolResult::ALL {
            self.subject_enrolments
                .with_label_values(&[token, r.as_str()]);
        }
    }

    /// Counts one enrolment of a subject of `token` (not on the request path: a label lookup
    /// per enrolment is fine).
    pub(crate) fn subject_enrolment(&self, token: &str, result: EnrolResult) {
        self.subject_enrolments
            .with_label_values(&[token, result.as_str()])
            .inc();
    }
}

/// Status codes 100..=599 each get a lazily created counter slot.
const STATUS_SLOTS: usize = 500;

/// One token's metric handles.
#[derive(Clone)]
pub struct TokenMetrics {
    /// The `token` label value.
    name: Arc<str>,
    refreshes: [IntCounter; RefreshResult::COUNT],
    /// `bearer_proxy_token_refresh_errors_total`, for a reason not named in advance.
    error_family: IntCounterVec,
    /// The series of the reasons named by [`TokenMetrics::count_errors`].
    errors: Vec<(&'static str, IntCounter)>,
    /// Token request duration.
    pub(crate) duration: Histogram,
    /// Unix time of expiry.
    pub(crate) expiry: prometheus::Gauge,
    /// Unix time of last success.
    pub(crate) last_success: prometheus::Gauge,
    /// Forced refreshes.
    pub(crate) forced: IntCounter,
    /// Tokens adopted from the shared slot.
    pub(crate) adoptions: IntCounter,
    /// Shared-token refreshes that fell back to an own request (Redis unusable).
    pub(crate) shared_fallbacks: IntCounter,
    /// 0 while a rotated refresh token is kept only in memory.
    pub(crate) state_persisted: IntGauge,
}

impl TokenMetrics {
    /// Counts one attempt.
    pub(crate) fn refresh(&self, result: RefreshResult) {
        self.refreshes[result as usize].inc();
    }

    /// Creates the failure series of each of `reasons` at zero, so alerts see them before the
    /// first failure. The token side owns the list of reasons; this module only counts them.
    pub(crate) fn count_errors(&mut self, reasons: &[&'static str]) {
        self.errors = reasons
            .iter()
            .map(|r| (*r, self.error_family.with_label_values(&[&*self.name, *r])))
            .collect();
    }

    /// Counts one failure under `reason`, a value from a fixed list (so the series stay
    /// bounded); a reason not given to [`TokenMetrics::count_errors`] gets its series now.
    pub(crate) fn error(&self, reason: &'static str) {
        match self.errors.iter().find(|(r, _)| *r == reason) {
            Some((_, c)) => c.inc(),
            None => self
                .error_family
                .with_label_values(&[&*self.name, reason])
                .inc(),
        }
    }
}

/// One per-subject token's metric handles. No label names a subject: the series are bounded
/// by the configuration, however many subjects are enrolled.
#[derive(Clone)]
pub struct SubjectMetrics {
    /// `bearer_proxy_subjects{token,state}`, one gauge per state.
    states: Box<[(&'static str, IntGauge)]>,
    refreshes: [IntCounter; SubjectRefreshResult::COUNT],
    rejected: [IntCounter; SubjectRejectReason::COUNT],
}

impl SubjectMetrics {
    /// Sets the number of subjects in `state` (a census or a re-count).
    pub(crate) fn set_state(&self, state: &str, n: u64) {
        if let Some((_, g)) = self.states.iter().find(|(s, _)| *s == state) {
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// One subject moved from `from` to `to` (`None`: not enrolled).
    pub(crate) fn transition(&self, from: Option<&str>, to: Option<&str>) {
        for (s, g) in self.states.iter() {
            if from == Some(*s) {
                g.dec();
            }
            if to == Some(*s) {
                g.inc();
            }
        }
    }

    /// Subjects counted in `state`.
    pub(crate) fn state(&self, state: &str) -> i64 {
        self.states
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, g)| g.get())
    }

    /// Counts one per-subject refresh.
    pub(crate) fn refresh(&self, result: SubjectRefreshResult) {
        self.refreshes[result as usize].inc();
    }

    /// Counts one request refused on a per-subject route.
    pub(crate) fn reject(&self, reason: SubjectRejectReason) {
        self.rejected[reason as usize].inc();
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
    upstream_errors: [IntCounter; UpstreamErrorKind::COUNT],
    replays: [IntCounter; ReplayResult::COUNT],
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
    pub(crate) fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.inner.upstream_errors[kind as usize].inc();
    }

    /// Counts a replay decision.
    pub(crate) fn replay(&self, result: ReplayResult) {
        self.inner.replays[result as usize].inc();
    }

    /// Requests answered so far, by status code (codes never seen are left out).
    pub(crate) fn counts(&self) -> Vec<(u16, u64)> {
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
    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exported_with_fixed_labels() {
        let m = Metrics::new();
        m.set_build_info(
            crate::build::VERSION,
            crate::build::COMMIT,
            crate::build::FEATURES,
        );
        let mut t = m.token("flinks");
        t.count_errors(&["invalid_grant", "other", "timeout"]);
        t.refresh(RefreshResult::Ok);
        t.error("invalid_grant");
        t.error("other");
        let r = m.route("fdx");
        r.request(200, 0.01);
        r.request(200, 0.01);
        r.request(999, 0.01);
        r.upstream_error(UpstreamErrorKind::Tls);
        m.reject(RejectReason::Loop);
        m.underscore_headers(UnderscoreAction::Dropped, 2);
        m.store_error(StoreOp::SpendCode);
        let text = m.encode();
        for needle in [
            "bearer_proxy_token_refreshes_total{result=\"ok\",token=\"flinks\"} 1",
            "bearer_proxy_token_refresh_errors_total{reason=\"invalid_grant\",token=\"flinks\"} 1",
            "bearer_proxy_token_refresh_errors_total{reason=\"other\",token=\"flinks\"} 1",
            "bearer_proxy_token_refresh_errors_total{reason=\"timeout\",token=\"flinks\"} 0",
            "bearer_proxy_requests_total{code=\"200\",route=\"fdx\"} 2",
            "bearer_proxy_upstream_errors_total{kind=\"tls\",route=\"fdx\"} 1",
            "bearer_proxy_rejected_requests_total{reason=\"loop\"} 1",
            "bearer_proxy_underscore_headers_total{action=\"dropped\"} 2",
            "bearer_proxy_underscore_headers_total{action=\"refused\"} 0",
            "bearer_proxy_open_connections 0",
            "bearer_proxy_store_errors_total{op=\"spend_code\"} 1",
            "bearer_proxy_store_errors_total{op=\"get\"} 0",
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

    #[test]
    fn every_label_variant_indexes_its_own_slot_and_has_a_distinct_label() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            index: fn(T) -> usize,
            label: fn(T) -> &'static str,
        ) {
            let mut labels: Vec<&str> = all.iter().map(|v| label(*v)).collect();
            for (i, v) in all.iter().enumerate() {
                assert_eq!(index(*v), i, "{v:?}");
            }
            labels.sort_unstable();
            labels.dedup();
            assert_eq!(labels.len(), all.len(), "duplicate label value");
        }
        check(&RefreshResult::ALL, |v| v as usize, RefreshResult::as_str);
        check(&RejectReason::ALL, |v| v as usize, RejectReason::as_str);
        check(
            &UnderscoreAction::ALL,
            |v| v as usize,
            UnderscoreAction::as_str,
        );
        check(
            &UpstreamErrorKind::ALL,
            |v| v as usize,
            UpstreamErrorKind::as_str,
        );
        check(&ReplayResult::ALL, |v| v as usize, ReplayResult::as_str);
        check(&StoreOp::ALL, |v| v as usize, StoreOp::as_str);
        check(&EnrolResult::ALL, |v| v as usize, EnrolResult::as_str);
        check(
            &SubjectRefreshResult::ALL,
            |v| v as usize,
            SubjectRefreshResult::as_str,
        );
        check(
            &SubjectRejectReason::ALL,
            |v| v as usize,
            SubjectRejectReason::as_str,
        );
        check(&TlsAcceptError::ALL, |v| v as usize, TlsAcceptError::as_str);
    }

    #[test]
    fn subject_families_count_by_token_and_never_by_subject() {
        let m = Metrics::new();
        let s = m.subject("fdx", &["active", "needs_reauth"]);
        s.set_state("active", 3);
        s.transition(Some("active"), Some("needs_reauth"));
        s.transition(None, Some("active"));
        s.refresh(SubjectRefreshResult::InvalidGrant);
        s.reject(SubjectRejectReason::UnknownSubject);
        assert_eq!(s.state("active"), 3);
        let text = m.encode();
        for needle in [
            "bearer_proxy_subjects{state=\"active\",token=\"fdx\"} 3",
            "bearer_proxy_subjects{state=\"needs_reauth\",token=\"fdx\"} 1",
            "bearer_proxy_subject_refreshes_total{result=\"invalid_grant\",token=\"fdx\"} 1",
            "bearer_proxy_subject_refreshes_total{result=\"ok\",token=\"fdx\"} 0",
            "bearer_proxy_subject_rejected_requests_total{reason=\"unknown_subject\",token=\"fdx\"} 1",
            "bearer_proxy_subject_rejected_requests_total{reason=\"subject_required\",token=\"fdx\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
