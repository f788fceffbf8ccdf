//! The subjects API: its own HTTP/1 listener (`[subjects] listen`, never the proxy or admin
//! port) through which the app enrols and manages the subjects of per-subject tokens. JSON in
//! and out; it never returns a token or a code. The operations themselves are in
//! [`super::enrol`]; this file reads requests, checks the caller and answers.
//!
//! | Method and path | Answer |
//! |---|---|
//! | `POST /v1/tokens/{token}/subjects/{subject}/code` `{"code", "redirect_uri"?}` | 201 state; 409 `code_already_used`; 422 `token_endpoint_rejected` (+ `oauth_error`); 502/504 |
//! | `PUT /v1/tokens/{token}/subjects/{subject}` `{"refresh_token"}` | 201 new / 200 replaced; 422; 502/504 |
//! | `GET /v1/tokens/{token}/subjects/{subject}` | 200 state |
//! | `GET /v1/tokens/{token}/subjects?state=&limit=&cursor=` | 200 `{"subjects", "next_cursor"}` |
//! | `DELETE /v1/tokens/{token}/subjects/{subject}?revoke=true` | 204; revocation failure 502/504 keeps the subject |
//! | `POST /v1/tokens/{token}/subjects/{subject}/refresh` | 200 state; 409 `reauth_required`; 502/504 |
//!
//! Every failure is `{"error", "message"}` with an `x-bearer-proxy-error` header, like the
//! proxy's own answers: 400 (`invalid_subject`, `bad_request`), 401 `unauthorized`, 404
//! (`not_found`, `unknown_token`, `unknown_subject`), 405 (with `Allow`), 408 `body_timeout`,
//! 413 `body_too_large`, 503 `api_token_unavailable`, 503 `store_unavailable` (the subject store,
//! Redis, cannot be reached: nothing was changed, retry).
//!
//! **Caller authentication.** With `api_token_file`, every request needs
//! `Authorization: Bearer <the file's content, trimmed>`. The SHA-256 of what the caller sent is
//! compared with the SHA-256 of the file's token in constant time (`subtle`), so neither the
//! content nor the length of the token leaks through timing. The file is read at start (an
//! unreadable or empty file stops the start) and again whenever its modification time, size or
//! inode changes, checked on each request: a Kubernetes secret update swaps the file, which
//! changes all three, so a rotated token works at once and the old one stops working. If the
//! file becomes unreadable or empty, every request is refused (503) until it is fixed. Without
//! `api_token_file` (allowed only on a loopback `listen`) no caller check is made.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::enrol::{OpError, Operations};
use super::record::{Cursor, MAX_PAGE, SubjectState};
use super::registry::Subjects;
use super::{InvalidSubject, SubjectId};
use crate::config::Config;
use crate::listener::accept;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shutdown::{Phase, Shutdown};

/// Largest request body accepted: a code or a refresh token with a redirect URI is well under
/// 1 KiB; 16 KiB leaves room for long JWT-shaped refresh tokens and bounds what a caller can
/// make the process buffer.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a request body may take to arrive: the app sends a few hundred bytes at once, so a
/// body still incomplete after this is a stalled or hostile client.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The request head must arrive within this, as on the admin port.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once: the app and an operator's CLI need a few; the bound keeps a
/// flood on this port from taking descriptors the proxy port needs (further connections wait
/// in the kernel's backlog).
pub const MAX_CONNECTIONS: usize = 64;
/// Subjects per page when the caller gives no `limit`: one screen for a person, a cheap page
/// for a program.
pub const DEFAULT_PAGE: usize = 100;

/// The header naming the error code on every failure, as on the proxy port.
const ERROR_HEADER: &str = "x-bearer-proxy-error";
/// Path prefix of every endpoint.
const PREFIX: &str = "/v1/tokens/";

/// A failure answer: status, stable code, message (never a secret or echoed request data other
/// than a validated subject id or a configured token name).
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Extra fields of the body (`oauth_error`).
    extra: Option<(&'static str, &'static str)>,
    /// Whether to send `WWW-Authenticate: Bearer` (a 401).
    challenge: bool,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            challenge: false,
        }
    }

    fn response(self) -> Response<Full<Bytes>> {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some((k, v)) = self.extra {
            body[k] = Value::from(v);
        }
        let mut resp = json_response(self.status, &body);
        resp.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(self.code));
        if self.challenge {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        Self {
            status: e.status(),
            code: e.code(),
            extra: e.oauth_error().map(|o| ("oauth_error", o)),
            message: e.to_string(),
            challenge: false,
        }
    }
}

impl From<InvalidSubject> for Failure {
    fn from(e: InvalidSubject) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, "invalid_subject", e.to_string())
    }
}

/// The API token file and what was last read from it.
#[derive(Debug)]
struct ApiToken {
    path: PathBuf,
    /// The file's identity when read, and the SHA-256 of its trimmed content.
    current: Mutex<(Stamp, [u8; 32])>,
}

/// What tells a changed file: modification time, size and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        }
    }
}

/// Why the API token cannot be checked.
#[derive(Debug, thiserror::Error)]
enum ApiTokenError {
    #[error("subjects.api_token_file: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("subjects.api_token_file: {path} is empty (or not UTF-8 text)")]
    Empty { path: PathBuf },
}

impl ApiToken {
    async fn load(path: PathBuf) -> Result<Self, ApiTokenError> {
        let current = read_token(&path).await?;
        Ok(Self {
            path,
            current: Mutex::new(current),
        })
    }

    /// The digest of the current token, re-reading the file if it changed.
    async fn digest(&self) -> Result<[u8; 32], ApiTokenError> {
        let read_err = |source| ApiTokenError::Read {
            path: self.path.clone(),
            source,
        };
        let stamp = Stamp::of(&tokio::fs::metadata(&self.path).await.map_err(read_err)?);
        {
            let current = lock(&self.current);
            if current.0 == stamp {
                return Ok(current.1);
            }
        }
        let fresh = read_token(&self.path).await?;
        *lock(&self.current) = fresh;
        tracing::info!(path = %self.path.display(), "subjects API token file changed; reloaded");
        Ok(fresh.1)
    }
}

async fn read_token(path: &std::path::Path) -> Result<(Stamp, [u8; 32]), ApiTokenError> {
    let read_err = |source| ApiTokenError::Read {
        path: path.to_owned(),
        source,
    };
    let stamp = Stamp::of(&tokio::fs::metadata(path).await.map_err(read_err)?);
    let raw = tokio::fs::read(path).await.map_err(read_err)?;
    let text = String::from_utf8(raw).unwrap_or_default();
    let token = text.trim();
    if token.is_empty() {
        return Err(ApiTokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok((stamp, Sha256::digest(token.as_bytes()).into()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data (a stamp and a digest) written in one assignment: never half-updated.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The subjects API server.
#[derive(Clone)]
pub struct SubjectsApi {
    ops: Arc<Operations>,
    auth: Option<Arc<ApiToken>>,
}

impl std::fmt::Debug for SubjectsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectsApi").finish_non_exhaustive()
    }
}

impl SubjectsApi {
    /// The API over `subjects`. Fails if `api_token_file` is set but unreadable or empty, or a
    /// revoke client cannot be built.
    pub async fn new(
        config: &Config,
        subjects: Arc<Subjects>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let auth = match config
            .subjects
            .as_ref()
            .and_then(|s| s.api_token_file.clone())
        {
            Some(path) => Some(Arc::new(ApiToken::load(path).await?)),
            None => None,
        };
        Ok(Self {
            ops: Arc::new(Operations::new(config, subjects, metrics)?),
            auth,
        })
    }

    /// Serves until `Stopping`, then lets in-flight requests finish (the server's
    /// `shutdown_grace` bounds that), like the proxy port.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = JoinSet::new();
        {
            let stopping = shutdown.reached(Phase::Stopping);
            tokio::pin!(stopping);
            loop {
                let permit = tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    Some(_) = tasks.join_next() => continue,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let stream = tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    Some(_) = tasks.join_next() => continue,
                    stream = accept(&listener, "subjects api") => stream,
                };
                let api = self.clone();
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    }),
                );
                let conn = graceful.watch(conn);
                tasks.spawn(async move {
                    let _permit = permit;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "subjects api: connection error");
                    }
                });
            }
        }
        drop(listener);
        let drain = async {
            graceful.shutdown().await;
            while tasks.join_next().await.is_some() {}
        };
        tokio::select! {
            biased;
            () = shutdown.reached(Phase::Terminated) => {}
            () = drain => {}
        }
        tasks.shutdown().await;
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.answer(req).await {
            Ok(resp) => resp,
            Err(f) => f.response(),
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Failure> {
        self.authorize(&req).await?;
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let route = Route::parse(&path).ok_or_else(|| {
            Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "paths: /v1/tokens/{token}/subjects[/{subject}[/code|/refresh]]",
            )
        })?;
        let method = req.method().clone();
        if !route.allows(&method) {
            let mut resp = Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this path answers {}", route.allow()),
            )
            .response();
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.allow()));
            return Ok(resp);
        }
        let token = route.token();
        if !self.ops.has_token(token) {
            return Err(OpError::UnknownToken.into());
        }
        let subject = route.subject().map(SubjectId::parse).transpose()?;
        let ops = &self.ops;
        match (route, subject) {
            (Route::List(_), _) => {
                let q = ListQuery::parse(&query)?;
                let page = ops.list(token, q.state, q.cursor, q.limit).await?;
                let subjects: Vec<Value> = page.subjects.iter().map(|v| v.json()).collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "subjects": subjects,
                        "next_cursor": page.next.as_ref().map(Cursor::as_str),
                    }),
                ))
            }
            (Route::Code(..), Some(subject)) => {
                no_query(&query)?;
                let body: CodeBody = read_json(req).await?;
                if body.code.is_empty() {
                    return Err(bad_request("code is empty"));
                }
                if let Some(uri) = &body.redirect_uri {
                    check_redirect_uri(uri)?;
                }
                let view = ops
                    .enrol(token, &subject, body.code, body.redirect_uri)
                    .await?;
                Ok(json_response(StatusCode::CREATED, &view.json()))
            }
            (Route::Refresh(..), Some(subject)) => {
                no_query(&query)?;
                let view = ops.refresh(token, &subject).await?;
                Ok(json_response(StatusCode::OK, &view.json()))
            }
            (Route::Subject(..), Some(subject)) => match method {
                Method::PUT => {
                    no_query(&query)?;
                    let body: ImportBody = read_json(req).await?;
                    if body.refresh_token.is_empty() {
                        return Err(bad_request("refresh_token is empty"));
                    }
                    let (view, created) = ops.import(token, &subject, body.refresh_token).await?;
                    let status = if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    Ok(json_response(status, &view.json()))
                }
                Method::DELETE => {
                    let revoke = revoke_query(&query)?;
                    ops.delete(token, &subject, revoke).await?;
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    Ok(resp)
                }
                _ => {
                    no_query(&query)?;
                    let view = ops.show(token, &subject).await?;
                    Ok(json_response(StatusCode::OK, &view.json()))
                }
            },
            // Every route but List names a subject, parsed above.
            (_, None) => Err(Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no subject in the path",
            )),
        }
    }

    /// Checks the caller's bearer token when `api_token_file` is set.
    async fn authorize(&self, req: &Request<Incoming>) -> Result<(), Failure> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let expected = auth.digest().await.map_err(|e| {
            tracing::error!(error = %e, "subjects API token unavailable; refusing every request");
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_token_unavailable",
                "the subjects API token file cannot be read; see the server's log",
            )
        })?;
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if presented.is_empty() || !bool::from(digest.ct_eq(&expected)) {
            return Err(Failure {
                challenge: true,
                ..Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send Authorization: Bearer <the content of subjects.api_token_file>",
                )
            });
        }
        Ok(())
    }
}

/// The endpoints, by path shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// `/v1/tokens/{token}/subjects`
    List(&'a str),
    /// `/v1/tokens/{token}/subjects/{subject}`
    Subject(&'a str, &'a str),
    /// `/v1/tokens/{token}/subjects/{subject}/code`
    Code(&'a str, &'a str),
    /// `/v1/tokens/{token}/subjects/{subject}/refresh`
    Refresh(&'a str, &'a str),
}

impl<'a> Route<'a> {
    /// The route of `path` (raw, not percent-decoded: nothing valid needs escaping).
    fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [token, "subjects"] if !token.is_empty() => Some(Route::List(token)),
            [token, "subjects", s] if !token.is_empty() => Some(Route::Subject(token, s)),
            [token, "subjects", s, "code"] if !token.is_empty() => Some(Route::Code(token, s)),
            [token, "subjects", s, "refresh"] if !token.is_empty() => {
                Some(Route::Refresh(token, s))
            }
            _ => None,
        }
    }

    fn token(self) -> &'a str {
        match self {
            Route::List(t) | Route::Subject(t, _) | Route::Code(t, _) | Route::Refresh(t, _) => t,
        }
    }

    fn subject(self) -> Option<&'a str> {
        match self {
            Route::List(_) => None,
            Route::Subject(_, s) | Route::Code(_, s) | Route::Refresh(_, s) => Some(s),
        }
    }

    fn allow(self) -> &'static str {
        match self {
            Route::List(_) => "GET",
            Route::Subject(..) => "GET, PUT, DELETE",
            Route::Code(_, _) | Route::Refresh(_, _) => "POST",
        }
    }

    fn allows(self, method: &Method) -> bool {
        match self {
            Route::List(_) => method == Method::GET,
            Route::Subject(..) => [Method::GET, Method::PUT, Method::DELETE].contains(method),
            Route::Code(..) | Route::Refresh(..) => method == Method::POST,
        }
    }
}

/// The body of `POST …/code`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: Secret,
    #[serde(default)]
    redirect_uri: Option<String>,
}

/// The body of `PUT …/{subject}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    refresh_token: Secret,
}

/// Longest `redirect_uri` accepted: far above any real one, and it is sent to the token
/// endpoint as it is.
const MAX_REDIRECT_URI: usize = 2048;

fn check_redirect_uri(uri: &str) -> Result<(), Failure> {
    if uri.len() > MAX_REDIRECT_URI || url::Url::parse(uri).is_err() {
        return Err(bad_request(
            "redirect_uri must be an absolute URL of at most 2048 characters",
        ));
    }
    Ok(())
}

/// `?state=&limit=&cursor=` of a listing.
#[derive(Debug, PartialEq)]
struct ListQuery {
    state: Option<SubjectState>,
    limit: usize,
    cursor: Option<Cursor>,
}

impl ListQuery {
    fn parse(query: &str) -> Result<Self, Failure> {
        let mut q = ListQuery {
            state: None,
            limit: DEFAULT_PAGE,
            cursor: None,
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "state" => {
                    q.state = Some(match &*v {
                        "active" => SubjectState::Active,
                        "needs_reauth" => SubjectState::NeedsReauth,
                        _ => return Err(bad_request("state must be active or needs_reauth")),
                    });
                }
                "limit" => {
                    q.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            bad_request(format!("limit must be a number from 1 to {MAX_PAGE}"))
                        })?;
                }
                "cursor" => q.cursor = Some(Cursor::from_text(v.into_owned())),
                _ => return Err(bad_request("query parameters: state, limit, cursor")),
            }
        }
        Ok(q)
    }
}

/// `?revoke=true|false` of a deletion; anything else is refused, so a typo never silently
/// skips the revocation.
fn revoke_query(query: &str) -> Result<bool, Failure> {
    let mut revoke = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match (&*k, &*v) {
            ("revoke", "true") => revoke = true,
            ("revoke", "false") => revoke = false,
            _ => return Err(bad_request("the only query parameter is revoke=true|false")),
        }
    }
    Ok(revoke)
}

fn no_query(query: &str) -> Result<(), Failure> {
    if query.is_empty() {
        Ok(())
    } else {
        Err(bad_request("this endpoint takes no query parameters"))
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`]. Parse errors are
/// described without serde's text, which can quote the value (a code or a token).
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body must be at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => {
            return Err(Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {}s", BODY_TIMEOUT.as_secs()),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(_)) => return Err(bad_request("the body could not be read")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        bad_request(format!(
            "the body must be a JSON object with the documented fields and no others ({:?} \
             error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_parsed_exactly() {
        assert_eq!(
            Route::parse("/v1/tokens/fdx/subjects"),
            Some(Route::List("fdx"))
        );
        assert_eq!(
            Route::parse("/v1/tokens/fdx/subjects/c-1"),
            Some(Route::Subject("fdx", "c-1"))
        );
        assert_eq!(
            Route::parse("/v1/tokens/fdx/subjects/c-1/code"),
            Some(Route::Code("fdx", "c-1"))
        );
        assert_eq!(
            Route::parse("/v1/tokens/fdx/subjects/c-1/refresh"),
            Some(Route::Refresh("fdx", "c-1"))
        );
        for bad in [
            "/",
            "/v1/tokens/",
            "/v1/tokens//subjects",
            "/v1/tokens/fdx/subjects/",
            "/v1/tokens/fdx/subjects/c-1/other",
            "/v1/tokens/fdx/subjects/c-1/code/",
            "/v1/tokens/fdx",
            "/metrics",
        ] {
            let route = Route::parse(bad);
            // An empty subject parses as a route but fails SubjectId validation (400).
            assert!(
                route.is_none() || route.and_then(Route::subject) == Some(""),
                "{bad}: {route:?}"
            );
        }
        assert!(Route::Subject("t", "s").allows(&Method::DELETE));
        assert!(!Route::List("t").allows(&Method::POST));
        assert!(!Route::Code("t", "s").allows(&Method::GET));
    }

    #[test]
    fn list_queries_are_strict() {
        let q = ListQuery::parse("state=needs_reauth&limit=5&cursor=abc%2Fd").unwrap();
        assert_eq!(q.state, Some(SubjectState::NeedsReauth));
        assert_eq!(q.limit, 5);
        assert_eq!(q.cursor, Some(Cursor::from_text("abc/d")));
        assert_eq!(ListQuery::parse("").unwrap().limit, DEFAULT_PAGE);
        for bad in [
            "state=gone",
            "limit=0",
            "limit=1001",
            "limit=x",
            "stat=active",
        ] {
            assert!(ListQuery::parse(bad).is_err(), "{bad}");
        }
        assert!(revoke_query("revoke=true").unwrap());
        assert!(!revoke_query("").unwrap());
        assert!(revoke_query("revoke=yes").is_err());
        assert!(revoke_query("revok=true").is_err());
    }

    #[tokio::test]
    async fn the_api_token_file_is_reloaded_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        std::fs::write(&path, "first-token\n").unwrap();
        let auth = ApiToken::load(path.clone()).await.unwrap();
        let sha = |s: &str| -> [u8; 32] { Sha256::digest(s.as_bytes()).into() };
        assert_eq!(auth.digest().await.unwrap(), sha("first-token"));
        std::fs::write(&path, "the-second-token").unwrap();
        assert_eq!(auth.digest().await.unwrap(), sha("the-second-token"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            auth.digest().await,
            Err(ApiTokenError::Empty { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            auth.digest().await,
            Err(ApiTokenError::Read { .. })
        ));
        assert!(ApiToken::load(path).await.is_err());
    }
}
