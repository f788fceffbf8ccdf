//! The Redis side of a `shared = true` named token ([`crate::token::shared::SharedSlot`]): its
//! sealed access-token slot ([`super::access`]) and its lease ([`super::lock`]), under
//! [`Scope::Named`], sealed with `[redis]`'s own key ring (`encryption_key_file`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::lock::Lease;
use super::{RedisStore, Scope};
use crate::secret::Secret;
use crate::subject::keyring::KeyRing;
use crate::subject::record::StoreError;
use crate::token::shared::{SharedSlot, SlotToken, SlotUnavailable};

/// One shared named token's slot and lease in Redis.
#[derive(Debug)]
pub struct RedisSlot {
    store: Arc<RedisStore>,
    ring: Arc<KeyRing>,
    token: String,
    /// The lease this process holds, between `try_lock` and `unlock`.
    lease: Mutex<Option<Lease>>,
}

impl RedisSlot {
    /// The slot of `[tokens.<token>]` in `store`, sealed with `ring`.
    pub fn new(store: Arc<RedisStore>, ring: Arc<KeyRing>, token: &str) -> Self {
        Self {
            store,
            ring,
            token: token.to_owned(),
            lease: Mutex::new(None),
        }
    }

    fn scope(&self) -> Scope<'_> {
        Scope::Named(&self.token)
    }
}

/// The store's error, whose message names the operation and token (never a value).
fn unavailable(e: StoreError) -> SlotUnavailable {
    SlotUnavailable(e.to_string())
}

impl SharedSlot for RedisSlot {
    fn read(&self) -> BoxFuture<'_, Result<Option<SlotToken>, SlotUnavailable>> {
        Box::pin(async move {
            match self.store.get_access_token(&self.ring, &self.scope()).await {
                Ok(t) => Ok(t.map(|t| SlotToken {
                    access_token: t.access_token,
                    expires_at: t.expires_at,
                })),
                // Sealed with a key this replica lacks (a rotation half rolled out) or
                // altered: Redis works, the value is useless. Refresh and overwrite it.
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::warn!(
                        token = %self.token,
                        error = %e,
                        "the shared token's slot does not open; requesting a new token"
                    );
                    Ok(None)
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn write<'a>(
        &'a self,
        access_token: &'a Secret,
        expires_at: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), SlotUnavailable>> {
        Box::pin(async move {
            self.store
                .put_access_token(&self.ring, &self.scope(), access_token, expires_at, ttl)
                .await
                .map_err(unavailable)
        })
    }

    fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<bool, SlotUnavailable>> {
        Box::pin(async move {
            let lease = self
                .store
                .try_lock(&self.scope(), ttl)
                .await
                .map_err(unavailable)?;
            let taken = lease.is_some();
            if let Some(lease) = lease {
                *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(lease);
            }
            Ok(taken)
        })
    }

    fn unlock(&self) -> BoxFuture<'_, Result<(), SlotUnavailable>> {
        Box::pin(async move {
            let lease = self
                .lease
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match lease {
                Some(lease) => self
                    .store
                    .release(lease)
                    .await
                    .map(drop)
                    .map_err(unavailable),
                None => Ok(()),
            }
        })
    }
}
