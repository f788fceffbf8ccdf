//! Per-subject tokens (issue #12): who a subject is, how its refresh token is sealed, where its
//! record lives, the access tokens the proxy injects for it (`tokens`, reached through
//! [`Subjects`]), and the subjects API that enrols and manages subjects ([`api`]).
//!
//! A *subject* is an identifier the app chooses (its customer or connection id) under a token
//! entry with `per_subject = true`. Each subject has its own refresh token, kept in a
//! [`Record`] behind the [`SubjectStore`] trait.
//!
//! # Parts
//! - [`SubjectId`] (here): a validated subject identifier.
//! - [`keyring`]: AES-256-GCM sealing of refresh tokens, with several keys for rotation.
//! - [`record`]: the stored record, the [`SubjectStore`] trait every store implements, and its
//!   errors.
//! - [`file`]: the embedded store, one file per subject under `state_dir`.
//! - [`redis`]: the shared store for replicas (issue #13, `[subjects] store = "redis"`), with
//!   leases and shared access-token slots; `coordination`: what `tokens` needs of them to
//!   refresh each subject once across replicas.
//! - [`census`]: subjects counted by state and key at start; refuses records whose key is
//!   not configured.
//! - `tokens`: the per-subject access-token cache with single-flight lazy refresh, upstream
//!   rejections (401 replay, 602), `last_use` notes and the keep-alive (crate internal; the
//!   proxy calls it).
//! - [`config`]: the `[subjects]` settings these parts need, and their validation.
//! - `registry`: [`Subjects`], the per-subject token entries of a running server.
//! - [`api`]: the subjects API listener (`[subjects] listen`); `enrol`: its operations
//!   (enrol a code, import, show, list, delete and revoke, force a refresh).
//!
//! # Encryption at rest
//! Refresh tokens are sealed before they reach any store, so no store (the file store here, the
//! Redis store of issue #13) ever holds one in plaintext. Each sealed value carries the id of
//! the key that sealed it, a random 96-bit nonce and the AES-256-GCM ciphertext with its tag.
//! The token name and the subject id are bound as associated data: a sealed value copied into
//! another subject's record (or another token's) does not open.
//!
//! Keys come from files, each holding 32 random bytes in base64, as `openssl rand -base64 32`
//! prints. `encryption_key_file = "…"` gives one key; `encryption_key_files = ["new", "old"]`
//! gives several, **newest first**. New writes always use the first; the others only open
//! records sealed earlier. A key's id is the first 8 hex digits of the SHA-256 of its 32 bytes,
//! so the id is the same wherever the key is mounted, and it reveals nothing useful about the
//! key. To rotate: put the new key file first and keep the old one after it; records are
//! re-sealed with the new key as they are rewritten (every refresh rewrites its record); drop
//! the old file only once no record names its id. A record whose key id is not configured is an
//! error naming that id, never a silently forgotten subject: [`census::Census::check_keys`]
//! finds such records at start, and [`keyring::KeyRing::open`] names the id for any one.
pub mod api;
pub mod census;
pub mod config;
mod coordination;
mod enrol;
pub mod file;
pub mod keyring;
pub mod record;
pub mod redis;
mod registry;
pub(crate) mod tokens;

use std::fmt;

pub use file::FileStore;
pub use keyring::{KeyRing, Sealed};
pub use record::{Record, SubjectState, SubjectStore};
pub use registry::Subjects;

/// Longest subject id accepted: long enough for a UUID with a prefix or a composite
/// `customer:bank` key, short enough to bound log lines and store keys.
pub const MAX_SUBJECT_LEN: usize = 128;

/// A subject identifier: 1 to [`MAX_SUBJECT_LEN`] characters of `A-Z a-z 0-9 . _ : -`.
///
/// The alphabet keeps ids safe in URL paths, log lines and store keys without escaping. Ids
/// such as `.` and `..` are valid, so stores must not use an id as a file name as it is (the
/// file store names files by a hash).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectId(String);

/// A subject id outside the allowed alphabet or length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid subject id: use 1 to {MAX_SUBJECT_LEN} characters of A-Z a-z 0-9 . _ : - ({reason})"
)]
pub struct InvalidSubject {
    /// What is wrong, without echoing the rejected value (it may be anything a caller sent).
    pub reason: &'static str,
}

impl SubjectId {
    /// Validates an id.
    pub fn parse(id: &str) -> Result<Self, InvalidSubject> {
        if id.is_empty() {
            return Err(InvalidSubject { reason: "empty" });
        }
        if id.len() > MAX_SUBJECT_LEN {
            return Err(InvalidSubject { reason: "too long" });
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(InvalidSubject {
                reason: "character outside the alphabet",
            });
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SubjectId {
    type Error = InvalidSubject;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::parse(&id)
    }
}

impl From<SubjectId> for String {
    fn from(id: SubjectId) -> Self {
        id.0
    }
}

impl fmt::Display for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Subject ids are not secret: logs name the subject (issue #12), never its token.
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_and_length_are_enforced() {
        for ok in [
            "a",
            "customer-42",
            "cust_1:bank.1000",
            "..",
            "A.Z_0:9-",
            &"x".repeat(MAX_SUBJECT_LEN),
        ] {
            assert_eq!(SubjectId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            &"x".repeat(MAX_SUBJECT_LEN + 1),
            "a/b",
            "a b",
            "a\0",
            "a%2F",
            "é",
            "a\nb",
            "../x",
            "x?y",
        ] {
            assert!(SubjectId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        /// A string is accepted exactly when a plain reading of the rule accepts it (the
        /// strategy mixes allowed and refused characters and straddles the length limit).
        #[test]
        fn parse_agrees_with_the_rule(id in "[A-Za-z0-9._:-]{0,130}|[A-Za-z0-9._:/ é\0-]{0,130}") {
            let rule = (1..=MAX_SUBJECT_LEN).contains(&id.len())
                && id.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
            proptest::prop_assert_eq!(SubjectId::parse(&id).is_ok(), rule);
        }
    }

    #[test]
    fn serde_validates_too_and_errors_do_not_echo_the_value() {
        let id: SubjectId = serde_json::from_str("\"c-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"c-1\"");
        let e = serde_json::from_str::<SubjectId>("\"evil/../canary\"")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("canary"), "{e}");
        let e = SubjectId::parse("canary value").unwrap_err().to_string();
        assert!(!e.contains("canary") && e.contains("A-Z a-z 0-9"), "{e}");
    }
}
