//! The background refresher: one task per configured token. It obtains a token at start,
//! renews it at `refresh_ratio` of its lifetime (jittered, never later than `refresh_margin`
//! or the expiry leeway before expiry, and never sooner than [`MIN_REFRESH_DELAY`]), backs off exponentially with full jitter on transient failures, retries
//! slowly after a rejection (re-reading the secret files each time, so a rotated Kubernetes
//! secret recovers without a restart), answers forced refreshes from [`TokenCell::invalidate`],
//! and persists refresh tokens through [`Store`].
//!
//! The current token keeps being served while it is valid whatever happens here; the cell never
//! hands out an expired one.
//!
//! With `shared = true` ([`Refresher::with_shared`]) each attempt goes through the token's
//! shared slot first (see [`crate::token::shared`]): adopt a newer token another replica
//! wrote, or take the lease and request one for everybody, or wait for the lease holder's.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::config::TokenConfig;
use crate::metrics::{RefreshResult, TokenMetrics};
use crate::secret::Secret;
use crate::shutdown::{Phase, Shutdown};
use crate::time::unix_secs_f64;
use crate::token::client::{
    ClientBuildError, Credentials, Fetch, FetchError, Grant, LifetimeSource, TokenClient,
    jwt_claims,
};
use crate::token::error::REFRESH_ERROR_REASONS;
use crate::token::grant::{Grants, Rotation};
use crate::token::schedule::{MIN_REFRESH_DELAY, refresh_delay, retry_delay};
use crate::token::shared::{
    POLL_INTERVAL, SharedSlot, SlotToken, SlotUnavailable, adopted_lifetime, lease_ttl, slot_ttl,
    unix_secs_floor,
};
use crate::token::status::{ErrorInfo, ErrorKind};
use crate::token::{AccessToken, TokenCell};

/// JWT claims that describe a token without being secret, shown by `bearer-proxy token`.
pub const PUBLIC_CLAIMS: &[&str] = &["sub", "client_id", "exp", "iat", "iss", "aud", "scope"];

/// What one successful refresh produced (nothing secret).
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Generation of the published token.
    pub generation: u64,
    /// Granted lifetime.
    pub lifetime: Duration,
    /// Where the lifetime came from.
    pub lifetime_source: LifetimeSource,
    /// `token_type` as sent.
    pub token_type: Option<String>,
    /// Granted scope.
    pub scope: Option<String>,
    /// Wall-clock expiry.
    pub expires_wall: SystemTime,
    /// The non-secret JWT claims ([`PUBLIC_CLAIMS`]), if the token is a JWT.
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the server sent a new refresh token.
    pub refresh_token_rotated: bool,
    /// Whether the token was adopted from the shared slot (another replica requested it)
    /// instead of being requested by this process.
    pub adopted: bool,
}

/// Obtains and renews the tokens of one `[tokens.<name>]`, through `C` (the real HTTP client
/// unless a test substitutes one).
pub struct Refresher<C = TokenClient> {
    cfg: Arc<TokenConfig>,
    cell: Arc<TokenCell>,
    client: C,
    metrics: TokenMetrics,
    /// The choice of grant and the saved refresh-token state.
    grants: Grants,
    /// Failures since the last success.
    failures: u32,
    /// A rotated refresh token is held only in memory (see
    /// [`TokenStatus::refresh_token_in_memory_only`]).
    in_memory_only: bool,
    /// The token's slot in `[redis]`, when it has `shared = true`.
    shared: Option<Arc<dyn SharedSlot>>,
}

/// How a shared attempt ended without a result of its own.
enum Fallback {
    /// Redis could not be used.
    Unavailable(SlotUnavailable),
    /// Other replicas kept the lease for longer than a holder may: waiting longer would risk
    /// the current token's expiry.
    LeaseHeld,
}

impl<C> std::fmt::Debug for Refresher<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("token", &self.cfg.name)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// The client certificate its token requests present, if any.
    pub fn client_identity(&self) -> Option<Arc<crate::identity::ClientIdentity>> {
        self.client.identity().cloned()
    }

    /// A refresher for `cfg` publishing into `cell`.
    pub fn new(
        cfg: TokenConfig,
        cell: Arc<TokenCell>,
        metrics: TokenMetrics,
    ) -> Result<Self, ClientBuildError> {
        let client = TokenClient::new(&cfg)?;
        Ok(Self::with_client(cfg, cell, metrics, client))
    }
}

impl<C: Fetch> Refresher<C> {
    /// A refresher that obtains tokens through `client`.
    pub fn with_client(
        cfg: TokenConfig,
        cell: Arc<TokenCell>,
        metrics: TokenMetrics,
        client: C,
    ) -> Self {
        let mut metrics = metrics;
        metrics.count_errors(REFRESH_ERROR_REASONS);
        let cfg = Arc::new(cfg);
        Self {
            grants: Grants::new(cfg.clone()),
            cfg,
            cell,
            client,
            metrics,
            failures: 0,
            in_memory_only: false,
            shared: None,
        }
    }

    /// Shares the token with the other replicas through `slot` (`shared = true`).
    pub fn with_shared(mut self, slot: Arc<dyn SharedSlot>) -> Self {
        self.shared = Some(slot);
        self
    }

    /// Runs the refresher on its own task until the process terminates.
    pub fn spawn(self, shutdown: Shutdown) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    /// The refresh loop: fetch now, then on schedule, on backoff, or when forced.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut next = Instant::now();
        // Set once the expiry of the current token has been reported, so it is reported once.
        let mut expiry_reported = true;
        loop {
            let expiry = self.cell.latest().map(|t| t.usable_until());
            let forced = tokio::select! {
                biased;
                () = shutdown.reached(Phase::Terminated) => return,
                () = self.cell.forced_requested() => {
                    // A stale wake-up: the request was already served by an attempt since.
                    if !self.cell.take_forced() {
                        continue;
                    }
                    true
                }
                () = sleep_until(next) => false,
                () = sleep_until(expiry.unwrap_or(next)), if expiry.is_some() && !expiry_reported => {
                    expiry_reported = true;
                    tracing::error!(
                        token = %self.cfg.name,
                        "token expired and no refresh has succeeded; routed requests get 503 \
                         until one does"
                    );
                    continue;
                }
            };
            let delay = self.attempt(forced).await;
            if self.failures == 0 {
                expiry_reported = false;
            }
            next = Instant::now() + delay;
        }
    }

    /// One attempt with its bookkeeping; returns the delay until the next one.
    async fn attempt(&mut self, forced: bool) -> Duration {
        // Whatever asked for a refresh is served by this attempt.
        self.cell.take_forced();
        if forced {
            self.metrics.forced.inc();
        }
        let before = self.cell.status().state;
        let delay = match self.obtain(forced).await {
            Ok(f) => {
                let delay = refresh_delay(
                    f.lifetime,
                    self.cfg.refresh_ratio,
                    self.cfg.refresh_margin,
                    rand::rng().random(),
                );
                tracing::info!(
                    token = %self.cfg.name,
                    generation = f.generation,
                    lifetime_secs = f.lifetime.as_secs_f64(),
                    lifetime_from = ?f.lifetime_source,
                    next_refresh_secs = delay.as_secs_f64(),
                    forced,
                    adopted = f.adopted,
                    "token refreshed"
                );
                delay
            }
            Err(e) => {
                let kind = e.kind();
                let delay = retry_delay(
                    kind,
                    self.failures,
                    self.cfg.backoff_initial,
                    self.cfg.backoff_max,
                    e.retry_after(),
                    rand::rng().random(),
                );
                let valid = self.cell.current().is_some();
                // The same fields at two levels: tracing needs the level as a constant.
                macro_rules! failed {
                    ($level:ident, $msg:literal) => {
                        tracing::$level!(
                            token = %self.cfg.name,
                            error = %e,
                            reason = e.reason(),
                            status = e.status(),
                            failures = self.failures,
                            retry_in_secs = delay.as_secs_f64(),
                            token_still_valid = valid,
                            $msg
                        )
                    };
                }
                match kind {
                    ErrorKind::Rejected => failed!(
                        error,
                        "token request rejected; retrying slowly (fix the credentials)"
                    ),
                    ErrorKind::Transient if e.misconfigured() => failed!(
                        error,
                        "the token endpoint's answer is not OAuth (check token_url); will retry"
                    ),
                    ErrorKind::Transient => failed!(warn, "token refresh failed; will retry"),
                }
                delay
            }
        };
        self.cell.update_status(|s| {
            s.in_flight = false;
            s.next_attempt = Some(SystemTime::now() + delay);
        });
        self.cell.attempt_finished();
        let after = self.cell.status().state;
        if after != before {
            tracing::info!(
                token = %self.cfg.name,
                from = before.as_str(),
                to = after.as_str(),
                "token state changed"
            );
        }
        delay
    }

    /// Obtains one token now and publishes it, recording metrics and status; persists any new
    /// refresh token first. Used by the loop and by `bearer-proxy token`.
    pub async fn refresh(&mut self) -> Result<Fetched, FetchError> {
        self.cell.update_status(|s| s.in_flight = true);
        if self.in_memory_only && self.grants.has_store() {
            // The state directory may be writable again: save what only memory holds.
            match self.grants.persist().await {
                Ok(()) => {
                    tracing::info!(token = %self.cfg.name, "the refresh token is persisted again");
                    self.set_in_memory_only(false);
                }
                Err(e) => tracing::warn!(
                    token = %self.cfg.name,
                    error = %e,
                    "the refresh token is still held only in memory"
                ),
            }
        }
        let started = Instant::now();
        let result = self.try_refresh().await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let now = SystemTime::now();
        match &result {
            Ok(f) => {
                self.failures = 0;
                self.metrics.refresh(RefreshResult::Ok);
                self.metrics.expiry.set(unix_secs_f64(f.expires_wall));
                self.metrics.last_success.set(unix_secs_f64(now));
                self.cell.update_status(|s| {
                    s.in_flight = false;
                    s.last_success = Some(now);
                    s.consecutive_failures = 0;
                    s.refreshes_ok += 1;
                });
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.metrics.refresh(match e.kind() {
                    ErrorKind::Transient => RefreshResult::TransientError,
                    ErrorKind::Rejected => RefreshResult::Rejected,
                });
                self.metrics.error(e.reason());
                let info = ErrorInfo {
                    kind: e.kind(),
                    reason: e.reason(),
                    status: e.status(),
                    oauth_error: e.oauth().map(|o| o.code.clone()),
                    description: e.oauth().and_then(|o| o.description.clone()),
                    message: e.to_string(),
                    at: now,
                };
                let failures = self.failures;
                self.cell.update_status(|s| {
                    s.in_flight = false;
                    s.last_error = Some(info);
                    s.consecutive_failures = failures;
                    s.refreshes_failed += 1;
                });
            }
        }
        result
    }

    async fn try_refresh(&mut self) -> Result<Fetched, FetchError> {
        let creds = self.credentials().await?;
        let (grant, used) = self.grants.choose().await?;
        let code_marked = match &grant {
            Grant::AuthorizationCode(code) => Some(self.grants.spend_code(code).await?),
            _ => None,
        };
        let sent_at = Instant::now();
        let sent_wall = SystemTime::now();
        let resp = match self.client.fetch(&creds, &grant).await {
            Ok(r) => r,
            Err(mut e) => {
                // Whatever the server sent back is shown and logged: no secret it echoes may be.
                let stored = self.grants.stored_refresh_token();
                let sent = match &grant {
                    Grant::ClientCredentials => None,
                    Grant::RefreshToken(s) | Grant::AuthorizationCode(s) => Some(s.expose()),
                };
                let secrets: Vec<&str> = creds
                    .client_secret
                    .as_ref()
                    .map(Secret::expose)
                    .into_iter()
                    .chain(sent)
                    .chain(stored)
                    .collect();
                e.redact(&secrets);
                if let Some(previous) = code_marked
                    && !e.server_may_have_seen()
                {
                    // The code never reached the server: it is still good.
                    self.grants.unspend(previous).await;
                }
                return Err(e);
            }
        };
        let rotated = match self
            .grants
            .remember(&used, resp.refresh_token.as_ref())
            .await
        {
            Rotation::Unchanged => false,
            Rotation::Persisted => {
                self.set_in_memory_only(false);
                true
            }
            Rotation::InMemoryOnly => {
                self.set_in_memory_only(true);
                true
            }
        };
        let token = AccessToken::new(
            resp.access_token.expose(),
            sent_at,
            sent_wall,
            resp.lifetime,
            resp.scope.clone(),
        )
        .map_err(|_| FetchError::Malformed("access_token is not a valid header value".into()))?;
        let expires_wall = token.expires_wall();
        let generation = self.cell.publish(token);
        let claims = jwt_claims(resp.access_token.expose()).map(|mut all| {
            all.retain(|k, _| PUBLIC_CLAIMS.contains(&k.as_str()));
            all
        });
        Ok(Fetched {
            generation,
            lifetime: resp.lifetime,
            lifetime_source: resp.lifetime_source,
            token_type: resp.token_type,
            scope: resp.scope,
            expires_wall,
            claims,
            refresh_token_rotated: rotated,
            adopted: false,
        })
    }

    /// One token, requested by this process or, for a shared token, adopted from the slot.
    async fn obtain(&mut self, forced: bool) -> Result<Fetched, FetchError> {
        let Some(slot) = self.shared.clone() else {
            return self.refresh().await;
        };
        match self.through_slot(&*slot, forced).await {
            Ok(result) => result,
            Err(fallback) => {
                // A client_credentials token holds nothing that could be lost: request one
                // ourselves rather than let the route go without a token.
                self.metrics.shared_fallbacks.inc();
                match &fallback {
                    Fallback::Unavailable(e) => tracing::warn!(
                        token = %self.cfg.name,
                        error = %e,
                        "the shared token's slot in Redis cannot be used; requesting a token \
                         for this replica alone (sharing resumes when Redis answers)"
                    ),
                    Fallback::LeaseHeld => tracing::warn!(
                        token = %self.cfg.name,
                        "other replicas held the shared token's lease for too long; \
                         requesting a token for this replica alone"
                    ),
                }
                self.refresh().await
            }
        }
    }

    /// The shared protocol: adopt a newer token from the slot; else take the lease, look again,
    /// request, write the slot and release; else wait for the holder's token, until the lease
    /// lapses (then try again). `Err` when the slot cannot be used and the caller should
    /// request on its own.
    async fn through_slot(
        &mut self,
        slot: &dyn SharedSlot,
        forced: bool,
    ) -> Result<Result<Fetched, FetchError>, Fallback> {
        let ttl = lease_ttl(self.cfg.timeout);
        // Long enough for a holder to finish or its lease to lapse, and one more try after it.
        let give_up = Instant::now() + ttl + POLL_INTERVAL * 2;
        loop {
            if let Some(f) = self
                .adopt_from(slot, forced)
                .await
                .map_err(Fallback::Unavailable)?
            {
                return Ok(Ok(f));
            }
            if slot.try_lock(ttl).await.map_err(Fallback::Unavailable)? {
                let result = self.as_holder(slot, forced).await;
                if let Err(e) = slot.unlock().await {
                    // It lapses at its TTL; the others wait for it at most that long.
                    tracing::warn!(
                        token = %self.cfg.name,
                        error = %e,
                        "the shared token's lease could not be released"
                    );
                }
                return result.map_err(Fallback::Unavailable);
            }
            if Instant::now() >= give_up {
                return Err(Fallback::LeaseHeld);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Holding the lease: look again (another replica may have written between our read and
    /// our lock), else request, and share what we got.
    async fn as_holder(
        &mut self,
        slot: &dyn SharedSlot,
        forced: bool,
    ) -> Result<Result<Fetched, FetchError>, SlotUnavailable> {
        if let Some(f) = self.adopt_from(slot, forced).await? {
            return Ok(Ok(f));
        }
        let result = self.refresh().await;
        if result.is_ok()
            && let Some(t) = self.cell.latest()
            && let Some(raw) = t.raw()
        {
            let sent_at = t.expires_at() - t.lifetime();
            let ttl = slot_ttl(
                sent_at,
                t.lifetime(),
                self.cfg.refresh_ratio,
                self.cfg.refresh_margin,
                Instant::now(),
            );
            let expires_at = unix_secs_floor(t.expires_wall());
            if let Err(e) = slot.write(&raw, expires_at, ttl).await {
                // This replica has its token; the others request their own if Redis stays
                // unusable, or find the lease free again and one of them requests.
                tracing::warn!(
                    token = %self.cfg.name,
                    error = %e,
                    "the new token could not be written to the shared slot"
                );
            }
        }
        Ok(result)
    }

    /// Reads the slot and publishes its token if it is worth adopting: not the token this
    /// replica holds (a forced refresh must not adopt the token the upstream rejected), valid
    /// for longer than the shortest refresh delay, and (unless `forced`: then ours was
    /// rejected, and any other valid token is better) valid longer than ours.
    async fn adopt_from(
        &mut self,
        slot: &dyn SharedSlot,
        forced: bool,
    ) -> Result<Option<Fetched>, SlotUnavailable> {
        let Some(SlotToken {
            access_token,
            expires_at,
        }) = slot.read().await?
        else {
            return Ok(None);
        };
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let Some(lifetime) = adopted_lifetime(expires_at, now_wall) else {
            return Ok(None);
        };
        let Ok(token) = AccessToken::new(access_token.expose(), now, now_wall, lifetime, None)
        else {
            // Sealed by a key we hold, so written by a replica: it cannot be malformed unless
            // the issuer's answer was, which the writer already refused. Refresh instead.
            return Ok(None);
        };
        if token.usable_until() <= now + MIN_REFRESH_DELAY {
            return Ok(None);
        }
        if let Some(ours) = self.cell.latest()
            && (ours.header() == token.header()
                || (!forced && ours.usable_until() >= token.usable_until()))
        {
            return Ok(None);
        }
        let expires_wall = token.expires_wall();
        let generation = self.cell.publish(token);
        let now_wall = SystemTime::now();
        self.failures = 0;
        self.metrics.adoptions.inc();
        self.metrics.expiry.set(unix_secs_f64(expires_wall));
        self.metrics.last_success.set(unix_secs_f64(now_wall));
        self.cell.update_status(|s| {
            s.in_flight = false;
            s.last_success = Some(now_wall);
            s.consecutive_failures = 0;
        });
        Ok(Some(Fetched {
            generation,
            lifetime,
            lifetime_source: LifetimeSource::SharedSlot,
            token_type: None,
            scope: None,
            expires_wall,
            claims: None,
            refresh_token_rotated: false,
            adopted: true,
        }))
    }

    /// Reads the client credentials from their sources (files are re-read every time).
    async fn credentials(&self) -> Result<Credentials, FetchError> {
        let client_id = match self.cfg.client_id_source() {
            Some(src) => src.read("client_id").await?,
            None => Secret::new(""),
        };
        let client_secret = match self.cfg.client_secret_source() {
            Some(src) => Some(src.read("client_secret").await?),
            None => None,
        };
        Ok(Credentials {
            client_id,
            client_secret,
        })
    }

    /// Records whether a rotated refresh token is held only in memory, on the status page and
    /// in `bearer_proxy_token_state_persisted`.
    fn set_in_memory_only(&mut self, yes: bool) {
        self.in_memory_only = yes;
        self.metrics.state_persisted.set(i64::from(!yes));
        self.cell
            .update_status(|s| s.refresh_token_in_memory_only = yes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::schedule::REFRESH_JITTER;
    use crate::token::status::TokenState;

    const S: fn(u64) -> Duration = Duration::from_secs;

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use crate::config::TokenConfig;
    use crate::shutdown::ShutdownController;
    use crate::token::client::TokenResponse;

    /// What the fake token endpoint does on one call.
    enum Answer {
        Token(Duration),
        Fail(fn() -> FetchError),
        Slow(Duration, Duration),
    }

    /// A token endpoint in memory: answers from a script, then with `default`.
    struct Fake {
        script: Mutex<VecDeque<Answer>>,
        default: fn() -> Answer,
        calls: Mutex<Vec<(Instant, Grant, Credentials)>>,
    }

    impl Fake {
        fn new(script: Vec<Answer>, default: fn() -> Answer) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(script.into()),
                default,
                calls: Mutex::new(Vec::new()),
            })
        }
        fn times(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().iter().map(|c| c.0).collect()
        }
    }

    impl Fetch for Arc<Fake> {
        async fn fetch(
            &self,
            creds: &Credentials,
            grant: &Grant,
        ) -> Result<TokenResponse, FetchError> {
            self.calls
                .lock()
                .unwrap()
                .push((Instant::now(), grant.clone(), creds.clone()));
            let answer = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(self.default);
            let lifetime = match answer {
                Answer::Token(l) => l,
                Answer::Fail(e) => return Err(e()),
                Answer::Slow(delay, l) => {
                    tokio::time::sleep(delay).await;
                    l
                }
            };
            let n = self.calls.lock().unwrap().len();
            Ok(TokenResponse {
                access_token: Secret::new(format!("token-{n}")),
                lifetime,
                lifetime_source: LifetimeSource::ExpiresIn,
                refresh_token: None,
                scope: None,
                token_type: Some("Bearer".into()),
            })
        }
    }

    fn config() -> TokenConfig {
        let mut c: TokenConfig = serde_json::from_value(serde_json::json!({
            "token_url": "http://127.0.0.1:9/api/v1/token",
            "grant_type": "client_credentials",
            "client_id": "id",
            "client_secret": "secret",
        }))
        .unwrap();
        c.name = "t".into();
        c
    }

    fn start(cfg: TokenConfig, fake: &Arc<Fake>) -> (Arc<TokenCell>, ShutdownController) {
        let cell = TokenCell::new("t", cfg.forced_refresh_interval);
        let metrics = crate::metrics::Metrics::new().token("t");
        let (ctl, sd) = ShutdownController::new();
        Refresher::with_client(cfg, cell.clone(), metrics, fake.clone()).spawn(sd);
        (cell, ctl)
    }

    fn server_error() -> FetchError {
        FetchError::Http {
            status: 500,
            oauth: None,
            retry_after: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_request_per_lifetime_while_a_thousand_tasks_read() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let (cell, _ctl) = start(config(), &fake);
        let t0 = Instant::now();
        let end = t0 + S(1800);
        let mut readers = Vec::new();
        for _ in 0..1000 {
            let cell = cell.clone();
            readers.push(tokio::spawn(async move {
                cell.wait_valid(S(5)).await.expect("first token");
                let mut reads = 0u32;
                while Instant::now() < end {
                    assert!(cell.current().is_some(), "a reader saw no valid token");
                    reads += 1;
                    tokio::time::sleep(S(7)).await;
                }
                reads
            }));
        }
        for r in readers {
            assert!(r.await.unwrap() > 200);
        }
        let times = fake.times();
        // 1800s / (225s at most, 191.25s at least) after the first: 9 to 10 refreshes.
        assert!((9..=11).contains(&times.len()), "{} requests", times.len());
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs_f64(225.0 * (1.0 - REFRESH_JITTER)) && gap <= S(225),
                "refresh gap {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outage_backs_off_keeps_token_until_expiry_then_hands_out_none() {
        let fake = Fake::new(vec![Answer::Token(S(60))], || Answer::Fail(server_error));
        let (cell, _ctl) = start(config(), &fake);
        let first = cell.wait_valid(S(1)).await.expect("first token");
        let issued = Instant::now();
        // Valid right up to expiry less the leeway (5 s of a 60 s token), even though every
        // refresh since ~40s has failed.
        tokio::time::sleep_until(issued + Duration::from_millis(54_999)).await;
        assert_eq!(cell.current().unwrap().generation(), first.generation());
        assert_eq!(cell.status().state, TokenState::Refreshing);
        tokio::time::sleep_until(issued + S(55)).await;
        assert!(cell.current().is_none(), "an expired token was handed out");
        assert!(cell.wait_valid(S(2)).await.is_none());
        assert_eq!(cell.status().state, TokenState::Expired);
        tokio::time::sleep(S(600)).await;
        let times = fake.times();
        // Gaps between failed attempts never shorter than backoff_initial nor longer than max.
        for pair in times[1..].windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= S(1) && gap <= S(30), "gap {gap:?}");
        }
        // Backing off: far fewer attempts than one per second over ~11 minutes.
        assert!(times.len() < 60, "{} attempts", times.len());
        assert!(cell.status().consecutive_failures as usize == times.len() - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn three_second_tokens_are_renewed_before_expiry_and_never_served_after_it() {
        // Three tokens, then the endpoint fails for good.
        let fake = Fake::new(
            vec![
                Answer::Token(S(3)),
                Answer::Token(S(3)),
                Answer::Token(S(3)),
            ],
            || Answer::Fail(server_error),
        );
        let (cell, _ctl) = start(config(), &fake);
        cell.wait_valid(S(1)).await.expect("first token");
        let t0 = Instant::now();
        let mut last_generation = 0;
        // Every 50 ms for 12 s: whatever is handed out is inside its own lifetime less the
        // leeway, and while refreshes succeed there is no gap.
        while Instant::now() < t0 + S(12) {
            let now = Instant::now();
            match cell.current() {
                Some(t) => {
                    assert!(
                        now < t.expires_at() - Duration::from_millis(300),
                        "late use"
                    );
                    assert!(now >= t.expires_at() - S(3), "token from the future");
                    last_generation = t.generation();
                }
                None => assert_eq!(last_generation, 3, "a gap at {:?}", now - t0),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let times = fake.times();
        for pair in times[..3].windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap < Duration::from_millis(2_700), "refresh after {gap:?}");
        }
        // After the outage began the last token expired: none is handed out, and the state
        // says so.
        assert!(cell.current().is_none());
        assert!(cell.wait_valid(Duration::from_millis(500)).await.is_none());
        assert_eq!(cell.status().state, TokenState::Expired);
        assert!(!cell.status().valid);
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_lifetime_is_retried_with_backoff_and_nothing_is_served() {
        let fake = Fake::new(
            vec![
                Answer::Fail(|| FetchError::Malformed("expires_in is 0: not a lifetime".into())),
                Answer::Fail(|| FetchError::Malformed("expires_in is -5: not a lifetime".into())),
            ],
            || Answer::Token(S(300)),
        );
        let (cell, _ctl) = start(config(), &fake);
        let t = cell
            .wait_valid(S(10))
            .await
            .expect("a token after the retries");
        assert_eq!(t.generation(), 1, "nothing was published before");
        let times = fake.times();
        assert_eq!(times.len(), 3);
        // Backed off (backoff_initial, 1 s by default), not the rejection's slow retry.
        assert!(times[1] - times[0] >= S(1) && times[1] - times[0] < S(30));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_delays_the_next_attempt() {
        let fake = Fake::new(
            vec![Answer::Fail(|| FetchError::Http {
                status: 429,
                oauth: None,
                retry_after: Some(S(7)),
            })],
            || Answer::Token(S(300)),
        );
        let (cell, _ctl) = start(config(), &fake);
        cell.wait_valid(S(30)).await.expect("token after retry");
        let times = fake.times();
        assert!(times[1] - times[0] >= S(7), "{:?}", times[1] - times[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn rejection_retries_at_backoff_max_and_rereads_the_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client_secret");
        std::fs::write(&secret, "old\n").unwrap();
        let mut cfg = config();
        cfg.client_secret = None;
        cfg.client_secret_file = Some(secret.clone());
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        // Reject whatever is sent with the old secret.
        let fake = Arc::new(RejectOld(fake));
        let cell = TokenCell::new("t", cfg.forced_refresh_interval);
        let (ctl, sd) = ShutdownController::new();
        Refresher::with_client(
            cfg,
            cell.clone(),
            crate::metrics::Metrics::new().token("t"),
            fake.clone(),
        )
        .spawn(sd);
        tokio::time::sleep(S(65)).await;
        assert_eq!(cell.status().state, TokenState::Rejected);
        let times = fake.0.times();
        assert_eq!(times.len(), 3, "attempts at 0, 30 and 60s");
        assert_eq!(times[1] - times[0], S(30));
        // The kubelet swaps the secret; the next slow retry picks it up.
        std::fs::write(&secret, "new\n").unwrap();
        assert!(cell.wait_valid(S(31)).await.is_some());
        assert_eq!(cell.status().state, TokenState::Fresh);
        drop(ctl);
    }

    struct RejectOld(Arc<Fake>);
    impl Fetch for Arc<RejectOld> {
        async fn fetch(
            &self,
            creds: &Credentials,
            grant: &Grant,
        ) -> Result<TokenResponse, FetchError> {
            let result = self.0.fetch(creds, grant).await;
            if creds.client_secret.as_ref().map(Secret::expose) == Some("old") {
                return Err(FetchError::Http {
                    status: 400,
                    oauth: Some(crate::token::client::OAuthError {
                        code: "invalid_client".into(),
                        description: None,
                    }),
                    retry_after: None,
                });
            }
            result
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_invalidations_cause_one_request_and_are_rate_limited() {
        let fake = Fake::new(vec![], || Answer::Slow(Duration::from_millis(200), S(300)));
        let (cell, _ctl) = start(config(), &fake);
        let seen = cell.wait_valid(S(5)).await.unwrap().generation();
        let mut waiters = Vec::new();
        for _ in 0..50 {
            let cell = cell.clone();
            waiters.push(tokio::spawn(
                async move { cell.invalidate(seen, S(5)).await },
            ));
        }
        for w in waiters {
            assert_eq!(w.await.unwrap().expect("new token").generation(), seen + 1);
        }
        assert_eq!(fake.times().len(), 2, "one start-up request, one forced");
        // The new token is rejected too, at once: the rate limit refuses another refresh.
        assert!(cell.invalidate(seen + 1, S(5)).await.is_none());
        tokio::time::sleep(S(1)).await;
        assert_eq!(fake.times().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_counts_from_when_the_request_was_sent() {
        let fake = Fake::new(vec![Answer::Slow(S(4), S(60))], || Answer::Token(S(60)));
        let (cell, _ctl) = start(config(), &fake);
        let sent = Instant::now();
        let t = cell.wait_valid(S(10)).await.unwrap();
        assert_eq!(t.expires_at(), sent + S(60));
    }

    /// Redis in memory for the shared-token protocol: one slot and one lease, shared by every
    /// [`FakeSlot`] (replica) made from it. The paused clock moves tokio's time but not the
    /// wall clock, so a read returns the written expiry less the (tokio) time since the write:
    /// what a reader's wall clock would see.
    #[derive(Default)]
    struct FakeRedis {
        /// Token, expiry (Unix s), when written, when its TTL ends.
        slot: Mutex<Option<(String, u64, Instant, Instant)>>,
        /// Holder and the end of its TTL.
        lease: Mutex<Option<(u32, Instant)>>,
        down: std::sync::atomic::AtomicBool,
        writes: std::sync::atomic::AtomicU32,
        /// Put in the slot just before the next lease is granted: another replica's write that
        /// landed between a replica's read and its lock.
        race: Mutex<Option<(String, u64)>>,
    }

    impl FakeRedis {
        fn put(&self, token: &str, expires_at: u64, ttl: Duration) {
            let now = Instant::now();
            *self.slot.lock().unwrap() = Some((token.to_owned(), expires_at, now, now + ttl));
        }
        fn lock_for(&self, holder: u32, ttl: Duration) {
            *self.lease.lock().unwrap() = Some((holder, Instant::now() + ttl));
        }
        fn check(&self) -> Result<(), SlotUnavailable> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                Err(SlotUnavailable("redis: connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    struct FakeSlot {
        redis: Arc<FakeRedis>,
        id: u32,
    }

    impl SharedSlot for FakeSlot {
        fn read(&self) -> BoxFuture<'_, Result<Option<SlotToken>, SlotUnavailable>> {
            Box::pin(async move {
                self.redis.check()?;
                let now = Instant::now();
                let slot = self.redis.slot.lock().unwrap();
                Ok(slot.as_ref().filter(|s| now < s.3).map(|(t, exp, at, _)| {
                    let elapsed = (now - *at).as_secs_f64().ceil() as u64;
                    SlotToken {
                        access_token: Secret::new(t.clone()),
                        expires_at: exp - elapsed,
                    }
                }))
            })
        }
        fn write<'a>(
            &'a self,
            access_token: &'a Secret,
            expires_at: u64,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<(), SlotUnavailable>> {
            Box::pin(async move {
                self.redis.check()?;
                self.redis
                    .writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.redis.put(access_token.expose(), expires_at, ttl);
                Ok(())
            })
        }
        fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<bool, SlotUnavailable>> {
            Box::pin(async move {
                self.redis.check()?;
                let now = Instant::now();
                let mut lease = self.redis.lease.lock().unwrap();
                if lease.is_some_and(|(_, end)| now < end) {
                    return Ok(false);
                }
                if let Some((t, exp)) = self.redis.race.lock().unwrap().take() {
                    self.redis.put(&t, exp, S(60));
                }
                *lease = Some((self.id, now + ttl));
                Ok(true)
            })
        }
        fn unlock(&self) -> BoxFuture<'_, Result<(), SlotUnavailable>> {
            Box::pin(async move {
                self.redis.check()?;
                let mut lease = self.redis.lease.lock().unwrap();
                if lease.is_some_and(|(holder, _)| holder == self.id) {
                    *lease = None;
                }
                Ok(())
            })
        }
    }

    use futures_util::future::BoxFuture;

    /// A replica: a refresher of `fake` sharing through `redis`.
    fn replica(
        fake: &Arc<Fake>,
        redis: &Arc<FakeRedis>,
        id: u32,
    ) -> (Arc<TokenCell>, TokenMetrics, ShutdownController) {
        let cfg = config();
        let cell = TokenCell::new("t", cfg.forced_refresh_interval);
        let metrics = crate::metrics::Metrics::new().token("t");
        let (ctl, sd) = ShutdownController::new();
        let slot = Arc::new(FakeSlot {
            redis: redis.clone(),
            id,
        });
        Refresher::with_client(cfg, cell.clone(), metrics.clone(), fake.clone())
            .with_shared(slot)
            .spawn(sd);
        (cell, metrics, ctl)
    }

    /// Unix second `d` from now.
    fn wall_in(d: Duration) -> u64 {
        unix_secs_floor(SystemTime::now() + d)
    }

    #[tokio::test(start_paused = true)]
    async fn three_replicas_request_about_as_often_as_one_and_always_hold_a_valid_token() {
        let fake = Fake::new(vec![], || Answer::Slow(Duration::from_millis(300), S(300)));
        let redis = Arc::new(FakeRedis::default());
        let replicas: Vec<_> = (0..3).map(|i| replica(&fake, &redis, i)).collect();
        for (cell, _, _) in &replicas {
            cell.wait_valid(S(5)).await.expect("first token");
        }
        assert_eq!(fake.times().len(), 1, "one request at start, not three");
        let t0 = Instant::now();
        while Instant::now() < t0 + S(1800) {
            for (cell, _, _) in &replicas {
                let t = cell.current().expect("a replica without a valid token");
                assert!(Instant::now() < t.usable_until());
            }
            tokio::time::sleep(S(3)).await;
        }
        // One replica alone makes 9 to 11 in 30 min of 300 s tokens (see the test above);
        // three replicas sharing make about as many, never three times as many.
        let requests = fake.times().len();
        assert!((8..=13).contains(&requests), "{requests} token requests");
        let adoptions: u64 = replicas.iter().map(|r| r.1.adoptions.get()).sum();
        assert!(
            adoptions >= 2 * (requests as u64 - 1),
            "{adoptions} adoptions"
        );
        for (_, m, _) in &replicas {
            assert_eq!(m.shared_fallbacks.get(), 0);
        }
        // Nothing ever requested while another replica held the lease: requests are spaced.
        for pair in fake.times().windows(2) {
            assert!(
                pair[1] - pair[0] > S(60),
                "two requests {:?} apart",
                pair[1] - pair[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_finds_the_lease_taken_adopts_the_holders_token() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let redis = Arc::new(FakeRedis::default());
        // Another replica holds the lease and is requesting.
        redis.lock_for(99, S(20));
        let (cell, metrics, _ctl) = replica(&fake, &redis, 1);
        tokio::time::sleep(S(2)).await;
        assert!(cell.current().is_none());
        redis.put("token-from-99", wall_in(S(300)), S(225));
        let t = cell
            .wait_valid(POLL_INTERVAL * 2)
            .await
            .expect("adopted within a poll");
        assert_eq!(t.header(), "Bearer token-from-99");
        assert!(
            fake.times().is_empty(),
            "requested while another held the lease"
        );
        assert_eq!(metrics.adoptions.get(), 1);
        // Never later than the slot says, less the skew allowance.
        assert!(
            t.expires_at() <= Instant::now() + S(300) - crate::token::shared::CLOCK_SKEW_ALLOWANCE
        );
        assert!(t.expires_at() >= Instant::now() + S(297));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_holders_lease_lapses_and_the_waiter_requests_then() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let redis = Arc::new(FakeRedis::default());
        let start = Instant::now();
        redis.lock_for(99, S(5));
        let (cell, _m, _ctl) = replica(&fake, &redis, 1);
        cell.wait_valid(S(10))
            .await
            .expect("a token once the lease lapsed");
        let times = fake.times();
        assert_eq!(times.len(), 1);
        assert!(times[0] >= start + S(5), "requested under another's lease");
        assert!(
            times[0] < start + S(5) + POLL_INTERVAL * 2,
            "waited past the lapse"
        );
        // It shared what it got, and let the lease go.
        assert_eq!(redis.writes.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(redis.lease.lock().unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_holder_looks_again_after_locking_and_adopts_a_token_written_meanwhile() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let redis = Arc::new(FakeRedis::default());
        *redis.race.lock().unwrap() = Some(("token-raced".into(), wall_in(S(300))));
        let (cell, metrics, _ctl) = replica(&fake, &redis, 1);
        let t = cell.wait_valid(S(1)).await.unwrap();
        assert_eq!(t.header(), "Bearer token-raced");
        assert!(fake.times().is_empty());
        assert_eq!(metrics.adoptions.get(), 1);
        assert!(redis.lease.lock().unwrap().is_none(), "lease released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_token_about_to_expire_or_already_held_is_not_adopted() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let redis = Arc::new(FakeRedis::default());
        // Within the skew allowance of its expiry: useless.
        redis.put("token-dying", wall_in(S(1)), S(60));
        let (cell, metrics, _ctl) = replica(&fake, &redis, 1);
        let t = cell.wait_valid(S(1)).await.unwrap();
        assert_eq!(t.header(), "Bearer token-1");
        assert_eq!(metrics.adoptions.get(), 0);
        // The upstream rejects token-1, which is also what the slot holds: a forced refresh
        // requests a new one instead of adopting the rejected token again.
        let newer = cell.invalidate(t.generation(), S(5)).await.expect("newer");
        assert_eq!(newer.header(), "Bearer token-2");
        assert_eq!(fake.times().len(), 2);
        assert_eq!(metrics.adoptions.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_adopts_a_newer_token_another_replica_shared() {
        let fake = Fake::new(vec![], || Answer::Token(S(300)));
        let redis = Arc::new(FakeRedis::default());
        let (cell, metrics, _ctl) = replica(&fake, &redis, 1);
        let t = cell.wait_valid(S(1)).await.unwrap();
        // Another replica was refused the same token and already shared a new one.
        redis.put("token-newer", wall_in(S(300)), S(225));
        let newer = cell.invalidate(t.generation(), S(5)).await.expect("newer");
        assert_eq!(newer.header(), "Bearer token-newer");
        assert_eq!(fake.times().len(), 1);
        assert_eq!(metrics.adoptions.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn redis_down_means_an_own_request_and_sharing_resumes_when_it_returns() {
        let fake = Fake::new(vec![], || Answer::Token(S(20)));
        let redis = Arc::new(FakeRedis::default());
        redis.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let (a, ma, _ca) = replica(&fake, &redis, 1);
        let (b, mb, _cb) = replica(&fake, &redis, 2);
        a.wait_valid(S(2)).await.expect("a serves without Redis");
        b.wait_valid(S(2)).await.expect("b serves without Redis");
        assert_eq!(fake.times().len(), 2, "each its own");
        assert_eq!(ma.shared_fallbacks.get() + mb.shared_fallbacks.get(), 2);
        // Both keep refreshing on their own while it is down: never without a token.
        let t0 = Instant::now();
        while Instant::now() < t0 + S(60) {
            assert!(a.current().is_some() && b.current().is_some());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let fallbacks = ma.shared_fallbacks.get() + mb.shared_fallbacks.get();
        assert!(
            fallbacks >= 8,
            "every refresh while down fell back: {fallbacks}"
        );
        redis
            .down
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let before = fake.times().len();
        let t1 = Instant::now();
        while Instant::now() < t1 + S(200) {
            assert!(a.current().is_some() && b.current().is_some());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // 200 s of 20 s tokens refreshed at ~half their life: one replica alone makes about
        // 20 requests (each replica ~20 on its own), sharing about as many for both.
        let shared = fake.times().len() - before;
        assert!(
            (10..=28).contains(&shared),
            "{shared} requests after Redis returned"
        );
        assert!(ma.adoptions.get() + mb.adoptions.get() >= 8);
        // At most the refresh under way when it returned still fell back.
        assert!(ma.shared_fallbacks.get() + mb.shared_fallbacks.get() <= fallbacks + 2);
    }
}
