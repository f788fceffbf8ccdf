//! The encryption key ring for refresh tokens at rest: loading key files, sealing with the
//! newest key, opening with whichever key a record names. AES-256-GCM from `ring` (already in
//! the tree through rustls), a random 96-bit nonce per seal from the system generator, and the
//! token name and subject id bound as associated data. The module doc of [`crate::subject`]
//! describes the key files and rotation for operators.
//!
//! Random nonces are safe here because each key seals far fewer than 2^32 values (one per
//! enrolment or rewrite of a record) before operators rotate it.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SubjectId;
use crate::secret::{REDACTED, Secret};

/// Bytes in an AES-256 key.
pub const KEY_LEN: usize = 32;

/// Label at the start of the associated data, so a value sealed for some other purpose with
/// the same key can never open as a subject's refresh token, and the format can change later.
const AAD_LABEL: &[u8] = b"bearer-proxy subject refresh token v1";

/// One refresh token, sealed: what a store keeps instead of the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Id of the key that sealed it (8 hex digits).
    pub key_id: String,
    /// The 96-bit nonce, base64.
    pub nonce: String,
    /// Ciphertext followed by the 128-bit tag, base64.
    pub ciphertext: String,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The ciphertext is harmless without the key, but there is no reason to print it.
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// One key: its id and the AES-256-GCM key. `Debug` prints the id only.
struct Key {
    id: String,
    aead: LessSafeKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, {REDACTED})", self.id)
    }
}

/// The configured keys, newest first. `Debug` prints the key ids, never key material.
pub struct KeyRing {
    keys: Vec<Key>,
    rng: SystemRandom,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.keys).finish()
    }
}

/// A key file that cannot be used. Raised at start, before any record is read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key file was given.
    #[error("no encryption key file is configured")]
    Empty,
    /// The file cannot be read.
    #[error("cannot read encryption key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content is not base64 (the message never quotes the content).
    #[error(
        "encryption key file {path} is not base64 text (make a key with `openssl rand -base64 32`)"
    )]
    NotBase64 {
        /// The file.
        path: PathBuf,
    },
    /// The content decodes to something other than 32 bytes.
    #[error(
        "encryption key file {path} holds {len} bytes; an AES-256 key is {KEY_LEN} (make one with `openssl rand -base64 32`)"
    )]
    WrongLength {
        /// The file.
        path: PathBuf,
        /// Decoded length.
        len: usize,
    },
    /// Two files hold the same key: almost certainly a rotation mistake.
    #[error("encryption key files {first} and {second} hold the same key ({key_id})")]
    Duplicate {
        /// The earlier file.
        first: PathBuf,
        /// The later file.
        second: PathBuf,
        /// The shared key id.
        key_id: String,
    },
}

/// Sealing or opening failed. Every variant about a record names the key id it carries.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The record was sealed with a key that is not configured.
    #[error(
        "refresh token sealed with encryption key {key_id}, which no configured encryption key file holds (was that key file removed or replaced?)"
    )]
    UnknownKey {
        /// The id the record names.
        key_id: String,
    },
    /// The key is configured but the value does not open: altered, or moved from another
    /// subject or token.
    #[error(
        "refresh token sealed with encryption key {key_id} does not open: the record was altered or belongs to another subject or token"
    )]
    Open {
        /// The id the record names.
        key_id: String,
    },
    /// The nonce or ciphertext is not well-formed base64 of the right size.
    #[error("refresh token sealed with encryption key {key_id} is malformed")]
    Malformed {
        /// The id the record names.
        key_id: String,
    },
    /// The system random generator failed (no nonce, so nothing is sealed).
    #[error("the system random number generator failed")]
    Random,
}

impl KeyRing {
    /// Loads key files, newest first. Every file must hold a distinct 32-byte key in base64
    /// (surrounding whitespace ignored).
    pub async fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let mut raw = Vec::with_capacity(paths.len());
        for path in paths {
            raw.push((path.clone(), read_key_file(path).await?));
        }
        Self::from_keys(raw)
    }

    /// Builds a ring from key bytes, newest first (`path` is only for messages).
    fn from_keys(raw: Vec<(PathBuf, Vec<u8>)>) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        let mut keys: Vec<Key> = Vec::with_capacity(raw.len());
        let mut seen: Vec<(String, PathBuf)> = Vec::new();
        for (path, bytes) in raw {
            if bytes.len() != KEY_LEN {
                return Err(KeyError::WrongLength {
                    path,
                    len: bytes.len(),
                });
            }
            let id = key_id(&bytes);
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == id) {
                return Err(KeyError::Duplicate {
                    first: first.clone(),
                    second: path,
                    key_id: id,
                });
            }
            #[allow(clippy::expect_used)]
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
                .expect("a 32-byte key is valid for AES-256-GCM because its length was checked");
            seen.push((id.clone(), path));
            keys.push(Key {
                id,
                aead: LessSafeKey::new(unbound),
            });
        }
        Ok(Self {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// The id new seals use.
    pub fn newest_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Every configured key id, newest first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Seals `refresh_token` for `subject` of token `token` with the newest key and a fresh
    /// random nonce.
    pub fn seal(
        &self,
        token: &str,
        subject: &SubjectId,
        refresh_token: &Secret,
    ) -> Result<Sealed, SealError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut in_out = refresh_token.expose().as_bytes().to_vec();
        #[allow(clippy::expect_used)]
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(token, subject)),
                &mut in_out,
            )
            .expect("AES-GCM sealing fails only for inputs over 64 GiB, and a token is not one");
        Ok(Sealed {
            key_id: key.id.clone(),
            nonce: BASE64.encode(nonce),
            ciphertext: BASE64.encode(in_out),
        })
    }

    /// Opens a sealed refresh token of `subject` of token `token`.
    pub fn open(
        &self,
        token: &str,
        subject: &SubjectId,
        sealed: &Sealed,
    ) -> Result<Secret, SealError> {
        let key_id = || sealed.key_id.clone();
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| SealError::UnknownKey { key_id: key_id() })?;
        let malformed = || SealError::Malformed { key_id: key_id() };
        let nonce: [u8; NONCE_LEN] = BASE64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(malformed)?;
        let mut in_out = BASE64.decode(&sealed.ciphertext).map_err(|_| malformed())?;
        let plain = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(token, subject)),
                &mut in_out,
            )
            .map_err(|_| SealError::Open { key_id: key_id() })?;
        // Only text was ever sealed, and the tag proved this is what was sealed.
        let text = String::from_utf8(plain.to_vec()).map_err(|_| malformed())?;
        Ok(Secret::new(text))
    }

    /// Whether `sealed` should be re-sealed on its next write (an older key sealed it).
    pub fn is_stale(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.newest_id()
    }

    /// `sealed` as the newest key would seal it: unchanged when it already is, otherwise opened
    /// and sealed again. Writers call this on every rewrite so rotation completes by itself.
    pub fn reseal(
        &self,
        token: &str,
        subject: &SubjectId,
        sealed: &Sealed,
    ) -> Result<Sealed, SealError> {
        if !self.is_stale(sealed) {
            return Ok(sealed.clone());
        }
        let plain = self.open(token, subject, sealed)?;
        self.seal(token, subject, &plain)
    }
}

/// The id of a key: the first 8 hex digits of its SHA-256.
fn key_id(key: &[u8]) -> String {
    Sha256::digest(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The associated data: a label, then the token name and the subject id, each prefixed with its
/// length so no two (token, subject) pairs give the same bytes.
fn aad(token: &str, subject: &SubjectId) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_LABEL.len() + 8 + token.len() + subject.as_str().len());
    out.extend_from_slice(AAD_LABEL);
    for part in [token.as_bytes(), subject.as_str().as_bytes()] {
        // Token names and subject ids are far shorter than 4 GiB.
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

async fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    let text = crate::secret::read_file(path, "encryption key")
        .await
        .map_err(|e| KeyError::Read {
            path: path.to_owned(),
            source: e.source,
        })?;
    BASE64
        .decode(text.expose())
        .map_err(|_| KeyError::NotBase64 {
            path: path.to_owned(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ring of the given keys (each a repeated byte), newest first.
    pub(crate) fn ring(bytes: &[u8]) -> KeyRing {
        KeyRing::from_keys(
            bytes
                .iter()
                .map(|b| (PathBuf::from(format!("key-{b}")), vec![*b; KEY_LEN]))
                .collect(),
        )
        .unwrap()
    }

    fn subject(id: &str) -> SubjectId {
        SubjectId::parse(id).unwrap()
    }

    #[test]
    fn round_trip() {
        let ring = ring(&[1]);
        let rt = Secret::new("rt-canary-1");
        let sealed = ring.seal("flinks", &subject("c1"), &rt).unwrap();
        assert_eq!(sealed.key_id, ring.newest_id());
        assert_eq!(sealed.key_id.len(), 8);
        assert!(!sealed.ciphertext.contains("rt-canary"));
        assert_eq!(ring.open("flinks", &subject("c1"), &sealed).unwrap(), rt);
        assert!(!format!("{sealed:?}").contains(&sealed.ciphertext));
    }

    #[test]
    fn a_value_moved_to_another_subject_or_token_does_not_open() {
        let ring = ring(&[1]);
        let sealed = ring
            .seal("flinks", &subject("c1"), &Secret::new("rt"))
            .unwrap();
        for (token, who) in [("flinks", "c2"), ("other", "c1"), ("flinksc", "1")] {
            let e = ring.open(token, &subject(who), &sealed).unwrap_err();
            assert!(matches!(e, SealError::Open { .. }), "{token}/{who}: {e}");
            assert!(e.to_string().contains(&sealed.key_id), "{e}");
        }
    }

    #[test]
    fn a_wrong_key_fails_naming_the_key_id() {
        let sealed = ring(&[1])
            .seal("t", &subject("s"), &Secret::new("rt"))
            .unwrap();
        let e = ring(&[2]).open("t", &subject("s"), &sealed).unwrap_err();
        assert!(matches!(e, SealError::UnknownKey { .. }), "{e}");
        assert!(e.to_string().contains(&sealed.key_id), "{e}");
        // A record claiming the configured key's id but sealed with another key: does not open.
        let other = ring(&[2]);
        let forged = Sealed {
            key_id: other.newest_id().to_owned(),
            ..sealed
        };
        let e = other.open("t", &subject("s"), &forged).unwrap_err();
        assert!(matches!(e, SealError::Open { .. }), "{e}");
        assert!(e.to_string().contains(other.newest_id()), "{e}");
    }

    #[test]
    fn rotation_reads_old_records_and_writes_with_the_newest_key() {
        let old = ring(&[1]);
        let s = subject("s");
        let before = old.seal("t", &s, &Secret::new("rt-old")).unwrap();
        let rotated = ring(&[2, 1]);
        assert_ne!(rotated.newest_id(), old.newest_id());
        assert_eq!(rotated.open("t", &s, &before).unwrap().expose(), "rt-old");
        assert!(rotated.is_stale(&before));
        let after = rotated.reseal("t", &s, &before).unwrap();
        assert_eq!(after.key_id, rotated.newest_id());
        assert!(!rotated.is_stale(&after));
        assert_eq!(rotated.open("t", &s, &after).unwrap().expose(), "rt-old");
        let fresh = rotated.seal("t", &s, &Secret::new("rt-new")).unwrap();
        assert_eq!(fresh.key_id, rotated.newest_id());
        // Once the old key is dropped, the re-sealed record still opens, the old one names its key.
        let new_only = ring(&[2]);
        assert_eq!(new_only.open("t", &s, &after).unwrap().expose(), "rt-old");
        let e = new_only.open("t", &s, &before).unwrap_err().to_string();
        assert!(e.contains(old.newest_id()), "{e}");
    }

    #[test]
    fn tampering_with_any_part_fails() {
        let ring = ring(&[1]);
        let s = subject("s");
        let sealed = ring.seal("t", &s, &Secret::new("rt-canary")).unwrap();
        let flip = |b64: &str, at: usize| {
            let mut bytes = BASE64.decode(b64).unwrap();
            bytes[at] ^= 1;
            BASE64.encode(bytes)
        };
        let len = BASE64.decode(&sealed.ciphertext).unwrap().len();
        for at in [0, len - 1] {
            let t = Sealed {
                ciphertext: flip(&sealed.ciphertext, at),
                ..sealed.clone()
            };
            assert!(matches!(
                ring.open("t", &s, &t),
                Err(SealError::Open { .. })
            ));
        }
        let t = Sealed {
            nonce: flip(&sealed.nonce, 3),
            ..sealed.clone()
        };
        assert!(matches!(
            ring.open("t", &s, &t),
            Err(SealError::Open { .. })
        ));
        for t in [
            Sealed {
                nonce: "AAAA".into(),
                ..sealed.clone()
            },
            Sealed {
                ciphertext: "not base64!".into(),
                ..sealed.clone()
            },
        ] {
            assert!(matches!(
                ring.open("t", &s, &t),
                Err(SealError::Malformed { .. })
            ));
        }
        // Truncated: the tag no longer matches.
        let mut short = BASE64.decode(&sealed.ciphertext).unwrap();
        short.truncate(short.len() - 1);
        let t = Sealed {
            ciphertext: BASE64.encode(short),
            ..sealed
        };
        assert!(ring.open("t", &s, &t).is_err());
    }

    #[test]
    fn nonces_differ_per_write() {
        let ring = ring(&[1]);
        let s = subject("s");
        let rt = Secret::new("same");
        let sealed: Vec<Sealed> = (0..64).map(|_| ring.seal("t", &s, &rt).unwrap()).collect();
        let nonces: std::collections::HashSet<_> = sealed.iter().map(|x| &x.nonce).collect();
        assert_eq!(nonces.len(), sealed.len());
        let texts: std::collections::HashSet<_> = sealed.iter().map(|x| &x.ciphertext).collect();
        assert_eq!(texts.len(), sealed.len());
        assert_eq!(BASE64.decode(&sealed[0].nonce).unwrap().len(), 12);
    }

    #[test]
    fn debug_prints_ids_not_keys() {
        let ring = ring(&[0xAB]);
        let text = format!("{ring:?}");
        assert!(
            text.contains(ring.newest_id()) && text.contains(REDACTED),
            "{text}"
        );
        assert!(!text.contains("171"), "{text}"); // 0xAB as a decimal byte list
    }

    #[tokio::test]
    async fn key_files_are_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let a = write("a", &format!("{}\n", BASE64.encode([7u8; KEY_LEN])));
        let b = write("b", &BASE64.encode([8u8; KEY_LEN]));
        let ring = KeyRing::load(&[b.clone(), a.clone()]).await.unwrap();
        assert_eq!(ring.ids().count(), 2);
        assert_eq!(ring.newest_id(), key_id(&[8u8; KEY_LEN]));

        let short = write("short", &BASE64.encode([1u8; 16]));
        let junk = write("junk", "canary-not-base64!");
        let missing = dir.path().join("missing");
        let cases: [(&[PathBuf], &str); 5] = [
            (&[], "no encryption key"),
            (std::slice::from_ref(&short), "holds 16 bytes"),
            (std::slice::from_ref(&junk), "not base64"),
            (std::slice::from_ref(&missing), "cannot read"),
            (&[a.clone(), b, a.clone()], "hold the same key"),
        ];
        for (paths, want) in cases {
            let e = KeyRing::load(paths).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("canary"), "{e}");
        }
    }

    #[test]
    fn key_id_is_the_sha256_prefix() {
        // SHA-256 of 32 zero bytes starts 66687aad.
        assert_eq!(key_id(&[0u8; KEY_LEN]), "66687aad");
    }
}
