//! Named tokens shared by replicas (`[tokens.NAME] shared = true`, issue #13): the slot
//! contract a refresher talks to ([`SharedSlot`]), and the arithmetic of the protocol: how long
//! a lease lasts, how long a written slot lives, and how a slot's wall-clock expiry becomes a
//! local deadline.
//!
//! The protocol itself runs in the refresher (`refresher.rs`): at its refresh point a replica
//! first reads the slot and adopts a newer token it finds there; otherwise it takes the token's
//! lease, re-reads the slot, requests a token, writes it to the slot and releases the lease;
//! a replica that finds the lease taken polls the slot until the new token appears or the lease
//! lapses. When Redis cannot be reached the replica requests its own token: a
//! `client_credentials` token holds no secret that could be lost, so the route keeps working.
//!
//! Only the contract lives here; the Redis implementation is `crate::subject::redis::named`
//! (the token module does not depend on the subject module, which depends on it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::secret::Secret;
use crate::token::schedule::refresh_delay;

/// How often a replica that found the lease taken looks for the holder's token. A token
/// request takes from tens of milliseconds to a few seconds; ten Redis reads a second per
/// waiting replica are nothing for Redis, and a waiter adopts the new token at most this long
/// after it was written (which matters at start, when requests wait for the first token).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Allowance for the difference between the writer's wall clock and this replica's: an adopted
/// token is treated as expiring this much before the slot says. Replicas in one cluster run
/// NTP and agree within milliseconds; one second covers a node whose clock drifted badly
/// (beyond that, NTP monitoring should fire), and is small against real token lifetimes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(1);

/// What the lease TTL adds to twice the token request's timeout: the holder's re-read and its
/// write of the slot, each bounded by `[redis] command_timeout` (1 s by default).
pub const LEASE_SLACK: Duration = Duration::from_secs(2);

/// A shared token's slot could not be used (Redis unreachable, or answering errors). The
/// message names the operation and the token, never a value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SlotUnavailable(pub String);

/// An access token read from a slot.
#[derive(Debug)]
pub struct SlotToken {
    /// The access token.
    pub access_token: Secret,
    /// When it expires, seconds since the Unix epoch, as the writer's clock saw it.
    pub expires_at: u64,
}

/// One shared named token's slot and lease, as a refresher uses them. One value per token;
/// it remembers the lease it holds.
pub trait SharedSlot: Send + Sync {
    /// The token in the slot, if any. A value that does not open (another key, altered) is
    /// reported by the implementation and read as `None`: the replica then refreshes.
    fn read(&self) -> BoxFuture<'_, Result<Option<SlotToken>, SlotUnavailable>>;

    /// Replaces the slot's token for `ttl` (nothing is stored for a zero `ttl`).
    fn write<'a>(
        &'a self,
        access_token: &'a Secret,
        expires_at: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), SlotUnavailable>>;

    /// Takes the token's lease for `ttl` if nobody holds it; whether it was taken.
    fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<bool, SlotUnavailable>>;

    /// Releases the lease this value holds, if it still holds it.
    fn unlock(&self) -> BoxFuture<'_, Result<(), SlotUnavailable>>;
}

/// The lease TTL for a token whose request times out after `request_timeout`. It must outlast
/// the holder's work (one token request, then a slot write), or a second replica would take the
/// lease and request too; it should not be much longer, because waiters poll until it lapses
/// when a holder dies. Twice the timeout (a holder stalled by a pause as long as the request
/// itself still holds it) plus [`LEASE_SLACK`].
pub fn lease_ttl(request_timeout: Duration) -> Duration {
    request_timeout
        .saturating_mul(2)
        .saturating_add(LEASE_SLACK)
}

/// How long a token sent at `sent_at`, living `lifetime`, stays in the slot when written at
/// `now`: until the writer's own (unjittered) refresh point, never past the moment it stops
/// being sent, both measured from when the request was sent (never from when the answer
/// came). Zero when that moment has passed.
pub fn slot_ttl(
    sent_at: Instant,
    lifetime: Duration,
    ratio: f64,
    margin: Duration,
    now: Instant,
) -> Duration {
    let usable = lifetime.saturating_sub(crate::token::expiry_leeway(lifetime));
    let end = sent_at + refresh_delay(lifetime, ratio, margin, 0.0).min(usable);
    end.saturating_duration_since(now)
}

/// The Unix second a token expiring at `expires_wall` is written with: rounded down, so a
/// reader never believes it lives longer than the issuer granted.
pub fn unix_secs_floor(expires_wall: SystemTime) -> u64 {
    expires_wall
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long a slot token expiring at Unix second `expires_at` may be treated as living from
/// `now_wall`: what the slot says less [`CLOCK_SKEW_ALLOWANCE`]; `None` when nothing is left.
pub fn adopted_lifetime(expires_at: u64, now_wall: SystemTime) -> Option<Duration> {
    let expiry = UNIX_EPOCH.checked_add(Duration::from_secs(expires_at))?;
    expiry
        .duration_since(now_wall)
        .ok()?
        .checked_sub(CLOCK_SKEW_ALLOWANCE)
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_lease_outlasts_the_request_it_covers() {
        assert_eq!(lease_ttl(S(10)), S(22));
        assert!(lease_ttl(Duration::from_millis(1)) > LEASE_SLACK);
        assert_eq!(lease_ttl(Duration::MAX), Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_lives_until_the_writers_refresh_point_counted_from_the_send() {
        let sent = Instant::now();
        // 300 s token, ratio 0.75: refresh point at 225 s after sending.
        tokio::time::advance(S(4)).await;
        let ttl = slot_ttl(sent, S(300), 0.75, S(30), Instant::now());
        assert_eq!(ttl, S(221), "the 4 s the answer took are not added");
        // A short token: never past its usable end (lifetime less the leeway).
        let ttl = slot_ttl(sent, S(3), 0.99, Duration::ZERO, sent);
        assert!(ttl <= Duration::from_millis(2_700), "{ttl:?}");
        // An answer that came after the refresh point: nothing is written.
        tokio::time::advance(S(300)).await;
        assert_eq!(
            slot_ttl(sent, S(300), 0.75, S(30), Instant::now()),
            Duration::ZERO
        );
    }

    #[test]
    fn adopted_expiry_is_never_later_than_the_slot_says_and_allows_for_skew() {
        let now = UNIX_EPOCH + Duration::from_millis(1_000_000_500);
        let expires = unix_secs_floor(now + S(60));
        assert_eq!(expires, 1_000_060, "rounded down");
        let life = adopted_lifetime(expires, now).unwrap();
        assert_eq!(life, Duration::from_millis(58_500));
        assert!(now + life + CLOCK_SKEW_ALLOWANCE <= UNIX_EPOCH + S(expires));
        // Expired, about to expire within the allowance, or before the epoch: nothing.
        assert_eq!(adopted_lifetime(1_000_000, now), None);
        assert_eq!(adopted_lifetime(1_000_001, now), None);
        assert_eq!(adopted_lifetime(0, now), None);
        assert_eq!(adopted_lifetime(u64::MAX, now), None);
    }
}
