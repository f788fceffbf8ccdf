//! The per-subject part of a running server: one [`SubjectTokens`] for each token entry with
//! `per_subject = true`, over one store and one key ring. Built once by [`Subjects::start_with_metrics`];
//! the proxy reads tokens from it and the subjects API manages subjects through it.
//!
//! Start-up reads every record once (the census) to count subjects and to refuse, naming the
//! key id, any record sealed with a key that is not configured; it sends no token request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;

use super::census::Census;
use super::config::StoreKind;
use super::coordination::Coordination;
use super::keyring::KeyRing;
use super::record::{SubjectState, SubjectStore};
use super::redis::RedisStore;
use super::tokens::{DEFAULT_FAILURE_HOLD, Settings, SubjectTokens, lease_ttl};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::token::client::TokenClient;

/// One per-subject token entry's subjects, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryCounts {
    /// Subjects per state, as `bearer_proxy_subjects` counts them.
    pub states: Vec<(&'static str, i64)>,
    /// Subjects whose access token is held in memory.
    pub cached: usize,
}

/// The per-subject token entries of a running server, by token name.
pub struct Subjects {
    /// The header naming the subject on a request (already validated by the config).
    header: HeaderName,
    /// Where every subject's record lives.
    store: Arc<dyn SubjectStore>,
    /// The keys sealing refresh tokens.
    ring: Arc<KeyRing>,
    /// `subjects.keepalive_after`.
    keepalive_after: Duration,
    /// Per token entry: its access tokens and settings.
    entries: BTreeMap<String, Arc<SubjectTokens<TokenClient>>>,
}

impl std::fmt::Debug for Subjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subjects")
            .field("header", &self.header)
            .field("tokens", &self.entries.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Subjects {
    /// Opens the store and key ring and builds each per-subject token entry, counting into
    /// `metrics` (`bearer_proxy_subjects` starts from the census); `None` when no token has
    /// `per_subject = true`. Fails before anything is served if the store cannot be opened, a
    /// key file cannot be read, or a record names a key id that is not configured.
    /// `redis` is the server's connection to `[redis]`, the store when `[subjects] store =
    /// "redis"`.
    pub async fn start_with_metrics(
        config: &Config,
        metrics: &Metrics,
        redis: Option<Arc<RedisStore>>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(sc) = &config.subjects else {
            return Ok(None);
        };
        let header = HeaderName::from_bytes(sc.header.as_bytes())
            .context("subjects.header: not a valid header name")?;
        let ring = Arc::new(sc.key_ring().await.context("subjects: encryption keys")?);
        // With Redis as the store, refreshes also coordinate through it (leases, shared
        // access tokens), so the replicas sharing it act as one towards the token endpoint.
        let mut coord: Option<Arc<dyn Coordination>> = None;
        let store: Arc<dyn SubjectStore> = match (sc.store, redis) {
            (StoreKind::Redis, Some(redis)) => {
                coord = Some(redis.clone());
                redis
            }
            (StoreKind::Redis, None) => {
                anyhow::bail!("subjects.store = \"redis\" without a connection to [redis]")
            }
            (StoreKind::File, _) => Arc::new(sc.open_store().await.context("subjects: store")?),
        };
        let mut entries = BTreeMap::new();
        for (name, cfg) in config.tokens.iter().filter(|(_, t)| t.per_subject) {
            let census = Census::take(store.as_ref(), name)
                .await
                .with_context(|| format!("subjects: reading the records of tokens.{name}"))?;
            census
                .check_keys(name, &ring)
                .map_err(|e| anyhow::anyhow!("subjects: {e}"))?;
            let client =
                TokenClient::new(cfg).map_err(|e| anyhow::anyhow!("tokens.{name}: {e}"))?;
            if let Some(identity) = client.identity() {
                metrics.watch_client_certificate("token", name, identity.probe());
            }
            let settings = Settings {
                token: name.clone(),
                client_id: cfg
                    .client_id_source()
                    .context("client_id is required, which validate() checked")?,
                client_secret: cfg.client_secret_source(),
                max_cached: sc.max_cached,
                token_wait: config.proxy.token_wait,
                refresh_ratio: cfg.refresh_ratio,
                refresh_margin: cfg.refresh_margin,
                failure_hold: DEFAULT_FAILURE_HOLD,
                forced_interval: cfg.forced_refresh_interval,
                lease_ttl: lease_ttl(cfg.timeout),
            };
            let states = SubjectState::ALL.map(SubjectState::as_str);
            let entry_metrics = metrics.subject(name, &states);
            for (state, n) in &census.by_state {
                entry_metrics.set_state(state, *n);
            }
            tracing::info!(token = %name, subjects = census.total(), "per-subject token ready");
            entries.insert(
                name.clone(),
                SubjectTokens::with_coordination(
                    settings,
                    client,
                    store.clone(),
                    ring.clone(),
                    entry_metrics,
                    coord.clone(),
                ),
            );
        }
        Ok(Some(Arc::new(Self {
            header,
            store,
            ring,
            keepalive_after: sc.keepalive_after,
            entries,
        })))
    }

    /// The request header naming the subject.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Starts each entry's keep-alive task (see `tokens::SubjectTokens::keepalive`); the
    /// caller aborts them at shutdown.
    pub fn spawn_keepalive(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.entries
            .values()
            .map(|entry| tokio::spawn(entry.clone().keepalive(self.keepalive_after)))
            .collect()
    }

    /// Subjects per state (`bearer_proxy_subjects`) and held in memory, per token entry, for
    /// `/status`.
    pub fn counts(&self) -> BTreeMap<&str, EntryCounts> {
        self.entries
            .iter()
            .map(|(name, entry)| {
                let states = SubjectState::ALL
                    .iter()
                    .map(|s| (s.as_str(), entry.metrics().state(s.as_str())))
                    .collect();
                (
                    name.as_str(),
                    EntryCounts {
                        states,
                        cached: entry.cached(),
                    },
                )
            })
            .collect()
    }

    /// The access tokens of per-subject token entry `token`, if it is one.
    pub(crate) fn entry(&self, token: &str) -> Option<&Arc<SubjectTokens<TokenClient>>> {
        self.entries.get(token)
    }

    /// The per-subject token names.
    pub fn token_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The store every entry shares.
    pub fn store(&self) -> &Arc<dyn SubjectStore> {
        &self.store
    }

    /// The key ring every entry shares.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }
}
