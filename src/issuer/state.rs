//! What a dev issuer knows and hands out: the options it starts with ([`IssuerOptions`]), the
//! state its connections and control handles share, the request log, and the minting of
//! access and refresh tokens. Everything here is synchronous and behind one mutex; what belongs
//! to each end user (codes, refresh tokens, consent) is in `users.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Method;
use serde_json::{Map, Value, json};

use super::client_auth::{ClientAuthOptions, ClientAuthState};
use super::fault::Fault;
use super::users::{DEFAULT_CODE_LIFETIME, Users};
use crate::config::GrantType;
use crate::secret::Secret;
use crate::time::unix_secs;

/// Longest accepted access token lifetime (one year). Keeps `SystemTime` arithmetic and the
/// `exp` claim far from overflow whatever a test asks for.
pub(super) const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most entries kept in the request log and the issued-token list; older ones are dropped so a
/// long soak run keeps bounded memory. Counters and validity checks are not affected.
const LOG_CAP: usize = 10_000;
/// Random bytes in a refresh token (192 bits: unguessable, and 32 Base64url characters).
const REFRESH_TOKEN_BYTES: usize = 24;
/// Random bytes in a `jti` claim (128 bits: unique across any test run).
const JTI_BYTES: usize = 16;

/// How the dev issuer starts out. Everything except `control_api` can be changed later through
/// [`IssuerControl`](super::IssuerControl).
#[derive(Clone)]
pub struct IssuerOptions {
    /// Access token lifetime (`expires_in` and the `exp` claim). Flinks issues 300s tokens.
    /// Values above one year are clamped to one year; zero issues already-expired tokens.
    pub lifetime: Duration,
    /// Valid clients as `(client_id, client_secret)`. A repeated id keeps its last secret.
    pub clients: Vec<(String, String)>,
    /// Authorization codes the `authorization_code` grant accepts, each once, for the user
    /// `subject` (codes from `/api/v1/authorize` come on top).
    pub codes: Vec<String>,
    /// Refresh tokens the `refresh_token` grant accepts, the user `subject`'s.
    pub refresh_tokens: Vec<String>,
    /// When set, the `authorization_code` grant needs exactly this `redirect_uri`, and a
    /// `refresh_token` grant that sends one must send exactly this.
    pub redirect_uri: Option<String>,
    /// The `refresh_token` grant answers a new refresh token and retires the one it received;
    /// presenting a retired one again is `invalid_grant` and counted
    /// ([`IssuerControl::superseded_refresh_token_uses`](super::IssuerControl::superseded_refresh_token_uses)).
    /// Off by default: Flinks' refresh tokens do not change when exchanged.
    pub rotate_refresh_tokens: bool,
    /// Every grant answers exactly this access token (benchmarks compare it byte for byte).
    pub fixed_token: Option<String>,
    /// Serve the `/control/...` endpoints. On by default: this is a dev tool meant to be bound
    /// to loopback.
    pub control_api: bool,
    /// The default user: the `sub` claim (the user at the bank, for Flinks) of client
    /// credentials tokens and of tokens bought with `codes` and `refresh_tokens`. Tokens of
    /// other users name them instead.
    pub subject: String,
    /// How long a code from `/api/v1/authorize` can be exchanged (ten minutes by default, the
    /// most RFC 6749 §4.1.2 recommends; Flinks does not say).
    pub code_lifetime: Duration,
    /// HTTPS, client certificates and `private_key_jwt` (off by default).
    pub client_auth: ClientAuthOptions,
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
            code_lifetime: DEFAULT_CODE_LIFETIME,
            client_auth: ClientAuthOptions::default(),
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
            .field("code_lifetime", &self.code_lifetime)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// One request the token endpoint (or the revoke endpoint) received, as the request log keeps
/// it.
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
    /// The end user whose code or refresh token was presented (for the revoke endpoint: whose
    /// access token), if the issuer knows it; worked out on arrival, before any check.
    pub user: Option<String>,
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
    /// The end user it was issued for (its `sub` claim).
    pub user: String,
}

/// State shared by the server's connections and every control handle.
pub(super) struct Shared {
    /// Whether `/control/...` is served; fixed at bind time.
    pub(super) control_api: bool,
    /// Everything else. Held only for short synchronous sections, never across an await.
    inner: Mutex<Inner>,
}

/// The mutable state; see [`Shared::lock`].
pub(super) struct Inner {
    pub(super) lifetime: Duration,
    /// client id → its one valid secret.
    pub(super) clients: HashMap<String, String>,
    /// Codes, refresh tokens, consents and access tokens, per end user.
    pub(super) users: Users,
    pub(super) redirect_uri: Option<String>,
    pub(super) rotate_refresh_tokens: bool,
    pub(super) fixed_token: Option<String>,
    /// Queued faults with how many requests each still applies to (always > 0).
    pub(super) faults: VecDeque<(Fault, u32)>,
    pub(super) delay: Duration,
    pub(super) request_count: u64,
    pub(super) by_grant: BTreeMap<String, u64>,
    pub(super) log: VecDeque<RecordedRequest>,
    pub(super) issued: VecDeque<IssuedToken>,
    pub(super) issued_count: u64,
    /// Every issued token still possibly valid → its latest expiry.
    pub(super) valid: HashMap<String, SystemTime>,
    /// Certificate and assertion clients, and the assertion ids already used.
    pub(super) client_auth: ClientAuthState,
}

impl Shared {
    /// The starting state: `opts`, no faults, no delay, nothing logged or issued.
    pub(super) fn new(opts: IssuerOptions) -> Self {
        Self {
            control_api: opts.control_api,
            inner: Mutex::new(Inner {
                lifetime: opts.lifetime.min(MAX_LIFETIME),
                clients: opts.clients.into_iter().collect(),
                users: Users::new(
                    opts.subject,
                    opts.codes,
                    opts.refresh_tokens,
                    opts.code_lifetime,
                ),
                redirect_uri: opts.redirect_uri,
                rotate_refresh_tokens: opts.rotate_refresh_tokens,
                fixed_token: opts.fixed_token,
                faults: VecDeque::new(),
                delay: Duration::ZERO,
                request_count: 0,
                by_grant: BTreeMap::new(),
                log: VecDeque::new(),
                issued: VecDeque::new(),
                issued_count: 0,
                valid: HashMap::new(),
                client_auth: ClientAuthState::new(opts.client_auth),
            }),
        }
    }

    /// The state. A panic while holding the lock cannot leave it inconsistent in a way that
    /// matters to a test double, so poisoning is ignored.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts (in total, by grant and by user) and logs a token endpoint request.
    pub(super) fn record(&self, request: RecordedRequest) {
        let mut inner = self.lock();
        inner.request_count += 1;
        if let Some(grant) = &request.grant_type {
            *inner.by_grant.entry(grant.clone()).or_default() += 1;
            if let Some(user) = &request.user {
                inner.users.count_request(user, grant);
            }
        }
        inner.push_log(request);
    }

    /// Consumes one application of the first queued fault, if any.
    pub(super) fn take_fault(&self) -> Option<Fault> {
        let mut inner = self.lock();
        let (fault, remaining) = inner.faults.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            inner.faults.pop_front();
        }
        Some(fault)
    }
}

impl Inner {
    /// Appends to the request log, dropping the oldest entry past its cap.
    pub(super) fn push_log(&mut self, request: RecordedRequest) {
        if self.log.len() >= LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(request);
    }

    /// Issues an access token for `user` at `now` and remembers it.
    pub(super) fn issue(
        &mut self,
        client_id: &str,
        user: &str,
        grant: GrantType,
        scope: Option<&str>,
        now: SystemTime,
    ) -> String {
        let expires_at = now + self.lifetime;
        let token = match &self.fixed_token {
            Some(fixed) => fixed.clone(),
            None => jwt_shaped(client_id, user, scope, now, expires_at),
        };
        self.users.note_access_token(&token, user, expires_at, now);
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
            user: user.to_owned(),
        });
        self.issued_count += 1;
        token
    }
}

/// A new random refresh token.
pub(super) fn new_refresh_token() -> String {
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
