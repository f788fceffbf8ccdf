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
//! - **Rejected by the upstream.** [`SubjectTokens::invalidate`] (an upstream replay status)
//!   drops the rejected token and refreshes, at most once per `forced_refresh_interval` per
//!   subject; [`SubjectTokens::consent_revoked`] (Flinks 602) marks the subject
//!   `needs_reauth` in the store and in memory without a token request.
//! - **Last use.** A request that gets a token notes the time in the record at most once per
//!   [`LAST_USE_WRITE_INTERVAL`] per subject, in a task of its own (never on the request path).
//! - **Keep-alive.** [`SubjectTokens::keepalive`] pages through the store every
//!   [`SWEEP_INTERVAL`], refreshes (spaced and jittered) every active subject whose refresh
//!   token was last used more than `keepalive_after` ago, and re-counts subjects per state for
//!   `bearer_proxy_subjects` on the way.
//!
//! - **Replicas** (`[subjects] store = "redis"`, issue #13). With a [`Coordination`] handle,
//!   a refresh is one per subject across every process sharing the store: after the
//!   in-process single flight, the refresh takes the subject's lease; holding it, it re-reads
//!   the subject's shared access-token slot and uses a token another replica stored
//!   meanwhile, else refreshes (the record re-read inside), writes the refresh token with the
//!   compare-and-set, and stores the access token in the slot with a TTL ending at this
//!   process's refresh point (before the expiry the issuer granted, measured from when the
//!   request was sent). A process that does not get the lease polls the slot and the record
//!   (bounded by `token_wait`) and never calls the token endpoint. A lease or read that
//!   fails (Redis unreachable) fails the refresh *before* any token request: a rotated
//!   refresh token that cannot be stored would be lost. Cached valid tokens are still served.
//! - **A lease lost while stalled.** The compare-and-set refuses the late write. If the
//!   record then holds another refresh token (another replica refreshed), this process
//!   discards its own answer and uses the token in the slot (or fails, and the next request
//!   refreshes with the stored refresh token): it never serves a token whose refresh token
//!   is not the stored one, so the replicas never diverge. The refresh token it got is lost;
//!   the issuer sees it as never used.
//!
//! On the request path a lookup takes two short `std::sync::Mutex` sections (the map, then
//! the subject's slot) and no `await` unless a refresh is needed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::SubjectId;
use super::coordination::Coordination;
use super::keyring::{KeyRing, Sealed};
use super::record::{Record, StoreError, SubjectState, SubjectStore};
use crate::metrics::{SubjectMetrics, SubjectRefreshResult};
use crate::secret::SecretSource;
use crate::token::AccessToken;
use crate::token::client::{Credentials, Fetch, FetchError, Grant};
use crate::token::{ErrorKind, refresh_delay};

/// A stored `last_refresh` older than this is brought up to date on the next refresh. Hours
/// are precise enough for the keep-alive (which thinks in days) and for people.
pub const LAST_REFRESH_WRITE_INTERVAL: Duration = Duration::from_secs(3600);

/// A request's use of a subject is written to its record at most this often: `last_use` is
/// for people and dashboards, and an hour keeps 100,000 busy subjects at under 30 writes a
/// second.
pub const LAST_USE_WRITE_INTERVAL: Duration = Duration::from_secs(3600);

/// How often the keep-alive pages through the store (and re-counts subjects per state). A
/// pass reads every record (100 listing pages for 100,000 subjects, no decryption), so a
/// quarter of an hour costs about a hundred small reads a second on average, while
/// `keepalive_after` (at least an hour, 20 days by default) is checked far more often than it
/// can matter.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// The first keep-alive pass runs this long after start, so that a restart after a long
/// outage catches up soon without competing with the start-up itself.
pub const FIRST_SWEEP_DELAY: Duration = Duration::from_secs(60);

/// Mean spacing between two keep-alive refreshes (each spacing is drawn uniformly from half
/// to one and a half of it, so replicas and restarts do not line up): five token requests a
/// second at most, so even 100,000 subjects falling due together are kept alive in under six
/// hours, far inside the ten days `keepalive_after`'s default leaves before Flinks' 30-day
/// idle timeout.
pub const KEEPALIVE_SPACING: Duration = Duration::from_millis(200);

/// What a refresh failure that is not the subject's fault is remembered for: callers during
/// this time get the failure at once instead of each causing a token request.
pub const DEFAULT_FAILURE_HOLD: Duration = Duration::from_secs(1);

/// Shortest lease on a subject's refresh. The lease must outlast the work it covers or a
/// second replica starts a refresh with the same refresh token; 30 s is far beyond any sane
/// token request while a crashed holder blocks its subject for half a minute at most (the
/// other replicas keep serving cached tokens meanwhile).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(30);

/// Token requests one refresh sends while holding the lease: a subject's refresh tries once
/// (a failure is held for `failure_hold`, and the next request tries again under a new lease).
const ATTEMPTS_PER_LEASE: u32 = 1;

/// How often a replica that did not get the lease looks for the token the holder stores. A
/// Redis read costs well under a millisecond and a token request tens to hundreds, so 50 ms
/// adds little latency while a waiting subject costs a replica at most 60 reads a second, and
/// only during the refresh.
pub const LEASE_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The lease TTL for a token whose requests time out after `request_timeout`: twice what the
/// holder's requests can take, at least [`MIN_LEASE_TTL`]. Twice, so a holder whose request
/// ends at its timeout still writes the result well inside its lease.
pub fn lease_ttl(request_timeout: Duration) -> Duration {
    (request_timeout * 2 * ATTEMPTS_PER_LEASE).max(MIN_LEASE_TTL)
}

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
    /// Least time between two refreshes forced by an upstream rejecting a subject's token
    /// (`forced_refresh_interval` of the token entry).
    pub forced_interval: Duration,
    /// How long a refresh holds the subject's lease (with a shared store); see [`lease_ttl`].
    pub lease_ttl: Duration,
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
    /// When an upstream rejection last forced a refresh (rate limit of `invalidate`).
    last_forced: Option<Instant>,
    /// When this process last wrote the subject's `last_use`.
    use_written: Option<Instant>,
}

/// The access tokens of one per-subject token entry.
pub(crate) struct SubjectTokens<F> {
    settings: Settings,
    fetch: F,
    store: Arc<dyn SubjectStore>,
    ring: Arc<KeyRing>,
    metrics: SubjectMetrics,
    slots: Mutex<Cache>,
    /// Leases and shared slots when the store is shared by replicas (Redis).
    coord: Option<Arc<dyn Coordination>>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<SubjectId, Arc<Mutex<Slot>>>,
    tick: u64,
}

impl<F: Fetch> SubjectTokens<F> {
    /// Per-subject tokens over `store` without replicas to coordinate with (unit tests; the
    /// server uses [`SubjectTokens::with_coordination`]).
    #[cfg(test)]
    pub(crate) fn new(
        settings: Settings,
        fetch: F,
        store: Arc<dyn SubjectStore>,
        ring: Arc<KeyRing>,
        metrics: SubjectMetrics,
    ) -> Arc<Self> {
        Self::with_coordination(settings, fetch, store, ring, metrics, None)
    }

    /// As [`SubjectTokens::new`], refreshing through `coord`'s leases and shared slots when
    /// given (the store is shared by replicas).
    pub(crate) fn with_coordination(
        settings: Settings,
        fetch: F,
        store: Arc<dyn SubjectStore>,
        ring: Arc<KeyRing>,
        metrics: SubjectMetrics,
        coord: Option<Arc<dyn Coordination>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            fetch,
            store,
            ring,
            metrics,
            slots: Mutex::new(Cache::default()),
            coord,
        })
    }

    /// Subjects held in memory.
    pub(crate) fn cached(&self) -> usize {
        lock(&self.slots).map.len()
    }

    /// The token entry's name.
    pub(crate) fn name(&self) -> &str {
        &self.settings.token
    }

    /// The entry's metric handles (the proxy counts its refusals; the subjects API its
    /// enrolments and deletions, through [`SubjectMetrics::transition`]).
    pub(crate) fn metrics(&self) -> &SubjectMetrics {
        &self.metrics
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
                    let stale = s.token.clone();
                    self.start_flight(subject, &slot, &mut s, stale);
                }
                let note = use_due(&mut s, now);
                drop(s);
                if note {
                    self.write_last_use(subject);
                }
                return Ok(t);
            }
            if let Some(e) = held {
                return Err(e);
            }
            match &s.flight {
                Some(rx) => rx.clone(),
                None => {
                    let stale = s.token.clone();
                    self.start_flight(subject, &slot, &mut s, stale)
                }
            }
        };
        let outcome = wait_flight(&mut rx, self.settings.token_wait).await;
        if outcome.is_ok() && use_due(&mut lock(&slot), Instant::now()) {
            self.write_last_use(subject);
        }
        outcome
    }

    /// An upstream rejected `seen`, the token sent for `subject`: a newer valid token if one is
    /// in place or arrives within `wait` (zero: start the refresh, do not wait). Concurrent
    /// callers share one refresh; `None` if the refresh failed or timed out, or if one was
    /// forced less than `forced_refresh_interval` ago for this subject (rate limit, as for
    /// named tokens).
    pub(crate) async fn invalidate(
        self: &Arc<Self>,
        subject: &SubjectId,
        seen: &Arc<AccessToken>,
        wait: Duration,
    ) -> Option<Arc<AccessToken>> {
        let slot = self.slot(subject);
        let mut rx = {
            let mut s = lock(&slot);
            let now = Instant::now();
            if let Some(t) = s
                .token
                .clone()
                .filter(|t| !Arc::ptr_eq(t, seen) && t.is_valid_at(now))
            {
                return Some(t);
            }
            match s.flight.clone() {
                Some(rx) => rx,
                None => {
                    if s.last_forced
                        .is_some_and(|at| now < at + self.settings.forced_interval)
                    {
                        return None;
                    }
                    s.last_forced = Some(now);
                    // The rejected token is not handed out again: later callers wait for
                    // the refresh instead.
                    if s.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, seen)) {
                        s.token = None;
                    }
                    s.failure = None;
                    tracing::info!(token = %self.settings.token, subject = %subject, "upstream rejected the subject's token; refreshing");
                    self.start_flight(subject, &slot, &mut s, Some(seen.clone()))
                }
            }
        };
        if wait.is_zero() {
            return None;
        }
        wait_flight(&mut rx, wait)
            .await
            .ok()
            .filter(|t| !Arc::ptr_eq(t, seen))
    }

    /// The upstream said the customer's consent is gone (Flinks 602) in answer to `seen`:
    /// the subject becomes `needs_reauth` in memory and in the store, so later requests are
    /// answered `reauth_required` without a token request. Ignored if the subject's token
    /// changed meanwhile (a new enrolment replaced it).
    pub(crate) async fn consent_revoked(&self, subject: &SubjectId, seen: &Arc<AccessToken>) {
        {
            let cache = lock(&self.slots);
            let Some(slot) = cache.map.get(subject) else {
                return;
            };
            let mut s = lock(slot);
            if !s.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, seen)) {
                return;
            }
            s.token = None;
            s.failure = Some((SubjectTokenError::NeedsReauth, None));
        }
        tracing::warn!(token = %self.settings.token, subject = %subject, "upstream says the consent is gone (602): subject needs to consent again");
        self.store_needs_reauth(subject, "consent_revoked", None)
            .await;
    }

    /// Writes `needs_reauth` into the subject's record and moves the state gauges. A
    /// compare-and-set, retried when only something else changed (a `last_use` note); with
    /// `sent`, only while the record still holds that refresh token (a new enrolment that
    /// raced it wins).
    async fn store_needs_reauth(&self, subject: &SubjectId, why: &str, sent: Option<&Sealed>) {
        let token = self.settings.token.as_str();
        for _ in 0..3 {
            let record = match self.store.get(token, subject).await {
                Ok(Some(r))
                    if r.state == SubjectState::Active
                        && sent.is_none_or(|sent| *sent == r.refresh_token) =>
                {
                    r
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(token, subject = %subject, error = %e, "could not record needs_reauth");
                    return;
                }
            };
            let updated = Record {
                state: SubjectState::NeedsReauth,
                last_error: Some(why.to_owned()),
                ..record.clone()
            };
            match self
                .store
                .put(token, &updated, Some(record.generation))
                .await
            {
                Ok(_) => {
                    self.metrics.transition(
                        Some(SubjectState::Active.as_str()),
                        Some(SubjectState::NeedsReauth.as_str()),
                    );
                    // No replica may take the gone consent's token from the shared slot.
                    if let Err(e) = self.unshare(subject).await {
                        tracing::debug!(token, subject = %subject, error = %e, "could not empty the shared access token");
                    }
                    return;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => {
                    tracing::warn!(token, subject = %subject, error = %e, "could not record needs_reauth");
                    return;
                }
            }
        }
        tracing::warn!(token, subject = %subject, "could not record needs_reauth: the record kept changing");
    }

    /// Writes the time of use into the subject's record, in a task of its own.
    fn write_last_use(self: &Arc<Self>, subject: &SubjectId) {
        let (this, subject) = (self.clone(), subject.clone());
        tokio::spawn(async move {
            let token = this.settings.token.as_str();
            let now = crate::time::unix_secs(SystemTime::now());
            // One retry: a refresh may have rewritten the record between read and write.
            for _ in 0..2 {
                let Ok(Some(record)) = this.store.get(token, &subject).await else {
                    return;
                };
                let updated = Record {
                    last_use: Some(now),
                    ..record.clone()
                };
                match this
                    .store
                    .put(token, &updated, Some(record.generation))
                    .await
                {
                    Ok(_) => return,
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => {
                        tracing::debug!(token, subject = %subject, error = %e, "could not record last_use");
                        return;
                    }
                }
            }
        });
    }

    /// Keeps idle subjects' refresh tokens alive until the process ends: every
    /// [`SWEEP_INTERVAL`] (the first after [`FIRST_SWEEP_DELAY`]), one [`Self::sweep`].
    pub(crate) async fn keepalive(self: Arc<Self>, keepalive_after: Duration) {
        tokio::time::sleep(FIRST_SWEEP_DELAY).await;
        loop {
            let started = Instant::now();
            match self.sweep(keepalive_after).await {
                Ok(n) if n > 0 => {
                    tracing::info!(token = %self.settings.token, refreshed = n, "keep-alive pass done");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(token = %self.settings.token, error = %e, "keep-alive pass failed; next pass as scheduled");
                }
            }
            tokio::time::sleep_until(started + SWEEP_INTERVAL).await;
        }
    }

    /// One keep-alive pass: pages through every record (one page in memory at a time),
    /// refreshes each active subject whose refresh token was last used (`last_refresh`, else
    /// `enrolled_at`) more than `keepalive_after` ago, spaced by about [`KEEPALIVE_SPACING`],
    /// and sets `bearer_proxy_subjects` to the states counted. Returns how many it refreshed.
    pub(crate) async fn sweep(
        self: &Arc<Self>,
        keepalive_after: Duration,
    ) -> Result<u64, StoreError> {
        let token = self.settings.token.as_str();
        let mut counts = [0u64; SubjectState::ALL.len()];
        let mut refreshed = 0;
        // Subjects skipped because the shared store failed: logged once per pass.
        let mut unreachable: Option<(u64, String)> = None;
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list(token, None, cursor.as_ref(), super::record::MAX_PAGE)
                .await?;
            for record in &page.records {
                if let Some(i) = SubjectState::ALL.iter().position(|s| *s == record.state) {
                    counts[i] += 1;
                }
                let now = crate::time::unix_secs(SystemTime::now());
                let last = record.last_refresh.unwrap_or(record.enrolled_at);
                if record.state != SubjectState::Active
                    || now.saturating_sub(last) <= keepalive_after.as_secs()
                {
                    continue;
                }
                let spacing = KEEPALIVE_SPACING.mul_f64(0.5 + rand::random::<f64>());
                tokio::time::sleep(spacing).await;
                match self.keepalive_one(&record.subject).await {
                    Ok(KeepAlive::Refreshed) => {
                        refreshed += 1;
                        tracing::info!(token, subject = %record.subject, "keep-alive refresh done");
                    }
                    Ok(KeepAlive::Busy) => {}
                    Ok(KeepAlive::Unreachable(e)) => {
                        unreachable.get_or_insert((0, e)).0 += 1;
                    }
                    Err(e) => {
                        tracing::warn!(token, subject = %record.subject, error = %e, "keep-alive refresh failed");
                    }
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if let Some((n, first)) = unreachable {
            tracing::warn!(token, skipped = n, error = %first, "keep-alive skipped subjects whose lease could not be taken (shared store unreachable); next pass as scheduled");
        }
        for (state, n) in SubjectState::ALL.iter().zip(counts) {
            self.metrics.set_state(state.as_str(), n);
        }
        Ok(refreshed)
    }

    /// Refreshes one subject for the keep-alive: through its slot (sharing a refresh with
    /// requests) when it is in memory, else without caching its access token (an idle subject
    /// must not push a busy one out of memory). With a shared store, only under the subject's
    /// lease: a subject another replica is refreshing is skipped (that refresh keeps it
    /// alive), and one whose lease cannot be taken (Redis unreachable) too.
    async fn keepalive_one(
        self: &Arc<Self>,
        subject: &SubjectId,
    ) -> Result<KeepAlive, SubjectTokenError> {
        if let Some(coord) = self.coord.as_deref() {
            let token = self.settings.token.as_str();
            let lease = match coord
                .try_lease(token, subject, self.settings.lease_ttl)
                .await
            {
                Ok(Some(lease)) => lease,
                Ok(None) => return Ok(KeepAlive::Busy),
                Err(e) => return Ok(KeepAlive::Unreachable(e.to_string())),
            };
            let outcome = self.refresh_once(subject, Some(coord)).await;
            if let Err(e) = coord.release(lease).await {
                tracing::debug!(token, subject = %subject, error = %e, "could not release the subject's lease");
            }
            return outcome.map(|_| KeepAlive::Refreshed);
        }
        let slot = lock(&self.slots).map.get(subject).cloned();
        match slot {
            Some(slot) => {
                let mut rx = {
                    let mut s = lock(&slot);
                    match s.flight.clone() {
                        Some(rx) => rx,
                        None => {
                            let stale = s.token.clone();
                            self.start_flight(subject, &slot, &mut s, stale)
                        }
                    }
                };
                wait_flight(&mut rx, self.settings.token_wait)
                    .await
                    .map(|_| KeepAlive::Refreshed)
            }
            None => self
                .refresh(subject, None)
                .await
                .map(|_| KeepAlive::Refreshed),
        }
    }

    /// Forgets a subject's token and any remembered failure (after an enrolment or deletion).
    // The subjects API (written on another branch) calls it.
    #[cfg_attr(not(test), allow(dead_code))]
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
    /// `stale` is the token being replaced (expired, past its refresh point, or rejected by
    /// the upstream): a shared slot still holding it does not count as a newer token.
    fn start_flight(
        self: &Arc<Self>,
        subject: &SubjectId,
        slot: &Arc<Mutex<Slot>>,
        s: &mut Slot,
        stale: Option<Arc<AccessToken>>,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        s.flight = Some(rx.clone());
        let (this, subject, slot) = (self.clone(), subject.clone(), slot.clone());
        tokio::spawn(async move {
            let outcome = this.refresh(&subject, stale.as_ref()).await;
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

    /// One refresh of `subject`'s token (`stale`: the token it replaces). Without a
    /// coordination handle, [`Self::refresh_once`]; with one, under the subject's lease, or
    /// by waiting for the token of the replica holding it.
    async fn refresh(
        &self,
        subject: &SubjectId,
        stale: Option<&Arc<AccessToken>>,
    ) -> Result<(Arc<AccessToken>, Instant), SubjectTokenError> {
        let Some(coord) = self.coord.as_deref() else {
            return self.refresh_once(subject, None).await;
        };
        let token = self.settings.token.as_str();
        let deadline = Instant::now() + self.settings.token_wait;
        loop {
            let lease = coord
                .try_lease(token, subject, self.settings.lease_ttl)
                .await
                .map_err(|e| self.failed(subject, "shared store (lease)", &e))?;
            if let Some(lease) = lease {
                // Another replica may have refreshed between our miss and the lease.
                let outcome = match self.shared_token(coord, subject, stale).await {
                    Ok(Some(found)) => Ok(found),
                    Ok(None) => self.refresh_once(subject, Some(coord)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = coord.release(lease).await {
                    // It lapses at its TTL; the other replicas wait or serve cached tokens.
                    tracing::debug!(token, subject = %subject, error = %e, "could not release the subject's lease");
                }
                return outcome;
            }
            // Another replica holds the lease: its token appears in the slot, or its
            // outcome in the record (deleted, needs_reauth).
            if let Some(found) = self.shared_token(coord, subject, stale).await? {
                return Ok(found);
            }
            match self.store.get(token, subject).await {
                Ok(Some(r)) if r.state == SubjectState::NeedsReauth => {
                    return Err(SubjectTokenError::NeedsReauth);
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(SubjectTokenError::UnknownSubject),
                Err(e) => return Err(self.failed(subject, "subject store", &e)),
            }
            if Instant::now() + LEASE_POLL_INTERVAL > deadline {
                return Err(SubjectTokenError::Timeout);
            }
            tokio::time::sleep(LEASE_POLL_INTERVAL).await;
        }
    }

    /// Logs a refresh failure of `subject` and turns it into the callers' error.
    fn failed(
        &self,
        subject: &SubjectId,
        what: &str,
        e: &dyn std::fmt::Display,
    ) -> SubjectTokenError {
        tracing::warn!(token = %self.settings.token, subject = %subject, error = %e, "subject refresh failed: {what}");
        SubjectTokenError::Failed(format!("{what}: {e}"))
    }

    /// The token in `subject`'s shared slot with this process's refresh point for it, unless
    /// the slot is empty, holds `stale` or a token too close to its expiry. A slot that does
    /// not open (a key no longer configured, an altered value) counts as empty: the refresh
    /// replaces it.
    async fn shared_token(
        &self,
        coord: &dyn Coordination,
        subject: &SubjectId,
        stale: Option<&Arc<AccessToken>>,
    ) -> Result<Option<(Arc<AccessToken>, Instant)>, SubjectTokenError> {
        let token = self.settings.token.as_str();
        let shared = match coord.shared(&self.ring, token, subject).await {
            Ok(Some(shared)) => shared,
            Ok(None) => return Ok(None),
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!(token, subject = %subject, error = %e, "ignoring the subject's shared access token");
                return Ok(None);
            }
            Err(e) => return Err(self.failed(subject, "shared store (access token)", &e)),
        };
        // What is left of the lifetime, to the nanosecond: whole seconds on this side would
        // stretch the token up to a second past the expiry the writer stored.
        let now_wall = SystemTime::now();
        let since_epoch = now_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let lifetime = Duration::from_secs(shared.expires_at).saturating_sub(since_epoch);
        if lifetime.is_zero() {
            return Ok(None);
        }
        let now = Instant::now();
        let Ok(access) =
            AccessToken::new(shared.access_token.expose(), now, now_wall, lifetime, None)
        else {
            return Ok(None);
        };
        if !access.is_valid_at(now) || stale.is_some_and(|old| old.header() == access.header()) {
            return Ok(None);
        }
        let delay = refresh_delay(
            lifetime,
            self.settings.refresh_ratio,
            self.settings.refresh_margin,
            rand::random::<f64>(),
        );
        Ok(Some((Arc::new(access), now + delay)))
    }

    /// One refresh: read the record, send its refresh token, store what changed; with
    /// `coord` (whose lease the caller holds), also share the access token.
    async fn refresh_once(
        &self,
        subject: &SubjectId,
        coord: Option<&dyn Coordination>,
    ) -> Result<(Arc<AccessToken>, Instant), SubjectTokenError> {
        let token = self.settings.token.as_str();
        let failed = |what: &str, e: &dyn std::fmt::Display| self.failed(subject, what, e);
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
        self.metrics.refresh(match &answer {
            Ok(_) => SubjectRefreshResult::Ok,
            Err(e) if is_invalid_grant(e) => SubjectRefreshResult::InvalidGrant,
            Err(_) => SubjectRefreshResult::Error,
        });
        let response = match answer {
            Ok(r) => r,
            Err(e) if is_invalid_grant(&e) => {
                tracing::warn!(token, subject = %subject, "refresh token rejected (invalid_grant): subject needs to consent again");
                // A new enrolment that arrived meanwhile wins, and its record stays active.
                self.store_needs_reauth(subject, "invalid_grant", Some(&record.refresh_token))
                    .await;
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
            // Stored before the access token is used: a rotated refresh token must not be
            // lost. If it cannot be stored, the access token is not handed out either.
            let mut base = record.clone();
            let mut tries = 0;
            loop {
                let updated = Record {
                    refresh_token: sealed.clone(),
                    last_refresh: Some(now_unix),
                    last_error: None,
                    ..base.clone()
                };
                match self.store.put(token, &updated, Some(base.generation)).await {
                    Ok(_) => break,
                    // Someone else rewrote the record meanwhile (a `last_use` note, another
                    // replica's refresh): apply this refresh on top of it, unless the refresh
                    // token it holds is no longer the one just sent (a new enrolment wins).
                    Err(StoreError::Conflict { .. }) if tries < 3 => {
                        tries += 1;
                        match self.store.get(token, subject).await {
                            Ok(Some(now))
                                if now.refresh_token == record.refresh_token
                                    && now.state == SubjectState::Active =>
                            {
                                base = now;
                            }
                            Ok(_) => {
                                // A replica that refreshed while this one stalled past its
                                // lease: its token is the one that matches the stored
                                // refresh token, so it is served instead of ours.
                                if let Some(coord) = coord
                                    && let Some(found) =
                                        self.shared_token(coord, subject, None).await?
                                {
                                    tracing::warn!(token, subject = %subject, "another replica refreshed the subject meanwhile (this one's lease lapsed); using its token, this refresh's result is discarded");
                                    return Ok(found);
                                }
                                return Err(failed(
                                    "storing the refreshed record",
                                    &"the subject was refreshed elsewhere, enrolled again or deleted meanwhile",
                                ));
                            }
                            Err(e) => return Err(failed("storing the refreshed record", &e)),
                        }
                    }
                    Err(e) => return Err(failed("storing the refreshed record", &e)),
                }
            }
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
        if let Some(coord) = coord {
            // The slot lapses at this process's refresh point, before the expiry the issuer
            // granted counted from when the request was sent (whole seconds, rounded down):
            // no replica takes a token from it that is about to expire.
            let expires_at = crate::time::unix_secs(sent_wall) + response.lifetime.as_secs();
            let ttl = (sent_at + delay).saturating_duration_since(Instant::now());
            if let Err(e) = coord
                .share(
                    &self.ring,
                    token,
                    subject,
                    &response.access_token,
                    expires_at,
                    ttl,
                )
                .await
            {
                // The refresh token is stored; the other replicas refresh on their own.
                tracing::warn!(token, subject = %subject, error = %e, "could not share the subject's access token");
            }
        }
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

    /// With a shared store, puts the access token an enrolment just obtained (request sent at
    /// `sent_at`/`sent_wall`, granted `lifetime`) into the subject's shared slot, replacing
    /// the previous consent's token, so other replicas serve the subject without a token
    /// request. A failure is logged: the record is what matters, and the other replicas then
    /// refresh on their own.
    pub(crate) async fn share_enrolled(
        &self,
        subject: &SubjectId,
        access_token: &crate::secret::Secret,
        sent_at: Instant,
        sent_wall: SystemTime,
        lifetime: Duration,
    ) {
        let Some(coord) = self.coord.as_deref() else {
            return;
        };
        let token = self.settings.token.as_str();
        let delay = refresh_delay(
            lifetime,
            self.settings.refresh_ratio,
            self.settings.refresh_margin,
            rand::random::<f64>(),
        );
        let expires_at = crate::time::unix_secs(sent_wall) + lifetime.as_secs();
        let ttl = (sent_at + delay).saturating_duration_since(Instant::now());
        let outcome = if ttl.is_zero() {
            coord.unshare(token, subject).await
        } else {
            coord
                .share(&self.ring, token, subject, access_token, expires_at, ttl)
                .await
        };
        if let Err(e) = outcome {
            tracing::warn!(token, subject = %subject, error = %e, "could not share the enrolled subject's access token");
        }
    }

    /// With a shared store, empties the subject's shared slot (deleted, or refreshed on
    /// request), so no replica takes the old token from it. Replicas that hold the old token
    /// in memory keep it until it expires or is rejected.
    pub(crate) async fn unshare(&self, subject: &SubjectId) -> Result<(), StoreError> {
        match self.coord.as_deref() {
            Some(coord) => coord.unshare(&self.settings.token, subject).await,
            None => Ok(()),
        }
    }

    /// The valid access token held for `subject`, if any, without counting as a use or
    /// starting a refresh (for the API's view and for revocation).
    pub(crate) fn peek(&self, subject: &SubjectId) -> Option<Arc<AccessToken>> {
        let slot = lock(&self.slots).map.get(subject).cloned()?;
        let s = lock(&slot);
        s.token.clone().filter(|t| t.is_valid_at(Instant::now()))
    }
}

/// What the keep-alive did with one due subject.
enum KeepAlive {
    /// Its refresh token was used.
    Refreshed,
    /// Another replica holds its lease (and is refreshing it).
    Busy,
    /// Its lease could not be taken: the shared store failed (the error, for the pass's log).
    Unreachable(String),
}

/// Whether the caller should write the subject's `last_use` now (and notes that it will).
fn use_due(s: &mut Slot, now: Instant) -> bool {
    if s.use_written
        .is_some_and(|at| now < at + LAST_USE_WRITE_INTERVAL)
    {
        return false;
    }
    s.use_written = Some(now);
    true
}

/// The outcome of the refresh behind `rx`, waiting at most `wait`.
async fn wait_flight(rx: &mut watch::Receiver<Option<Outcome>>, wait: Duration) -> Outcome {
    match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(outcome)) => outcome.clone().unwrap_or(Err(SubjectTokenError::Timeout)),
        // The flight task ended without a word: only if the runtime is shutting down.
        Ok(Err(_)) => Err(SubjectTokenError::Failed("refresh was abandoned".into())),
        Err(_) => Err(SubjectTokenError::Timeout),
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
    use crate::metrics::Metrics;
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
        /// The first answer's delay instead of `delay` (a holder stalling past its lease).
        first_delay: Option<Duration>,
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
            let delay = match self.first_delay {
                Some(d) if n == 1 => d,
                _ => self.delay,
            };
            tokio::time::sleep(delay).await;
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
                forced_interval: Duration::from_secs(5),
                lease_ttl: lease_ttl(Duration::from_secs(2)),
            };
            let metrics = Metrics::new().subject("fdx", &["active", "needs_reauth"]);
            let tokens = SubjectTokens::new(
                settings,
                issuer.clone(),
                store.clone(),
                ring.clone(),
                metrics,
            );
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
        // last_refresh recorded by the refresh, then last_use noted in a task of its own.
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.record("c1").await.last_use.is_none() {
            assert!(Instant::now() < deadline, "last_use never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let generation = f.record("c1").await.generation;
        assert_eq!(generation, 3);
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
        // Nothing durable changed within the hour: the record was not rewritten (neither by
        // the refresh nor by a second last_use note).
        assert_eq!(f.record("c1").await.generation, generation);
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
            f.tokens.metrics.clone(),
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
    #[tokio::test(start_paused = true)]
    async fn an_upstream_rejection_refreshes_once_per_interval_and_only_that_subject() {
        let f = Fixture::new(Issuer::default(), 10, &["c1", "c2"]).await;
        let t1 = f.tokens.get(&id("c1")).await.unwrap();
        let t2 = f.tokens.get(&id("c2")).await.unwrap();
        assert_eq!(f.calls(), 2);
        // Twenty requests saw the same rejected token: one refresh, all get the new token.
        let fresh = (0..20).map(|_| {
            let (tokens, t1) = (f.tokens.clone(), t1.clone());
            tokio::spawn(async move {
                tokens
                    .invalidate(&id("c1"), &t1, Duration::from_secs(5))
                    .await
            })
        });
        for r in futures_util::future::join_all(fresh).await {
            assert_eq!(value(&r.unwrap().unwrap()), "Bearer at.rt-c1.3");
        }
        assert_eq!(f.calls(), 3);
        // The rejected token is never handed out again.
        assert_eq!(
            value(&f.tokens.get(&id("c1")).await.unwrap()),
            "Bearer at.rt-c1.3"
        );
        // The new one rejected too, within forced_refresh_interval: no second refresh.
        let t1b = f.tokens.get(&id("c1")).await.unwrap();
        assert!(
            f.tokens
                .invalidate(&id("c1"), &t1b, Duration::from_secs(5))
                .await
                .is_none()
        );
        assert_eq!(f.calls(), 3);
        // After the interval it may refresh again.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            f.tokens
                .invalidate(&id("c1"), &t1b, Duration::from_secs(5))
                .await
                .is_some()
        );
        assert_eq!(f.calls(), 4);
        // The other subject's token was untouched.
        assert!(Arc::ptr_eq(&f.tokens.get(&id("c2")).await.unwrap(), &t2));
    }

    #[tokio::test(start_paused = true)]
    async fn consent_revoked_marks_needs_reauth_in_memory_and_store_without_a_token_request() {
        let f = Fixture::new(Issuer::default(), 10, &["c1", "c2"]).await;
        let old = f.tokens.get(&id("c1")).await.unwrap();
        // A 602 for a token that is no longer the subject's current one changes nothing.
        f.tokens.forget(&id("c1"));
        let current = f.tokens.get(&id("c1")).await.unwrap();
        f.tokens.consent_revoked(&id("c1"), &old).await;
        assert_eq!(f.record("c1").await.state, SubjectState::Active);
        let calls = f.calls();
        f.tokens.consent_revoked(&id("c1"), &current).await;
        let record = f.record("c1").await;
        assert_eq!(record.state, SubjectState::NeedsReauth);
        assert_eq!(record.last_error.as_deref(), Some("consent_revoked"));
        assert_eq!(f.tokens.metrics.state("needs_reauth"), 1);
        for _ in 0..10 {
            assert_eq!(
                f.tokens.get(&id("c1")).await.unwrap_err(),
                SubjectTokenError::NeedsReauth
            );
        }
        assert_eq!(f.calls(), calls);
        assert!(f.tokens.get(&id("c2")).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn last_use_is_written_at_most_once_an_hour_per_subject() {
        let f = Fixture::new(Issuer::default(), 10, &["c1"]).await;
        let settled = |f: &Fixture| {
            let store = f.store.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let r = store.get("fdx", &id("c1")).await.unwrap().unwrap();
                    if r.last_use.is_some() {
                        return r;
                    }
                    assert!(Instant::now() < deadline, "last_use never written");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        f.tokens.get(&id("c1")).await.unwrap();
        let first = settled(&f).await;
        for _ in 0..50 {
            f.tokens.get(&id("c1")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(f.record("c1").await.generation, first.generation);
        tokio::time::advance(LAST_USE_WRITE_INTERVAL).await;
        f.tokens.get(&id("c1")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.record("c1").await.generation == first.generation {
            assert!(Instant::now() < deadline, "no second last_use write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Puts a record for `s` whose refresh token was last used `idle` ago.
    async fn enrol_idle(f: &Fixture, s: &str, idle: Duration, state: SubjectState) {
        let now = crate::time::unix_secs(SystemTime::now());
        let sealed = f
            .ring
            .seal("fdx", &id(s), &Secret::new(format!("rt-{s}")))
            .unwrap();
        let record = Record {
            state,
            last_refresh: Some(now - idle.as_secs()),
            ..Record::enrolled(id(s), sealed, now - idle.as_secs() - 10)
        };
        f.store.put("fdx", &record, None).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_keepalive_refreshes_idle_subjects_only_spaced_and_recounts_states() {
        const DAY: Duration = Duration::from_secs(86_400);
        let f = Fixture::new(Issuer::default(), 10, &[]).await;
        for i in 0..5 {
            enrol_idle(&f, &format!("idle{i}"), 21 * DAY, SubjectState::Active).await;
        }
        enrol_idle(&f, "busy", DAY, SubjectState::Active).await;
        enrol_idle(&f, "gone", 25 * DAY, SubjectState::NeedsReauth).await;
        let task = tokio::spawn(f.tokens.clone().keepalive(20 * DAY));
        // Nothing before the first pass.
        tokio::time::sleep(FIRST_SWEEP_DELAY - Duration::from_secs(1)).await;
        assert_eq!(f.calls(), 0);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(60);
        while f.calls() < 5 {
            assert!(Instant::now() < deadline, "idle subjects not kept alive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Five refreshes spaced by at least half of KEEPALIVE_SPACING each.
        assert!(
            start.elapsed() >= KEEPALIVE_SPACING * 5 / 2,
            "{:?}",
            start.elapsed()
        );
        let now = crate::time::unix_secs(SystemTime::now());
        for i in 0..5 {
            let r = f.record(&format!("idle{i}")).await;
            assert!(now - r.last_refresh.unwrap() < 60, "idle{i} not refreshed");
        }
        // The busy subject and the one needing consent were left alone.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(f.calls(), 5);
        assert_eq!(f.tokens.metrics.state("active"), 6);
        assert_eq!(f.tokens.metrics.state("needs_reauth"), 1);
        // Idle subjects' tokens were not cached (they must not push busy ones out).
        assert_eq!(f.tokens.cached(), 0);
        // The next pass finds nothing due.
        tokio::time::sleep(SWEEP_INTERVAL).await;
        assert_eq!(f.calls(), 5);
        task.abort();
    }

    /// Leases and shared slots in memory, on tokio's clock, as Redis keeps them: a lease
    /// lapses at its TTL, a slot at its TTL; `down` fails every call as an unreachable Redis.
    #[derive(Default)]
    struct FakeCoordination {
        leases: Mutex<HashMap<String, (String, Instant)>>,
        slots: Mutex<HashMap<String, (String, u64, Instant)>>,
        down: AtomicBool,
        holders: AtomicUsize,
    }

    impl FakeCoordination {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Io {
                    location: "fake redis".into(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                });
            }
            Ok(())
        }
    }

    impl Coordination for FakeCoordination {
        fn try_lease<'a>(
            &'a self,
            token: &'a str,
            subject: &'a SubjectId,
            ttl: Duration,
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<Option<crate::subject::redis::lock::Lease>, StoreError>,
        > {
            Box::pin(async move {
                self.check()?;
                let key = format!("{token}:{subject}");
                let mut leases = lock(&self.leases);
                let now = Instant::now();
                if leases.get(&key).is_some_and(|(_, until)| now < *until) {
                    return Ok(None);
                }
                let holder = self.holders.fetch_add(1, Ordering::SeqCst).to_string();
                leases.insert(key.clone(), (holder.clone(), now + ttl));
                Ok(Some(crate::subject::redis::lock::Lease::fake(key, holder)))
            })
        }

        fn release(
            &self,
            lease: crate::subject::redis::lock::Lease,
        ) -> futures_util::future::BoxFuture<'_, Result<bool, StoreError>> {
            Box::pin(async move {
                self.check()?;
                let (key, holder) = lease.parts();
                let mut leases = lock(&self.leases);
                let mine = leases.get(key).is_some_and(|(h, _)| h == holder);
                if mine {
                    leases.remove(key);
                }
                Ok(mine)
            })
        }

        fn shared<'a>(
            &'a self,
            _ring: &'a KeyRing,
            token: &'a str,
            subject: &'a SubjectId,
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<Option<crate::subject::redis::access::SharedToken>, StoreError>,
        > {
            Box::pin(async move {
                self.check()?;
                let slots = lock(&self.slots);
                Ok(slots
                    .get(&format!("{token}:{subject}"))
                    .filter(|(_, _, until)| Instant::now() < *until)
                    .map(
                        |(v, expires_at, _)| crate::subject::redis::access::SharedToken {
                            access_token: Secret::new(v.clone()),
                            expires_at: *expires_at,
                        },
                    ))
            })
        }

        fn unshare<'a>(
            &'a self,
            token: &'a str,
            subject: &'a SubjectId,
        ) -> futures_util::future::BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                self.check()?;
                lock(&self.slots).remove(&format!("{token}:{subject}"));
                Ok(())
            })
        }

        fn share<'a>(
            &'a self,
            _ring: &'a KeyRing,
            token: &'a str,
            subject: &'a SubjectId,
            access_token: &'a Secret,
            expires_at: u64,
            ttl: Duration,
        ) -> futures_util::future::BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                self.check()?;
                lock(&self.slots).insert(
                    format!("{token}:{subject}"),
                    (
                        access_token.expose().to_owned(),
                        expires_at,
                        Instant::now() + ttl,
                    ),
                );
                Ok(())
            })
        }
    }

    /// A second process ("replica") over the fixture's store and issuer; both refresh through
    /// `coord`.
    fn replica(f: &Fixture, coord: &Arc<FakeCoordination>) -> Arc<SubjectTokens<Arc<Issuer>>> {
        SubjectTokens::with_coordination(
            f.tokens.settings.clone(),
            f.issuer.clone(),
            f.store.clone(),
            f.ring.clone(),
            Metrics::new().subject("fdx", &["active", "needs_reauth"]),
            Some(coord.clone() as Arc<dyn Coordination>),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn two_replicas_sharing_a_store_cause_one_token_request_per_lifetime() {
        let issuer = Issuer {
            delay: Duration::from_millis(300),
            rotate: true,
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        let coord = Arc::new(FakeCoordination::default());
        let (a, b) = (replica(&f, &coord), replica(&f, &coord));
        for lifetime in 0..3 {
            let gets = (0..400).map(|i| {
                let tokens = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { tokens.get(&id("c1")).await })
            });
            let values: HashSet<String> = futures_util::future::join_all(gets)
                .await
                .into_iter()
                .map(|r| value(&r.unwrap().unwrap()))
                .collect();
            assert_eq!(values.len(), 1, "{values:?}");
            assert_eq!(f.calls(), lifetime + 1);
            tokio::time::advance(LIFETIME).await;
        }
        // Every refresh sent the refresh token the previous one stored: the chain is unbroken.
        let record = f.record("c1").await;
        let rt = f
            .ring
            .open("fdx", &id("c1"), &record.refresh_token)
            .unwrap();
        assert_eq!(rt.expose(), "rt-c1.r1.r2.r3");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_shared_store_stops_refreshes_before_the_token_endpoint() {
        let f = Fixture::new(Issuer::default(), 10, &["c1", "c2"]).await;
        let coord = Arc::new(FakeCoordination::default());
        let a = replica(&f, &coord);
        let held = value(&a.get(&id("c1")).await.unwrap());
        assert_eq!(f.calls(), 1);
        coord.down.store(true, Ordering::SeqCst);
        // The cached, valid token is still served; past its refresh point too.
        tokio::time::advance(Duration::from_secs(240)).await;
        for _ in 0..10 {
            assert_eq!(value(&a.get(&id("c1")).await.unwrap()), held);
        }
        // A subject without a cached token gets no token, and no request is sent for it.
        let e = a.get(&id("c2")).await.unwrap_err();
        assert!(
            matches!(&e, SubjectTokenError::Failed(m) if m.contains("lease")),
            "{e}"
        );
        assert_eq!(f.calls(), 1);
        // The keep-alive skips c2 (due: enrolled long ago) without a token request.
        assert_eq!(a.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(f.calls(), 1);
        // Redis is back: the next attempt after the failure hold refreshes.
        coord.down.store(false, Ordering::SeqCst);
        tokio::time::advance(DEFAULT_FAILURE_HOLD).await;
        assert!(a.get(&id("c2")).await.is_ok());
        assert_eq!(f.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_stalled_past_its_lease_serves_the_winners_token_not_its_own() {
        let issuer = Issuer {
            first_delay: Some(MIN_LEASE_TTL + Duration::from_secs(10)),
            rotate: true,
            ..Issuer::default()
        };
        let f = Fixture::new(issuer, 10, &["c1"]).await;
        let coord = Arc::new(FakeCoordination::default());
        let (a, b) = (replica(&f, &coord), replica(&f, &coord));
        // A takes the lease and stalls in its token request; its caller gives up.
        assert_eq!(
            a.get(&id("c1")).await.unwrap_err(),
            SubjectTokenError::Timeout
        );
        // B waits while A's lease lasts, then takes the lapsed lease and refreshes.
        tokio::time::advance(MIN_LEASE_TTL).await;
        let winner = value(&b.get(&id("c1")).await.unwrap());
        assert_eq!(winner, "Bearer at.rt-c1.2");
        // A's answer arrives; its write is refused and its refresh ends with B's token (not
        // a failure, and not its own token, whose refresh token is not the stored one).
        tokio::time::advance(Duration::from_secs(15)).await;
        let deadline = Instant::now() + Duration::from_millis(500);
        let held = loop {
            if let Some(t) = a.peek(&id("c1")) {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "A's refresh did not end with a token"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(value(&held), winner);
        assert_eq!(value(&a.get(&id("c1")).await.unwrap()), winner);
        assert_eq!(f.calls(), 2);
        // The record holds B's rotated refresh token, the one the issuer will accept next.
        let record = f.record("c1").await;
        let rt = f
            .ring
            .open("fdx", &id("c1"), &record.refresh_token)
            .unwrap();
        assert_eq!(rt.expose(), "rt-c1.r2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_the_upstream_rejected_is_not_taken_back_from_the_shared_slot() {
        let f = Fixture::new(Issuer::default(), 10, &["c1"]).await;
        let coord = Arc::new(FakeCoordination::default());
        let (a, b) = (replica(&f, &coord), replica(&f, &coord));
        let seen = a.get(&id("c1")).await.unwrap();
        // B takes the same token from the slot, without a request.
        assert_eq!(value(&b.get(&id("c1")).await.unwrap()), value(&seen));
        assert_eq!(f.calls(), 1);
        // The upstream rejects it at A: A refreshes instead of reading it back from the slot.
        let fresh = a
            .invalidate(&id("c1"), &seen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_ne!(value(&fresh), value(&seen));
        assert_eq!(f.calls(), 2);
        // B, rejected with the old token too, takes A's new one from the slot.
        let old_b = b.get(&id("c1")).await.unwrap();
        let at_b = b
            .invalidate(&id("c1"), &old_b, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(value(&at_b), value(&fresh));
        assert_eq!(f.calls(), 2);
        // The consent is gone (602 at A): the slot is emptied, so a replica without the
        // token in memory learns needs_reauth from the record instead of serving it.
        a.consent_revoked(&id("c1"), &fresh).await;
        let c = replica(&f, &coord);
        assert_eq!(
            c.get(&id("c1")).await.unwrap_err(),
            SubjectTokenError::NeedsReauth
        );
        assert_eq!(f.calls(), 2);
    }
}
