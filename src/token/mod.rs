//! Access tokens: the value the proxy injects, and the cell through which a refresher hands it
//! to requests.
//!
//! A request does one `ArcSwap` load and an expiry check ([`TokenCell::current`]); it never
//! waits on the refresher unless no valid token exists. The refresher ([`refresher`]) is the only
//! writer. The token endpoint client lives in [`client`], refresh-token persistence in `store`, the
//! choice of grant in `grant`, the refresh schedule in `schedule`, the status types in `status`,
//! and the contract of a token shared by replicas through Redis in [`shared`].
//!
//! An expired token is never handed out: validity is checked against tokio's monotonic clock at
//! the moment of use, not by a timer that might fire late, and ends [`expiry_leeway`] before the
//! expiry the server granted, so a token is not sent in its last moments (it could expire on
//! the way to the upstream).

pub mod assertion;
pub mod client;
mod error;
mod grant;
pub mod refresher;
mod schedule;
pub mod shared;
mod status;
mod store;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub use status::{ErrorInfo, ErrorKind, TokenState, TokenStatus};
// The per-subject tokens (`crate::subject`) share the refresh schedule and the durable file write.
pub(crate) use schedule::refresh_delay;
pub(crate) use store::write_atomic;

/// The share of a token's lifetime at its end during which it is no longer sent: 10 % is 0.3 s
/// of a 3 s token and 0.1 s of a 1 s one, enough for a request to cross the network and for
/// modest clock skew at the upstream, while a short token stays usable for most of its life.
pub const EXPIRY_LEEWAY_FRACTION: f64 = 0.1;
/// The longest leeway, whatever the lifetime: a few seconds cover any sane transit time, and a
/// long-lived token should not be retired minutes early.
pub const MAX_EXPIRY_LEEWAY: Duration = Duration::from_secs(5);

/// How long before its granted expiry a token of `lifetime` stops being sent:
/// [`EXPIRY_LEEWAY_FRACTION`] of the lifetime, at most [`MAX_EXPIRY_LEEWAY`].
pub fn expiry_leeway(lifetime: Duration) -> Duration {
    lifetime
        .mul_f64(EXPIRY_LEEWAY_FRACTION)
        .min(MAX_EXPIRY_LEEWAY)
}

/// An access token ready to be injected.
pub struct AccessToken {
    /// `Bearer <token>`, built once and marked sensitive (HTTP/2 never indexes it).
    header: HeaderValue,
    /// Monotonic expiry: the moment the token request was sent plus the lifetime.
    expires_at: Instant,
    /// The last moment the token is sent: `expires_at` less [`expiry_leeway`].
    usable_until: Instant,
    /// Wall-clock expiry, for metrics and the status page only.
    expires_wall: SystemTime,
    /// Which token this is, counting from 1 per cell; lets a 401 name the token it saw.
    generation: u64,
    /// The lifetime the server granted (never raised; capped only at the client's maximum).
    lifetime: Duration,
    /// The `scope` the server granted, if it said.
    scope: Option<String>,
}

impl AccessToken {
    /// Builds a token from its raw value. Fails if the value cannot be a header value (CR, LF,
    /// other control characters), which a hostile or broken token endpoint could send.
    pub fn new(
        raw: &str,
        sent_at: Instant,
        sent_wall: SystemTime,
        lifetime: Duration,
        scope: Option<String>,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut header = HeaderValue::try_from(format!("Bearer {raw}"))?;
        header.set_sensitive(true);
        Ok(Self {
            header,
            expires_at: sent_at + lifetime,
            usable_until: sent_at + lifetime - expiry_leeway(lifetime),
            expires_wall: sent_wall + lifetime,
            generation: 0,
            lifetime,
            scope,
        })
    }

    /// The `Authorization` header value.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The token itself (the header without `Bearer `), to be sealed into a shared slot
    /// (`shared = true`); nothing else needs it.
    pub(crate) fn raw(&self) -> Option<crate::secret::Secret> {
        let bytes = self.header.as_bytes().strip_prefix(b"Bearer ")?;
        std::str::from_utf8(bytes)
            .ok()
            .map(|s| crate::secret::Secret::new(s.to_owned()))
    }

    /// Monotonic expiry, as granted by the server.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// The last moment the token is sent (the expiry less [`expiry_leeway`]).
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }

    /// Wall-clock expiry (informational).
    pub fn expires_wall(&self) -> SystemTime {
        self.expires_wall
    }

    /// Generation within its cell (1 for the first token).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Lifetime granted by the server.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Scope granted by the server.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether the token may still be sent at `now`: before its expiry less the leeway.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("generation", &self.generation)
            .field("lifetime", &self.lifetime)
            .field("expires_wall", &self.expires_wall)
            .finish_non_exhaustive()
    }
}

/// One credential's current token, shared between its refresher and every request.
pub struct TokenCell {
    /// The configured name (`[tokens.<name>]`).
    name: Arc<str>,
    /// The latest token, or none before the first success.
    current: ArcSwapOption<AccessToken>,
    /// Last generation handed out.
    generation: AtomicU64,
    /// Bumped after every refresh attempt, successful or not, so waiters can re-check.
    attempts: watch::Sender<u64>,
    /// Wakes the refresher for a forced refresh.
    force: Notify,
    /// Forced-refresh bookkeeping; touched only on upstream 401s, never on the normal path.
    forced: Mutex<Forced>,
    /// Minimum time between forced refreshes.
    forced_interval: Duration,
    /// What the admin port shows; written by the refresher, read by the admin port.
    status: Mutex<TokenStatus>,
}

#[derive(Default)]
struct Forced {
    /// When the last forced refresh was granted.
    last: Option<Instant>,
    /// A forced refresh has been requested and not yet attempted.
    pending: bool,
    /// The attempt count when the last forced refresh was granted: while it has not moved, that
    /// refresh is still pending or in flight, and a new caller joins it.
    granted_at: u64,
}

impl fmt::Debug for TokenCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCell")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TokenCell {
    /// An empty cell.
    pub fn new(name: impl Into<Arc<str>>, forced_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            attempts: watch::channel(0).0,
            force: Notify::new(),
            forced: Mutex::new(Forced::default()),
            forced_interval,
            status: Mutex::new(TokenStatus::default()),
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current token if it is still valid. This is the request path: one atomic load and a
    /// clock read.
    pub fn current(&self) -> Option<Arc<AccessToken>> {
        let token = self.current.load_full()?;
        token.is_valid_at(Instant::now()).then_some(token)
    }

    /// The current token, valid or not (for status reporting).
    pub fn latest(&self) -> Option<Arc<AccessToken>> {
        self.current.load_full()
    }

    /// A valid token, waiting up to `timeout` for the refresher to obtain one.
    pub async fn wait_valid(&self, timeout: Duration) -> Option<Arc<AccessToken>> {
        let deadline = Instant::now() + timeout;
        let mut attempts = self.attempts.subscribe();
        loop {
            if let Some(t) = self.current() {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, attempts.changed()).await {
                Ok(Ok(())) => continue,
                // Deadline passed, or the refresher is gone: one last look.
                _ => return self.current(),
            }
        }
    }

    /// Asks for a token newer than generation `seen`, because an upstream rejected that one.
    ///
    /// Returns a newer valid token if one is in place or arrives within `timeout`; `None` if the
    /// refresh failed, timed out, or was refused by the rate limit (at most one forced refresh
    /// per `forced_interval`). Concurrent callers share one token request.
    pub async fn invalidate(&self, seen: u64, timeout: Duration) -> Option<Arc<AccessToken>> {
        let newer = |cell: &Self| cell.current().filter(|t| t.generation > seen);
        if let Some(t) = newer(self) {
            return Some(t);
        }
        let mut attempts = self.attempts.subscribe();
        let finished = *attempts.borrow_and_update();
        {
            let mut forced = self.forced.lock().unwrap_or_else(PoisonError::into_inner);
            if !forced.pending {
                let now = Instant::now();
                if forced
                    .last
                    .is_some_and(|last| now < last + self.forced_interval)
                {
                    // Rate-limited, unless that refresh has not finished yet (the refresher
                    // took it and is still asking): then wait for its result like the callers
                    // that came before it was taken.
                    if forced.granted_at != finished {
                        return None;
                    }
                } else {
                    forced.last = Some(now);
                    forced.pending = true;
                    forced.granted_at = finished;
                    self.force.notify_one();
                }
            }
        }
        // Wait for the refresher's next attempt to finish, then look.
        let _ = tokio::time::timeout(timeout, attempts.changed()).await;
        newer(self)
    }

    /// Whether a forced refresh is waiting; clears the request (refresher side).
    pub(crate) fn take_forced(&self) -> bool {
        let mut forced = self.forced.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut forced.pending)
    }

    /// Resolves when a forced refresh is requested (refresher side).
    pub(crate) async fn forced_requested(&self) {
        self.force.notified().await;
    }

    /// Installs a new token and returns its generation. The refresher is the only writer in the
    /// product; tests use this to put a known token in place.
    pub fn publish(&self, mut token: AccessToken) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        token.generation = generation;
        self.current.store(Some(Arc::new(token)));
        generation
    }

    /// A watch on the number of refresh attempts finished so far, successful or not (a
    /// readiness signal for tests and diagnostics: wait for the refresher's next attempt
    /// instead of sleeping).
    pub fn watch_attempts(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    /// Tells waiters that an attempt has finished (refresher side).
    pub(crate) fn attempt_finished(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    /// A snapshot of the refresher's state for the admin port, with the state derived from the
    /// token's validity at this moment.
    pub fn status(&self) -> TokenStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        s.valid = self.current().is_some();
        s.state = s.derive_state();
        if let Some(t) = self.latest() {
            s.expires_wall = Some(t.expires_wall);
            s.expires_in = t.expires_at.checked_duration_since(Instant::now());
            s.generation = t.generation;
        }
        s
    }

    pub(crate) fn update_status(&self, f: impl FnOnce(&mut TokenStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime: u64) -> AccessToken {
        AccessToken::new(
            "abc",
            Instant::now(),
            SystemTime::now(),
            Duration::from_secs(lifetime),
            None,
        )
        .unwrap()
    }

    #[test]
    fn header_is_sensitive_and_debug_hides_it() {
        let t = token(10);
        assert!(t.header().is_sensitive());
        assert_eq!(t.header(), "Bearer abc");
        assert!(!format!("{t:?}").contains("abc"));
    }

    #[test]
    fn crlf_in_token_is_refused() {
        assert!(
            AccessToken::new(
                "abc\r\nX-Evil: 1",
                Instant::now(),
                SystemTime::now(),
                Duration::from_secs(1),
                None
            )
            .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_never_handed_out() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        assert!(cell.current().is_none());
        cell.publish(token(10));
        assert!(cell.current().is_some());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(cell.current().is_none());
        assert!(cell.wait_valid(Duration::from_secs(1)).await.is_none());
    }

    #[test]
    fn leeway_is_a_fraction_of_short_lifetimes_and_capped_for_long_ones() {
        assert_eq!(
            expiry_leeway(Duration::from_secs(3)),
            Duration::from_millis(300)
        );
        assert_eq!(
            expiry_leeway(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(expiry_leeway(Duration::from_secs(300)), MAX_EXPIRY_LEEWAY);
        assert_eq!(expiry_leeway(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_three_second_token_is_served_until_its_expiry_less_the_leeway() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        let t = cell.publish(token(3));
        let issued = Instant::now();
        tokio::time::sleep_until(issued + Duration::from_millis(2699)).await;
        assert_eq!(cell.current().expect("valid at 2.699 s").generation(), t);
        // From the expiry less 0.3 s on, never again, and no waiter gets it either.
        tokio::time::sleep_until(issued + Duration::from_millis(2700)).await;
        assert!(cell.current().is_none(), "sent in its last 0.3 s");
        assert!(cell.wait_valid(Duration::from_secs(1)).await.is_none());
        assert!(!cell.status().valid);
        // The granted expiry stays what the server said.
        assert_eq!(
            cell.latest().unwrap().expires_at(),
            issued + Duration::from_secs(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_valid_returns_when_a_token_arrives() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        let c2 = cell.clone();
        let waiter = tokio::spawn(async move { c2.wait_valid(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        cell.publish(token(60));
        cell.attempt_finished();
        let got = waiter.await.unwrap().expect("token");
        assert_eq!(got.generation(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_returns_newer_token_without_a_request() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        cell.publish(token(60));
        cell.publish(token(60));
        let t = cell.invalidate(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(t.generation(), 2);
        assert!(!cell.take_forced(), "no refresh was requested");
    }

    #[tokio::test(start_paused = true)]
    async fn forced_refreshes_are_rate_limited() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        cell.publish(token(60));
        // First request is granted (and times out here: no refresher runs).
        assert!(
            cell.invalidate(1, Duration::from_millis(10))
                .await
                .is_none()
        );
        assert!(cell.take_forced());
        // A second within the interval is refused at once.
        assert!(cell.invalidate(1, Duration::from_secs(1)).await.is_none());
        assert!(!cell.take_forced());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            cell.invalidate(1, Duration::from_millis(10))
                .await
                .is_none()
        );
        assert!(cell.take_forced());
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_during_an_in_flight_forced_refresh_joins_it() {
        let cell = TokenCell::new("t", Duration::from_secs(5));
        cell.publish(token(60));
        let c1 = cell.clone();
        let first = tokio::spawn(async move { c1.invalidate(1, Duration::from_secs(1)).await });
        tokio::task::yield_now().await;
        // The refresher takes the request and starts its token request...
        assert!(cell.take_forced());
        // ...and another rejected request arrives meanwhile.
        let c2 = cell.clone();
        let second = tokio::spawn(async move { c2.invalidate(1, Duration::from_secs(1)).await });
        tokio::task::yield_now().await;
        cell.publish(token(60));
        cell.attempt_finished();
        assert_eq!(first.await.unwrap().unwrap().generation(), 2);
        assert_eq!(second.await.unwrap().unwrap().generation(), 2);
        assert!(!cell.take_forced(), "one refresh served both");
    }
}
