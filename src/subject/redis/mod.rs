//! The shared subject store for replicas (issue #13): [`RedisStore`] keeps subject records in
//! Redis behind the same [`SubjectStore`] contract as the embedded file store, and adds what
//! several processes need to act as one: a lease per subject or token ([`lock`]) and a shared,
//! sealed access-token slot ([`access`]).
//!
//! # Keys
//! With prefix `P` (`key_prefix`, default `bearer-proxy:`), token name `T` and subject id `S`:
//! - `P{T}:rec:S`, a hash: `gen` (the generation, decimal) and `rec` (the [`Record`] as JSON,
//!   its refresh token sealed exactly as in the file store);
//! - `P{T}:subjects`, `P{T}:state:active`, `P{T}:state:needs_reauth`: sorted sets of subject
//!   ids (score 0, so ordered by id), the listing indexes;
//! - `P{T}:code:<sha256>`: a spent authorization code, holding the subject id;
//! - `P{T}:lock[:S]`: a lease; `P{T}:access[:S]`: a shared access token (a named token's
//!   without `:S`, used through [`named::RedisSlot`]).
//!
//! `{T}` is a Redis Cluster hash tag: every key of one token lands in one slot, so each script
//! touches one slot. (The client here talks to one Redis or a primary behind a failover
//! address; Cluster mode is not implemented.)
//!
//! # Atomicity
//! [`SubjectStore::put`] and [`SubjectStore::delete`] are Lua scripts: the generation check,
//! the record and the indexes change together or not at all, and every replica sees the same
//! order of writes. A reader fetches the record's two fields with one `HMGET`, so it sees the
//! old record or the new one. Scripts are sent by digest (`EVALSHA`) and resent in full after
//! a Redis restart emptied the script cache.
//!
//! # Durability
//! Redis is the system of record here: losing its data means every customer consents again.
//! It must run with `appendonly yes` (the tests run it so and restart it from its AOF after a
//! `SIGKILL`). With `appendfsync everysec`, Redis writes each command to the AOF before
//! answering, so a Redis crash loses nothing; a crash of the whole host can lose the last
//! second. `appendfsync always` closes that window at some write latency.
//!
//! # Failures
//! Every command, script and pipeline runs under `command_timeout` (which includes waiting for
//! a reconnect in progress) and fails as [`StoreError::Io`] naming the operation and the token
//! and subject, never a value. The connection manager reconnects in the background after a
//! failure, so the store recovers without a restart once Redis is back.

pub mod access;
pub mod config;
pub mod health;
pub mod lock;
pub mod named;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, Script};

use super::SubjectId;
use super::record::{
    CodeDigest, Cursor, MAX_PAGE, Page, Record, StoreError, SubjectState, SubjectStore,
};
use crate::metrics::{Metrics, StoreOp};
use crate::secret::SecretFileError;
pub use config::RedisConfig;

/// How long a spent code's digest is kept. Codes live minutes (RFC 6749 §4.1.2 recommends at
/// most 10), and a server refuses an expired code whoever sends it; what must never happen is
/// sending a code twice while the server still honours or remembers it. Thirty days is
/// thousands of code lifetimes, and bounds Redis memory to the enrolments of a month instead
/// of every enrolment ever (the file store keeps them forever: disk is cheaper than memory).
pub const SPENT_CODE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Reconnection attempts in one round before the pending command's wait ends in an error (the
/// next command starts a new round). Few, because every command is bounded by
/// `command_timeout` anyway and a fresh round on the next command finds a restarted Redis.
const RECONNECT_ATTEMPTS: usize = 3;
/// Longest pause between two reconnection attempts of one round.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Compare-and-set of a record and its index entries. KEYS: record, all, active, needs_reauth.
/// ARGV: expected generation (`""` for no record), new generation, record JSON, state, subject.
/// Returns `{"ok", new}` or `{"conflict", found}` (`found` is `""` when there is no record).
const PUT_SCRIPT: &str = r"
local found = redis.call('HGET', KEYS[1], 'gen')
if (found or '') ~= ARGV[1] then
  return {'conflict', found or ''}
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'rec', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[5])
if ARGV[4] == 'active' then
  redis.call('ZADD', KEYS[3], 0, ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
else
  redis.call('ZADD', KEYS[4], 0, ARGV[5])
  redis.call('ZREM', KEYS[3], ARGV[5])
end
return {'ok', ARGV[2]}
";

/// Deletes a record and its index entries. KEYS as for [`PUT_SCRIPT`]; ARGV: subject.
/// Returns 1 if a record was deleted.
const DELETE_SCRIPT: &str = r"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return n
";

/// The Redis store. Cheap to share behind an `Arc`; every clone of the connection manager
/// multiplexes one connection.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    command_timeout: Duration,
    /// The URL without anything secret (validation refuses credentials in it), for messages.
    url: String,
    put_script: Script,
    delete_script: Script,
    lock_scripts: lock::Scripts,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The store could not be opened. Raised at start; every message names Redis and the URL.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The password file cannot be read.
    #[error("redis.password_file: {0}")]
    Password(#[source] SecretFileError),
    /// The CA file cannot be read.
    #[error("redis.ca_file: cannot read {path}: {source}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Redis refused the settings, the connection or the credentials.
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis {
        /// The configured URL.
        url: String,
        /// Redis' or the client's reason (never the password).
        #[source]
        source: redis::RedisError,
    },
    /// No answer within `connect_timeout`.
    #[error(
        "cannot connect to Redis at {url}: no answer within {timeout:?} (redis.connect_timeout)"
    )]
    Timeout {
        /// The configured URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
}

impl RedisStore {
    /// Connects (reading the password and CA files), checks that Redis answers `PING` with these
    /// credentials within `connect_timeout`, and keeps a self-healing connection. Call after
    /// [`RedisConfig::validate`] passed.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, ConnectError> {
        // redis-rs builds its TLS settings with `rustls::ClientConfig::builder()`, which uses the
        // process-wide provider; make it ring (the only one in the tree) so that nothing else
        // can be picked, nor a second provider in the tree make that call panic.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = without_credentials(&cfg.url);
        let redis_err = |source| ConnectError::Redis {
            url: url.clone(),
            source,
        };
        let mut info = cfg.url.as_str().into_connection_info().map_err(redis_err)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        if let Some(path) = &cfg.password_file {
            let password = crate::secret::read_file(path, "Redis password")
                .await
                .map_err(ConnectError::Password)?;
            settings = settings.set_password(password.expose());
        }
        info = info.set_redis_settings(settings);
        let client = match &cfg.ca_file {
            Some(path) => {
                let pem = tokio::fs::read(path)
                    .await
                    .map_err(|source| ConnectError::CaFile {
                        path: path.clone(),
                        source,
                    })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                Client::build_with_tls(info, certs).map_err(redis_err)?
            }
            None => Client::open(info).map_err(redis_err)?,
        };
        // One direct attempt first: the manager retries every failure (a wrong password
        // included) with backoff, which would turn a clear error into a slow one.
        let timeouts = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.command_timeout));
        let timeout = || ConnectError::Timeout {
            url: url.clone(),
            timeout: cfg.connect_timeout,
        };
        let probe = async {
            let mut c = client
                .get_multiplexed_async_connection_with_config(&timeouts)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        };
        tokio::time::timeout(cfg.connect_timeout, probe)
            .await
            .map_err(|_| timeout())?
            .map_err(redis_err)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(RECONNECT_ATTEMPTS)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = tokio::time::timeout(
            cfg.connect_timeout,
            ConnectionManager::new_with_config(client, manager),
        )
        .await
        .map_err(|_| timeout())?
        .map_err(redis_err)?;
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            command_timeout: cfg.command_timeout,
            url,
            put_script: Script::new(PUT_SCRIPT),
            delete_script: Script::new(DELETE_SCRIPT),
            lock_scripts: lock::Scripts::new(),
            metrics: None,
        })
    }

    /// Counts every failed operation in `bearer_proxy_store_errors_total{op}`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Whether Redis answers `PING` now (for `/readyz` and `/status`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        self.run(StoreOp::Ping, "ping".into(), async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(drop)
    }

    /// Runs one Redis exchange under `command_timeout`, mapping a failure to
    /// [`StoreError::Io`] at `location` and counting it under `op`.
    async fn run<T>(
        &self,
        op: StoreOp,
        location: String,
        exchange: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.command_timeout, exchange).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                let kind = if e.is_timeout() {
                    std::io::ErrorKind::TimedOut
                } else if e.is_connection_refusal() {
                    std::io::ErrorKind::ConnectionRefused
                } else if e.is_io_error() || e.is_connection_dropped() {
                    std::io::ErrorKind::ConnectionAborted
                } else {
                    std::io::ErrorKind::Other
                };
                std::io::Error::new(kind, e)
            }
            Err(_) => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {:?} (redis.command_timeout)",
                    self.command_timeout
                ),
            ),
        };
        Err(self.failed(
            op,
            StoreError::Io {
                location: format!("redis {} {location}", op.as_str()),
                source: result,
            },
        ))
    }

    /// Counts a failure of `op` and hands it back.
    fn failed(&self, op: StoreOp, e: StoreError) -> StoreError {
        if let Some(m) = &self.metrics {
            m.store_error(op);
        }
        e
    }

    /// `P{T}:`, after checking the token name (the alphabet config validation enforces, so no
    /// name can break out of its hash tag or collide with a key kind).
    fn token_base(&self, token: &str) -> Result<String, StoreError> {
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(format!("{}{{{token}}}:", self.prefix))
        } else {
            Err(StoreError::InvalidToken(token.to_owned()))
        }
    }

    /// The keys the record scripts touch: record, all, active, needs_reauth.
    fn record_keys(&self, token: &str, subject: &SubjectId) -> Result<[String; 4], StoreError> {
        let base = self.token_base(token)?;
        Ok([
            format!("{base}rec:{subject}"),
            format!("{base}subjects"),
            format!("{base}state:{}", SubjectState::Active.as_str()),
            format!("{base}state:{}", SubjectState::NeedsReauth.as_str()),
        ])
    }
}

/// `url` for messages: validation refuses credentials in it, but a caller that skipped
/// validation must not get a password printed either.
fn without_credentials(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

/// Where a scripted or shared value belongs: a named token, or one subject of a per-subject
/// token. Locks and shared access tokens use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A `[tokens.NAME]` entry with `shared = true`.
    Named(&'a str),
    /// One subject of a `per_subject = true` token.
    Subject(&'a str, &'a SubjectId),
}

impl Scope<'_> {
    /// The token name.
    pub fn token(&self) -> &str {
        match self {
            Scope::Named(t) | Scope::Subject(t, _) => t,
        }
    }

    /// `token` or `token/subject`, for messages.
    fn location(&self) -> String {
        match self {
            Scope::Named(t) => (*t).to_owned(),
            Scope::Subject(t, s) => format!("{t}/{s}"),
        }
    }
}

impl RedisStore {
    /// The key of `kind` (`lock`, `access`) for `scope`.
    fn scope_key(&self, kind: &str, scope: &Scope<'_>) -> Result<String, StoreError> {
        let base = self.token_base(scope.token())?;
        Ok(match scope {
            Scope::Named(_) => format!("{base}{kind}"),
            Scope::Subject(_, s) => format!("{base}{kind}:{s}"),
        })
    }
}

/// A record as stored, checked against its key: it must name the subject the key does, and its
/// generation must be the hash's.
fn decode(
    key: &str,
    subject: &SubjectId,
    gen_field: Option<String>,
    rec: Option<String>,
) -> Result<Option<Record>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        location: format!("redis key {key}"),
        reason,
    };
    let (gen_text, json) = match (gen_field, rec) {
        (None, None) => return Ok(None),
        (Some(g), Some(r)) => (g, r),
        _ => return Err(corrupt("the generation or the record is missing".into())),
    };
    // serde_json's message names the line and column and the expected type, never a value.
    let record: Record = serde_json::from_str(&json).map_err(|e| corrupt(e.to_string()))?;
    if record.subject != *subject {
        return Err(corrupt("it belongs to another subject".into()));
    }
    if gen_text.parse::<u64>().ok() != Some(record.generation) {
        return Err(corrupt("its generation disagrees with the record's".into()));
    }
    Ok(Some(record))
}

/// A listing cursor: the hex of the last subject id of the page (opaque to callers; hex keeps
/// it free of characters a URL query would need to escape).
fn cursor_of(subject: &SubjectId) -> Cursor {
    Cursor(
        subject
            .as_str()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The subject a cursor names, if this store could have handed it out.
fn subject_of(cursor: &Cursor) -> Result<SubjectId, StoreError> {
    let hex = cursor.as_str();
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(StoreError::InvalidCursor);
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("g"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| StoreError::InvalidCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| StoreError::InvalidCursor)?;
    SubjectId::parse(&text).map_err(|_| StoreError::InvalidCursor)
}

impl SubjectStore for RedisStore {
    fn get<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move {
            let [key, ..] = self.record_keys(token, subject)?;
            let mut c = self.conn.clone();
            let (g, rec): (Option<String>, Option<String>) = self
                .run(StoreOp::Get, format!("{token}/{subject}"), async {
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg("gen")
                        .arg("rec")
                        .query_async(&mut c)
                        .await
                })
                .await?;
            decode(&key, subject, g, rec).map_err(|e| self.failed(StoreOp::Get, e))
        })
    }

    fn put<'a>(
        &'a self,
        token: &'a str,
        record: &'a Record,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let subject = &record.subject;
            let keys = self.record_keys(token, subject)?;
            let next = match expected {
                None => 1,
                Some(g) => g.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                    location: format!("redis key {}", keys[0]),
                    reason: "the generation cannot grow any further".into(),
                })?,
            };
            let stored = Record {
                generation: next,
                ..record.clone()
            };
            let json = serde_json::to_string(&stored).map_err(|e| StoreError::Io {
                location: format!("redis put {token}/{subject}"),
                source: std::io::Error::other(e),
            })?;
            let expected_text = expected.map(|g| g.to_string()).unwrap_or_default();
            let mut c = self.conn.clone();
            let mut call = self.put_script.prepare_invoke();
            call.key(&keys[..])
                .arg(&expected_text)
                .arg(next.to_string())
                .arg(&json)
                .arg(record.state.as_str())
                .arg(subject.as_str());
            let (outcome, generation): (String, String) = self
                .run(StoreOp::Put, format!("{token}/{subject}"), async {
                    call.invoke_async(&mut c).await
                })
                .await?;
            match outcome.as_str() {
                "ok" => Ok(next),
                _ => {
                    let found = if generation.is_empty() {
                        None
                    } else {
                        Some(generation.parse::<u64>().map_err(|_| {
                            self.failed(
                                StoreOp::Put,
                                StoreError::Corrupt {
                                    location: format!("redis key {}", keys[0]),
                                    reason: "the generation is not a number".into(),
                                },
                            )
                        })?)
                    };
                    Err(StoreError::Conflict {
                        subject: subject.clone(),
                        expected,
                        found,
                    })
                }
            }
        })
    }

    fn list<'a>(
        &'a self,
        token: &'a str,
        state: Option<SubjectState>,
        after: Option<&'a Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(async move {
            let base = self.token_base(token)?;
            let after = after.map(subject_of).transpose()?;
            let limit = limit.clamp(1, MAX_PAGE);
            let index = match state {
                None => format!("{base}subjects"),
                Some(s) => format!("{base}state:{}", s.as_str()),
            };
            let start = after.map_or_else(|| "-".to_owned(), |s| format!("({s}"));
            let mut c = self.conn.clone();
            let location = format!("{token} (listing)");
            // One more than the page, to know whether anything is left after it.
            let mut ids: Vec<String> = self
                .run(StoreOp::List, location.clone(), async {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit + 1)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let more = ids.len() > limit;
            ids.truncate(limit);
            let subjects = ids
                .iter()
                .map(|id| SubjectId::parse(id))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    self.failed(
                        StoreOp::List,
                        StoreError::Corrupt {
                            location: format!("redis key {index}"),
                            reason: e.to_string(),
                        },
                    )
                })?;
            let mut pipe = redis::pipe();
            for s in &subjects {
                pipe.cmd("HMGET")
                    .arg(format!("{base}rec:{s}"))
                    .arg("gen")
                    .arg("rec");
            }
            let fields: Vec<(Option<String>, Option<String>)> = if subjects.is_empty() {
                Vec::new()
            } else {
                self.run(StoreOp::List, location, async {
                    pipe.query_async(&mut c).await
                })
                .await?
            };
            let mut records = Vec::with_capacity(subjects.len());
            for (s, (g, rec)) in subjects.iter().zip(fields) {
                let key = format!("{base}rec:{s}");
                // None: deleted between the index read and the fetch.
                if let Some(r) =
                    decode(&key, s, g, rec).map_err(|e| self.failed(StoreOp::List, e))?
                {
                    // The state may have changed between the two reads as well.
                    if state.is_none_or(|want| want == r.state) {
                        records.push(r);
                    }
                }
            }
            let next = if more {
                subjects.last().map(cursor_of)
            } else {
                None
            };
            Ok(Page { records, next })
        })
    }

    fn delete<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let keys = self.record_keys(token, subject)?;
            let mut c = self.conn.clone();
            let mut call = self.delete_script.prepare_invoke();
            call.key(&keys[..]).arg(subject.as_str());
            let n: i64 = self
                .run(StoreOp::Delete, format!("{token}/{subject}"), async {
                    call.invoke_async(&mut c).await
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn spend_code<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
        code: &'a CodeDigest,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = format!("{}code:{}", self.token_base(token)?, code.as_str());
            let mut c = self.conn.clone();
            // The value says which subject spent it, for an operator investigating a 409.
            let set: Option<String> = self
                .run(StoreOp::SpendCode, format!("{token}/{subject}"), async {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(subject.as_str())
                        .arg("NX")
                        .arg("EX")
                        .arg(SPENT_CODE_TTL.as_secs())
                        .query_async(&mut c)
                        .await
                })
                .await?;
            match set {
                Some(_) => Ok(()),
                None => Err(StoreError::CodeSpent),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SubjectId {
        SubjectId::parse(s).unwrap()
    }

    #[test]
    fn messages_never_carry_the_urls_credentials() {
        assert_eq!(
            without_credentials("rediss://user:canary@h:6380/1"),
            "rediss://h:6380/1"
        );
        assert_eq!(without_credentials("redis://h"), "redis://h");
        assert!(!without_credentials("redis://:canary@").contains("canary"));
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        for s in ["a", "cust_1:bank.1000", ".."] {
            assert_eq!(subject_of(&cursor_of(&id(s))).unwrap(), id(s));
        }
        for bad in ["", "6", "zz", "2f", "2e2e2f", "c3a9", &"61".repeat(129)] {
            assert!(
                matches!(
                    subject_of(&Cursor::from_text(bad)),
                    Err(StoreError::InvalidCursor)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_stored_record_must_match_its_key() {
        let r = Record::enrolled(
            id("a"),
            super::super::Sealed {
                key_id: "00000000".into(),
                nonce: "n".into(),
                ciphertext: "c".into(),
            },
            1,
        );
        let json = |r: &Record| Some(serde_json::to_string(r).unwrap());
        let one = Record {
            generation: 1,
            ..r.clone()
        };
        assert_eq!(decode("k", &id("a"), None, None).unwrap(), None);
        assert_eq!(
            decode("k", &id("a"), Some("1".into()), json(&one)).unwrap(),
            Some(one.clone())
        );
        for (subject, g, rec) in [
            ("b", Some("1".to_owned()), json(&one)),
            ("a", Some("2".to_owned()), json(&one)),
            ("a", None, json(&one)),
            ("a", Some("1".to_owned()), None),
            ("a", Some("1".to_owned()), Some("{\"subject\":".to_owned())),
        ] {
            let e = decode("k", &id(subject), g, rec).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains("redis key k"), "{e}");
        }
    }
}
