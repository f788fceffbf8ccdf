//! Wall-clock time as people and Prometheus read it: RFC 3339 text, and seconds since the Unix
//! epoch. Scheduling never uses these; it runs on tokio's clock (`tokio::time::Instant`).
//! Also how configured durations (`30s`, `5m`) are written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339 in UTC with whole seconds (`2026-01-02T03:04:05Z`), for humans and the status page.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whole seconds since the Unix epoch, as JWT `iat`/`exp` claims and the subject records count
/// them. A time before the epoch (a badly set clock) counts as 0 rather than failing: these
/// values are descriptive.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch with the fraction, as Prometheus timestamp gauges hold them;
/// 0 before the epoch, as with [`unix_secs`].
pub fn unix_secs_f64(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time `secs` seconds after the Unix epoch (a JWT `exp` or `iat` claim).
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Durations written as `30s`, `5m`, `250ms`, `1h 30m`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Parses a duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Parses `30s`, `5m`, `250ms`; a bare number is refused so that units are never guessed.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!(
                "{s:?} has no unit; write e.g. \"{s}s\" or \"{s}ms\""
            ));
        }
        humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like \"30s\", \"5m\", \"250ms\": {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_agree_and_clamp_before_the_epoch() {
        let t = from_unix_secs(1_767_323_045);
        assert_eq!(rfc3339(t), "2026-01-02T03:04:05Z");
        assert_eq!(unix_secs(t), 1_767_323_045);
        assert_eq!(unix_secs(t + Duration::from_millis(900)), 1_767_323_045);
        assert!((unix_secs_f64(t + Duration::from_millis(500)) - 1_767_323_045.5).abs() < 1e-6);
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(unix_secs(before), 0);
        assert_eq!(unix_secs_f64(before), 0.0);
    }
}
