//! Shared access tokens: one slot per `shared = true` named token and per subject, so that N
//! replicas make about one token request per lifetime between them instead of N.
//!
//! A slot holds the access token sealed with the subjects' [`KeyRing`] (Redis never sees it in
//! plaintext) and its expiry, with a Redis TTL that ends before the expiry: a reader never gets
//! a token that is about to expire from Redis, and a slot nobody refreshes disappears by itself.
//!
//! Sealing reuses [`KeyRing::seal`] in a namespace of its own: the "token name" it binds is
//! `access-token:named:<token>:<expires_at>` or `access-token:subject:<token>:<expires_at>`.
//! Token names never contain `:`, so no sealed refresh token opens as an access token or the
//! other way round, a named token's slot never opens as a subject's, and the expiry cannot be
//! changed without the value failing to open.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RedisStore, Scope};
use crate::metrics::StoreOp;
use crate::secret::Secret;
use crate::subject::SubjectId;
use crate::subject::keyring::{KeyRing, SealError, Sealed};
use crate::subject::record::StoreError;

/// What a slot holds.
#[derive(Serialize, Deserialize)]
struct Slot {
    /// When the access token expires, seconds since the Unix epoch (bound into the seal).
    expires_at: u64,
    sealed: Sealed,
}

/// An access token read from a shared slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedToken {
    /// The access token.
    pub access_token: Secret,
    /// When it expires, seconds since the Unix epoch (wall clock, as the writer saw it).
    pub expires_at: u64,
}

/// The subject id the seal binds for a named token's slot: any fixed valid id does, since the
/// namespace string already says "named".
const NAMED_SUBJECT: &str = "-";

/// The (namespace, subject) pair a slot's value is sealed under.
fn seal_context(scope: &Scope<'_>, expires_at: u64) -> (String, SubjectId) {
    match scope {
        Scope::Named(t) => (
            format!("access-token:named:{t}:{expires_at}"),
            #[allow(clippy::expect_used)]
            SubjectId::parse(NAMED_SUBJECT)
                .expect("\"-\" is a valid subject id because '-' is in the alphabet"),
        ),
        Scope::Subject(t, s) => (
            format!("access-token:subject:{t}:{expires_at}"),
            (*s).clone(),
        ),
    }
}

impl RedisStore {
    /// Stores `access_token` (expiring at `expires_at`, Unix seconds) in the slot of `scope` for
    /// `ttl`, replacing what was there. Give a `ttl` that ends before the expiry (for example at
    /// the refresh point), so no reader takes a token about to expire. A zero `ttl` stores
    /// nothing.
    pub async fn put_access_token(
        &self,
        ring: &KeyRing,
        scope: &Scope<'_>,
        access_token: &Secret,
        expires_at: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.scope_key("access", scope)?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Ok(());
        }
        let (namespace, subject) = seal_context(scope, expires_at);
        let location = scope.location();
        let io = |e: String| StoreError::Io {
            location: format!("redis access_token_put {location}"),
            source: std::io::Error::other(e),
        };
        let sealed = ring
            .seal(&namespace, &subject, access_token)
            .map_err(|e| self.failed(StoreOp::AccessTokenPut, io(e.to_string())))?;
        let value = serde_json::to_string(&Slot { expires_at, sealed })
            .map_err(|e| self.failed(StoreOp::AccessTokenPut, io(e.to_string())))?;
        let mut c = self.conn.clone();
        self.run(StoreOp::AccessTokenPut, scope.location(), async {
            redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Empties the slot of `scope` (a subject deleted, re-enrolled or refreshed on request: no
    /// replica may take its old token from the slot).
    pub async fn delete_access_token(&self, scope: &Scope<'_>) -> Result<(), StoreError> {
        let key = self.scope_key("access", scope)?;
        let mut c = self.conn.clone();
        self.run(StoreOp::AccessTokenPut, scope.location(), async {
            redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
        })
        .await
    }

    /// The access token in the slot of `scope`, if there is one. A value that does not open
    /// (sealed with a key no longer configured, or altered) is [`StoreError::Corrupt`] naming
    /// the key id; callers treat it as a miss and refresh.
    pub async fn get_access_token(
        &self,
        ring: &KeyRing,
        scope: &Scope<'_>,
    ) -> Result<Option<SharedToken>, StoreError> {
        let key = self.scope_key("access", scope)?;
        let mut c = self.conn.clone();
        let value: Option<String> = self
            .run(StoreOp::AccessTokenGet, scope.location(), async {
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let corrupt = |reason: String| {
            self.failed(
                StoreOp::AccessTokenGet,
                StoreError::Corrupt {
                    location: format!("redis key {key}"),
                    reason,
                },
            )
        };
        let slot: Slot = serde_json::from_str(&value).map_err(|e| corrupt(e.to_string()))?;
        let (namespace, subject) = seal_context(scope, slot.expires_at);
        let access_token = ring
            .open(&namespace, &subject, &slot.sealed)
            .map_err(|e| match e {
                SealError::UnknownKey { key_id } => corrupt(format!(
                    "sealed with encryption key {key_id}, which no configured key file holds"
                )),
                _ => corrupt(format!(
                    "the value sealed with encryption key {} does not open: altered, or written \
                     for another slot",
                    slot.sealed.key_id
                )),
            })?;
        Ok(Some(SharedToken {
            access_token,
            expires_at: slot.expires_at,
        }))
    }
}
