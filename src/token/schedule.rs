//! The refresher's schedule as pure functions of a lifetime or a failure count and a random
//! `unit` in 0..1 (the jitter), so every bound is unit- and property-tested without a clock:
//! when to renew a token ([`refresh_delay`]) and when to retry after a failure
//! ([`retry_delay`], over [`backoff_delay`]).

use std::time::Duration;

use crate::token::status::ErrorKind;

/// Jitter takes up to this fraction off each scheduled refresh delay, so that replicas started
/// together spread their token requests instead of hitting the endpoint at the same instant.
pub const REFRESH_JITTER: f64 = 0.15;
/// Shortest delay between two scheduled refreshes, whatever the lifetime: keeps a server that
/// grants absurdly short tokens from making us spin (at most four requests a second), while a
/// 1 s token, whose schedule is half its lifetime, is still renewed before it expires.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(250);
/// Longest `Retry-After` honoured. Longer than a Flinks token lives; waiting longer would only
/// guarantee an expired token.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Delay before the next scheduled refresh of a token that lives `lifetime`: `ratio` of it, less
/// up to [`REFRESH_JITTER`] of that (`unit` in 0..1 picks where), never later than `margin` (or
/// twice the expiry leeway, if longer) before expiry, or half the lifetime if that is later still,
/// and never less than [`MIN_REFRESH_DELAY`]. Only this schedule has a floor: the token itself
/// is never used beyond its lifetime.
pub fn refresh_delay(lifetime: Duration, ratio: f64, margin: Duration, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    let target = lifetime.mul_f64(ratio.clamp(0.0, 1.0) * (1.0 - REFRESH_JITTER * unit));
    // Twice the leeway: the token stops being served one leeway before expiry, and the new one
    // should be in place another leeway before that.
    let margin = margin.max(crate::token::expiry_leeway(lifetime) * 2);
    let latest = lifetime.saturating_sub(margin).max(lifetime / 2);
    target.min(latest).max(MIN_REFRESH_DELAY)
}

/// Delay before retry number `failures` (1 for the first) after a transient failure:
/// exponential growth from `initial` capped at `max`, with full jitter (`unit` in 0..1) between
/// `initial` and that cap.
pub fn backoff_delay(failures: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let max = max.max(initial);
    let shift = failures.saturating_sub(1).min(30);
    let cap = initial.saturating_mul(1u32 << shift).min(max);
    initial + (cap - initial).mul_f64(unit.clamp(0.0, 1.0))
}

/// Delay before the next attempt after a failure of `kind`, the `failures`-th in a row:
/// [`backoff_delay`] for a transient failure, `backoff_max` after a rejection (the credentials
/// will not fix themselves quickly), and never sooner than the server's `Retry-After` (at most
/// [`MAX_RETRY_AFTER`]).
pub fn retry_delay(
    kind: ErrorKind,
    failures: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let delay = match kind {
        ErrorKind::Transient => backoff_delay(failures, backoff_initial, backoff_max, unit),
        ErrorKind::Rejected => backoff_max,
    };
    delay.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn flinks_lifetime_refreshes_between_jitter_bounds() {
        let lo = refresh_delay(S(300), 0.75, S(30), 1.0);
        let hi = refresh_delay(S(300), 0.75, S(30), 0.0);
        assert_eq!(hi, S(225));
        assert_eq!(lo, Duration::from_secs_f64(225.0 * (1.0 - REFRESH_JITTER)));
    }

    #[test]
    fn margin_caps_the_ratio_and_short_lifetimes_do_not_spin() {
        // ratio 0.95 of 300s = 285s, but never later than 30s before expiry.
        assert_eq!(refresh_delay(S(300), 0.95, S(30), 0.0), S(270));
        // A margin longer than the lifetime falls back to half of it.
        assert_eq!(refresh_delay(S(20), 0.75, S(30), 0.0), S(10));
        // Tiny lifetimes hit the floor.
        assert_eq!(
            refresh_delay(Duration::from_millis(100), 0.75, S(30), 0.0),
            MIN_REFRESH_DELAY
        );
    }

    #[test]
    fn short_lifetimes_are_refreshed_before_they_stop_being_served() {
        for ms in [1_000u64, 2_000, 3_000, 5_000] {
            let lifetime = Duration::from_millis(ms);
            let usable = lifetime - crate::token::expiry_leeway(lifetime);
            for margin in [Duration::ZERO, S(1), S(30)] {
                for unit in [0.0, 0.5, 1.0] {
                    let d = refresh_delay(lifetime, 0.95, margin, unit);
                    assert!(d < usable, "{lifetime:?} margin {margin:?}: {d:?}");
                }
            }
        }
        // A 1 s token is renewed at half its life, not after a whole second.
        assert_eq!(
            refresh_delay(S(1), 0.75, S(30), 0.0),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_delay(1, S(1), S(30), 1.0), S(1));
        assert_eq!(backoff_delay(2, S(1), S(30), 1.0), S(2));
        assert_eq!(backoff_delay(4, S(1), S(30), 1.0), S(8));
        assert_eq!(backoff_delay(10, S(1), S(30), 1.0), S(30));
        assert_eq!(backoff_delay(u32::MAX, S(1), S(30), 1.0), S(30));
        assert_eq!(backoff_delay(10, S(1), S(30), 0.0), S(1));
    }

    #[test]
    fn a_rejection_waits_backoff_max_and_retry_after_is_honoured_up_to_its_cap() {
        let retry = |kind, after| retry_delay(kind, 1, S(1), S(30), after, 0.0);
        assert_eq!(retry(ErrorKind::Transient, None), S(1));
        assert_eq!(retry(ErrorKind::Rejected, None), S(30));
        assert_eq!(retry(ErrorKind::Transient, Some(S(7))), S(7));
        assert_eq!(retry(ErrorKind::Rejected, Some(S(7))), S(30));
        assert_eq!(
            retry(ErrorKind::Transient, Some(S(86_400))),
            MAX_RETRY_AFTER
        );
    }

    proptest! {
        #[test]
        fn backoff_stays_within_bounds(
            failures in 0u32..200,
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..600_000,
            unit in 0.0f64..=1.0,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial + Duration::from_millis(extra_ms);
            let d = backoff_delay(failures, initial, max, unit);
            prop_assert!(d >= initial && d <= max, "{d:?} not in {initial:?}..={max:?}");
        }

        #[test]
        fn refresh_happens_before_expiry(
            lifetime_ms in 1_000u64..86_400_000,
            ratio in 0.01f64..0.99,
            margin_ms in 0u64..600_000,
            unit in 0.0f64..=1.0,
        ) {
            let lifetime = Duration::from_millis(lifetime_ms);
            let d = refresh_delay(lifetime, ratio, Duration::from_millis(margin_ms), unit);
            prop_assert!(d >= MIN_REFRESH_DELAY);
            let usable = lifetime - crate::token::expiry_leeway(lifetime);
            prop_assert!(d < usable, "{d:?} >= {usable:?}");
            prop_assert!(d <= lifetime.mul_f64(ratio).max(MIN_REFRESH_DELAY));
        }
    }
}
