//! The per-subject part of a running server: one [`SubjectTokens`] for each token entry with
//! `per_subject = true`, over one store and one key ring. Built once by [`Subjects::start`];
//! the proxy reads tokens from it and the subjects API manages subjects through it.
//!
//! Start-up reads every record once (the census) to count subjects and to refuse, naming the
//! key id, any record sealed with a key that is not configured; it sends no token request.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use http::HeaderName;

use super::census::Census;
use super::keyring::KeyRing;
use super::record::SubjectStore;
use super::tokens::{DEFAULT_FAILURE_HOLD, Settings, SubjectTokens};
use crate::config::Config;
use crate::token::client::TokenClient;

/// The per-subject token entries of a running server, by token name.
pub struct Subjects {
    /// The header naming the subject on a request (already validated by the config).
    header: HeaderName,
    /// Where every subject's record lives.
    store: Arc<dyn SubjectStore>,
    /// The keys sealing refresh tokens.
    ring: Arc<KeyRing>,
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
    /// Opens the store and key ring and builds each per-subject token entry; `None` when no
    /// token has `per_subject = true`. Fails before anything is served if the store cannot be
    /// opened, a key file cannot be read, or a record names a key id that is not configured.
    pub async fn start(config: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(sc) = &config.subjects else {
            return Ok(None);
        };
        let header = HeaderName::from_bytes(sc.header.as_bytes())
            .context("subjects.header: not a valid header name")?;
        let ring = Arc::new(sc.key_ring().await.context("subjects: encryption keys")?);
        let store: Arc<dyn SubjectStore> =
            Arc::new(sc.open_store().await.context("subjects: store")?);
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
            };
            tracing::info!(token = %name, subjects = census.total(), "per-subject token ready");
            entries.insert(
                name.clone(),
                SubjectTokens::new(settings, client, store.clone(), ring.clone()),
            );
        }
        Ok(Some(Arc::new(Self {
            header,
            store,
            ring,
            entries,
        })))
    }

    /// The request header naming the subject.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The access tokens of per-subject token entry `token`, if it is one.
    // The proxy's per-subject routes and the subjects API (being wired) read it.
    #[allow(dead_code)]
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
