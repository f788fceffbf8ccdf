//! Leases: "one refresh at a time across replicas" (issue #13). A lease is a Redis key set with
//! `SET key <random> NX PX ttl`: whoever set it holds it until it expires or the holder
//! releases it. Release and renewal are Lua compare-and-delete / compare-and-expire on the
//! random value, so a holder whose lease expired (a stalled process) cannot release or extend
//! the lease a newer holder took meanwhile.
//!
//! A lease is not a fence by itself: a holder that stalls past its TTL may still act after a
//! newer holder did. What it protects, the refresh token, is written with the store's
//! compare-and-set on the record's generation, which refuses such a late write. Callers give a
//! TTL longer than the work it covers (a token request's timeout with its retries) and, after
//! taking the lease, re-read the record: another replica may have refreshed meanwhile.

use std::time::Duration;

use redis::Script;
use ring::rand::{SecureRandom, SystemRandom};

use super::{RedisStore, Scope};
use crate::metrics::StoreOp;
use crate::subject::record::StoreError;

/// Bytes of randomness in a holder value: enough that two holders never draw the same one.
const HOLDER_BYTES: usize = 16;

/// Deletes KEYS[1] if it holds ARGV[1]. Returns 1 if it did.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Sets KEYS[1]'s expiry to ARGV[2] milliseconds if it holds ARGV[1]. Returns 1 if it did.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The lease scripts, hashed once.
pub(super) struct Scripts {
    release: Script,
    renew: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
        }
    }
}

/// A lease this process holds. Dropping it does not release it (that needs Redis); it then
/// lapses at its TTL.
#[derive(Debug)]
#[must_use = "a lease is released with RedisStore::release (or lapses at its TTL)"]
pub struct Lease {
    key: String,
    /// Random; the holder's proof. Not secret (it grants nothing but releasing this lease).
    holder: String,
    location: String,
}

#[cfg(test)]
impl Lease {
    /// A lease as a fake coordination hands it out (unit tests of the refresh logic).
    pub(crate) fn fake(key: String, holder: String) -> Self {
        Self {
            location: key.clone(),
            key,
            holder,
        }
    }

    /// The lease's key and holder value (unit tests).
    pub(crate) fn parts(&self) -> (&str, &str) {
        (&self.key, &self.holder)
    }
}

/// A TTL as Redis' milliseconds: at least 1 (Redis refuses 0).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Takes the lease of `scope` for `ttl` if nobody holds it; `None` if somebody does.
    pub async fn try_lock(
        &self,
        scope: &Scope<'_>,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let key = self.scope_key("lock", scope)?;
        let mut random = [0u8; HOLDER_BYTES];
        SystemRandom::new().fill(&mut random).map_err(|_| {
            self.failed(
                StoreOp::Lock,
                StoreError::Io {
                    location: format!("redis lock {}", scope.location()),
                    source: std::io::Error::other("the system random number generator failed"),
                },
            )
        })?;
        let holder: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let mut c = self.conn.clone();
        let set: Option<String> = self
            .run(StoreOp::Lock, scope.location(), async {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.map(|_| Lease {
            key,
            holder,
            location: scope.location(),
        }))
    }

    /// Extends `lease` to `ttl` from now if it is still held by its holder; whether it was.
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let mut call = self.lock_scripts.renew.prepare_invoke();
        call.key(&lease.key).arg(&lease.holder).arg(millis(ttl));
        let n: i64 = self
            .run(StoreOp::Lock, lease.location.clone(), async {
                call.invoke_async(&mut c).await
            })
            .await?;
        Ok(n == 1)
    }

    /// Releases `lease` if it is still held by its holder; whether it was (false: it had
    /// expired, and perhaps another holder has it now, which this leaves alone).
    pub async fn release(&self, lease: Lease) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let mut call = self.lock_scripts.release.prepare_invoke();
        call.key(&lease.key).arg(&lease.holder);
        let n: i64 = self
            .run(StoreOp::Unlock, lease.location.clone(), async {
                call.invoke_async(&mut c).await
            })
            .await?;
        Ok(n == 1)
    }
}
