//! The built-in dev token issuer: a local OAuth2 token endpoint speaking Flinks'
//! `POST /api/v1/token` contract, with failure switches and observation hooks for the local demo,
//! the integration tests (in-process) and the benchmarks (as a subprocess the CLI starts).
//!
//! # Token endpoint
//! `POST /api/v1/token` (alias `POST /token`) takes an `application/json` or
//! `application/x-www-form-urlencoded` body of at most [`MAX_BODY`] bytes. The client
//! authenticates with `client_id`/`client_secret` body fields or with HTTP Basic
//! (`client_secret_basic`: Base64 of `form-urlencode(id):form-urlencode(secret)`), never both.
//! `client_credentials` needs the secret; `authorization_code` and `refresh_token` need a known
//! `client_id` and check the secret only when one is sent (public clients).
//!
//! Grants: `client_credentials`; `authorization_code` (a configured code, usable once, and the
//! configured `redirect_uri` if any; answers a new `refresh_token`); `refresh_token` (a refresh
//! token the issuer knows; like Flinks it answers no new refresh token unless
//! [`IssuerOptions::rotate_refresh_tokens`] is set, which then also retires the old one).
//!
//! Success is `200 {access_token, token_type: "Bearer", expires_in, scope?, refresh_token?}`
//! with `Cache-Control: no-store` (RFC 6749 §5.1). Access tokens are JWT-shaped
//! (`header.claims.signature`, Base64url) with claims `client_id`, `sub`, `iat`, `exp`, `jti` and
//! `scope` when one was requested; the signature part is random bytes and nobody can verify it.
//!
//! Errors are `{error, error_description}` JSON, following RFC 6749 §5.2:
//! * 400 `invalid_request`: unparsable body, unsupported content type, a repeated parameter,
//!   a missing `grant_type`/`code`/`refresh_token`/`redirect_uri`, a malformed `Authorization`
//!   header, or two client authentication methods at once;
//! * 400 `invalid_client`: unknown client, wrong or missing secret, sent in the body;
//! * 401 `invalid_client` with `WWW-Authenticate: Basic`: the same, when the client tried the
//!   `Authorization` header (RFC 6749 §5.2 requires 401 then);
//! * 400 `invalid_grant`: unknown or spent code, unknown refresh token, `redirect_uri` mismatch;
//! * 400 `unsupported_grant_type`: any other grant;
//! * 405 (not `POST`), 413 (body over [`MAX_BODY`]), 404 (other paths), all as
//!   `invalid_request`.
//!
//! # Failure switches and observation
//! [`IssuerControl`] (from [`DevIssuer::control`], cloneable) queues injected failures, adds a
//! delay, changes the lifetime, rotates client secrets, adds codes and refresh tokens, and reports
//! what the issuer received and issued. When [`IssuerOptions::control_api`] is set the same
//! switches are reachable over HTTP on the issuer's own port:
//!
//! | request | parameters (query string, JSON or form body) |
//! |---|---|
//! | `POST /control/fail` | `kind` = `server_error` (500) \| `unavailable` (503) \| `rate_limited` (429, `retry_after` seconds, default 1) \| `oauth_error` (400, `error` code, default `invalid_grant`) \| `malformed` (200 HTML); `count` (default 1) |
//! | `POST /control/clear_faults` | none |
//! | `POST /control/delay` | `ms`: delay before every token answer (0 turns it off) |
//! | `POST /control/lifetime` | `secs`: access token lifetime from now on |
//! | `POST /control/client_secret` | `client_id`, `client_secret`: the client's only valid secret from now on |
//! | `POST /control/codes` | `code` (repeatable, or a JSON array); `replace=true` drops the old ones |
//! | `POST /control/refresh_tokens` | `refresh_token` (repeatable, or a JSON array); `replace=true` drops the old ones |
//! | `GET /control/stats` | answers `{token_requests, by_grant, issued_tokens, pending_faults}` |
//!
//! Control answers are `200 {"ok":true}`, or `400 {error, error_description}` on bad parameters.
//! Control requests are not token requests: they are neither counted, logged, delayed nor failed.
//!
//! Secrets, codes and tokens never reach a log line: tracing (debug level) shows only the grant
//! type, client id and status.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use url::form_urlencoded;

use crate::config::GrantType;
use crate::secret::Secret;

/// The token endpoint path (Flinks').
pub const TOKEN_PATH: &str = "/api/v1/token";
/// A second path for the token endpoint, the common OAuth2 spelling.
const TOKEN_ALIAS: &str = "/token";
/// Prefix of the control API paths.
const CONTROL_PREFIX: &str = "/control/";
/// Largest accepted request body. A token request is a few hundred bytes; 64 KiB leaves ample
/// room for long fields while refusing a runaway client.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest accepted access token lifetime (one year). Keeps `SystemTime` arithmetic and the
/// `exp` claim far from overflow whatever a test asks for.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most entries kept in the request log and the issued-token list; older ones are dropped so a
/// long soak run keeps bounded memory. Counters and validity checks are not affected.
const LOG_CAP: usize = 10_000;
/// How long `serve` lets in-flight requests finish after shutdown before cutting connections:
/// ample for a loopback token request, short enough that a configured delay cannot hold up a
/// test that stops the issuer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Random bytes in a refresh token (192 bits: unguessable, and 32 Base64url characters).
const REFRESH_TOKEN_BYTES: usize = 24;
/// Random bytes in a `jti` claim (128 bits: unique across any test run).
const JTI_BYTES: usize = 16;
/// The `WWW-Authenticate` challenge sent with a 401.
const BASIC_CHALLENGE: &str = "Basic realm=\"bearer-proxy dev issuer\"";
/// The body of a `malformed` answer: what a misrouted request to a web server or a captive
/// portal looks like.
const MALFORMED_BODY: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
     <body><h1>Bad Gateway</h1><p>The upstream server is unreachable.</p></body></html>\n";

/// How the dev issuer starts out. Everything except `control_api` can be changed later through
/// [`IssuerControl`].
#[derive(Clone)]
pub struct IssuerOptions {
    /// Access token lifetime (`expires_in` and the `exp` claim). Flinks issues 300s tokens.
    /// Values above one year are clamped to one year; zero issues already-expired tokens.
    pub lifetime: Duration,
    /// Valid clients as `(client_id, client_secret)`. A repeated id keeps its last secret.
    pub clients: Vec<(String, String)>,
    /// Authorization codes the `authorization_code` grant accepts, each once.
    pub codes: Vec<String>,
    /// Refresh tokens the `refresh_token` grant accepts.
    pub refresh_tokens: Vec<String>,
    /// When set, the `authorization_code` grant needs exactly this `redirect_uri`, and a
    /// `refresh_token` grant that sends one must send exactly this.
    pub redirect_uri: Option<String>,
    /// The `refresh_token` grant answers a new refresh token and retires the one it received.
    /// Off by default: Flinks' refresh tokens do not change when exchanged.
    pub rotate_refresh_tokens: bool,
    /// Every grant answers exactly this access token (benchmarks compare it byte for byte).
    pub fixed_token: Option<String>,
    /// Serve the `/control/...` endpoints. On by default: this is a dev tool meant to be bound
    /// to loopback.
    pub control_api: bool,
    /// The `sub` claim (the user at the bank, for Flinks).
    pub subject: String,
}

impl Default for IssuerOptions {
    /// 300s tokens like Flinks, the client `demo-client`/`demo-secret`, the code `demo-code`,
    /// the refresh token `demo-refresh-token`, no redirect URI check, control API on.
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(300),
            clients: vec![("demo-client".into(), "demo-secret".into())],
            codes: vec!["demo-code".into()],
            refresh_tokens: vec!["demo-refresh-token".into()],
            redirect_uri: None,
            rotate_refresh_tokens: false,
            fixed_token: None,
            control_api: true,
            subject: "dev-user-0001".into(),
        }
    }
}

impl fmt::Debug for IssuerOptions {
    /// Shows client ids and counts, never secrets, codes or tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.clients.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("IssuerOptions")
            .field("lifetime", &self.lifetime)
            .field("clients", &ids)
            .field("codes", &self.codes.len())
            .field("refresh_tokens", &self.refresh_tokens.len())
            .field("redirect_uri", &self.redirect_uri)
            .field("rotate_refresh_tokens", &self.rotate_refresh_tokens)
            .field("fixed_token", &self.fixed_token.is_some())
            .field("control_api", &self.control_api)
            .field("subject", &self.subject)
            .finish()
    }
}

/// An injected failure, answered instead of the real result (see [`IssuerControl::fail_next`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 `server_error`.
    ServerError,
    /// 503 `temporarily_unavailable`.
    Unavailable,
    /// 429 `temporarily_unavailable` with `Retry-After: <retry_after_secs>`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u32,
    },
    /// 400 with this OAuth error code (`invalid_grant`, `invalid_client`, `access_denied`, …).
    OAuthError(String),
    /// 200 with an HTML body (`text/html`): not JSON, not a token.
    Malformed,
    /// Exactly this answer, for what no well-behaved server sends: a redirect, a 404 page, an
    /// error echoing a secret, a token with a lifetime of zero or an `exp` in the past. A
    /// status that is not a valid code is answered 500; invalid header names or values are
    /// left out.
    Raw {
        /// The status code.
        status: u16,
        /// Header lines, in order.
        headers: Vec<(String, String)>,
        /// The body, verbatim.
        body: String,
    },
}

/// One request the token endpoint received, as the request log keeps it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// When it arrived.
    pub received_at: SystemTime,
    /// HTTP method.
    pub method: Method,
    /// Path, without the query string.
    pub path: String,
    /// The `Content-Type` header, verbatim.
    pub content_type: Option<String>,
    /// Whether an `Authorization` header was present.
    pub has_authorization: bool,
    /// `grant_type`, if the body could be parsed and had one.
    pub grant_type: Option<String>,
    /// The client id from HTTP Basic, else from the body.
    pub client_id: Option<String>,
    /// `refresh_token` as received.
    pub refresh_token: Option<Secret>,
    /// `code` as received.
    pub code: Option<Secret>,
    /// `redirect_uri` as received.
    pub redirect_uri: Option<String>,
    /// `scope` as received.
    pub scope: Option<String>,
}

/// One access token the issuer handed out.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token.
    pub access_token: Secret,
    /// When it was issued.
    pub issued_at: SystemTime,
    /// When it expires (`issued_at + lifetime`).
    pub expires_at: SystemTime,
    /// The grant that bought it.
    pub grant_type: GrantType,
    /// The client it was issued to.
    pub client_id: String,
}

/// A bound, not yet serving, dev issuer.
pub struct DevIssuer {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Binds the listening socket (`127.0.0.1:0` picks a free port). Nothing is served until
    /// [`DevIssuer::serve`] runs, but connections queue in the backlog meanwhile.
    pub async fn bind(addr: SocketAddr, opts: IssuerOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(Shared::new(opts)),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>` with no trailing slash; an unspecified bind address (`0.0.0.0`, `::`)
    /// is replaced by loopback so the URL can be connected to.
    pub fn base_url(&self) -> String {
        let mut addr = self.local_addr;
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        format!("http://{addr}")
    }

    /// The token endpoint URL, `<base_url>/api/v1/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// A handle on the switches and observations; it stays usable after `serve` returns.
    pub fn control(&self) -> IssuerControl {
        IssuerControl {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` resolves, each connection in its own task. Then it stops
    /// accepting, lets in-flight requests finish for up to a second, closes every connection
    /// and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let DevIssuer {
            listener, shared, ..
        } = self;
        let mut http = hyper::server::conn::http1::Builder::new();
        // The timer enables hyper's header read timeout, so an idle half-open client cannot pin
        // a task forever.
        http.timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let shared = Arc::clone(&shared);
                        let service = service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                        });
                        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                        connections.spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "dev issuer: connection error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dev issuer: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("dev issuer: cutting connections still busy after the grace period");
        }
        connections.shutdown().await;
    }
}

/// A cloneable handle on a dev issuer's failure switches and observations. Every method takes
/// effect immediately, for all connections.
#[derive(Clone)]
pub struct IssuerControl {
    shared: Arc<Shared>,
}

impl fmt::Debug for IssuerControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerControl").finish_non_exhaustive()
    }
}

impl IssuerControl {
    /// The next `count` token requests get `fault` instead of their real answer, whatever they
    /// contain. Faults queue in order: `fail_next(2, ServerError)` then
    /// `fail_next(1, Malformed)` fails two requests with 500, then one with HTML.
    pub fn fail_next(&self, count: u32, fault: Fault) {
        if count > 0 {
            self.shared.lock().faults.push_back((fault, count));
        }
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Waits this long before answering every token request (a slow endpoint);
    /// [`Duration::ZERO`] turns it off.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Access tokens issued from now on live this long (clamped to one year).
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.shared.lock().lifetime = lifetime.min(MAX_LIFETIME);
    }

    /// Makes `secret` the only valid secret of `client_id` (adding the client if new): a secret
    /// rotation, after which the old secret gets `invalid_client`.
    pub fn set_client_secret(&self, client_id: &str, secret: &str) {
        self.shared
            .lock()
            .clients
            .insert(client_id.to_owned(), secret.to_owned());
    }

    /// Adds valid authorization codes.
    pub fn add_codes<S: Into<String>>(&self, codes: impl IntoIterator<Item = S>) {
        self.shared
            .lock()
            .codes
            .extend(codes.into_iter().map(Into::into));
    }

    /// Replaces the valid authorization codes.
    pub fn replace_codes<S: Into<String>>(&self, codes: impl IntoIterator<Item = S>) {
        self.shared.lock().codes = codes.into_iter().map(Into::into).collect();
    }

    /// Adds valid refresh tokens.
    pub fn add_refresh_tokens<S: Into<String>>(&self, tokens: impl IntoIterator<Item = S>) {
        self.shared
            .lock()
            .refresh_tokens
            .extend(tokens.into_iter().map(Into::into));
    }

    /// Replaces the valid refresh tokens (including ones the issuer handed out).
    pub fn replace_refresh_tokens<S: Into<String>>(&self, tokens: impl IntoIterator<Item = S>) {
        self.shared.lock().refresh_tokens = tokens.into_iter().map(Into::into).collect();
    }

    /// Token endpoint requests received so far (any method, including refused and failed ones).
    pub fn request_count(&self) -> u64 {
        self.shared.lock().request_count
    }

    /// Token endpoint requests received so far whose body named this `grant_type`
    /// (e.g. `GrantType::RefreshToken.as_str()`; unknown grant names are counted too).
    pub fn request_count_for(&self, grant_type: &str) -> u64 {
        self.shared
            .lock()
            .by_grant
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// The request log, oldest first (the last 10 000 token endpoint requests).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// Access tokens handed out, oldest first (the last 10 000).
    pub fn issued_tokens(&self) -> Vec<IssuedToken> {
        self.shared.lock().issued.iter().cloned().collect()
    }

    /// How many access tokens were handed out in all.
    pub fn issued_count(&self) -> u64 {
        self.shared.lock().issued_count
    }

    /// Whether `token` was issued by this issuer and has not expired.
    pub fn is_valid_token(&self, token: &str) -> bool {
        self.is_valid_token_at(token, SystemTime::now())
    }

    /// Whether `token` was issued by this issuer and is still valid at `now`. With
    /// [`IssuerOptions::fixed_token`] the latest expiry of that token counts.
    pub fn is_valid_token_at(&self, token: &str, now: SystemTime) -> bool {
        self.shared
            .lock()
            .valid
            .get(token)
            .is_some_and(|expires_at| now < *expires_at)
    }
}

/// State shared by the server's connections and every control handle.
struct Shared {
    /// Whether `/control/...` is served; fixed at bind time.
    control_api: bool,
    /// Everything else. Held only for short synchronous sections, never across an await.
    inner: Mutex<Inner>,
}

struct Inner {
    lifetime: Duration,
    /// client id → its one valid secret.
    clients: HashMap<String, String>,
    codes: HashSet<String>,
    refresh_tokens: HashSet<String>,
    redirect_uri: Option<String>,
    rotate_refresh_tokens: bool,
    fixed_token: Option<String>,
    subject: String,
    /// Queued faults with how many requests each still applies to (always > 0).
    faults: VecDeque<(Fault, u32)>,
    delay: Duration,
    request_count: u64,
    by_grant: BTreeMap<String, u64>,
    log: VecDeque<RecordedRequest>,
    issued: VecDeque<IssuedToken>,
    issued_count: u64,
    /// Every issued token still possibly valid → its latest expiry.
    valid: HashMap<String, SystemTime>,
}

impl Shared {
    fn new(opts: IssuerOptions) -> Self {
        Self {
            control_api: opts.control_api,
            inner: Mutex::new(Inner {
                lifetime: opts.lifetime.min(MAX_LIFETIME),
                clients: opts.clients.into_iter().collect(),
                codes: opts.codes.into_iter().collect(),
                refresh_tokens: opts.refresh_tokens.into_iter().collect(),
                redirect_uri: opts.redirect_uri,
                rotate_refresh_tokens: opts.rotate_refresh_tokens,
                fixed_token: opts.fixed_token,
                subject: opts.subject,
                faults: VecDeque::new(),
                delay: Duration::ZERO,
                request_count: 0,
                by_grant: BTreeMap::new(),
                log: VecDeque::new(),
                issued: VecDeque::new(),
                issued_count: 0,
                valid: HashMap::new(),
            }),
        }
    }

    /// The state. A panic while holding the lock cannot leave it inconsistent in a way that
    /// matters to a test double, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts and logs a token endpoint request.
    fn record(&self, request: RecordedRequest) {
        let mut inner = self.lock();
        inner.request_count += 1;
        if let Some(grant) = &request.grant_type {
            *inner.by_grant.entry(grant.clone()).or_default() += 1;
        }
        if inner.log.len() >= LOG_CAP {
            inner.log.pop_front();
        }
        inner.log.push_back(request);
    }

    /// Consumes one application of the first queued fault, if any.
    fn take_fault(&self) -> Option<Fault> {
        let mut inner = self.lock();
        let (fault, remaining) = inner.faults.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            inner.faults.pop_front();
        }
        Some(fault)
    }

    /// Runs a grant: authenticates the client, checks and consumes the grant, issues a token.
    fn grant(&self, params: &Params, basic: Option<BasicAuth>) -> Result<Granted, OAuthError> {
        let grant_name = params
            .one("grant_type")?
            .ok_or_else(|| OAuthError::invalid_request("grant_type missing"))?;
        let grant = match grant_name {
            "client_credentials" => Some(GrantType::ClientCredentials),
            "authorization_code" => Some(GrantType::AuthorizationCode),
            "refresh_token" => Some(GrantType::RefreshToken),
            _ => None,
        };
        let scope = params.one("scope")?.map(str::to_owned);
        let redirect_uri = params.one("redirect_uri")?;
        let mut inner = self.lock();
        let client_id =
            inner.authenticate(params, basic, grant == Some(GrantType::ClientCredentials))?;
        let Some(grant) = grant else {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "the grant_type is not one of client_credentials, authorization_code, \
                 refresh_token",
            ));
        };
        let refresh_token = match grant {
            GrantType::ClientCredentials => None,
            GrantType::AuthorizationCode => {
                let code = params
                    .one("code")?
                    .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
                if !inner.codes.contains(code) {
                    return Err(OAuthError::invalid_grant(
                        "unknown or already used authorization code",
                    ));
                }
                if let Some(expected) = &inner.redirect_uri {
                    match redirect_uri {
                        None => return Err(OAuthError::invalid_request("redirect_uri missing")),
                        Some(sent) if sent != expected => {
                            return Err(OAuthError::invalid_grant("redirect_uri mismatch"));
                        }
                        Some(_) => {}
                    }
                }
                // Used once: gone even if something below failed (nothing below can).
                inner.codes.remove(code);
                let new = new_refresh_token();
                inner.refresh_tokens.insert(new.clone());
                Some(new)
            }
            GrantType::RefreshToken => {
                let sent = params
                    .one("refresh_token")?
                    .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
                if let (Some(expected), Some(uri)) = (&inner.redirect_uri, redirect_uri)
                    && uri != expected
                {
                    return Err(OAuthError::invalid_grant("redirect_uri mismatch"));
                }
                if !inner.refresh_tokens.contains(sent) {
                    return Err(OAuthError::invalid_grant("unknown refresh token"));
                }
                if inner.rotate_refresh_tokens {
                    inner.refresh_tokens.remove(sent);
                    let new = new_refresh_token();
                    inner.refresh_tokens.insert(new.clone());
                    Some(new)
                } else {
                    None
                }
            }
        };
        let expires_in = inner.lifetime.as_secs();
        let access_token = inner.issue(&client_id, grant, scope.as_deref(), SystemTime::now());
        Ok(Granted {
            access_token,
            expires_in,
            scope,
            refresh_token,
        })
    }
}

impl Inner {
    /// Authenticates the client and returns its id. With `secret_required` false (public
    /// clients) a known `client_id` alone is enough, but a secret that is sent must be right.
    fn authenticate(
        &self,
        params: &Params,
        basic: Option<BasicAuth>,
        secret_required: bool,
    ) -> Result<String, OAuthError> {
        let body_id = params.one("client_id")?;
        let body_secret = params.one("client_secret")?;
        let (client_id, secret, via_header) = match basic {
            Some(BasicAuth::Invalid(e)) => return Err(e),
            Some(BasicAuth::Credentials { id, secret }) => {
                if body_secret.is_some() {
                    return Err(OAuthError::invalid_request(
                        "client authenticated both with HTTP Basic and a client_secret field",
                    ));
                }
                if body_id.is_some_and(|b| b != id) {
                    return Err(OAuthError::invalid_request(
                        "the client_id field differs from the HTTP Basic user",
                    ));
                }
                (id, Some(secret), true)
            }
            None => match body_id {
                Some(id) => (id.to_owned(), body_secret.map(str::to_owned), false),
                None => {
                    return Err(OAuthError::invalid_client(
                        false,
                        "no client authentication",
                    ));
                }
            },
        };
        let Some(expected) = self.clients.get(&client_id) else {
            return Err(OAuthError::invalid_client(via_header, "unknown client"));
        };
        match secret {
            Some(secret) if secret == *expected => Ok(client_id),
            Some(_) => Err(OAuthError::invalid_client(
                via_header,
                "wrong client secret",
            )),
            None if secret_required => Err(OAuthError::invalid_client(
                via_header,
                "client_secret missing",
            )),
            None => Ok(client_id),
        }
    }

    /// Issues an access token at `now` and remembers it.
    fn issue(
        &mut self,
        client_id: &str,
        grant: GrantType,
        scope: Option<&str>,
        now: SystemTime,
    ) -> String {
        let expires_at = now + self.lifetime;
        let token = match &self.fixed_token {
            Some(fixed) => fixed.clone(),
            None => jwt_shaped(client_id, &self.subject, scope, now, expires_at),
        };
        if self.valid.len() >= LOG_CAP {
            // Forgetting expired tokens does not change any answer of `is_valid_token`.
            self.valid.retain(|_, exp| *exp > now);
        }
        let latest = self.valid.entry(token.clone()).or_insert(expires_at);
        *latest = (*latest).max(expires_at);
        if self.issued.len() >= LOG_CAP {
            self.issued.pop_front();
        }
        self.issued.push_back(IssuedToken {
            access_token: Secret::new(token.clone()),
            issued_at: now,
            expires_at,
            grant_type: grant,
            client_id: client_id.to_owned(),
        });
        self.issued_count += 1;
        token
    }
}

/// A successful grant.
struct Granted {
    access_token: String,
    expires_in: u64,
    scope: Option<String>,
    refresh_token: Option<String>,
}

/// An OAuth error answer.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: &'static str,
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: &'static str) -> Self {
        Self {
            status,
            code,
            description,
        }
    }

    fn invalid_request(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    /// `invalid_client`: 401 if the client tried the `Authorization` header, else 400
    /// (RFC 6749 §5.2).
    fn invalid_client(via_header: bool, description: &'static str) -> Self {
        let status = if via_header {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, "invalid_client", description)
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = error_response(self.status, self.code, self.description);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(BASIC_CHALLENGE));
        }
        response
    }
}

/// What the `Authorization` header said.
enum BasicAuth {
    /// Well-formed Basic credentials, form-url-decoded.
    Credentials { id: String, secret: String },
    /// A header that is not usable Basic credentials.
    Invalid(OAuthError),
}

/// Reads HTTP Basic client credentials (`client_secret_basic`, RFC 6749 §2.3.1): Base64 of
/// `form-urlencode(id):form-urlencode(secret)`. `None` without an `Authorization` header.
fn basic_auth(headers: &HeaderMap) -> Option<BasicAuth> {
    let value = headers.get(AUTHORIZATION)?;
    Some(match parse_basic(value) {
        Ok((id, secret)) => BasicAuth::Credentials { id, secret },
        Err(e) => BasicAuth::Invalid(e),
    })
}

fn parse_basic(value: &HeaderValue) -> Result<(String, String), OAuthError> {
    let malformed = || OAuthError::invalid_request("malformed HTTP Basic credentials");
    let text = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(OAuthError::invalid_client(
            true,
            "only HTTP Basic client authentication is supported",
        ));
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok((form_decode(id), form_decode(secret)))
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space, `%XX` a byte).
fn form_decode(component: &str) -> String {
    // The form parser splits on `&` and `=`; writing those as their escapes first keeps the
    // input a single name whose decoding is exactly the component's.
    let escaped = component.replace('&', "%26").replace('=', "%3D");
    form_urlencoded::parse(escaped.as_bytes())
        .next()
        .map(|(name, _)| name.into_owned())
        .unwrap_or_default()
}

/// Request parameters in arrival order. A name can repeat (form `a=1&a=2`, a JSON array).
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    /// Parses a body by its media type. An empty body has no parameters whatever its type.
    fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, OAuthError> {
        if body.is_empty() {
            return Ok(Self::default());
        }
        let media_type = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|mt| mt.trim().to_ascii_lowercase());
        match media_type.as_deref() {
            Some("application/json") => Self::from_json(body),
            Some("application/x-www-form-urlencoded") => Ok(Self::from_form(body)),
            _ => Err(OAuthError::invalid_request(
                "unsupported content type: send application/json or \
                 application/x-www-form-urlencoded",
            )),
        }
    }

    fn from_form(body: &[u8]) -> Self {
        Self(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// A JSON object of strings, numbers, booleans, nulls (skipped) and arrays of those.
    fn from_json(body: &[u8]) -> Result<Self, OAuthError> {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
            return Err(OAuthError::invalid_request("the body is not a JSON object"));
        };
        let mut params = Vec::with_capacity(object.len());
        for (name, value) in object {
            match value {
                Value::Array(items) => {
                    for item in items {
                        params.push((name.clone(), json_scalar(item)?));
                    }
                }
                Value::Null => {}
                other => params.push((name, json_scalar(other)?)),
            }
        }
        Ok(Self(params))
    }

    /// The value of `name`; a repeated parameter is an error (RFC 6749 §3.2).
    fn one(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(OAuthError::invalid_request("a parameter is repeated"));
        }
        Ok(first)
    }

    /// The first value of `name`, repeated or not.
    fn first(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// Every value of `name`.
    fn all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn json_scalar(value: Value) -> Result<String, OAuthError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(OAuthError::invalid_request(
            "JSON parameters must be strings, numbers or booleans",
        )),
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Broken,
}

async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// Routes a request.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == TOKEN_PATH || path == TOKEN_ALIAS {
        return token_endpoint(shared, req).await;
    }
    if shared.control_api
        && let Some(command) = path.strip_prefix(CONTROL_PREFIX)
    {
        let command = command.to_owned();
        return control_endpoint(shared, &command, req).await;
    }
    error_response(StatusCode::NOT_FOUND, "invalid_request", "no such endpoint")
}

/// `POST /api/v1/token`: record, delay, injected fault, then the real grant.
async fn token_endpoint(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let content_type = header_string(&parts.headers, CONTENT_TYPE);
    let mut record = RecordedRequest {
        received_at: SystemTime::now(),
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        content_type: content_type.clone(),
        has_authorization: parts.headers.contains_key(AUTHORIZATION),
        grant_type: None,
        client_id: None,
        refresh_token: None,
        code: None,
        redirect_uri: None,
        scope: None,
    };
    if parts.method != Method::POST {
        shared.record(record);
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let body = match read_body(body, &parts.headers).await {
        Ok(body) => body,
        Err(e) => {
            shared.record(record);
            return match e {
                BodyError::TooLarge => error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "the request body is larger than 64 KiB",
                ),
                BodyError::Broken => error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request body could not be read",
                ),
            };
        }
    };
    let params = Params::parse(content_type.as_deref(), &body);
    let basic = basic_auth(&parts.headers);
    if let Ok(p) = &params {
        record.grant_type = p.first("grant_type").map(str::to_owned);
        record.client_id = p.first("client_id").map(str::to_owned);
        record.refresh_token = p.first("refresh_token").map(Secret::new);
        record.code = p.first("code").map(Secret::new);
        record.redirect_uri = p.first("redirect_uri").map(str::to_owned);
        record.scope = p.first("scope").map(str::to_owned);
    }
    if let Some(BasicAuth::Credentials { id, .. }) = &basic {
        record.client_id = Some(id.clone());
    }
    let grant_type = record.grant_type.clone();
    let client_id = record.client_id.clone();
    shared.record(record);

    let delay = shared.lock().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match shared.take_fault() {
        Some(fault) => fault_response(&fault),
        None => match params.and_then(|p| shared.grant(&p, basic)) {
            Ok(granted) => token_response(granted),
            Err(e) => e.into_response(),
        },
    };
    tracing::debug!(
        grant_type = grant_type.as_deref().unwrap_or("-"),
        client_id = client_id.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        "dev issuer: token request"
    );
    response
}

/// The control API (see the module documentation for the table of commands).
async fn control_endpoint(
    shared: &Shared,
    command: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if command == "stats" && (parts.method == Method::GET || parts.method == Method::POST) {
        let inner = shared.lock();
        let pending: u64 = inner.faults.iter().map(|(_, n)| u64::from(*n)).sum();
        return json_response(
            StatusCode::OK,
            &json!({
                "token_requests": inner.request_count,
                "by_grant": inner.by_grant,
                "issued_tokens": inner.issued_count,
                "pending_faults": pending,
            }),
        );
    }
    if parts.method != Method::POST {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "control commands take POST",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let body = match read_body(body, &parts.headers).await {
        Ok(body) => body,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read or is too large",
            );
        }
    };
    let content_type = header_string(&parts.headers, CONTENT_TYPE);
    let mut params = match Params::parse(content_type.as_deref(), &body) {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    if let Some(query) = parts.uri.query() {
        params.0.extend(Params::from_form(query.as_bytes()).0);
    }
    match apply_control(shared, command, &params) {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ok": true })),
        Err(ControlError::UnknownCommand) => error_response(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "unknown control command",
        ),
        Err(ControlError::BadParameter(description)) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "invalid_request", "error_description": description }),
        ),
    }
}

enum ControlError {
    UnknownCommand,
    BadParameter(String),
}

/// Carries out one control command.
fn apply_control(shared: &Shared, command: &str, params: &Params) -> Result<(), ControlError> {
    let mut inner = shared.lock();
    match command {
        "fail" => {
            let count: u32 = number(params, "count", Some(1))?;
            let fault = match required(params, "kind")? {
                "server_error" => Fault::ServerError,
                "unavailable" | "temporarily_unavailable" => Fault::Unavailable,
                "rate_limited" => Fault::RateLimited {
                    retry_after_secs: number(params, "retry_after", Some(1))?,
                },
                "oauth_error" => {
                    let code = param(params, "error")?.unwrap_or("invalid_grant");
                    if code.is_empty() {
                        return Err(ControlError::BadParameter("error is empty".into()));
                    }
                    Fault::OAuthError(code.to_owned())
                }
                "malformed" => Fault::Malformed,
                other => {
                    return Err(ControlError::BadParameter(format!(
                        "unknown kind {other:?}: use server_error, unavailable, rate_limited, \
                         oauth_error or malformed"
                    )));
                }
            };
            if count > 0 {
                inner.faults.push_back((fault, count));
            }
        }
        "clear_faults" => inner.faults.clear(),
        "delay" => inner.delay = Duration::from_millis(number(params, "ms", None)?),
        "lifetime" => {
            inner.lifetime = Duration::from_secs(number(params, "secs", None)?).min(MAX_LIFETIME);
        }
        "client_secret" => {
            let id = required(params, "client_id")?.to_owned();
            let secret = required(params, "client_secret")?.to_owned();
            inner.clients.insert(id, secret);
        }
        "codes" => {
            let replace = flag(params, "replace")?;
            let codes = params.all("code").map(str::to_owned);
            if replace {
                inner.codes = codes.collect();
            } else {
                inner.codes.extend(codes);
            }
        }
        "refresh_tokens" => {
            let replace = flag(params, "replace")?;
            let tokens = params.all("refresh_token").map(str::to_owned);
            if replace {
                inner.refresh_tokens = tokens.collect();
            } else {
                inner.refresh_tokens.extend(tokens);
            }
        }
        _ => return Err(ControlError::UnknownCommand),
    }
    Ok(())
}

fn param<'a>(params: &'a Params, name: &'static str) -> Result<Option<&'a str>, ControlError> {
    params
        .one(name)
        .map_err(|_| ControlError::BadParameter(format!("{name} is repeated")))
}

fn required<'a>(params: &'a Params, name: &'static str) -> Result<&'a str, ControlError> {
    param(params, name)?.ok_or_else(|| ControlError::BadParameter(format!("{name} missing")))
}

fn number<T: FromStr>(
    params: &Params,
    name: &'static str,
    default: Option<T>,
) -> Result<T, ControlError> {
    match (param(params, name)?, default) {
        (Some(text), _) => text.trim().parse().map_err(|_| {
            ControlError::BadParameter(format!("{name} is not a non-negative integer"))
        }),
        (None, Some(default)) => Ok(default),
        (None, None) => Err(ControlError::BadParameter(format!("{name} missing"))),
    }
}

fn flag(params: &Params, name: &'static str) -> Result<bool, ControlError> {
    match param(params, name)? {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(_) => Err(ControlError::BadParameter(format!(
            "{name} must be true or false"
        ))),
    }
}

fn header_string(headers: &HeaderMap, name: http::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A new random refresh token.
fn new_refresh_token() -> String {
    let mut bytes = [0u8; REFRESH_TOKEN_BYTES];
    rand::fill(&mut bytes);
    format!("rt-{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A JWT-shaped access token: Base64url header, claims and random "signature".
fn jwt_shaped(
    client_id: &str,
    subject: &str,
    scope: Option<&str>,
    issued_at: SystemTime,
    expires_at: SystemTime,
) -> String {
    let header = json!({ "alg": "HS256", "typ": "JWT" });
    let mut jti = [0u8; JTI_BYTES];
    rand::fill(&mut jti);
    let mut claims = Map::new();
    claims.insert("client_id".into(), client_id.into());
    claims.insert("sub".into(), subject.into());
    claims.insert("iat".into(), unix_secs(issued_at).into());
    claims.insert("exp".into(), unix_secs(expires_at).into());
    claims.insert("jti".into(), URL_SAFE_NO_PAD.encode(jti).into());
    if let Some(scope) = scope {
        claims.insert("scope".into(), scope.into());
    }
    // 32 bytes: the size of an HMAC-SHA256 signature, so the token looks like a real HS256 one.
    let mut signature = [0u8; 32];
    rand::fill(&mut signature);
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn token_response(granted: Granted) -> Response<Full<Bytes>> {
    let mut body = Map::new();
    body.insert("access_token".into(), granted.access_token.into());
    body.insert("token_type".into(), "Bearer".into());
    body.insert("expires_in".into(), granted.expires_in.into());
    if let Some(scope) = granted.scope {
        body.insert("scope".into(), scope.into());
    }
    if let Some(refresh_token) = granted.refresh_token {
        body.insert("refresh_token".into(), refresh_token.into());
    }
    json_response(StatusCode::OK, &Value::Object(body))
}

fn fault_response(fault: &Fault) -> Response<Full<Bytes>> {
    match fault {
        Fault::ServerError => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected failure: an unhandled error occurred on the server",
        ),
        Fault::Unavailable => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "injected failure: the server is temporarily unavailable",
        ),
        Fault::RateLimited { retry_after_secs } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "injected failure: too many requests",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            response
        }
        Fault::OAuthError(code) => {
            error_response(StatusCode::BAD_REQUEST, code, "injected failure")
        }
        Fault::Malformed => {
            let mut response =
                Response::new(Full::new(Bytes::from_static(MALFORMED_BODY.as_bytes())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Fault::Raw {
            status,
            headers,
            body,
        } => {
            let mut response = Response::new(Full::new(Bytes::from(body.clone())));
            *response.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    http::header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
    }
}

fn error_response(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": code, "error_description": description }),
    )
}

/// A JSON answer, never cached (RFC 6749 §5.1 asks that of token responses).
fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// A serving issuer and the means to stop it.
    struct Running {
        control: IssuerControl,
        base: String,
        url: String,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Running {
        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("serve returns after shutdown")
                .unwrap();
        }
    }

    async fn start(opts: IssuerOptions) -> Running {
        let issuer = DevIssuer::bind("127.0.0.1:0".parse().unwrap(), opts)
            .await
            .unwrap();
        let control = issuer.control();
        let base = issuer.base_url();
        let url = issuer.token_url();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(issuer.serve(async move {
            let _ = rx.await;
        }));
        Running {
            control,
            base,
            url,
            stop: Some(tx),
            task,
        }
    }

    fn client() -> reqwest::Client {
        // reqwest is built without a default crypto provider; plain http needs none, but the
        // builder wants one installed. A second install in the same process fails harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    /// Client credentials as body fields, JSON.
    fn cc_json() -> Value {
        json!({
            "grant_type": "client_credentials",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
        })
    }

    async fn post_json(url: &str, body: &Value) -> reqwest::Response {
        client().post(url).json(body).send().await.unwrap()
    }

    async fn post_form(url: &str, body: &[(&str, &str)]) -> reqwest::Response {
        let encoded = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(body)
            .finish();
        client()
            .post(url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(encoded)
            .send()
            .await
            .unwrap()
    }

    /// `client_secret_basic`: Base64 of form-urlencoded id and secret.
    fn basic_header(id: &str, secret: &str) -> String {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
        )
    }

    async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
        let (status, body) = json_of(response).await;
        (status, body["error"].as_str().unwrap().to_owned())
    }

    fn claims_of(token: &str) -> Value {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "JWT-shaped: {token}");
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["typ"], "JWT");
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 32);
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn client_credentials_json_body_issues_a_jwt_shaped_token() {
        let issuer = start(IssuerOptions::default()).await;
        let mut body = cc_json();
        body["scope"] = "client:admin".into();
        let response = post_json(&issuer.url, &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["scope"], "client:admin");
        assert!(body.get("refresh_token").is_none(), "{body}");
        let token = body["access_token"].as_str().unwrap();
        let claims = claims_of(token);
        assert_eq!(claims["client_id"], "demo-client");
        assert_eq!(claims["sub"], "dev-user-0001");
        assert_eq!(claims["scope"], "client:admin");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            300
        );
        assert!(!claims["jti"].as_str().unwrap().is_empty());
        assert!(issuer.control.is_valid_token(token));
        let issued = issuer.control.issued_tokens();
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].access_token.expose(), token);
        assert_eq!(issued[0].grant_type, GrantType::ClientCredentials);
        assert_eq!(
            issued[0]
                .expires_at
                .duration_since(issued[0].issued_at)
                .unwrap(),
            Duration::from_secs(300)
        );
        // Two tokens in a row differ (random jti and signature).
        let second = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_ne!(second["access_token"].as_str().unwrap(), token);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn form_body_and_token_alias_path_work() {
        let issuer = start(IssuerOptions::default()).await;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        let (status, body) = json_of(post_form(&issuer.url, &form).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            issuer
                .control
                .is_valid_token(body["access_token"].as_str().unwrap())
        );
        let alias = format!("{}/token", issuer.base);
        let (status, _) = json_of(post_form(&alias, &form).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(issuer.control.request_count(), 2);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn basic_auth_decodes_form_encoded_id_and_secret() {
        let secret = "s+cr/t:with%and space";
        let id = "id:with+plus";
        let issuer = start(IssuerOptions {
            clients: vec![(id.into(), secret.into())],
            ..IssuerOptions::default()
        })
        .await;
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header(id, secret))
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            claims_of(body["access_token"].as_str().unwrap())["client_id"],
            id
        );
        let log = issuer.control.requests();
        assert!(log[0].has_authorization);
        assert_eq!(log[0].client_id.as_deref(), Some(id));

        // A wrong secret over Basic: 401 with a challenge.
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header(id, "s+cr/t:with%and"))
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        assert!(response.headers().contains_key(WWW_AUTHENTICATE));
        assert_eq!(
            error_of(response).await,
            (StatusCode::UNAUTHORIZED, "invalid_client".into())
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn client_authentication_failures() {
        let issuer = start(IssuerOptions::default()).await;
        let mut wrong = cc_json();
        wrong["client_secret"] = "nope".into();
        assert_eq!(
            error_of(post_json(&issuer.url, &wrong).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );
        let mut unknown = cc_json();
        unknown["client_id"] = "stranger".into();
        assert_eq!(
            error_of(post_json(&issuer.url, &unknown).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );
        // client_credentials without a secret.
        let no_secret = json!({ "grant_type": "client_credentials", "client_id": "demo-client" });
        assert_eq!(
            error_of(post_json(&issuer.url, &no_secret).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );
        // Two methods at once.
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header("demo-client", "demo-secret"))
            .json(&cc_json())
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        // Not Basic.
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, "Bearer abc")
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::UNAUTHORIZED, "invalid_client".into())
        );
        // Basic but not Base64.
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, "Basic !!!")
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        assert!(issuer.control.issued_tokens().is_empty());
        issuer.stop().await;
    }

    #[tokio::test]
    async fn secret_rotation_through_the_handle() {
        let issuer = start(IssuerOptions::default()).await;
        issuer
            .control
            .set_client_secret("demo-client", "new-secret");
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );
        let mut rotated = cc_json();
        rotated["client_secret"] = "new-secret".into();
        assert_eq!(
            post_json(&issuer.url, &rotated).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn unknown_or_missing_grant_and_bad_bodies() {
        let issuer = start(IssuerOptions::default()).await;
        let mut body = cc_json();
        body["grant_type"] = "password".into();
        assert_eq!(
            error_of(post_json(&issuer.url, &body).await).await,
            (StatusCode::BAD_REQUEST, "unsupported_grant_type".into())
        );
        let body = json!({ "client_id": "demo-client", "client_secret": "demo-secret" });
        assert_eq!(
            error_of(post_json(&issuer.url, &body).await).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        // Not JSON although labelled so; a text/plain body; a repeated parameter.
        let response = client()
            .post(&issuer.url)
            .header(CONTENT_TYPE, "application/json")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        let response = client()
            .post(&issuer.url)
            .header(CONTENT_TYPE, "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        let form = [
            ("grant_type", "client_credentials"),
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        assert_eq!(
            error_of(post_form(&issuer.url, &form).await).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into())
        );
        // Too large, wrong method, wrong path.
        let response = client()
            .post(&issuer.url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(vec![b'a'; MAX_BODY + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let response = client().get(&issuer.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "POST");
        let response = client()
            .post(format!("{}/oauth/token", issuer.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(issuer.control.request_count(), 7);
        assert!(issuer.control.issued_tokens().is_empty());
        issuer.stop().await;
    }

    #[tokio::test]
    async fn authorization_code_works_once_and_its_refresh_token_works_repeatedly() {
        let issuer = start(IssuerOptions {
            codes: vec!["code-1".into()],
            redirect_uri: Some("https://app.example/cb".into()),
            ..IssuerOptions::default()
        })
        .await;
        let mut exchange = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "code": "code-1",
            "redirect_uri": "https://app.example/cb/",
        });
        // A redirect_uri that is not an exact match is refused and does not spend the code.
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        exchange["redirect_uri"] = "https://app.example/cb".into();
        let (status, body) = json_of(post_json(&issuer.url, &exchange).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let refresh_token = body["refresh_token"].as_str().unwrap().to_owned();
        assert!(
            issuer
                .control
                .is_valid_token(body["access_token"].as_str().unwrap())
        );
        // Spent.
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        // The refresh token buys tokens without a new refresh token, and keeps working.
        let refresh = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "refresh_token": refresh_token,
        });
        for _ in 0..2 {
            let (status, body) = json_of(post_json(&issuer.url, &refresh).await).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.get("refresh_token").is_none(), "{body}");
        }
        // A public client: the id alone is enough for the refresh grant.
        let public = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": refresh_token,
        });
        assert_eq!(
            post_json(&issuer.url, &public).await.status(),
            StatusCode::OK
        );
        let unknown = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": "rt-unknown",
        });
        assert_eq!(
            error_of(post_json(&issuer.url, &unknown).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(issuer.control.request_count_for("authorization_code"), 3);
        assert_eq!(issuer.control.request_count_for("refresh_token"), 4);
        assert_eq!(issuer.control.issued_count(), 4);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn refresh_token_rotation_retires_the_old_token() {
        let issuer = start(IssuerOptions {
            refresh_tokens: vec!["rt-first".into()],
            rotate_refresh_tokens: true,
            ..IssuerOptions::default()
        })
        .await;
        let form = |rt: &str| {
            vec![
                ("grant_type", "refresh_token".to_owned()),
                ("client_id", "demo-client".to_owned()),
                ("client_secret", "demo-secret".to_owned()),
                ("refresh_token", rt.to_owned()),
            ]
        };
        let send = |rt: String| {
            let url = issuer.url.clone();
            async move {
                let pairs = form(&rt);
                let pairs: Vec<(&str, &str)> =
                    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                post_form(&url, &pairs).await
            }
        };
        let (status, body) = json_of(send("rt-first".into()).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let second = body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(second, "rt-first");
        assert_eq!(
            error_of(send("rt-first".into()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let (status, body) = json_of(send(second.clone()).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(body["refresh_token"].as_str().unwrap(), second);
        // The log shows which refresh token each request sent.
        let sent: Vec<String> = issuer
            .control
            .requests()
            .iter()
            .map(|r| r.refresh_token.as_ref().unwrap().expose().to_owned())
            .collect();
        assert_eq!(sent, ["rt-first", "rt-first", second.as_str()]);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn request_log_records_what_was_sent_but_never_prints_secrets() {
        let issuer = start(IssuerOptions::default()).await;
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header("demo-client", "demo-secret"))
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body("grant_type=refresh_token&refresh_token=demo-refresh-token&scope=a+b")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let log = issuer.control.requests();
        assert_eq!(log.len(), 1);
        let r = &log[0];
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, TOKEN_PATH);
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        assert!(r.has_authorization);
        assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(r.client_id.as_deref(), Some("demo-client"));
        assert_eq!(
            r.refresh_token.as_ref().map(Secret::expose),
            Some("demo-refresh-token")
        );
        assert_eq!(r.scope.as_deref(), Some("a b"));
        assert!(r.code.is_none());
        let printed = format!("{log:?} {:?}", issuer.control.issued_tokens());
        assert!(!printed.contains("demo-refresh-token"), "{printed}");
        let token = issuer.control.issued_tokens()[0]
            .access_token
            .expose()
            .to_owned();
        assert!(!printed.contains(&token));
        let opts = format!("{:?}", IssuerOptions::default());
        assert!(
            !opts.contains("demo-secret") && !opts.contains("demo-code"),
            "{opts}"
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn server_errors_for_n_requests_then_recovery() {
        let issuer = start(IssuerOptions::default()).await;
        issuer.control.fail_next(2, Fault::ServerError);
        issuer.control.fail_next(1, Fault::Unavailable);
        for _ in 0..2 {
            assert_eq!(
                error_of(post_json(&issuer.url, &cc_json()).await).await,
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error".into())
            );
        }
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable".into()
            )
        );
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        assert_eq!(issuer.control.issued_count(), 1);
        assert_eq!(issuer.control.request_count_for("client_credentials"), 4);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn rate_limit_oauth_error_and_malformed_faults() {
        let issuer = start(IssuerOptions::default()).await;
        issuer.control.fail_next(
            1,
            Fault::RateLimited {
                retry_after_secs: 7,
            },
        );
        issuer
            .control
            .fail_next(1, Fault::OAuthError("invalid_grant".into()));
        issuer.control.fail_next(1, Fault::Malformed);
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let text = response.text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
        // Queued faults can be dropped.
        issuer.control.fail_next(5, Fault::ServerError);
        issuer.control.clear_faults();
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn delay_slows_every_token_answer() {
        let issuer = start(IssuerOptions::default()).await;
        // Long enough to tell apart from a loopback round trip, short enough for a unit test.
        let delay = Duration::from_millis(300);
        issuer.control.set_delay(delay);
        let started = tokio::time::Instant::now();
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        assert!(started.elapsed() >= delay);
        // A client that gives up sooner sees a timeout.
        let err = client()
            .post(&issuer.url)
            .json(&cc_json())
            .timeout(Duration::from_millis(50))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        issuer.control.set_delay(Duration::ZERO);
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn token_validity_follows_expiry() {
        let issuer = start(IssuerOptions {
            lifetime: Duration::from_secs(1),
            ..IssuerOptions::default()
        })
        .await;
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 1);
        let token = body["access_token"].as_str().unwrap();
        let control = &issuer.control;
        assert!(control.is_valid_token(token));
        assert!(!control.is_valid_token("not-a-token"));
        let expires_at = control.issued_tokens()[0].expires_at;
        assert!(control.is_valid_token_at(token, expires_at - Duration::from_millis(1)));
        assert!(!control.is_valid_token_at(token, expires_at));
        assert!(!control.is_valid_token_at(token, SystemTime::now() + Duration::from_secs(2)));

        // A zero lifetime issues tokens that are expired on arrival.
        control.set_lifetime(Duration::ZERO);
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 0);
        assert!(!control.is_valid_token(body["access_token"].as_str().unwrap()));
        issuer.stop().await;
    }

    #[tokio::test]
    async fn fixed_token_is_answered_by_every_grant() {
        let issuer = start(IssuerOptions {
            fixed_token: Some("bench-token".into()),
            ..IssuerOptions::default()
        })
        .await;
        let code = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": "demo-code",
        });
        let refresh = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": "demo-refresh-token",
        });
        for body in [cc_json(), code, refresh] {
            let (status, answer) = json_of(post_json(&issuer.url, &body).await).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            assert_eq!(answer["access_token"], "bench-token");
        }
        assert!(issuer.control.is_valid_token("bench-token"));
        assert_eq!(issuer.control.issued_count(), 3);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn control_api_over_http() {
        let issuer = start(IssuerOptions::default()).await;
        let control = |cmd: &str| format!("{}/control/{cmd}", issuer.base);
        let ok = |response: reqwest::Response| async move {
            let (status, body) = json_of(response).await;
            assert_eq!((status, &body), (StatusCode::OK, &json!({ "ok": true })));
        };

        // fail, by query string and by JSON body.
        ok(client()
            .post(control("fail") + "?kind=rate_limited&retry_after=3")
            .send()
            .await
            .unwrap())
        .await;
        ok(post_json(
            &control("fail"),
            &json!({ "kind": "server_error", "count": 2 }),
        )
        .await)
        .await;
        let stats = json_of(client().get(control("stats")).send().await.unwrap())
            .await
            .1;
        assert_eq!(stats["pending_faults"], 3);
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
        for _ in 0..2 {
            assert_eq!(
                post_json(&issuer.url, &cc_json()).await.status(),
                StatusCode::INTERNAL_SERVER_ERROR
            );
        }
        ok(post_form(
            &control("fail"),
            &[("kind", "oauth_error"), ("error", "access_denied")],
        )
        .await)
        .await;
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "access_denied".into())
        );
        ok(post_form(&control("fail"), &[("kind", "malformed"), ("count", "4")]).await).await;
        ok(client().post(control("clear_faults")).send().await.unwrap()).await;

        // lifetime
        ok(post_form(&control("lifetime"), &[("secs", "42")]).await).await;
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 42);

        // delay on and off
        ok(post_form(&control("delay"), &[("ms", "0")]).await).await;

        // client secret rotation
        ok(post_json(
            &control("client_secret"),
            &json!({ "client_id": "demo-client", "client_secret": "rotated" }),
        )
        .await)
        .await;
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );

        // codes and refresh tokens, added and replaced
        ok(post_json(&control("codes"), &json!({ "code": ["c1", "c2"] })).await).await;
        ok(post_json(&control("codes"), &json!({ "code": "c3", "replace": true })).await).await;
        let exchange = |code: &str| json!({ "grant_type": "authorization_code", "client_id": "demo-client", "code": code });
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange("c1")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(
            post_json(&issuer.url, &exchange("c3")).await.status(),
            StatusCode::OK
        );
        ok(post_form(
            &control("refresh_tokens"),
            &[("refresh_token", "r1"), ("replace", "true")],
        )
        .await)
        .await;
        let refresh = |rt: &str| json!({ "grant_type": "refresh_token", "client_id": "demo-client", "refresh_token": rt });
        assert_eq!(
            error_of(post_json(&issuer.url, &refresh("demo-refresh-token")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(
            post_json(&issuer.url, &refresh("r1")).await.status(),
            StatusCode::OK
        );

        // Bad commands and parameters.
        let response = post_form(&control("fail"), &[("kind", "explode")]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = post_form(&control("lifetime"), &[("secs", "-1")]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = client().post(control("nope")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        let stats = json_of(client().get(control("stats")).send().await.unwrap())
            .await
            .1;
        assert_eq!(stats["token_requests"], issuer.control.request_count());
        assert_eq!(stats["issued_tokens"], issuer.control.issued_count());
        assert_eq!(stats["by_grant"]["refresh_token"], 2);
        assert_eq!(stats["pending_faults"], 0);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn control_api_can_be_turned_off() {
        let issuer = start(IssuerOptions {
            control_api: false,
            ..IssuerOptions::default()
        })
        .await;
        let response = post_form(
            &format!("{}/control/fail", issuer.base),
            &[("kind", "server_error")],
        )
        .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn serve_returns_on_shutdown_and_stops_accepting() {
        let issuer = start(IssuerOptions::default()).await;
        let url = issuer.url.clone();
        let http = client();
        assert_eq!(
            http.post(&url)
                .json(&cc_json())
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        issuer.stop().await;
        // The pooled keep-alive connection was closed and no new one is accepted.
        assert!(http.post(&url).json(&cc_json()).send().await.is_err());
    }

    #[test]
    fn form_decoding_of_one_component() {
        assert_eq!(form_decode("a+b%2B%2F%3A%25"), "a b+/:%");
        assert_eq!(form_decode("raw&and=kept"), "raw&and=kept");
        assert_eq!(form_decode(""), "");
        assert_eq!(form_decode("bad%zz"), "bad%zz");
    }

    #[test]
    fn json_params_accept_scalars_and_arrays_only() {
        let p = Params::parse(
            Some("Application/JSON; charset=utf-8"),
            br#"{"a":"x","n":5,"b":true,"z":null,"l":["1","2"]}"#,
        )
        .unwrap();
        assert_eq!(p.one("a").unwrap(), Some("x"));
        assert_eq!(p.one("n").unwrap(), Some("5"));
        assert_eq!(p.one("b").unwrap(), Some("true"));
        assert_eq!(p.one("z").unwrap(), None);
        assert!(p.one("l").is_err());
        assert_eq!(p.all("l").collect::<Vec<_>>(), ["1", "2"]);
        assert!(Params::parse(Some("application/json"), br#"{"a":{"b":1}}"#).is_err());
        assert!(Params::parse(Some("application/json"), b"[1]").is_err());
        assert!(Params::parse(None, b"a=1").is_err());
        assert!(Params::parse(None, b"").unwrap().0.is_empty());
    }
}
