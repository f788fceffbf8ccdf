//! Client identities for mutual TLS: a PEM certificate chain and its private key, loaded and
//! checked together (the key matches the certificate, the certificate is valid now), and the
//! rustls resolver that offers them in handshakes and picks up a rotated pair from disk.
//!
//! Used by the token client (`[tokens.NAME] client_cert_file`/`client_key_file`) and by the
//! upstream connectors (`[[routes]] client_cert_file`/`client_key_file`), and by `check`.
//!
//! Key material never leaves this module other than inside rustls' `CertifiedKey`: every `Debug`
//! here prints the file names and the certificate's subject and expiry, never key bytes.
//!
//! Rotation: [`ClientIdentity`] looks at the two files' metadata (modification time, length,
//! inode) at most once per [`RECHECK_INTERVAL`], during a handshake, and reloads the pair when
//! either changed. A pair that fails to load (half-written, mismatched while the two files are
//! swapped one after the other, expired) is logged and the previous pair stays in use; the next
//! check tries again. Connections already open keep the certificate they were made with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, crypto::CryptoProvider};
use tokio::time::Instant;

/// The files of a rotated identity are looked at no more often than this: a handshake costs two
/// `stat` calls at most every few seconds, and a Kubernetes secret update (which takes the kubelet
/// up to a minute to project) is in use within seconds of landing.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A certificate and key pair that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{path} contains no PEM certificate")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// The certificate could not be parsed.
    #[error("{path}: the first certificate is not a valid X.509 certificate")]
    BadCertificate {
        /// The file.
        path: String,
    },
    /// The key file holds no PEM private key.
    #[error("{path} contains no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey {
        /// The file.
        path: String,
    },
    /// The key is of a type or size that cannot sign TLS handshakes.
    #[error("{path}: unsupported private key (RSA, ECDSA P-256/P-384 and Ed25519 are): {reason}")]
    UnsupportedKey {
        /// The file.
        path: String,
        /// rustls' reason.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{key} is not the private key of the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// The certificate has expired.
    #[error("{path}: the certificate expired at {not_after}")]
    Expired {
        /// The file.
        path: String,
        /// When (RFC 3339).
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error("{path}: the certificate is not valid before {not_before}")]
    NotYetValid {
        /// The file.
        path: String,
        /// When (RFC 3339).
        not_before: String,
    },
}

/// What may be shown of a certificate: its subject and validity (status page, metrics, logs).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// The subject's distinguished name, `CN=…, O=…` (attributes other than CN, O, OU, C, L,
    /// ST are left out).
    pub subject: String,
    /// Not valid before, seconds since the Unix epoch.
    pub not_before: i64,
    /// Not valid after, seconds since the Unix epoch.
    pub not_after: i64,
}

/// A loaded and checked certificate chain and key.
#[derive(Clone)]
pub struct Identity {
    /// The chain and the signing key, as rustls uses them.
    pub certified: Arc<CertifiedKey>,
    /// The end-entity certificate's subject and validity.
    pub info: CertInfo,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The PEM private key in `path` (PKCS#8, PKCS#1 RSA or SEC1 EC), for signing JWT assertions as
/// well as handshakes.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| IdentityError::NoKey {
            path: path.display().to_string(),
        })
}

/// Loads the chain in `cert` and the key in `key`, and checks that they belong together and that
/// the certificate is valid at `now`.
pub fn load(cert: &Path, key: &Path, now: SystemTime) -> Result<Identity, IdentityError> {
    let shown = cert.display().to_string();
    let pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    let leaf = chain.first().ok_or_else(|| IdentityError::NoCertificate {
        path: shown.clone(),
    })?;
    let info = cert_info(leaf).ok_or_else(|| IdentityError::BadCertificate {
        path: shown.clone(),
    })?;
    let key_der = read_private_key(key)?;
    let provider = provider();
    let signer = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| IdentityError::UnsupportedKey {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    // Every key type the ring provider loads reports its public key, so "unknown" cannot
    // happen; treating it as a mismatch keeps a future provider from skipping the check.
    if certified.keys_match().is_err() {
        return Err(IdentityError::Mismatch {
            cert: shown,
            key: key.display().to_string(),
        });
    }
    let now = crate::time::unix_secs(now) as i64;
    let text = |secs: i64| crate::time::rfc3339(crate::time::from_unix_secs(secs.max(0) as u64));
    if now > info.not_after {
        return Err(IdentityError::Expired {
            path: shown,
            not_after: text(info.not_after),
        });
    }
    if now < info.not_before {
        return Err(IdentityError::NotYetValid {
            path: shown,
            not_before: text(info.not_before),
        });
    }
    Ok(Identity {
        certified: Arc::new(certified),
        info,
    })
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// What identifies a version of a file on disk: a rotation changes at least one of these (a
/// Kubernetes secret update swaps a symlink, so the inode changes even when nothing else does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// The loaded pair and the file versions it came from.
struct Loaded {
    identity: Identity,
    stamps: (Option<Stamp>, Option<Stamp>),
}

/// A client certificate offered in TLS handshakes, reloaded when its files change on disk (see
/// the module documentation).
pub struct ClientIdentity {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
    /// When the files were last looked at; `try_lock` so that concurrent handshakes never wait
    /// for each other (one of them checks, the others use what is loaded).
    checked: Mutex<Instant>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("info", &self.current.load().identity.info)
            .finish()
    }
}

impl ClientIdentity {
    /// Loads the pair; an unusable pair is an error here (at start-up), and only a warning when
    /// a rotation brings one later.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, IdentityError> {
        let stamps = (stamp(cert), stamp(key));
        let identity = load(cert, key, SystemTime::now())?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(Loaded { identity, stamps }),
            checked: Mutex::new(Instant::now()),
        }))
    }

    /// The certificate in use now.
    pub fn info(&self) -> CertInfo {
        self.current.load().identity.info.clone()
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// Subject and expiry for the status page and the expiry gauge (a
    /// [`crate::metrics::CertificateProbe`]), after picking up a rotated pair: the gauge shows
    /// the certificate the next handshake will present.
    pub fn probe(self: &Arc<Self>) -> crate::metrics::CertificateProbe {
        let identity = Arc::clone(self);
        Box::new(move || {
            identity.reload_if_changed();
            let info = identity.info();
            (info.subject, info.not_after)
        })
    }

    /// Reloads the pair if the files changed since it was loaded; returns whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if stamps == self.current.load().stamps {
            return false;
        }
        match load(&self.cert, &self.key, SystemTime::now()) {
            Ok(identity) => {
                tracing::info!(
                    cert = %self.cert.display(),
                    subject = %identity.info.subject,
                    not_after = identity.info.not_after,
                    "client certificate reloaded"
                );
                self.current.store(Arc::new(Loaded { identity, stamps }));
                true
            }
            Err(e) => {
                // The error names files and dates only, never key material.
                tracing::warn!(error = %e, "client certificate not reloaded; keeping the previous one");
                false
            }
        }
    }

    fn maybe_reload(&self) {
        let Ok(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.elapsed() < RECHECK_INTERVAL {
            return;
        }
        *checked = Instant::now();
        drop(checked);
        self.reload_if_changed();
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.load().identity.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// ---- the few DER fields shown: subject and validity ----

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject and validity of a DER certificate.
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // The optional explicit version, then serial, signature algorithm, issuer.
    let (tag, _, r) = tlv(rest)?;
    rest = if tag == 0xa0 { tlv(r)?.2 } else { r };
    let (_, _, r) = tlv(rest)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (SEQUENCE, validity, r) = tlv(r)? else {
        return None;
    };
    let (SEQUENCE, subject, _) = tlv(r)? else {
        return None;
    };
    let (t1, nb, after) = tlv(validity)?;
    let (t2, na, _) = tlv(after)?;
    Some(CertInfo {
        subject: dn_text(subject),
        not_before: der_time(t1, nb)?,
        not_after: der_time(t2, na)?,
    })
}

/// `CN=…, O=…` from a Name's RDN sequence.
fn dn_text(mut rdns: &[u8]) -> String {
    let mut parts = Vec::new();
    while let Some((_, set, rest)) = tlv(rdns) {
        rdns = rest;
        let mut attrs = set;
        while let Some((_, attr, rest)) = tlv(attrs) {
            attrs = rest;
            let Some((0x06, oid, value)) = tlv(attr) else {
                continue;
            };
            let name = match oid {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x06] => "C",
                [0x55, 0x04, 0x07] => "L",
                [0x55, 0x04, 0x08] => "ST",
                [0x55, 0x04, 0x0a] => "O",
                [0x55, 0x04, 0x0b] => "OU",
                _ => continue,
            };
            if let Some((_, text, _)) = tlv(value) {
                // Shown on the status page: control characters are dropped.
                let text: String = String::from_utf8_lossy(text)
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                parts.push(format!("{name}={text}"));
            }
        }
    }
    parts.join(", ")
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn der_time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy: i64 = text[..2].parse().ok()?;
            // RFC 5280 §4.1.2.5.1: 50-99 are 19xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, s) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The throwaway RSA key of the tests (tests/fixtures/README.md).
    pub(crate) const RSA_TEST_KEY: &str = include_str!("../tests/fixtures/throwaway-rsa-2048.pem");

    /// A self-signed certificate for `cn` and its key (PEM), valid from `from` to `until` (Unix
    /// seconds).
    pub(crate) fn leaf(
        alg: &'static rcgen::SignatureAlgorithm,
        cn: &str,
        from: i64,
        until: i64,
    ) -> (String, String) {
        let key = if alg == &rcgen::PKCS_RSA_SHA256 {
            // ring cannot generate RSA keys.
            rcgen::KeyPair::from_pem(RSA_TEST_KEY).unwrap()
        } else {
            rcgen::KeyPair::generate_for(alg).unwrap()
        };
        let mut params = rcgen::CertificateParams::new(vec!["client.test".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Test Org");
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + Duration::from_secs(from as u64);
        params.not_after = epoch + Duration::from_secs(until as u64);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const DAY: i64 = 86_400;

    fn now() -> i64 {
        crate::time::unix_secs(SystemTime::now()) as i64
    }

    #[test]
    fn every_supported_key_type_loads_with_subject_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let until = now() + 30 * DAY;
            let (cert, key) = leaf(alg, "client-1", now() - DAY, until);
            let c = write(dir.path(), "c.pem", &cert);
            let k = write(dir.path(), "k.pem", &key);
            let id = load(&c, &k, SystemTime::now()).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(id.info.subject, "CN=client-1, O=Test Org");
            assert_eq!(id.info.not_after, until);
            let shown = format!("{id:?}");
            assert!(!shown.contains("PRIVATE"), "{shown}");
        }
    }

    #[test]
    fn mismatched_expired_and_unreadable_pairs_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let (cert, _) = leaf(alg, "a", now() - DAY, now() + DAY);
        let (_, other_key) = leaf(alg, "b", now() - DAY, now() + DAY);
        let c = write(dir.path(), "c.pem", &cert);
        let k = write(dir.path(), "k.pem", &other_key);
        let e = load(&c, &k, SystemTime::now()).unwrap_err();
        assert!(matches!(e, IdentityError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("k.pem") && e.to_string().contains("c.pem"));

        let (old, old_key) = leaf(alg, "old", now() - 3 * DAY, now() - DAY);
        let c = write(dir.path(), "old.pem", &old);
        let k = write(dir.path(), "old-key.pem", &old_key);
        let e = load(&c, &k, SystemTime::now()).unwrap_err();
        assert!(matches!(e, IdentityError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("old.pem"), "{e}");

        let (future, future_key) = leaf(alg, "new", now() + DAY, now() + 3 * DAY);
        let c = write(dir.path(), "f.pem", &future);
        let k = write(dir.path(), "fk.pem", &future_key);
        let e = load(&c, &k, SystemTime::now()).unwrap_err();
        assert!(matches!(e, IdentityError::NotYetValid { .. }), "{e}");

        let junk = write(dir.path(), "junk.pem", "hello");
        assert!(matches!(
            load(&junk, &k, SystemTime::now()),
            Err(IdentityError::NoCertificate { .. })
        ));
        assert!(matches!(
            load(&c, &junk, SystemTime::now()),
            Err(IdentityError::NoKey { .. })
        ));
        assert!(matches!(
            load(&dir.path().join("missing"), &k, SystemTime::now()),
            Err(IdentityError::Read { .. })
        ));
    }

    #[test]
    fn a_rotated_pair_is_picked_up_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let (cert, key) = leaf(alg, "first", now() - DAY, now() + DAY);
        let c = write(dir.path(), "c.pem", &cert);
        let k = write(dir.path(), "k.pem", &key);
        let id = ClientIdentity::load(&c, &k).unwrap();
        assert!(!id.reload_if_changed());
        assert_eq!(id.info().subject, "CN=first, O=Test Org");
        // Half a rotation: a new certificate, the old key. Kept the old pair.
        let (cert2, key2) = leaf(alg, "second", now() - DAY, now() + 2 * DAY);
        write(dir.path(), "c.pem", &cert2);
        assert!(!id.reload_if_changed());
        assert_eq!(id.info().subject, "CN=first, O=Test Org");
        write(dir.path(), "k.pem", &key2);
        assert!(id.reload_if_changed());
        assert_eq!(id.info().subject, "CN=second, O=Test Org");
        let resolved = id.resolve(&[], &[]).unwrap();
        assert_eq!(
            cert_info(&resolved.cert[0]).unwrap().subject,
            "CN=second, O=Test Org"
        );
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn der_times_and_hostile_input() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x18, b"20000301000000Z"), Some(951_868_800));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x17, b"70010100000Z"), None);
        assert_eq!(der_time(0x18, b"2000130100000Z"), None);
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x85\xff\xff\xff\xff\xff",
            b"\x30\x02\x30\x00",
        ] {
            assert!(cert_info(bad).is_none());
        }
    }
}
