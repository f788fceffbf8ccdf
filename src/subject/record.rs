//! What is stored about one subject, and the [`SubjectStore`] trait every store implements: the
//! embedded file store ([`super::file`]) now, a shared Redis store (issue #13) later.
//!
//! The contract, so that a store shared by replicas fits behind it:
//! - a record is read and written whole; a reader sees the old record or the new one;
//! - [`SubjectStore::put`] is a compare-and-set on the record's generation, and the store (not
//!   the caller) assigns the next generation, so a writer that lost a race cannot overwrite a
//!   newer refresh token;
//! - [`SubjectStore::spend_code`] records an authorization code's digest durably and fails if it
//!   was recorded before: callers call it *before* sending the code, so no restart (and no other
//!   replica) sends it again;
//! - stores only ever see sealed refresh tokens ([`super::keyring::Sealed`]) and code digests.

use std::fmt;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SubjectId;
use super::keyring::Sealed;
use crate::secret::Secret;

/// Whether a subject's refresh token is usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectState {
    /// The refresh token works as far as we know.
    Active,
    /// The token endpoint said `invalid_grant`, or the API said the consent is gone (Flinks
    /// 602): only the customer can fix it by consenting again.
    NeedsReauth,
}

impl SubjectState {
    /// Every state, for counting and metric labels.
    pub const ALL: [SubjectState; 2] = [SubjectState::Active, SubjectState::NeedsReauth];

    /// The state as the API and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectState::Active => "active",
            SubjectState::NeedsReauth => "needs_reauth",
        }
    }
}

/// One subject's stored record. Times are whole seconds since the Unix epoch (wall clock, for
/// people and the API; scheduling uses tokio's clock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The subject this record belongs to. Stores check it on read, so a record file copied
    /// to another place is refused rather than served under the wrong subject.
    pub subject: SubjectId,
    /// The refresh token, sealed (its `key_id` names the key).
    pub refresh_token: Sealed,
    /// Bumped by the store on every successful [`SubjectStore::put`]; 0 before the first.
    pub generation: u64,
    /// Whether the refresh token is usable.
    pub state: SubjectState,
    /// When the current refresh token was enrolled (code exchange or import).
    pub enrolled_at: u64,
    /// When the refresh token was last used successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<u64>,
    /// When a request last used this subject's token. Writers should update it coarsely (it is
    /// for people and the keep-alive, not per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_use: Option<u64>,
    /// The last refresh failure, as the OAuth `error` code or a short cause. Never a token or
    /// an error description echoed from a peer that could contain one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Record {
    /// A freshly enrolled, active record.
    pub fn enrolled(subject: SubjectId, refresh_token: Sealed, now: u64) -> Self {
        Self {
            subject,
            refresh_token,
            generation: 0,
            state: SubjectState::Active,
            enrolled_at: now,
            last_refresh: None,
            last_use: None,
            last_error: None,
        }
    }

    /// The id of the key that sealed the refresh token.
    pub fn key_id(&self) -> &str {
        &self.refresh_token.key_id
    }
}

/// The SHA-256 of an authorization code: what stores remember of a spent code.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CodeDigest(String);

impl CodeDigest {
    /// The digest of `code` (64 lowercase hex digits).
    pub fn of(code: &Secret) -> Self {
        Self(
            Sha256::digest(code.expose().as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CodeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest is not the code, but nothing needs it in a log line either.
        f.write_str("CodeDigest(..)")
    }
}

/// Where a listing continues: opaque to callers, handed back as it was received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor(pub(crate) String);

impl Cursor {
    /// The cursor as text, for an API response.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A cursor received back from a caller; the store checks it when it is used.
    pub fn from_text(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Records in the store's order.
    pub records: Vec<Record>,
    /// Where the next page starts; `None` when nothing is left. With a state filter, the next
    /// page may turn out empty.
    pub next: Option<Cursor>,
}

/// Most records one listing call returns, whatever the caller asks: bounds the memory and the
/// time of one API call against a store holding 100,000 subjects.
pub const MAX_PAGE: usize = 1000;

/// A store failure. Callers branch on [`StoreError::Conflict`] (re-read and retry or give up)
/// and [`StoreError::CodeSpent`] (answer 409); the others are operational errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage itself failed.
    #[error("subject store: {location}: {source}")]
    Io {
        /// Where (a path or a key).
        location: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored record cannot be parsed or belongs elsewhere. Never skipped silently.
    #[error("subject store: {location}: not a valid subject record: {reason}")]
    Corrupt {
        /// Where.
        location: String,
        /// What is wrong (never record content).
        reason: String,
    },
    /// The compare-and-set lost: the record is not at the expected generation.
    #[error(
        "subject {subject} changed meanwhile (expected {}, found {})",
        generation_text(*expected),
        generation_text(*found)
    )]
    Conflict {
        /// The subject.
        subject: SubjectId,
        /// What the writer expected.
        expected: Option<u64>,
        /// What the store holds.
        found: Option<u64>,
    },
    /// The authorization code was recorded as spent before.
    #[error("this authorization code was already spent")]
    CodeSpent,
    /// A token name that cannot name a store location (config validation refuses these).
    #[error("token name {0:?} cannot name a subject store")]
    InvalidToken(String),
    /// A listing cursor that this store did not hand out.
    #[error("invalid listing cursor")]
    InvalidCursor,
}

fn generation_text(g: Option<u64>) -> String {
    g.map_or_else(|| "no record".to_owned(), |g| format!("generation {g}"))
}

/// Storage for subject records of every per-subject token. Object-safe (boxed futures), so the
/// store configured at start can sit behind an `Arc<dyn SubjectStore>`.
pub trait SubjectStore: Send + Sync + fmt::Debug {
    /// The record of `subject` under token `token`, if it is enrolled.
    fn get<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;

    /// Writes `record` if the stored record is at generation `expected` (`None`: no record
    /// yet). The stored copy gets the next generation (1 for a new record), which is returned.
    /// `record.generation` is ignored. Fails with [`StoreError::Conflict`] otherwise.
    fn put<'a>(
        &'a self,
        token: &'a str,
        record: &'a Record,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Up to `limit` records (at most [`MAX_PAGE`]) of token `token` after `after`, only those
    /// in `state` if given.
    fn list<'a>(
        &'a self,
        token: &'a str,
        state: Option<SubjectState>,
        after: Option<&'a Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, StoreError>>;

    /// Forgets `subject`; whether it was enrolled.
    fn delete<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Records durably that `code` (by digest) is being spent for `subject`, before it is sent.
    /// [`StoreError::CodeSpent`] if it was recorded before, under any subject of this token.
    fn spend_code<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
        code: &'a CodeDigest,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_as_json_with_stable_names() {
        let r = Record {
            last_refresh: Some(2),
            last_error: Some("invalid_grant".into()),
            state: SubjectState::NeedsReauth,
            ..Record::enrolled(
                SubjectId::parse("c1").unwrap(),
                Sealed {
                    key_id: "0011aabb".into(),
                    nonce: "n".into(),
                    ciphertext: "c".into(),
                },
                1,
            )
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["state"], "needs_reauth");
        assert_eq!(json["refresh_token"]["key_id"], "0011aabb");
        assert!(json.get("last_use").is_none());
        assert_eq!(serde_json::from_value::<Record>(json).unwrap(), r);
        assert_eq!(r.key_id(), "0011aabb");
        for s in SubjectState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn code_digest_is_hex_sha256_and_does_not_print() {
        let d = CodeDigest::of(&Secret::new("abc"));
        assert_eq!(
            d.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!format!("{d:?}").contains("ba78"));
    }
}
