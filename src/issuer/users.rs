//! The dev issuer's end users, as Flinks keeps them for a Data Recipient: one consent per user,
//! one-time authorization codes bound to a user, each user's own refresh tokens, and the access
//! tokens minted for them. It decides what a code, a refresh token or an access token is worth;
//! the endpoints (`endpoint.rs`, `authorize.rs`, `revoke.rs`, `fdx.rs`) only speak HTTP.
//!
//! The rules (Flinks' where its documentation states them, see `flinks-facts.md`):
//! - A code from `/api/v1/authorize` (or [`IssuerControl::code_for`]) names one user, works once
//!   and expires after `code_lifetime` (ten minutes by default). Exchanging it is a *login*:
//!   every refresh token the user held before stops working (`invalid_grant`, counted as
//!   [`Retired::Relogin`]) and a revoked consent is given again.
//! - The codes and refresh tokens configured in [`IssuerOptions`] or by the `codes` /
//!   `refresh_tokens` control commands belong to the default user (`IssuerOptions::subject`)
//!   and keep their single-user behaviour: exchanging a configured code retires nothing.
//! - With rotation on, the refresh grant retires the token it received ([`Retired::Rotated`]);
//!   presenting a retired token again is `invalid_grant` and counted by reason, so a test can
//!   assert that no superseded refresh token was ever presented.
//! - Revoking a user's consent retires their refresh tokens ([`Retired::Revoked`]) and makes
//!   every access token minted for them before answer `602` at the FDX endpoint.
//!
//! Memory stays bounded for long runs: retired refresh tokens, access tokens and pending codes
//! are forgotten oldest or expired first past [`CAP`] entries; users and their counters stay.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::time::Instant;

#[cfg(doc)]
use super::IssuerOptions;
use super::control::IssuerControl;
use super::response::OAuthError;
use super::state::{MAX_LIFETIME, new_refresh_token};
use crate::secret::Secret;

/// How long a code from the authorize endpoint can be exchanged. RFC 6749 §4.1.2 recommends at
/// most ten minutes; Flinks does not document its value, so the recommended maximum it is.
pub(super) const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Retired refresh tokens, access tokens and pending codes kept before the oldest or expired
/// are forgotten: ample for any test, bounded for a soak run.
const CAP: usize = 10_000;
/// Longest accepted user id; the same bound as a bearer-proxy subject id.
pub(super) const MAX_USER_LEN: usize = 128;
/// Random bytes in an authorization code (192 bits: unguessable).
const CODE_BYTES: usize = 24;
/// Random bytes in a generated user id (48 bits: unique across any test run, short to read).
const USER_ID_BYTES: usize = 6;

/// Why a refresh token no longer works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Retired {
    /// Rotation handed out a newer one (the token was superseded).
    Rotated,
    /// The user logged in again (exchanged a new code).
    Relogin,
    /// The user's consent was revoked.
    Revoked,
    /// The `refresh_tokens` control command replaced the configured ones.
    Replaced,
}

impl Retired {
    /// Every reason, for counters.
    pub const ALL: [Retired; 4] = [
        Retired::Rotated,
        Retired::Relogin,
        Retired::Revoked,
        Retired::Replaced,
    ];

    /// The name in `/control/stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Retired::Rotated => "rotated",
            Retired::Relogin => "relogin",
            Retired::Revoked => "revoked",
            Retired::Replaced => "replaced",
        }
    }
}

/// What the dev issuer knows about one end user, for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserStats {
    /// Token endpoint requests that presented this user's code or refresh token, by
    /// `grant_type` (refused and failed ones included).
    pub token_requests: BTreeMap<String, u64>,
    /// Codes of this user exchanged successfully (logins).
    pub logins: u64,
    /// Refresh tokens of this user that work now.
    pub live_refresh_tokens: usize,
    /// Whether the consent is revoked (until the next login).
    pub consent_revoked: bool,
    /// How many times the consent was revoked.
    pub revocations: u64,
    /// FDX endpoint requests answered 200 or 602 with this user's access token.
    pub fdx_requests: u64,
}

/// A code from the authorize endpoint, not yet exchanged.
struct PendingCode {
    user: String,
    /// The client it was issued to; `None` from [`IssuerControl::code_for`] (any client).
    client_id: Option<String>,
    /// The `redirect_uri` the authorize request named; the exchange must send exactly it.
    redirect_uri: Option<String>,
    expires_at: Instant,
}

/// One refresh token the issuer handed out or was given.
struct RefreshEntry {
    user: String,
    /// `None` while it works.
    retired: Option<Retired>,
}

/// One access token minted, for the FDX and revoke endpoints.
struct AccessEntry {
    user: String,
    /// The user's consent epoch when it was minted; a later revocation makes it stale.
    epoch: u64,
    expires_at: SystemTime,
}

/// One end user.
#[derive(Default)]
struct User {
    /// Increases with every revocation.
    epoch: u64,
    revoked: bool,
    /// The refresh tokens that work now.
    live: Vec<String>,
    token_requests: BTreeMap<String, u64>,
    logins: u64,
    revocations: u64,
    fdx_requests: u64,
}

/// What an access token is worth at the FDX endpoint.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Valid; the user it was minted for.
    Granted(String),
    /// Valid, but the user's consent was revoked since (Flinks' `602`).
    ConsentRevoked(String),
    /// Unknown or expired.
    Invalid,
}

/// Every user and what belongs to them; part of the issuer's state (one mutex).
pub(super) struct Users {
    /// The `sub` of client-credentials tokens and the owner of configured codes and refresh tokens.
    pub(super) default_user: String,
    /// At most [`MAX_LIFETIME`], so `Instant` arithmetic cannot overflow.
    code_lifetime: Duration,
    /// Configured codes (single-user behaviour), each usable once.
    configured_codes: HashSet<String>,
    pending: HashMap<String, PendingCode>,
    refresh: HashMap<String, RefreshEntry>,
    /// Retired refresh tokens, oldest first, for forgetting them past [`CAP`].
    retired_order: VecDeque<String>,
    access: HashMap<String, AccessEntry>,
    users: HashMap<String, User>,
    /// Presentations of a retired refresh token, by why it was retired.
    retired_uses: BTreeMap<Retired, u64>,
}

impl Users {
    /// The default user owning the configured `codes` and `refresh_tokens`.
    pub(super) fn new(
        default_user: String,
        codes: Vec<String>,
        refresh_tokens: Vec<String>,
        code_lifetime: Duration,
    ) -> Self {
        let mut users = Self {
            default_user,
            code_lifetime: code_lifetime.min(MAX_LIFETIME),
            configured_codes: codes.into_iter().collect(),
            pending: HashMap::new(),
            refresh: HashMap::new(),
            retired_order: VecDeque::new(),
            access: HashMap::new(),
            users: HashMap::new(),
            retired_uses: BTreeMap::new(),
        };
        users.add_refresh_tokens(refresh_tokens, false);
        users
    }

    /// Codes from [`Users::authorize`] can be exchanged this long from now on (at most a year).
    pub(super) fn set_code_lifetime(&mut self, lifetime: Duration) {
        self.code_lifetime = lifetime.min(MAX_LIFETIME);
    }

    /// Adds configured codes (default user); `replace` drops the configured ones first (codes
    /// from the authorize endpoint are not affected).
    pub(super) fn add_codes(&mut self, codes: impl IntoIterator<Item = String>, replace: bool) {
        if replace {
            self.configured_codes.clear();
        }
        self.configured_codes.extend(codes);
    }

    /// Adds refresh tokens of the default user; `replace` first retires every working refresh
    /// token of every user ([`Retired::Replaced`]).
    pub(super) fn add_refresh_tokens(
        &mut self,
        tokens: impl IntoIterator<Item = String>,
        replace: bool,
    ) {
        if replace {
            let names: Vec<String> = self.users.keys().cloned().collect();
            for name in names {
                self.retire_all(&name, Retired::Replaced);
            }
        }
        let user = self.default_user.clone();
        for token in tokens {
            self.add_live(&user, token);
        }
    }

    /// A fresh one-time code for `user` (a generated id when `None`), optionally bound to a
    /// client and a redirect URI. Returns the user and the code.
    pub(super) fn authorize(
        &mut self,
        user: Option<&str>,
        client_id: Option<&str>,
        redirect_uri: Option<&str>,
        now: Instant,
    ) -> (String, String) {
        let user = user.map_or_else(new_user_id, str::to_owned);
        if self.pending.len() >= CAP {
            self.pending.retain(|_, p| p.expires_at > now);
        }
        let code = new_code();
        self.pending.insert(
            code.clone(),
            PendingCode {
                user: user.clone(),
                client_id: client_id.map(str::to_owned),
                redirect_uri: redirect_uri.map(str::to_owned),
                expires_at: now + self.code_lifetime,
            },
        );
        self.users.entry(user.clone()).or_default();
        (user, code)
    }

    /// The user a code or refresh token belongs to, working or not, if the issuer knows it.
    pub(super) fn owner(&self, code: Option<&str>, refresh_token: Option<&str>) -> Option<String> {
        if let Some(code) = code {
            if let Some(pending) = self.pending.get(code) {
                return Some(pending.user.clone());
            }
            if self.configured_codes.contains(code) {
                return Some(self.default_user.clone());
            }
        }
        refresh_token
            .and_then(|rt| self.refresh.get(rt))
            .map(|entry| entry.user.clone())
    }

    /// Counts a token endpoint request that presented `user`'s code or refresh token.
    pub(super) fn count_request(&mut self, user: &str, grant_type: &str) {
        let user = self.users.entry(user.to_owned()).or_default();
        *user
            .token_requests
            .entry(grant_type.to_owned())
            .or_default() += 1;
    }

    /// The `authorization_code` grant: checks and spends `code`, returns its user and their new
    /// refresh token. `configured_redirect` is [`IssuerOptions::redirect_uri`]. A refused code
    /// is not spent (except an expired one, which is forgotten).
    pub(super) fn exchange_code(
        &mut self,
        code: &str,
        client_id: &str,
        redirect_uri: Option<&str>,
        configured_redirect: Option<&str>,
        now: Instant,
    ) -> Result<(String, String), OAuthError> {
        let check_configured = || match (configured_redirect, redirect_uri) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(OAuthError::invalid_request("redirect_uri missing")),
            (Some(expected), Some(sent)) if sent != expected => {
                Err(OAuthError::invalid_grant("redirect_uri mismatch"))
            }
            (Some(_), Some(_)) => Ok(()),
        };
        if self.configured_codes.contains(code) {
            check_configured()?;
            self.configured_codes.remove(code);
            let user = self.default_user.clone();
            let refresh_token = new_refresh_token();
            self.add_live(&user, refresh_token.clone());
            return Ok((user, refresh_token));
        }
        let Some(pending) = self.pending.get(code) else {
            return Err(OAuthError::invalid_grant(
                "unknown or already used authorization code",
            ));
        };
        if pending.expires_at <= now {
            self.pending.remove(code);
            return Err(OAuthError::invalid_grant("expired authorization code"));
        }
        if pending.client_id.as_deref().is_some_and(|c| c != client_id) {
            return Err(OAuthError::invalid_grant(
                "the authorization code was issued to another client",
            ));
        }
        match (&pending.redirect_uri, redirect_uri) {
            (Some(_), None) => return Err(OAuthError::invalid_request("redirect_uri missing")),
            (Some(expected), Some(sent)) if sent != expected => {
                return Err(OAuthError::invalid_grant("redirect_uri mismatch"));
            }
            (Some(_), Some(_)) => {}
            (None, _) => check_configured()?,
        }
        let user = pending.user.clone();
        self.pending.remove(code);
        // A login: older refresh tokens stop working and the consent is given (again).
        self.retire_all(&user, Retired::Relogin);
        let entry = self.users.entry(user.clone()).or_default();
        entry.logins += 1;
        entry.revoked = false;
        let refresh_token = new_refresh_token();
        self.add_live(&user, refresh_token.clone());
        Ok((user, refresh_token))
    }

    /// The `refresh_token` grant: returns the token's user and, with `rotate`, the new refresh
    /// token that replaces it.
    pub(super) fn refresh(
        &mut self,
        sent: &str,
        rotate: bool,
    ) -> Result<(String, Option<String>), OAuthError> {
        let Some(entry) = self.refresh.get(sent) else {
            return Err(OAuthError::invalid_grant("unknown refresh token"));
        };
        if let Some(reason) = entry.retired {
            *self.retired_uses.entry(reason).or_default() += 1;
            return Err(OAuthError::invalid_grant(match reason {
                Retired::Rotated => "superseded refresh token (rotated)",
                Retired::Relogin => "refresh token invalidated by a newer login",
                Retired::Revoked => "the user's consent was revoked",
                Retired::Replaced => "unknown refresh token",
            }));
        }
        let user = entry.user.clone();
        if !rotate {
            return Ok((user, None));
        }
        self.retire(sent, Retired::Rotated);
        let new = new_refresh_token();
        self.add_live(&user, new.clone());
        Ok((user, Some(new)))
    }

    /// Remembers an access token minted for `user`, valid until `expires_at`.
    pub(super) fn note_access_token(
        &mut self,
        token: &str,
        user: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) {
        if self.access.len() >= CAP {
            self.access.retain(|_, a| a.expires_at > now);
        }
        let epoch = self.users.entry(user.to_owned()).or_default().epoch;
        self.access.insert(
            token.to_owned(),
            AccessEntry {
                user: user.to_owned(),
                epoch,
                expires_at,
            },
        );
    }

    /// What `token` is worth at `now`.
    pub(super) fn access(&self, token: &str, now: SystemTime) -> Access {
        let Some(entry) = self.access.get(token).filter(|a| a.expires_at > now) else {
            return Access::Invalid;
        };
        match self.users.get(&entry.user) {
            Some(user) if user.revoked || user.epoch != entry.epoch => {
                Access::ConsentRevoked(entry.user.clone())
            }
            _ => Access::Granted(entry.user.clone()),
        }
    }

    /// Counts an FDX request answered for `user`.
    pub(super) fn count_fdx(&mut self, user: &str) {
        self.users.entry(user.to_owned()).or_default().fdx_requests += 1;
    }

    /// Revokes `user`'s consent: their refresh tokens stop working and their access tokens
    /// minted so far answer 602, until the next login.
    pub(super) fn revoke(&mut self, user: &str) {
        self.retire_all(user, Retired::Revoked);
        let entry = self.users.entry(user.to_owned()).or_default();
        entry.revoked = true;
        entry.epoch += 1;
        entry.revocations += 1;
    }

    /// What the issuer knows about `user`, if anything.
    pub(super) fn stats(&self, user: &str) -> Option<UserStats> {
        self.users.get(user).map(|u| UserStats {
            token_requests: u.token_requests.clone(),
            logins: u.logins,
            live_refresh_tokens: u.live.len(),
            consent_revoked: u.revoked,
            revocations: u.revocations,
            fdx_requests: u.fdx_requests,
        })
    }

    /// How many times a refresh token retired for `reason` was presented.
    pub(super) fn retired_uses(&self, reason: Retired) -> u64 {
        self.retired_uses.get(&reason).copied().unwrap_or(0)
    }

    /// Makes `token` a working refresh token of `user`.
    fn add_live(&mut self, user: &str, token: String) {
        if let Some(old) = self.refresh.get(&token)
            && old.retired.is_none()
        {
            // Already working (a configured token given twice): nothing to add.
            return;
        }
        self.refresh.insert(
            token.clone(),
            RefreshEntry {
                user: user.to_owned(),
                retired: None,
            },
        );
        self.users
            .entry(user.to_owned())
            .or_default()
            .live
            .push(token);
    }

    /// Retires every working refresh token of `user`.
    fn retire_all(&mut self, user: &str, reason: Retired) {
        let live = self
            .users
            .get_mut(user)
            .map(|u| std::mem::take(&mut u.live))
            .unwrap_or_default();
        for token in live {
            self.mark_retired(token, reason);
        }
    }

    /// Retires one working refresh token.
    fn retire(&mut self, token: &str, reason: Retired) {
        let Some(user) = self.refresh.get(token).map(|e| e.user.clone()) else {
            return;
        };
        if let Some(u) = self.users.get_mut(&user) {
            u.live.retain(|t| t != token);
        }
        self.mark_retired(token.to_owned(), reason);
    }

    /// Marks `token` retired and forgets the oldest retired tokens past [`CAP`].
    fn mark_retired(&mut self, token: String, reason: Retired) {
        if let Some(entry) = self.refresh.get_mut(&token) {
            entry.retired = Some(reason);
        }
        self.retired_order.push_back(token);
        while self.retired_order.len() > CAP {
            if let Some(old) = self.retired_order.pop_front()
                && self.refresh.get(&old).is_some_and(|e| e.retired.is_some())
            {
                self.refresh.remove(&old);
            }
        }
    }
}

/// A new random authorization code.
fn new_code() -> String {
    let mut bytes = [0u8; CODE_BYTES];
    rand::fill(&mut bytes);
    format!("ac-{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A new random user id, `dev-user-<12 hex digits>`.
fn new_user_id() -> String {
    let mut bytes = [0u8; USER_ID_BYTES];
    rand::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("dev-user-{hex}")
}

/// Whether `user` is usable as a user id: 1 to [`MAX_USER_LEN`] visible ASCII characters.
pub(super) fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN && user.bytes().all(|b| b.is_ascii_graphic())
}

/// The end-user switches and observations of [`IssuerControl`].
impl IssuerControl {
    /// A fresh one-time authorization code for `user`, as the authorize endpoint would redirect
    /// with, for any client and without a `redirect_uri` binding (the configured
    /// [`IssuerOptions::redirect_uri`] still applies). Exchanging it is a login of `user`.
    ///
    /// # Panics
    /// If `user` is empty, longer than 128 characters or not visible ASCII (a test's mistake).
    pub fn code_for(&self, user: &str) -> Secret {
        assert!(valid_user(user), "not a usable user id: {user:?}");
        let mut inner = self.shared.lock();
        let (_, code) = inner
            .users
            .authorize(Some(user), None, None, Instant::now());
        Secret::new(code)
    }

    /// Turns refresh-token rotation on or off (see [`IssuerOptions::rotate_refresh_tokens`]).
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        self.shared.lock().rotate_refresh_tokens = rotate;
    }

    /// Codes from the authorize endpoint issued from now on can be exchanged this long
    /// ([`Duration::ZERO`]: they are expired on arrival; clamped to one year).
    pub fn set_code_lifetime(&self, lifetime: Duration) {
        self.shared.lock().users.set_code_lifetime(lifetime);
    }

    /// Revokes `user`'s consent as `DELETE /api/v1/revoke` with their token would: their
    /// refresh tokens get `invalid_grant` and their access tokens `602` until they log in again.
    pub fn revoke_consent(&self, user: &str) {
        self.shared.lock().users.revoke(user);
    }

    /// What the issuer knows about `user`; `None` if it never heard of them.
    pub fn user_stats(&self, user: &str) -> Option<UserStats> {
        self.shared.lock().users.stats(user)
    }

    /// Token endpoint requests that presented `user`'s code or refresh token with this
    /// `grant_type`.
    pub fn user_request_count(&self, user: &str, grant_type: &str) -> u64 {
        self.user_stats(user)
            .and_then(|s| s.token_requests.get(grant_type).copied())
            .unwrap_or(0)
    }

    /// How many times a refresh token retired for `reason` was presented (and refused).
    pub fn retired_refresh_token_uses(&self, reason: Retired) -> u64 {
        self.shared.lock().users.retired_uses(reason)
    }

    /// How many times a superseded (rotated) refresh token was presented: zero in a correct
    /// client of a rotating server.
    pub fn superseded_refresh_token_uses(&self) -> u64 {
        self.retired_refresh_token_uses(Retired::Rotated)
    }

    /// The user an access token was minted for, if it is known and unexpired (with
    /// [`IssuerOptions::fixed_token`], the user it was last minted for).
    pub fn user_of_token(&self, access_token: &str) -> Option<String> {
        match self
            .shared
            .lock()
            .users
            .access(access_token, SystemTime::now())
        {
            Access::Granted(user) | Access::ConsentRevoked(user) => Some(user),
            Access::Invalid => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn users() -> Users {
        Users::new(
            "default".into(),
            vec!["code-cfg".into()],
            vec!["rt-cfg".into()],
            DEFAULT_CODE_LIFETIME,
        )
    }

    fn refused(result: Result<impl std::fmt::Debug, OAuthError>) -> (StatusCode, &'static str) {
        let e = result.expect_err("refused");
        (e.status(), e.code())
    }

    #[test]
    fn a_code_names_its_user_works_once_and_a_relogin_retires_older_refresh_tokens() {
        let mut u = users();
        let now = Instant::now();
        let (alice, code1) = u.authorize(Some("alice"), None, None, now);
        assert_eq!(alice, "alice");
        assert_eq!(u.owner(Some(&code1), None).as_deref(), Some("alice"));
        let (user, rt1) = u.exchange_code(&code1, "c", None, None, now).unwrap();
        assert_eq!(user, "alice");
        assert_eq!(
            refused(u.exchange_code(&code1, "c", None, None, now)),
            (StatusCode::BAD_REQUEST, "invalid_grant")
        );
        assert_eq!(u.refresh(&rt1, false).unwrap(), ("alice".into(), None));
        // Bob's login does not touch Alice's token.
        let (_, bob_code) = u.authorize(Some("bob"), None, None, now);
        let (_, bob_rt) = u.exchange_code(&bob_code, "c", None, None, now).unwrap();
        assert_eq!(u.refresh(&rt1, false).unwrap().0, "alice");
        // Alice logs in again: her old token is dead, her new one and Bob's work.
        let (_, code2) = u.authorize(Some("alice"), None, None, now);
        let (_, rt2) = u.exchange_code(&code2, "c", None, None, now).unwrap();
        assert_ne!(rt1, rt2);
        assert_eq!(
            refused(u.refresh(&rt1, false)),
            (StatusCode::BAD_REQUEST, "invalid_grant")
        );
        assert_eq!(u.retired_uses(Retired::Relogin), 1);
        assert_eq!(u.retired_uses(Retired::Rotated), 0);
        assert_eq!(u.refresh(&rt2, false).unwrap().0, "alice");
        assert_eq!(u.refresh(&bob_rt, false).unwrap().0, "bob");
        let stats = u.stats("alice").unwrap();
        assert_eq!((stats.logins, stats.live_refresh_tokens), (2, 1));
    }

    #[test]
    fn generated_user_ids_are_distinct() {
        let mut u = users();
        let (a, _) = u.authorize(None, None, None, Instant::now());
        let (b, _) = u.authorize(None, None, None, Instant::now());
        assert!(a.starts_with("dev-user-") && valid_user(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn codes_expire_and_bind_their_client_and_redirect_uri() {
        let mut u = users();
        let now = Instant::now();
        let (_, code) = u.authorize(Some("a"), Some("c1"), Some("https://app/cb"), now);
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(
            refused(u.exchange_code(&code, "c2", Some("https://app/cb"), None, now)),
            (bad, "invalid_grant")
        );
        assert_eq!(
            refused(u.exchange_code(&code, "c1", None, None, now)),
            (bad, "invalid_request")
        );
        assert_eq!(
            refused(u.exchange_code(&code, "c1", Some("https://app/cb/"), None, now)),
            (bad, "invalid_grant")
        );
        // None of those spent it; past its lifetime it is gone.
        let late = now + DEFAULT_CODE_LIFETIME;
        assert_eq!(
            refused(u.exchange_code(&code, "c1", Some("https://app/cb"), None, late)),
            (bad, "invalid_grant")
        );
        assert_eq!(u.owner(Some(&code), None), None);
        let (_, code) = u.authorize(Some("a"), Some("c1"), Some("https://app/cb"), now);
        let just_in_time = now + DEFAULT_CODE_LIFETIME - Duration::from_millis(1);
        assert!(
            u.exchange_code(&code, "c1", Some("https://app/cb"), None, just_in_time)
                .is_ok()
        );
    }

    #[test]
    fn configured_codes_keep_single_user_behaviour() {
        let mut u = users();
        let now = Instant::now();
        assert_eq!(
            refused(u.exchange_code("code-cfg", "c", None, Some("https://x"), now)),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
        let (user, rt) = u.exchange_code("code-cfg", "c", None, None, now).unwrap();
        assert_eq!(user, "default");
        // Not a login: the configured refresh token still works next to the new one.
        assert_eq!(u.refresh("rt-cfg", false).unwrap().0, "default");
        assert_eq!(u.refresh(&rt, false).unwrap().0, "default");
        assert!(u.exchange_code("code-cfg", "c", None, None, now).is_err());
        // replace retires every working token; presenting one is not a superseded use.
        u.add_refresh_tokens(["rt-new".to_owned()], true);
        assert!(u.refresh("rt-cfg", false).is_err());
        assert!(u.refresh(&rt, false).is_err());
        assert_eq!(u.retired_uses(Retired::Replaced), 2);
        assert_eq!(u.retired_uses(Retired::Rotated), 0);
        assert!(u.refresh("rt-new", false).is_ok());
        // A configured token given twice is one working token.
        u.add_refresh_tokens(["rt-new".to_owned()], false);
        assert_eq!(u.stats("default").unwrap().live_refresh_tokens, 1);
    }

    #[test]
    fn rotation_supersedes_and_counts_every_reuse() {
        let mut u = users();
        let (user, second) = u.refresh("rt-cfg", true).unwrap();
        let second = second.unwrap();
        assert_eq!(user, "default");
        for _ in 0..2 {
            assert_eq!(
                refused(u.refresh("rt-cfg", true)),
                (StatusCode::BAD_REQUEST, "invalid_grant")
            );
        }
        assert_eq!(u.retired_uses(Retired::Rotated), 2);
        let (_, third) = u.refresh(&second, true).unwrap();
        assert_ne!(third.as_deref(), Some(second.as_str()));
        assert_eq!(u.stats("default").unwrap().live_refresh_tokens, 1);
        assert!(refused(u.refresh("rt-never-issued", true)).1 == "invalid_grant");
        assert_eq!(u.retired_uses(Retired::Rotated), 2);
    }

    #[test]
    fn revocation_retires_refresh_tokens_and_stales_access_tokens_until_the_next_login() {
        let mut u = users();
        let now = Instant::now();
        let wall = SystemTime::now();
        let later = wall + Duration::from_secs(300);
        let (_, code) = u.authorize(Some("a"), None, None, now);
        let (_, rt) = u.exchange_code(&code, "c", None, None, now).unwrap();
        u.note_access_token("at-1", "a", later, wall);
        u.note_access_token("at-b", "b", later, wall);
        assert_eq!(u.access("at-1", wall), Access::Granted("a".into()));
        assert_eq!(u.access("at-1", later), Access::Invalid, "expired");
        assert_eq!(u.access("nope", wall), Access::Invalid);
        u.revoke("a");
        assert_eq!(u.access("at-1", wall), Access::ConsentRevoked("a".into()));
        assert_eq!(u.access("at-b", wall), Access::Granted("b".into()));
        assert!(u.refresh(&rt, false).is_err());
        assert_eq!(u.retired_uses(Retired::Revoked), 1);
        // A new login gives the consent back; the old access token stays revoked.
        let (_, code) = u.authorize(Some("a"), None, None, now);
        u.exchange_code(&code, "c", None, None, now).unwrap();
        u.note_access_token("at-2", "a", later, wall);
        assert_eq!(u.access("at-2", wall), Access::Granted("a".into()));
        assert_eq!(u.access("at-1", wall), Access::ConsentRevoked("a".into()));
        let stats = u.stats("a").unwrap();
        assert!(!stats.consent_revoked);
        assert_eq!(stats.revocations, 1);
    }

    #[test]
    fn retired_tokens_are_forgotten_past_the_cap_oldest_first() {
        let mut u = users();
        let (_, mut rt) = u.refresh("rt-cfg", true).unwrap();
        for _ in 0..CAP {
            rt = u.refresh(rt.as_deref().unwrap(), true).unwrap().1;
        }
        assert_eq!(u.retired_order.len(), CAP);
        // The first token was forgotten: unknown now, not counted as superseded.
        assert!(u.refresh("rt-cfg", true).is_err());
        assert_eq!(u.retired_uses(Retired::Rotated), 0);
        assert_eq!(u.refresh.len(), CAP + 1);
    }

    #[test]
    fn user_ids() {
        assert!(valid_user("customer:42_a.b-c"));
        assert!(valid_user(&"x".repeat(MAX_USER_LEN)));
        assert!(!valid_user(&"x".repeat(MAX_USER_LEN + 1)));
        assert!(!valid_user(""));
        assert!(!valid_user("a b"));
        assert!(!valid_user("a\nb"));
        assert!(!valid_user("é"));
    }
}
