//! The operations behind the subjects API ([`super::api`]) over a running server's
//! [`Subjects`]: enrol a subject with an authorization code, import a refresh token, show, list,
//! delete (optionally revoking the consent first) and force a refresh. HTTP is not this
//! module's business: each operation returns a [`View`] or an [`OpError`] that the API turns
//! into a status and a JSON body.
//!
//! Rules every operation keeps:
//! - a code is recorded as spent ([`SubjectStore::spend_code`]) *before* it is sent, so no
//!   retry and no restart sends it twice;
//! - a subject's record (sealed refresh token, `active`, `enrolled_at`) is written before the
//!   enrolment is reported; a new enrolment of a known subject replaces its record
//!   (compare-and-set on its generation), which makes it `active` again;
//! - the first access token goes to the cache ([`SubjectTokens::prime`]), so the first
//!   proxied request costs no token request;
//! - nothing returned holds a token or a code: a [`View`] has times, states and ids only, and
//!   error messages come from the token client, which redacts what it sent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::StatusCode;
use tokio::time::Instant;

use super::SubjectId;
use super::record::{CodeDigest, Cursor, Record, StoreError, SubjectState};
use super::registry::Subjects;
use super::tokens::{SubjectTokenError, SubjectTokens};
use crate::config::{Config, TokenConfig};
use crate::error::Chain;
use crate::metrics::{EnrolResult, Metrics};
use crate::secret::Secret;
use crate::time::{from_unix_secs, rfc3339, unix_secs};
use crate::token::client::{FetchError, Grant, TokenClient, TokenResponse};
use crate::token::{AccessToken, ErrorKind};

/// Records written by one enrolment before it gives up on concurrent writers (a refresh of the
/// old record, another enrolment): each retry re-reads the record, and a writer that keeps
/// winning five times in a row is a bug, not load.
const MAX_WRITE_ATTEMPTS: usize = 5;

/// Why an operation failed; [`OpError::status`] and [`OpError::code`] are what the API sends.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// No per-subject token of that name.
    #[error("no per-subject token of that name")]
    UnknownToken,
    /// The subject is not enrolled.
    #[error("subject is not enrolled")]
    UnknownSubject,
    /// The code was spent before (by an earlier enrolment, whatever its outcome).
    #[error("this authorization code was already used; ask the customer to authorize again")]
    CodeSpent,
    /// The token endpoint refused the code or refresh token with an OAuth error.
    #[error("the token endpoint refused it: {message}")]
    Rejected {
        /// The OAuth `error`, one of the bounded reasons (`invalid_grant`, …, `other`).
        oauth_error: &'static str,
        /// The client's description of the answer (redacted).
        message: String,
    },
    /// The token endpoint could not be reached, failed, or answered something unusable.
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The token endpoint did not answer within the token's `timeout`.
    #[error("the token endpoint did not answer in time")]
    Timeout,
    /// The subject's consent is gone (`needs_reauth`): enrol a new code.
    #[error("the subject needs to consent again (needs_reauth); enrol a new code")]
    NeedsReauth,
    /// `?revoke=true` on a token without `revoke_url`.
    #[error("this token has no revoke_url; delete without revoke=true")]
    RevokeNotConfigured,
    /// The revoke endpoint did not confirm; the subject was kept.
    #[error("revocation failed, the subject was kept (retry, or delete without revoke): {0}")]
    RevokeFailed(String),
    /// The revoke endpoint did not answer in time; the subject was kept.
    #[error("the revoke endpoint did not answer in time; the subject was kept")]
    RevokeTimeout,
    /// A listing cursor this server did not hand out.
    #[error("invalid cursor: pass back next_cursor as it was received")]
    InvalidCursor,
    /// The subject store could not be reached (Redis down): nothing was changed, retry later.
    #[error("the subject store is unavailable: {0}")]
    StoreUnavailable(String),
    /// A local failure (store, key, credentials file).
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    /// The HTTP status the API answers with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            OpError::UnknownToken | OpError::UnknownSubject => StatusCode::NOT_FOUND,
            OpError::CodeSpent | OpError::NeedsReauth => StatusCode::CONFLICT,
            OpError::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            OpError::Unavailable(_) | OpError::RevokeFailed(_) => StatusCode::BAD_GATEWAY,
            OpError::Timeout | OpError::RevokeTimeout => StatusCode::GATEWAY_TIMEOUT,
            OpError::RevokeNotConfigured | OpError::InvalidCursor => StatusCode::BAD_REQUEST,
            OpError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code (the `error` field and the `x-bearer-proxy-error` header).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            OpError::UnknownToken => "unknown_token",
            OpError::UnknownSubject => "unknown_subject",
            OpError::CodeSpent => "code_already_used",
            OpError::Rejected { .. } => "token_endpoint_rejected",
            OpError::Unavailable(_) => "token_endpoint_unavailable",
            OpError::Timeout => "token_endpoint_timeout",
            OpError::NeedsReauth => "reauth_required",
            OpError::RevokeNotConfigured => "revoke_not_configured",
            OpError::RevokeFailed(_) => "revoke_failed",
            OpError::RevokeTimeout => "revoke_timeout",
            OpError::InvalidCursor => "invalid_cursor",
            OpError::StoreUnavailable(_) => "store_unavailable",
            OpError::Internal(_) => "internal_error",
        }
    }

    /// The OAuth `error` of a rejection, sent as `oauth_error`.
    pub(crate) fn oauth_error(&self) -> Option<&'static str> {
        match self {
            OpError::Rejected { oauth_error, .. } => Some(oauth_error),
            _ => None,
        }
    }

    /// The enrolment metric's result for this failure.
    fn enrol_result(&self) -> EnrolResult {
        match self {
            OpError::CodeSpent => EnrolResult::CodeSpent,
            OpError::Rejected { .. } => EnrolResult::Rejected,
            OpError::Unavailable(_) => EnrolResult::Unavailable,
            OpError::Timeout => EnrolResult::Timeout,
            _ => EnrolResult::Failed,
        }
    }

    fn store(e: StoreError) -> Self {
        match e {
            StoreError::CodeSpent => OpError::CodeSpent,
            StoreError::InvalidCursor => OpError::InvalidCursor,
            e @ StoreError::Io { .. } => OpError::StoreUnavailable(e.to_string()),
            e => OpError::Internal(e.to_string()),
        }
    }

    /// A failed token request. The client already replaced every secret it sent (the code, the
    /// refresh token, the client secret) in whatever text the server sent back.
    fn fetch(e: &FetchError) -> Self {
        match e {
            FetchError::Timeout => OpError::Timeout,
            FetchError::Credentials(_) | FetchError::Unusable(_) => {
                OpError::Internal(format!("{}", Chain(e)))
            }
            FetchError::Http { oauth: Some(_), .. } if e.kind() == ErrorKind::Rejected => {
                OpError::Rejected {
                    oauth_error: e.reason(),
                    message: e.to_string(),
                }
            }
            _ => OpError::Unavailable(format!("{}", Chain(e))),
        }
    }

    fn token(e: SubjectTokenError) -> Self {
        match e {
            SubjectTokenError::UnknownSubject => OpError::UnknownSubject,
            SubjectTokenError::NeedsReauth => OpError::NeedsReauth,
            SubjectTokenError::Timeout => OpError::Timeout,
            SubjectTokenError::Failed(m) => OpError::Unavailable(m),
        }
    }
}

/// What the API shows about one subject: never a token or a code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    /// The token entry.
    pub(crate) token: String,
    /// The subject.
    pub(crate) subject: SubjectId,
    /// `active` or `needs_reauth`.
    pub(crate) state: SubjectState,
    /// When the current refresh token was enrolled.
    pub(crate) enrolled_at: SystemTime,
    /// When its refresh token was last used successfully (recorded hourly at most).
    pub(crate) last_refresh: Option<SystemTime>,
    /// When a request last used it (recorded coarsely).
    pub(crate) last_use: Option<SystemTime>,
    /// The expiry of the access token held in memory, if one is.
    pub(crate) access_token_expires_at: Option<SystemTime>,
    /// The last refresh failure (an OAuth error code or a short cause).
    pub(crate) last_error: Option<String>,
    /// The id of the key that sealed the refresh token (for key rotation).
    pub(crate) key_id: String,
}

impl View {
    fn new(token: &SubjectTokens<TokenClient>, record: &Record) -> Self {
        Self {
            token: token.token_name().to_owned(),
            subject: record.subject.clone(),
            state: record.state,
            enrolled_at: from_unix_secs(record.enrolled_at),
            last_refresh: record.last_refresh.map(from_unix_secs),
            last_use: record.last_use.map(from_unix_secs),
            access_token_expires_at: token.peek(&record.subject).map(|t| t.expires_wall()),
            last_error: record.last_error.clone(),
            key_id: record.key_id().to_owned(),
        }
    }

    /// The JSON the API sends.
    pub(crate) fn json(&self) -> serde_json::Value {
        let time = |t: Option<SystemTime>| t.map(rfc3339);
        serde_json::json!({
            "token": self.token,
            "subject": self.subject.as_str(),
            "state": self.state.as_str(),
            "enrolled_at": rfc3339(self.enrolled_at),
            "last_refresh": time(self.last_refresh),
            "last_use": time(self.last_use),
            "access_token_expires_at": time(self.access_token_expires_at),
            "last_error": self.last_error,
            "key_id": self.key_id,
        })
    }
}

/// One page of a listing.
#[derive(Debug)]
pub(crate) struct Listing {
    /// The subjects, in the store's order.
    pub(crate) subjects: Vec<View>,
    /// Where the next page starts, if anything is left.
    pub(crate) next: Option<Cursor>,
}

/// A per-subject token entry as the operations see it.
struct Entry {
    tokens: Arc<SubjectTokens<TokenClient>>,
    cfg: TokenConfig,
    /// The client for `revoke_url`, when it is set.
    revoke: Option<reqwest::Client>,
}

/// The operations over a running server's subjects.
pub(crate) struct Operations {
    subjects: Arc<Subjects>,
    entries: BTreeMap<String, Entry>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("tokens", &self.entries.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Operations {
    /// The operations over `subjects`, with each token's configuration from `config`. Fails if
    /// a revoke client cannot be built (its CA file).
    pub(crate) fn new(
        config: &Config,
        subjects: Arc<Subjects>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut entries = BTreeMap::new();
        for name in subjects.token_names() {
            let (Some(tokens), Some(cfg)) = (subjects.entry(name), config.tokens.get(name)) else {
                continue;
            };
            let revoke = match &cfg.revoke_url {
                Some(_) => Some(
                    revoke_client(cfg)
                        .map_err(|e| anyhow::anyhow!("tokens.{name}.revoke_url: {e}"))?,
                ),
                None => None,
            };
            metrics.subject_enrolment_series(name);
            entries.insert(
                name.to_owned(),
                Entry {
                    tokens: tokens.clone(),
                    cfg: cfg.clone(),
                    revoke,
                },
            );
        }
        Ok(Self {
            subjects,
            entries,
            metrics,
        })
    }

    /// Whether `token` is a per-subject token.
    pub(crate) fn has_token(&self, token: &str) -> bool {
        self.entries.contains_key(token)
    }

    fn entry(&self, token: &str) -> Result<&Entry, OpError> {
        self.entries.get(token).ok_or(OpError::UnknownToken)
    }

    /// Exchanges `code` for `subject`'s tokens (with `redirect_uri` instead of the configured
    /// one, if given) and writes its record. The code is recorded as spent before it is sent.
    pub(crate) async fn enrol(
        &self,
        token: &str,
        subject: &SubjectId,
        code: Secret,
        redirect_uri: Option<String>,
    ) -> Result<View, OpError> {
        let result = self.enrol_inner(token, subject, code, redirect_uri).await;
        self.count(token, "code", subject, &result);
        result.map(|(view, _)| view)
    }

    async fn enrol_inner(
        &self,
        token: &str,
        subject: &SubjectId,
        code: Secret,
        redirect_uri: Option<String>,
    ) -> Result<(View, bool), OpError> {
        let entry = self.entry(token)?;
        self.subjects
            .store()
            .spend_code(token, subject, &CodeDigest::of(&code))
            .await
            .map_err(OpError::store)?;
        let sent_at = Instant::now();
        let sent_wall = SystemTime::now();
        let grant = Grant::AuthorizationCode(code);
        let answer = match redirect_uri {
            None => entry.tokens.exchange(&grant).await,
            Some(uri) => {
                let cfg = TokenConfig {
                    redirect_uri: Some(uri),
                    ..entry.cfg.clone()
                };
                let client = TokenClient::new(&cfg)
                    .map_err(|e| OpError::Internal(format!("token client: {e}")))?;
                let creds = entry
                    .tokens
                    .client_credentials()
                    .await
                    .map_err(|e| OpError::Internal(e.to_string()))?;
                client.fetch(&creds, &grant).await
            }
        };
        let response = answer.map_err(|e| OpError::fetch(&e))?;
        let Some(refresh_token) = response.refresh_token.clone() else {
            return Err(OpError::Unavailable(
                "the token endpoint answered the code without a refresh token, so the subject \
                 could not be kept"
                    .into(),
            ));
        };
        self.install(entry, subject, &refresh_token, response, sent_at, sent_wall)
            .await
    }

    /// Imports `refresh_token` for `subject` after one refresh validated it; the refresh token
    /// the server sent back, if it rotated it, is what is stored. Whether the subject is new.
    pub(crate) async fn import(
        &self,
        token: &str,
        subject: &SubjectId,
        refresh_token: Secret,
    ) -> Result<(View, bool), OpError> {
        let result = self.import_inner(token, subject, refresh_token).await;
        self.count(token, "refresh token import", subject, &result);
        result
    }

    async fn import_inner(
        &self,
        token: &str,
        subject: &SubjectId,
        refresh_token: Secret,
    ) -> Result<(View, bool), OpError> {
        let entry = self.entry(token)?;
        let sent_at = Instant::now();
        let sent_wall = SystemTime::now();
        let response = entry
            .tokens
            .exchange(&Grant::RefreshToken(refresh_token.clone()))
            .await
            .map_err(|e| OpError::fetch(&e))?;
        let keep = response.refresh_token.clone().unwrap_or(refresh_token);
        self.install(entry, subject, &keep, response, sent_at, sent_wall)
            .await
    }

    /// Seals and writes the new record (replacing any), then primes the cache. Whether the
    /// subject is new.
    async fn install(
        &self,
        entry: &Entry,
        subject: &SubjectId,
        refresh_token: &Secret,
        response: TokenResponse,
        sent_at: Instant,
        sent_wall: SystemTime,
    ) -> Result<(View, bool), OpError> {
        let token = entry.tokens.token_name();
        let store = self.subjects.store();
        let sealed = self
            .subjects
            .ring()
            .seal(token, subject, refresh_token)
            .map_err(|e| OpError::Internal(format!("sealing the refresh token: {e}")))?;
        let mut record = Record::enrolled(subject.clone(), sealed, unix_secs(SystemTime::now()));
        let mut created = None;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let old = store.get(token, subject).await.map_err(OpError::store)?;
            let expected = old.as_ref().map(|r| r.generation);
            match store.put(token, &record, expected).await {
                Ok(generation) => {
                    record.generation = generation;
                    created = Some(old.is_none());
                    entry.tokens.metrics().transition(
                        old.as_ref().map(|r| r.state.as_str()),
                        Some(SubjectState::Active.as_str()),
                    );
                    break;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(OpError::store(e)),
            }
        }
        let Some(created) = created else {
            return Err(OpError::Internal(format!(
                "the record of subject {subject} kept changing while it was written; retry"
            )));
        };
        match AccessToken::new(
            response.access_token.expose(),
            sent_at,
            sent_wall,
            response.lifetime,
            response.scope,
        ) {
            Ok(access) => {
                entry.tokens.prime(subject, access, sent_at);
                entry
                    .tokens
                    .share_enrolled(
                        subject,
                        &response.access_token,
                        sent_at,
                        sent_wall,
                        response.lifetime,
                    )
                    .await;
            }
            Err(_) => {
                // The record is what matters; the first request fetches a token itself.
                entry.tokens.forget(subject);
                tracing::warn!(token, subject = %subject, "the token endpoint sent an unusable access token; not cached");
            }
        }
        Ok((View::new(&entry.tokens, &record), created))
    }

    fn count<T>(
        &self,
        token: &str,
        what: &'static str,
        subject: &SubjectId,
        result: &Result<T, OpError>,
    ) {
        if !self.has_token(token) {
            return;
        }
        match result {
            Ok(_) => {
                tracing::info!(token, subject = %subject, via = what, "subject enrolled");
                self.metrics.subject_enrolment(token, EnrolResult::Ok);
            }
            Err(e) => {
                tracing::warn!(token, subject = %subject, via = what, error = %e, "subject enrolment failed");
                self.metrics.subject_enrolment(token, e.enrol_result());
            }
        }
    }

    /// What is known about `subject`.
    pub(crate) async fn show(&self, token: &str, subject: &SubjectId) -> Result<View, OpError> {
        let entry = self.entry(token)?;
        let record = self
            .subjects
            .store()
            .get(token, subject)
            .await
            .map_err(OpError::store)?
            .ok_or(OpError::UnknownSubject)?;
        Ok(View::new(&entry.tokens, &record))
    }

    /// Up to `limit` subjects after `cursor`, only those in `state` if given.
    pub(crate) async fn list(
        &self,
        token: &str,
        state: Option<SubjectState>,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<Listing, OpError> {
        let entry = self.entry(token)?;
        let page = self
            .subjects
            .store()
            .list(token, state, cursor.as_ref(), limit)
            .await
            .map_err(OpError::store)?;
        Ok(Listing {
            subjects: page
                .records
                .iter()
                .map(|r| View::new(&entry.tokens, r))
                .collect(),
            next: page.next,
        })
    }

    /// Forgets `subject`. With `revoke`, first revokes its consent at `revoke_url` with its
    /// current access token (fetched if none is held); if that fails the subject is kept, so
    /// the operator can retry (deleting first would lose the means to revoke).
    pub(crate) async fn delete(
        &self,
        token: &str,
        subject: &SubjectId,
        revoke: bool,
    ) -> Result<(), OpError> {
        let entry = self.entry(token)?;
        let store = self.subjects.store();
        let record = store
            .get(token, subject)
            .await
            .map_err(OpError::store)?
            .ok_or(OpError::UnknownSubject)?;
        if revoke {
            let (Some(url), Some(client)) = (&entry.cfg.revoke_url, &entry.revoke) else {
                return Err(OpError::RevokeNotConfigured);
            };
            if record.state == SubjectState::NeedsReauth {
                return Err(OpError::NeedsReauth);
            }
            let access = match entry.tokens.peek(subject) {
                Some(t) => t,
                None => entry.tokens.get(subject).await.map_err(OpError::token)?,
            };
            revoke_at(client, url, &access).await.inspect_err(|e| {
                tracing::warn!(token, subject = %subject, error = %e, "revocation failed; subject kept");
            })?;
            tracing::info!(token, subject = %subject, "consent revoked");
        }
        if !store.delete(token, subject).await.map_err(OpError::store)? {
            return Err(OpError::UnknownSubject);
        }
        entry.tokens.forget(subject);
        if let Err(e) = entry.tokens.unshare(subject).await {
            // The slot lapses at its TTL (the token's refresh point at the latest).
            tracing::warn!(token, subject = %subject, error = %e, "could not empty the deleted subject's shared access token");
        }
        entry
            .tokens
            .metrics()
            .transition(Some(record.state.as_str()), None);
        tracing::info!(token, subject = %subject, "subject deleted");
        Ok(())
    }

    /// Refreshes `subject`'s access token now, whatever the cache holds.
    pub(crate) async fn refresh(&self, token: &str, subject: &SubjectId) -> Result<View, OpError> {
        let entry = self.entry(token)?;
        // Another replica's token in the shared slot would answer instead of a refresh.
        entry
            .tokens
            .unshare(subject)
            .await
            .map_err(OpError::store)?;
        entry.tokens.forget(subject);
        let outcome = entry.tokens.get(subject).await;
        match &outcome {
            Ok(_) => tracing::info!(token, subject = %subject, "subject refreshed on request"),
            Err(e) => {
                tracing::warn!(token, subject = %subject, error = %e, "forced subject refresh failed");
            }
        }
        outcome.map_err(OpError::token)?;
        self.show(token, subject).await
    }
}

/// The HTTP client for a token's `revoke_url`: verified TLS with the token's CA file, no
/// redirects (the bearer token must go nowhere else), no proxy variables (this process is the
/// proxy), the token's `timeout`, and the token's client certificate if it has one (the
/// revocation endpoint sits beside the token endpoint, behind the same mutual TLS).
fn revoke_client(cfg: &TokenConfig) -> anyhow::Result<reqwest::Client> {
    let identity = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(key)) => Some(crate::identity::ClientIdentity::load(cert, key)?),
        _ => None,
    };
    let tls = crate::tls::client_config(cfg.ca_file.as_deref(), &[b"http/1.1"], identity)?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .user_agent(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// `DELETE url` with the subject's bearer token. Flinks answers 204; any 2xx is taken as done
/// (RFC 7009 servers answer 200).
async fn revoke_at(
    client: &reqwest::Client,
    url: &str,
    access: &AccessToken,
) -> Result<(), OpError> {
    let answer = client
        .delete(url)
        .header(http::header::AUTHORIZATION, access.header().clone())
        .send()
        .await;
    match answer {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(OpError::RevokeFailed(format!(
            "the revoke endpoint answered HTTP {}",
            resp.status().as_u16()
        ))),
        Err(e) if e.is_timeout() => Err(OpError::RevokeTimeout),
        Err(e) => Err(OpError::RevokeFailed(format!(
            "cannot reach the revoke endpoint: {}",
            Chain(&e)
        ))),
    }
}
