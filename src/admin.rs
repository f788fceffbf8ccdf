//! The admin port: `/metrics`, `/livez`, `/readyz`, `/status`. Separate from the proxy port;
//! it never proxies, and it never shows a token, secret or refresh token.
//!
//! - `GET /metrics`: Prometheus text exposition of the project's own registry.
//! - `GET /livez`: 200 while the process serves, whatever the token endpoint does.
//! - `GET /readyz`: 200 only while every configured (named) token is valid and the process
//!   is not shutting down; otherwise 503 with a JSON reason naming the token and its state.
//!   Per-subject tokens never count: one customer's consent is not the pod's readiness. With
//!   `[redis]`, the body lists Redis under `dependencies`; an unreachable Redis fails
//!   readiness only with `redis.gate_readiness = true`.
//! - `GET /status`: JSON with each token's state, expiry, last success and error, each
//!   route's request counts, per per-subject token the subjects per state and in memory, and
//!   with `[redis]` its health and failed operations (`store`), and the loaded
//!   configuration's hash and load time.
//! - `POST /-/reload`: reloads the configuration file (`crate::reload`) and answers its
//!   result, only with `[admin] reload = true` (403 otherwise).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::listener::accept;
use crate::metrics::Metrics;
use crate::shutdown::{Phase, Shutdown};
use crate::subject::Subjects;
use crate::subject::redis::health::StoreHealth;
use crate::time::rfc3339;
use crate::token::{ErrorKind, TokenCell, TokenStatus};

/// A probe or a scrape sends its whole request at once; anything slower is not a client we
/// serve.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once. Probes, a scrape or two and an operator's curl need a
/// handful; 64 leaves room for a busy cluster while a flood of connections to this port
/// (reachable on the pod IP) cannot take the file descriptors the proxy port needs: above it
/// the listener stops accepting and new connections wait in the kernel's backlog, and each
/// admitted one that stays silent is closed after `HEADER_READ_TIMEOUT`.
pub const MAX_CONNECTIONS: usize = 64;
/// Prometheus' path for the same operation, so operators' habits carry over.
pub const RELOAD_PATH: &str = "/-/reload";

/// What the admin port asks of configuration reloads (implemented in `crate::reload`, which
/// depends on this module, not the other way round).
pub trait ReloadEndpoint: Send + Sync {
    /// Whether `POST /-/reload` is enabled (`[admin] reload` of the configuration in force).
    fn enabled(&self) -> bool;
    /// Reloads the configuration file; the answer's status and JSON document.
    fn reload(&self) -> Pin<Box<dyn Future<Output = (StatusCode, Value)> + Send + 'static>>;
    /// The `config` object of `/status` (hash, load time, last reload).
    fn status(&self) -> Value;
}

/// What the admin port reports on.
#[derive(Clone)]
pub struct Admin {
    /// The named tokens in force; a reload swaps the list (clones share it).
    tokens: Arc<ArcSwap<Vec<Arc<TokenCell>>>>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    subjects: Option<Arc<Subjects>>,
    store: Option<Arc<StoreHealth>>,
    reload: Option<Arc<dyn ReloadEndpoint>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// An admin server over these tokens and metrics, reporting the phase of `shutdown`.
    pub fn new(
        tokens: &BTreeMap<String, Arc<TokenCell>>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            tokens: Arc::new(ArcSwap::from_pointee(tokens.values().cloned().collect())),
            metrics,
            shutdown,
            subjects: None,
            store: None,
            reload: None,
        }
    }

    /// Also reports the shared store's (Redis') health on `/readyz` and `/status`.
    #[must_use]
    pub fn with_store(mut self, store: Option<Arc<StoreHealth>>) -> Self {
        self.store = store;
        self
    }

    /// Reports on `tokens` from now on (this admin server and every clone of it).
    pub fn set_tokens(&self, tokens: &BTreeMap<String, Arc<TokenCell>>) {
        self.tokens
            .store(Arc::new(tokens.values().cloned().collect()));
    }

    /// Serves `POST /-/reload` (when `reload` says it is enabled) and shows the loaded
    /// configuration on `/status`.
    #[must_use]
    pub fn with_reload(mut self, reload: Arc<dyn ReloadEndpoint>) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Also reports the per-subject token entries on `/status`.
    #[must_use]
    pub fn with_subjects(mut self, subjects: Option<Arc<Subjects>>) -> Self {
        self.subjects = subjects;
        self
    }

    /// Serves until the process terminates (it keeps answering probes while draining).
    pub async fn serve(self, listener: TcpListener) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        let terminated = self.shutdown.clone();
        let stop = terminated.reached(Phase::Terminated);
        tokio::pin!(stop);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            // A slot before `accept`, as on the proxy port.
            let permit = tokio::select! {
                () = &mut stop => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let stream = tokio::select! {
                () = &mut stop => return,
                stream = accept(&listener, "admin") => stream,
            };
            let admin = self.clone();
            let conn = http.serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.answer(&req).await) }
                }),
            );
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin: connection error");
                }
            });
        }
    }

    /// Answers one request, `POST /-/reload` included.
    pub async fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == RELOAD_PATH {
            return self.reload(req.method()).await;
        }
        self.handle(req)
    }

    /// Answers one request other than a reload.
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        self.route(req.method(), req.uri().path())
    }

    async fn reload(&self, method: &Method) -> Response<Full<Bytes>> {
        let Some(reload) = self.reload.as_ref().filter(|r| r.enabled()) else {
            return json_response(
                StatusCode::FORBIDDEN,
                &json!({
                    "error": "reload_disabled",
                    "message": "configuration reload over the admin port is off; set [admin] reload = true, or send SIGHUP"
                }),
            );
        };
        if method != Method::POST {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": "POST /-/reload reloads the configuration"}),
            );
        }
        let (status, doc) = reload.reload().await;
        json_response(status, &doc)
    }

    fn route(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": "the admin port answers GET only"}),
            );
        }
        match path {
            "/metrics" => self.metrics(),
            "/livez" => json_response(StatusCode::OK, &json!({"live": true})),
            "/readyz" => self.readyz(),
            "/status" => json_response(StatusCode::OK, &self.status()),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({
                    "error": "not_found",
                    "message": "admin paths: /metrics /livez /readyz /status, POST /-/reload; the admin port never proxies"
                }),
            ),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        for cell in self.tokens.load().iter() {
            self.metrics
                .set_token_valid(cell.name(), cell.current().is_some());
        }
        let mut resp = Response::new(Full::new(Bytes::from(self.metrics.encode())));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let phase = self.shutdown.phase();
        if phase != Phase::Running {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": "shutting down", "phase": phase_name(phase)}),
            );
        }
        let tokens = self.tokens.load();
        let not_valid: Vec<(&str, &'static str)> = tokens
            .iter()
            .filter(|cell| cell.current().is_none())
            .map(|cell| (cell.name(), cell.status().state.as_str()))
            .collect();
        let redis = self
            .store
            .as_ref()
            .map(|h| (h.snapshot().up, h.gates_readiness()));
        let dependencies =
            redis.map(|(up, gates)| json!({"redis": {"up": up, "gates_readiness": gates}}));
        if redis.is_some_and(|(up, gates)| gates && !up) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "ready": false,
                    "reason": "Redis is unreachable (redis.gate_readiness = true)",
                    "dependencies": dependencies,
                }),
            );
        }
        if not_valid.is_empty() {
            let mut body = json!({"ready": true});
            if let Some(d) = dependencies {
                body["dependencies"] = d;
            }
            return json_response(StatusCode::OK, &body);
        }
        let reason: Vec<String> = not_valid
            .iter()
            .map(|(name, state)| format!("{name} is {state}"))
            .collect();
        let tokens: Vec<Value> = not_valid
            .iter()
            .map(|(name, state)| json!({"token": name, "state": state}))
            .collect();
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({
                "ready": false,
                "reason": format!("no valid token: {}", reason.join(", ")),
                "tokens": tokens,
            }),
        )
    }

    /// The `/status` document.
    pub fn status(&self) -> Value {
        let tokens: serde_json::Map<String, Value> = self
            .tokens
            .load()
            .iter()
            .map(|cell| (cell.name().to_owned(), token_json(&cell.status())))
            .collect();
        let routes: serde_json::Map<String, Value> = self
            .metrics
            .routes()
            .iter()
            .map(|r| {
                let counts = r.counts();
                let total: u64 = counts.iter().map(|(_, n)| n).sum();
                let by_code: serde_json::Map<String, Value> = counts
                    .into_iter()
                    .map(|(code, n)| (code.to_string(), json!(n)))
                    .collect();
                (
                    r.name().to_owned(),
                    json!({"requests": total, "by_code": by_code}),
                )
            })
            .collect();
        let mut doc = json!({
            "version": crate::build::VERSION,
            "commit": crate::build::COMMIT,
            "features": crate::build::features().collect::<Vec<_>>(),
            "phase": phase_name(self.shutdown.phase()),
            "tokens": tokens,
            "routes": routes,
            "client_certificates": self
                .metrics
                .client_certificates()
                .into_iter()
                .map(|c| {
                    json!({
                        "kind": c.kind,
                        "name": c.name,
                        "subject": c.subject,
                        "not_after": time(Some(crate::time::from_unix_secs(c.not_after.max(0) as u64))),
                    })
                })
                .collect::<Vec<_>>(),
        });
        if let Some(subjects) = &self.subjects {
            let per_token: serde_json::Map<String, Value> = subjects
                .counts()
                .into_iter()
                .map(|(name, counts)| {
                    let states: serde_json::Map<String, Value> = counts
                        .states
                        .into_iter()
                        .map(|(state, n)| (state.to_owned(), json!(n)))
                        .collect();
                    (
                        name.to_owned(),
                        json!({"subjects": states, "cached_tokens": counts.cached}),
                    )
                })
                .collect();
            doc["subjects"] = Value::Object(per_token);
        }
        if let Some(health) = &self.store {
            let s = health.snapshot();
            let errors: serde_json::Map<String, Value> = self
                .metrics
                .store_errors()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(op, n)| (op.to_owned(), json!(n)))
                .collect();
            doc["store"] = json!({
                "kind": "redis",
                "up": s.up,
                "since": rfc3339(s.since),
                "checked": rfc3339(s.checked),
                "last_error": s.last_error,
                "gates_readiness": health.gates_readiness(),
                "errors": errors,
            });
        }
        if let Some(reload) = &self.reload {
            doc["config"] = reload.status();
        }
        doc
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Running => "running",
        Phase::Draining => "draining",
        Phase::Stopping => "stopping",
        Phase::Terminated => "terminated",
    }
}

fn time(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn token_json(s: &TokenStatus) -> Value {
    let last_error = s.last_error.as_ref().map_or(Value::Null, |e| {
        json!({
            "kind": match e.kind { ErrorKind::Transient => "transient", ErrorKind::Rejected => "rejected" },
            "reason": e.reason,
            "http_status": e.status,
            "oauth_error": e.oauth_error,
            "oauth_error_description": e.description,
            "message": e.message,
            "at": rfc3339(e.at),
        })
    });
    json!({
        "state": s.state.as_str(),
        "valid": s.valid,
        "generation": s.generation,
        "expires_at": time(s.expires_wall),
        "expires_in_seconds": s.expires_in.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        "last_success": time(s.last_success),
        "last_error": last_error,
        "consecutive_failures": s.consecutive_failures,
        "next_attempt": time(s.next_attempt),
        "refreshes": {"ok": s.refreshes_ok, "failed": s.refreshes_failed},
        // false while a refresh token the server rotated is held only in memory.
        "refresh_token_persisted": !s.refresh_token_in_memory_only,
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::ShutdownController;
    use crate::token::AccessToken;
    use http_body_util::BodyExt;

    fn admin() -> (Admin, Arc<TokenCell>, ShutdownController) {
        let cell = TokenCell::new("flinks", Duration::from_secs(5));
        let (ctl, sd) = ShutdownController::new();
        let tokens = BTreeMap::from([("flinks".to_owned(), cell.clone())]);
        (Admin::new(&tokens, Metrics::new(), sd), cell, ctl)
    }

    async fn body(resp: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_follows_the_token_and_the_shutdown() {
        let (admin, cell, ctl) = admin();
        let (status, text) = body(admin.route(&Method::GET, "/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("flinks is expired"), "{text}");
        cell.publish(
            AccessToken::new(
                "canary-token-1",
                tokio::time::Instant::now(),
                SystemTime::now(),
                Duration::from_secs(60),
                None,
            )
            .unwrap(),
        );
        assert_eq!(
            body(admin.route(&Method::GET, "/readyz")).await.0,
            StatusCode::OK
        );
        ctl.advance(Phase::Draining);
        let (status, text) = body(admin.route(&Method::GET, "/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("shutting down"));
        // Liveness does not care.
        assert_eq!(
            body(admin.route(&Method::GET, "/livez")).await.0,
            StatusCode::OK
        );
        let (_, status_page) = body(admin.route(&Method::GET, "/status")).await;
        assert!(!status_page.contains("canary"), "{status_page}");
        let v: Value = serde_json::from_str(&status_page).unwrap();
        assert_eq!(v["tokens"]["flinks"]["state"], "fresh");
        assert_eq!(v["tokens"]["flinks"]["generation"], 1);
        assert_eq!(v["phase"], "draining");
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_are_refused() {
        let (admin, _, _ctl) = admin();
        assert_eq!(
            body(admin.route(&Method::GET, "/")).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            body(admin.route(&Method::GET, "http://example.com/"))
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            body(admin.route(&Method::POST, "/metrics")).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let (status, text) = body(admin.route(&Method::GET, "/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("bearer_proxy_token_valid{token=\"flinks\"} 0"),
            "{text}"
        );
    }
}
