//! What per-subject refreshes need from a store shared by replicas (issue #13): a lease per
//! subject ("one refresh at a time across replicas") and the subject's shared access-token
//! slot. [`crate::subject::redis::RedisStore`] provides both; the file store has no
//! replicas and needs neither, so a `SubjectTokens` without a coordination handle refreshes
//! exactly as before. The trait exists so the lease → re-read → compare-and-set logic in
//! `tokens` can be unit-tested against a fake on tokio's paused clock.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::SubjectId;
use super::keyring::KeyRing;
use super::record::StoreError;
use super::redis::access::SharedToken;
use super::redis::lock::Lease;
use super::redis::{RedisStore, Scope};
use crate::secret::Secret;

/// Leases and shared access-token slots of per-subject tokens.
pub(crate) trait Coordination: Send + Sync {
    /// Takes the lease of `token`/`subject` for `ttl`; `None` if another holder has it.
    fn try_lease<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;

    /// Releases a lease taken by [`Coordination::try_lease`] (a no-op if it lapsed).
    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// The subject's shared access token, if a replica stored one that has not lapsed.
    fn shared<'a>(
        &'a self,
        ring: &'a KeyRing,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<Option<SharedToken>, StoreError>>;

    /// Empties the subject's slot.
    fn unshare<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Stores the subject's access token (expiring at `expires_at`, Unix seconds) for `ttl`.
    fn share<'a>(
        &'a self,
        ring: &'a KeyRing,
        token: &'a str,
        subject: &'a SubjectId,
        access_token: &'a Secret,
        expires_at: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl Coordination for RedisStore {
    fn try_lease<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(async move { self.try_lock(&Scope::Subject(token, subject), ttl).await })
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(RedisStore::release(self, lease))
    }

    fn shared<'a>(
        &'a self,
        ring: &'a KeyRing,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<Option<SharedToken>, StoreError>> {
        Box::pin(async move {
            self.get_access_token(ring, &Scope::Subject(token, subject))
                .await
        })
    }

    fn unshare<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.delete_access_token(&Scope::Subject(token, subject))
                .await
        })
    }

    fn share<'a>(
        &'a self,
        ring: &'a KeyRing,
        token: &'a str,
        subject: &'a SubjectId,
        access_token: &'a Secret,
        expires_at: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.put_access_token(
                ring,
                &Scope::Subject(token, subject),
                access_token,
                expires_at,
                ttl,
            )
            .await
        })
    }
}
