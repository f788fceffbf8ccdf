//! Access tokens of the subjects of one per-subject token entry: a bounded in-memory cache,
//! filled lazily from the subject store with one token request per subject at a time.
//!
//! - **Lazy.** Nothing is fetched at start; a subject's first [`SubjectTokens::get`] after its
//!   token expired starts a refresh (refresh-token grant with the stored, sealed refresh token).
//! - **Single flight.** Every caller for a subject that needs a token waits on the same refresh,
//!   at most `token_wait`; the refresh runs in its own task, so a caller giving up never
//!   cancels a token request whose rotated refresh token must still be stored.
//! - **Background refresh.** A caller arriving past the refresh point while the token is still
//!   valid gets the current token at once and starts the refresh for later callers.
//! - **`needs_reauth`.** `invalid_grant` from the token endpoint marks the subject
//!   `needs_reauth` in the store and in memory: later callers get the answer without a token
//!   request, until a new enrolment replaces the record.
//! - **Rotation.** A refresh token sent back by the server is sealed and stored (compare-and-set
//!   on the generation read) before the access token is handed out. Records sealed with an old
//!   key are re-sealed with the newest on that write.
//! - **Bounded.** At most `max_cached` subjects are held; inserting beyond that drops expired
//!   entries first, then the least recently used.
//!
//! The record is rewritten after a refresh only when something durable changed (a rotated
//! refresh token, a stale key, a cleared error) or its `last_refresh` is older than
//! [`LAST_REFRESH_WRITE_INTERVAL`], so 100,000 active subjects do not cost a disk write per
//! five-minute token.
//!
//! Not yet done here: the keep-alive refresh of idle subjects (`keepalive_after`), 401/602
//! handling from the proxy, metrics. On the request path a lookup takes two short
//! `std::sync::Mutex` sections (the map, then the subject's slot) and no `await` unless a
//! refresh is needed; the session wiring it into the proxy should measure that against the
//! named-token hot path (BENCHMARKS.md) and shard the map if it shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::SubjectId;
use super::keyring::KeyRing;
use super::record::{Record, SubjectState, SubjectStore};
use crate::secret::SecretSource;
use crate::token::AccessToken;
use crate::token::client::{Credentials, Fetch, FetchError, Grant};
use crate::token::{ErrorKind, refresh_delay};

/// A stored `last_refresh` older than this is brought up to date on the next refresh. Hours
/// are precise enough for the keep-alive (which thinks in days) and for people.
pub const LAST_REFRESH_WRITE_INTERVAL: Duration = Duration::from_secs(3600);

/// What a refresh failure that is not the subject's fault is remembered for: callers during
/// this time get the failure at once instead of each causing a token request.
// Used by the config default the next session adds with `per_subject = true`.
#[cfg_attr(not(test), allow(dead_code))]
pub const DEFAULT_FAILURE_HOLD: Duration = Duration::from_secs(1);

/// Settings of one per-subject token entry.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Token name (store key and associated data).
    pub token: String,
    /// The client id.
    pub client_id: SecretSource,
    /// The client secret, if any.
    pub client_secret: Option<SecretSource>,
    /// Most subjects held in memory.
    pub max_cached: usize,
    /// How long a caller waits for a token.
    pub token_wait: Duration,
    /// Fraction of the lifetime after which the token is refreshed in the background.
    pub refresh_ratio: f64,
    /// Refresh at least this long before expiry.
    pub refresh_margin: Duration,
    /// How long a transient failure is answered from memory.
    pub failure_hold: Duration,
}

/// Why no token can be handed out for a subject.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectTokenError {
    /// No record: the subject was never enrolled, or was deleted.
    #[error("subject is not enrolled")]
    UnknownSubject,
    /// The customer must consent again.
    #[error("subject needs to consent again (needs_reauth)")]
    NeedsReauth,
    /// No token within `token_wait` (the refresh goes on).
    #[error("no token for the subject within token_wait")]
    Timeout,
    /// The refresh failed for another reason (the message never holds a token).
    #[error("{0}")]
    Failed(String),
}

type Outcome = Result<Arc<AccessToken>, SubjectTokenError>;

/// One subject in memory.
#[derive(Default)]
struct Slot {
    token: Option<Arc<AccessToken>>,
    refresh_at: Option<Instant>,
    /// The refresh in progress; its receivers see `Some` when it ends.
    flight: Option<watch::Receiver<Option<Outcome>>>,
    /// The last failure and until when it is answered from memory (`NeedsReauth`: for good).
    failure: Option<(SubjectTokenError, Option<Instant>)>,
    /// Recency for eviction.
    last_get: u64,
}

/// The access tokens of one per-subject token entry.
// Not wired yet: the session that adds `per_subject = true` to the request path constructs it
// (one per token entry) and calls `get` from the proxy.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct SubjectTokens<F> {
    settings: Settings,
    fetch: F,
    store: Arc<dyn SubjectStore>,
    ring: Arc<KeyRing>,
    slots: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<SubjectId, Arc<Mutex<Slot>>>,
    tick: u64,
}

#[cfg_attr(not(test), allow(dead_code))]
impl<F: Fetch> SubjectTokens<F> {
    pub(crate) fn new(
        settings: Settings,
        fetch: F,
        store: Arc<dyn SubjectStore>,
        ring: Arc<KeyRing>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            fetch,
            store,
            ring,
            slots: Mutex::new(Cache::default()),
        })
    }

    /// Subjects held in memory.
    pub(crate) fn cached(&self) -> usize {
        lock(&self.slots).map.len()
    }

    /// A valid access token for `subject`, refreshing it if needed (waiting at most
    /// `token_wait`).
    pub(crate) async fn get(self: &Arc<Self>, subject: &SubjectId) -> Outcome {
        let slot = self.slot(subject);
        let mut rx = {
            let mut s = lock(&slot);
            let now = Instant::now();
            let held = match &s.failure {
                Some((e, None)) => Some(e.clone()),
                Some((e, Some(until))) if now < *until => Some(e.clone()),
                _ => None,
            };
            if let Some(t) = s.token.clone().filter(|t| t.is_valid_at(now)) {
                // A background refresh that just failed is not retried by every request.
                if s.refresh_at.is_some_and(|at| now >= at) && s.flight.is_none() && held.is_none()
                {
                    self.start_flight(subject, &slot, &mut s);
                }
                return Ok(t);
            }
            if let Some(e) = held {
                return Err(e);
            }
            match &s.flight {
                Some(rx) => rx.clone(),
                None => self.start_flight(subject, &slot, &mut s),
            }
        };
        let wait = rx.wait_for(Option::is_some);
        match tokio::time::timeout(self.settings.token_wait, wait).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Err(SubjectTokenError::Timeout)),
            // The flight task ended without a word: only if the runtime is shutting down.
            Ok(Err(_)) => Err(SubjectTokenError::Failed("refresh was abandoned".into())),
            Err(_) => Err(SubjectTokenError::Timeout),
        }
    }

    /// Forgets a subject's token and any remembered failure (after an enrolment or deletion).
    pub(crate) fn forget(&self, subject: &SubjectId) {
        lock(&self.slots).map.remove(subject);
    }

    /// The slot of `subject`, inserted (evicting if full) if absent.
    fn slot(&self, subject: &SubjectId) -> Arc<Mutex<Slot>> {
        let mut cache = lock(&self.slots);
        cache.tick += 1;
        let tick = cache.tick;
        if let Some(slot) = cache.map.get(subject) {
            lock(slot).last_get = tick;
            return slot.clone();
        }
        if cache.map.len() >= self.settings.max_cached.max(1) {
            evict(&mut cache.map, self.settings.max_cached.max(1) - 1);
        }
        let slot = Arc::new(Mutex::new(Slot {
            last_get: tick,
            ..Slot::default()
        }));
        cache.map.insert(subject.clone(), slot.clone());
        slot
    }

    /// Starts a refresh for `subject` (its slot locked as `s`) and returns its receiver.
    fn start_flight(
        self: &Arc<Self>,
        subject: &SubjectId,
        slot: &Arc<Mutex<Slot>>,
        s: &mut Slot,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        s.flight = Some(rx.clone());
        let (this, subject, slot) = (self.clone(), subject.clone(), slot.clone());
        tokio::spawn(async move {
            let outcome = this.refresh(&subject).await;
            let mut s = lock(&slot);
            s.flight = None;
            match &outcome {
                Ok((token, refresh_at)) => {
                    s.token = Some(token.clone());
                    s.refresh_at = Some(*refresh_at);
                    s.failure = None;
                }
                Err(e @ SubjectTokenError::NeedsReauth) => {
                    s.token = None;
                    s.failure = Some((e.clone(), None));
                }
                Err(e) => {
                    let until = Instant::now() + this.settings.failure_hold;
                    s.failure = Some((e.clone(), Some(until)));
                }
            }
            drop(s);
            let _ = tx.send(Some(outcome.map(|(t, _)| t)));
        });
        rx
    }

    /// One refresh: read the record, send its refresh token, store what changed.
    async fn refresh(
        &self,
        subject: &SubjectId,
    ) -> Result<(Arc<AccessToken>, Instant), SubjectTokenError> {
        let token = self.settings.token.as_str();
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(token, subject = %subject, error = %e, "subject refresh failed: {what}");
            SubjectTokenError::Failed(format!("{what}: {e}"))
        };
        let record = match self.store.get(token, subject).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(SubjectTokenError::UnknownSubject),
            Err(e) => return Err(failed("subject store", &e)),
        };
        if record.state == SubjectState::NeedsReauth {
            return Err(SubjectTokenError::NeedsReauth);
        }
        let refresh_token = self
            .ring
            .open(token, subject, &record.refresh_token)
            .map_err(|e| failed("sealed refresh token", &e))?;
        let creds = self
            .credentials()
            .await
            .map_err(|e| failed("credentials", &e))?;
        let sent_at = Instant::now();
        let sent_wall = SystemTime::now();
        let answer = self
            .fetch
            .fetch(&creds, &Grant::RefreshToken(refresh_token))
            .await;
        let now_unix = crate::time::unix_secs(SystemTime::now());
        let response = match answer {
            Ok(r) => r,
            Err(e) if is_invalid_grant(&e) => {
                tracing::warn!(token, subject = %subject, "refresh token rejected (invalid_grant): subject needs to consent again");
                let updated = Record {
                    state: SubjectState::NeedsReauth,
                    last_error: Some("invalid_grant".into()),
                    ..record.clone()
                };
                // A conflict means a new enrolment arrived meanwhile: it wins, and its
                // record stays active.
                if let Err(e) = self
                    .store
                    .put(token, &updated, Some(record.generation))
                    .await
                {
                    tracing::warn!(token, subject = %subject, error = %e, "could not record needs_reauth");
                }
                return Err(SubjectTokenError::NeedsReauth);
            }
            Err(e) => {
                let what = match e.kind() {
                    ErrorKind::Transient => "token endpoint unavailable",
                    ErrorKind::Rejected => "token endpoint refused the refresh",
                };
                return Err(failed(what, &e));
            }
        };
        let rotated = response.refresh_token.is_some();
        let sealed = match &response.refresh_token {
            Some(new) => self.ring.seal(token, subject, new),
            None => self.ring.reseal(token, subject, &record.refresh_token),
        }
        .map_err(|e| failed("sealing the refresh token", &e))?;
        let stale_time = record
            .last_refresh
            .is_none_or(|t| now_unix.saturating_sub(t) >= LAST_REFRESH_WRITE_INTERVAL.as_secs());
        if rotated || sealed != record.refresh_token || record.last_error.is_some() || stale_time {
            let updated = Record {
                refresh_token: sealed,
                last_refresh: Some(now_unix),
                last_error: None,
                ..record.clone()
            };
            // Stored before the access token is used: a rotated refresh token must not be
            // lost. If it cannot be stored, the access token is not handed out either.
            self.store
                .put(token, &updated, Some(record.generation))
                .await
                .map_err(|e| failed("storing the refreshed record", &e))?;
        }
        let access = AccessToken::new(
            response.access_token.expose(),
            sent_at,
            sent_wall,
            response.lifetime,
            response.scope,
        )
        .map_err(|_| {
            SubjectTokenError::Failed("the token endpoint sent an unusable access token".into())
        })?;
        let delay = refresh_delay(
            response.lifetime,
            self.settings.refresh_ratio,
            self.settings.refresh_margin,
            rand::random::<f64>(),
        );
        Ok((Arc::new(access), sent_at + delay))
    }

    async fn credentials(&self) -> Result<Credentials, crate::secret::SecretFileError> {
        let client_id = self.settings.client_id.read("client_id").await?;
        let client_secret = match &self.settings.client_secret {
            Some(src) => Some(src.read("client_secret").await?),
            None => None,
        };
        Ok(Credentials {
            client_id,
            client_secret,
        })
    }

    // ---- What the subjects API's operations need (src/subject/enrol.rs). ----

    /// The token name this entry serves.
    pub(crate) fn token_name(&self) -> &str {
        &self.settings.token
    }

    /// Sends one token request for `grant` with the entry's credentials (read fresh), through
    /// the entry's own client: the code exchange and the import's validating refresh.
    pub(crate) async fn exchange(
        &self,
        grant: &Grant,
    ) -> Result<crate::token::client::TokenResponse, FetchError> {
        let creds = self.credentials().await?;
        self.fetch.fetch(&creds, grant).await
    }

    /// The entry's client credentials, read fresh (for a one-off client with another
    /// `redirect_uri`).
    pub(crate) async fn client_credentials(
        &self,
    ) -> Result<Credentials, crate::secret::SecretFileError> {
        self.credentials().await
    }

    /// Hands the access token a code exchange or import just obtained (request sent at
    /// `sent_at`) to the cache, replacing whatever was held for `subject` (an old token, a
    /// remembered `needs_reauth`), so the first proxied request costs no token request.
    pub(crate) fn prime(&self, subject: &SubjectId, token: AccessToken, sent_at: Instant) {
        let delay = refresh_delay(
            token.lifetime(),
            self.settings.refresh_ratio,
            self.settings.refresh_margin,
            rand::random::<f64>(),
        );
        // A fresh slot: a refresh still running for the old record writes into the old one,
        // which nothing reads any more.
        self.forget(subject);
        let slot = self.slot(subject);
        let mut s = lock(&slot);
        s.token = Some(Arc::new(token));
        s.refresh_at = Some(sent_at + delay);
        s.failure = None;
    }

    /// The valid access token held for `subject`, if any, without counting as a use or
    /// starting a refresh (for the API's view and for revocation).
    pub(crate) fn peek(&self, subject: &SubjectId) -> Option<Arc<AccessToken>> {
        let slot = lock(&self.slots).map.get(subject).cloned()?;
        let s = lock(&slot);
        s.token.clone().filter(|t| t.is_valid_at(Instant::now()))
    }
}

fn is_invalid_grant(e: &FetchError) -> bool {
    matches!(e, FetchError::Http { oauth: Some(o), .. } if o.code == "invalid_grant")
}

/// Shrinks `map` to `keep` entries: expired tokens without a refresh first, then the least
/// recently asked for. Linear in the cache size; runs only when a subject not in memory
/// arrives at a full cache, which is about to cost a token request anyway.
fn evict(map: &mut HashMap<SubjectId, Arc<Mutex<Slot>>>, keep: usize) {
    let now = Instant::now();
    map.retain(|_, slot| {
        let s = lock(slot);
        s.flight.is_some() || s.token.as_ref().is_some_and(|t| t.is_valid_at(now))
    });
    while map.len() > keep {
        let oldest = map
            .iter()
            .min_by_key(|(_, slot)| lock(slot).last_get)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => map.remove(&id),
            None => break,
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still consistent
    // enough to serve from (the worst case is a stale token that is_valid_at rejects).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::secret::Secret;
    use crate::subject::FileStore;
    use crate::subject::keyring::tests::ring;
    use crate::token::client::{LifetimeSource, OAuthError, TokenResponse};

    const LIFETIME: Duration = Duration::from_secs(300);

    /// A token endpoint on the paused clock: each answer takes `delay`; the access token
    /// names the refresh token it was made from and the call number.
    #[derive(Default)]
    struct Issuer {
        calls: AtomicUsize,
        delay: Duration,
        rotate: bool,
        down: AtomicBool,
        revoked: Mutex<HashSet<String>>,
    }

    impl Fetch for Arc<Issuer> {
        async fn fetch(
            &self,
            creds: &Credentials,
            grant: &Grant,
        ) -> Result<TokenResponse, FetchError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            assert_eq!(creds.client_id.expose(), "client-1");
            tokio::time::sleep(self.delay).await;
            let Grant::RefreshToken(rt) = grant else {
                panic!("only the refresh grant is used")
            };
            if self.down.load(Ordering::SeqCst) {
                return Err(FetchError::Connect("connection refused".into()));
            }
            if lock(&self.revoked).contains(rt.expose()) {
                return Err(FetchError::Http {
                    status: 400,
                    oauth: Some(OAuthError {
                        code: "invalid_grant".into(),
                        description: None,
                    }),
                    retry_after: None,
                });
            }
            Ok(TokenResponse {
                access_token: Secret::new(format!("at.{}.{n}", rt.expose())),
                lifetime: LIFETIME,
                lifetime_source: LifetimeSource::ExpiresIn,
                refresh_token: self
                    .rotate
                    .then(|| Secret::new(format!("{}.r{n}", rt.expose()))),
                scope: None,
                token_type: Some("Bearer".into()),
            })
        }
    }

    struct Fixture {
        tokens: Arc<SubjectTokens<Arc<Issuer>>>,
        issuer: Arc<Issuer>,
        store: Arc<FileStore>,
        ring: Arc<KeyRing>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn new(issuer: Issuer, max_cached: usize, subjects: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(FileStore::open(dir.path()).await.unwrap());
            let ring = Arc::new(ring(&[1]));
            for s in subjects {
                let id = id(s);
                let sealed = ring
                    .seal("fdx", &id, &Secret::new(format!("rt-{s}")))
                    .unwrap();
                store
                    .put("fdx", &Record::enrolled(id, sealed, 1), None)
                    .await
                    .unwrap();
            }
            let issuer = Arc::new(issuer);
            let settings = Settings {
                token: "fdx".into(),
                client_id: SecretSource::Inline(Secret::new("client-1")),
                client_secret: None,
                max_cached,
                token_wait: Duration::from_secs(5),
                refresh_ratio: 0.75,
                refresh_margin: Duration::from_secs(30),
                failure_hold: DEFAULT_FAILURE_HOLD,
            };
            let tokens = SubjectTokens::new(settings, issuer.clone(), store.clone(), ring.clone());
            Self {
                tokens,
                issuer,
                store,
                ring,
                _dir: dir,
            }
        }

        fn calls(&self) -> usize {
            self.issuer.calls.load(Ordering::SeqCst)
        }

        async fn record(&self, s: &str) -> Record {
            self.store.get("fdx", &id(s)).await.unwrap().unwrap()
        }
    }

    fn id(s: &str) -> SubjectId {
        SubjectId::parse(s).unwrap()
    }

    fn value(t: &AccessToken) -> String {
        t.header().to_str().unwrap().to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_waiters_cause_one_token_request() {
        let issuer = Issuer {
            delay: Duration::from_millis(200),
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        let gets = (0..1000).map(|_| {
            let tokens = f.tokens.clone();
            tokio::spawn(async move { tokens.get(&id("c1")).await })
        });
        let results = futures_util::future::join_all(gets).await;
        let values: HashSet<String> = results
            .into_iter()
            .map(|r| value(&r.unwrap().unwrap()))
            .collect();
        assert_eq!(values, HashSet::from(["Bearer at.rt-c1.1".to_owned()]));
        assert_eq!(f.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_subjects_never_get_each_others_token() {
        let f = Fixture::new(Issuer::default(), 10, &["c1", "c2", "c3"]).await;
        let gets = (0..300).map(|i| {
            let tokens = f.tokens.clone();
            let who = format!("c{}", i % 3 + 1);
            tokio::spawn(async move { (who.clone(), tokens.get(&id(&who)).await) })
        });
        for r in futures_util::future::join_all(gets).await {
            let (who, token) = r.unwrap();
            let v = value(&token.unwrap());
            assert!(v.starts_with(&format!("Bearer at.rt-{who}.")), "{who}: {v}");
        }
        assert_eq!(f.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_refresh_point_the_old_token_serves_while_one_refresh_runs() {
        let issuer = Issuer {
            delay: Duration::from_secs(1),
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        let first = value(&f.tokens.get(&id("c1")).await.unwrap());
        assert_eq!(f.record("c1").await.generation, 2); // last_refresh recorded
        // Before the refresh point: no request.
        tokio::time::advance(Duration::from_secs(150)).await;
        assert_eq!(value(&f.tokens.get(&id("c1")).await.unwrap()), first);
        assert_eq!(f.calls(), 1);
        // Past it (225 s less jitter at most), still valid: served at once, one refresh starts.
        tokio::time::advance(Duration::from_secs(90)).await;
        for _ in 0..10 {
            assert_eq!(value(&f.tokens.get(&id("c1")).await.unwrap()), first);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = value(&f.tokens.get(&id("c1")).await.unwrap());
            if v != first {
                assert_eq!(v, "Bearer at.rt-c1.2");
                break;
            }
            assert!(Instant::now() < deadline, "no background refresh");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(f.calls(), 2);
        // Nothing durable changed within the hour: the record was not rewritten.
        assert_eq!(f.record("c1").await.generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_grant_marks_the_subject_needs_reauth_without_a_storm() {
        let f = Fixture::new(Issuer::default(), 10, &["c1", "c2"]).await;
        lock(&f.issuer.revoked).insert("rt-c1".into());
        let waiters = (0..50).map(|_| {
            let tokens = f.tokens.clone();
            tokio::spawn(async move { tokens.get(&id("c1")).await })
        });
        for r in futures_util::future::join_all(waiters).await {
            assert_eq!(r.unwrap().unwrap_err(), SubjectTokenError::NeedsReauth);
        }
        assert_eq!(f.calls(), 1);
        let record = f.record("c1").await;
        assert_eq!(record.state, SubjectState::NeedsReauth);
        assert_eq!(record.last_error.as_deref(), Some("invalid_grant"));
        // Later callers, in memory or after eviction, cause no request either.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            f.tokens.get(&id("c1")).await.unwrap_err(),
            SubjectTokenError::NeedsReauth
        );
        f.tokens.forget(&id("c1"));
        assert_eq!(
            f.tokens.get(&id("c1")).await.unwrap_err(),
            SubjectTokenError::NeedsReauth
        );
        assert_eq!(f.calls(), 1);
        // The other subject is unaffected.
        assert!(f.tokens.get(&id("c2")).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_refresh_token_is_stored_sealed_with_the_newest_key_before_use() {
        let issuer = Issuer {
            rotate: true,
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        // Re-key the store under a rotated ring: the record was sealed with the old key.
        let rotated = Arc::new(ring(&[2, 1]));
        let tokens = SubjectTokens::new(
            f.tokens.settings.clone(),
            f.issuer.clone(),
            f.store.clone(),
            rotated.clone(),
        );
        assert_eq!(f.record("c1").await.key_id(), f.ring.newest_id());
        tokens.get(&id("c1")).await.unwrap();
        let record = f.record("c1").await;
        assert_eq!(record.key_id(), rotated.newest_id());
        assert_eq!(
            rotated
                .open("fdx", &id("c1"), &record.refresh_token)
                .unwrap()
                .expose(),
            "rt-c1.r1"
        );
        // The next refresh sends the rotated token.
        tokio::time::advance(LIFETIME).await;
        let v = value(&tokens.get(&id("c1")).await.unwrap());
        assert_eq!(v, "Bearer at.rt-c1.r1.2");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_subject_causes_no_token_request() {
        let f = Fixture::new(Issuer::default(), 10, &["c1"]).await;
        assert_eq!(
            f.tokens.get(&id("nobody")).await.unwrap_err(),
            SubjectTokenError::UnknownSubject
        );
        assert_eq!(f.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_give_up_after_token_wait_but_the_refresh_completes() {
        let issuer = Issuer {
            delay: Duration::from_secs(8),
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        let start = Instant::now();
        assert_eq!(
            f.tokens.get(&id("c1")).await.unwrap_err(),
            SubjectTokenError::Timeout
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A second caller joins the same refresh, which ends at 8 s.
        let v = value(&f.tokens.get(&id("c1")).await.unwrap());
        assert_eq!(v, "Bearer at.rt-c1.1");
        assert_eq!(start.elapsed(), Duration::from_secs(8));
        assert_eq!(f.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_held_briefly_instead_of_retried_per_request() {
        let f = Fixture::new(Issuer::default(), 10, &["c1"]).await;
        f.issuer.down.store(true, Ordering::SeqCst);
        for _ in 0..20 {
            let e = f.tokens.get(&id("c1")).await.unwrap_err();
            assert!(matches!(e, SubjectTokenError::Failed(_)), "{e}");
        }
        assert_eq!(f.calls(), 1);
        f.issuer.down.store(false, Ordering::SeqCst);
        tokio::time::advance(DEFAULT_FAILURE_HOLD).await;
        assert!(f.tokens.get(&id("c1")).await.is_ok());
        assert_eq!(f.calls(), 2);
        // The subject stays active: a transient failure is not the customer's problem.
        assert_eq!(f.record("c1").await.state, SubjectState::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_background_refresh_is_not_retried_by_every_request() {
        let f = Fixture::new(Issuer::default(), 10, &["c1"]).await;
        let first = value(&f.tokens.get(&id("c1")).await.unwrap());
        f.issuer.down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(240)).await;
        // Requests keep coming during the outage, well within the failure hold.
        for _ in 0..20 {
            assert_eq!(value(&f.tokens.get(&id("c1")).await.unwrap()), first);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.calls(), 2);
        // After the hold, the next request tries again.
        f.issuer.down.store(false, Ordering::SeqCst);
        tokio::time::advance(DEFAULT_FAILURE_HOLD).await;
        f.tokens.get(&id("c1")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while value(&f.tokens.get(&id("c1")).await.unwrap()) == first {
            assert!(Instant::now() < deadline, "no refresh after the hold");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(f.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_holds_at_most_max_cached_subjects() {
        let subjects: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let names: Vec<&str> = subjects.iter().map(String::as_str).collect();
        let f = Fixture::new(Issuer::default(), 3, &names).await;
        for s in &names {
            assert!(f.tokens.get(&id(s)).await.is_ok());
            assert!(f.tokens.cached() <= 3, "{}", f.tokens.cached());
        }
        // The most recent ones are kept: asking again costs nothing.
        let calls = f.calls();
        f.tokens.get(&id("c9")).await.unwrap();
        assert_eq!(f.calls(), calls);
        // An evicted one is fetched again.
        f.tokens.get(&id("c0")).await.unwrap();
        assert_eq!(f.calls(), calls + 1);
    }
}
