//! Whether Redis answers, for `/readyz`, `/status` and `bearer_proxy_store_up`: a task pings it
//! every [`PING_INTERVAL`] and records the outcome, so the admin port answers probes from
//! memory (a probe never waits on Redis) and a change is logged once, not per request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::RedisStore;
use crate::metrics::Metrics;

/// How often Redis is pinged. Kubernetes probes readiness every 10 s by default, so the state
/// a probe sees is at most half a probe period old; a `PING` every 5 s costs Redis nothing.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// The last health check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Whether Redis answered the last check (true at start: it answered the connect probe).
    pub up: bool,
    /// Since when it is in that state.
    pub since: SystemTime,
    /// When it was last checked.
    pub checked: SystemTime,
    /// Why the last failed check failed (never a value or a password).
    pub last_error: Option<String>,
}

/// Redis' health as the admin port reports it.
#[derive(Debug)]
pub struct StoreHealth {
    /// `redis.gate_readiness`.
    gate: bool,
    state: Mutex<Snapshot>,
}

impl StoreHealth {
    /// Starts pinging `store` every [`PING_INTERVAL`] until the returned task is aborted.
    /// `gate` is `redis.gate_readiness`.
    pub fn spawn(
        store: Arc<RedisStore>,
        gate: bool,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let now = SystemTime::now();
        let health = Arc::new(Self {
            gate,
            state: Mutex::new(Snapshot {
                up: true,
                since: now,
                checked: now,
                last_error: None,
            }),
        });
        metrics.set_store_up(true);
        let this = health.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let outcome = store.ping().await;
                metrics.set_store_up(outcome.is_ok());
                this.record(outcome.err().map(|e| e.to_string()));
            }
        });
        (health, task)
    }

    /// Notes one check's outcome (`Some`: why it failed), logging a change of state.
    fn record(&self, error: Option<String>) {
        let now = SystemTime::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let up = error.is_none();
        if up != s.up {
            s.since = now;
            match &error {
                Some(e) => {
                    tracing::warn!(error = %e, "Redis is unreachable: cached access tokens are still served; refreshes and enrolments fail until it is back")
                }
                None => tracing::info!("Redis is reachable again"),
            }
        }
        s.up = up;
        s.checked = now;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// The last check's outcome.
    pub fn snapshot(&self) -> Snapshot {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether an unreachable Redis fails `/readyz` (`redis.gate_readiness`).
    pub fn gates_readiness(&self) -> bool {
        self.gate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_state_moves_since_and_the_last_error_stays_for_operators() {
        let h = StoreHealth {
            gate: false,
            state: Mutex::new(Snapshot {
                up: true,
                since: SystemTime::UNIX_EPOCH,
                checked: SystemTime::UNIX_EPOCH,
                last_error: None,
            }),
        };
        h.record(None);
        assert_eq!(h.snapshot().since, SystemTime::UNIX_EPOCH);
        h.record(Some("connection refused".into()));
        let down = h.snapshot();
        assert!(!down.up && down.since > SystemTime::UNIX_EPOCH);
        assert_eq!(down.last_error.as_deref(), Some("connection refused"));
        h.record(None);
        let up = h.snapshot();
        assert!(up.up && up.since >= down.since);
        assert_eq!(up.last_error.as_deref(), Some("connection refused"));
    }
}
