//! The operator CA of HTTPS interception (`[proxy.intercept]`): loading and checking the pair
//! ([`Ca::load`], used by `check` and at start), signing leaf certificates for routed hosts
//! ([`Ca::leaf`]), and the operator commands `ca init` ([`init`]) and `ca bundle` ([`bundle`],
//! and [`bundle_pkcs12`] for a Java truststore).
//!
//! The CA's private key never leaves this module: leaves get their own key, and nothing here
//! logs or prints a key.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// Why the CA pair cannot be used. Each names the file and the problem in words an operator
/// can act on.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate, or one that does not parse.
    #[error("{path}: not a PEM certificate ({reason})")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file holds no usable private key.
    #[error(
        "{path}: not a usable PEM private key (PKCS#8 `BEGIN PRIVATE KEY`, ECDSA P-256/P-384, \
         Ed25519 or RSA): {reason}"
    )]
    Key {
        /// The file.
        path: PathBuf,
        /// Why (never the key).
        reason: String,
    },
    /// The certificate is not a CA.
    #[error("{path}: not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotCa {
        /// The file.
        path: PathBuf,
    },
    /// The certificate may not sign certificates.
    #[error("{path}: its keyUsage does not include keyCertSign, so it cannot sign certificates")]
    NoKeyCertSign {
        /// The file.
        path: PathBuf,
    },
    /// Outside its validity period.
    #[error("{path}: {what}")]
    Validity {
        /// The file.
        path: PathBuf,
        /// Expired when, or not valid until when.
        what: String,
    },
    /// The key is not the certificate's.
    #[error("{key}: this private key does not belong to the certificate {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rcgen or rustls refused to make a certificate.
    #[error("cannot make a certificate: {0}")]
    Make(String),
    /// `ca bundle` found no system roots to put next to the CA.
    #[error(
        "no system root certificates were found (set SSL_CERT_FILE or SSL_CERT_DIR to the \
         system bundle): a bundle of only the operator CA would break the app's other HTTPS calls"
    )]
    NoSystemRoots,
    /// `ca bundle --pkcs12` was given a password Java cannot use.
    #[error("unusable truststore password: {0}")]
    Password(&'static str),
    /// `ca init` would overwrite a file.
    #[error("{0} already exists; remove it or choose another --out directory")]
    Exists(PathBuf),
}

/// A loaded and checked operator CA: signs leaf certificates.
pub struct Ca {
    /// The CA as rcgen's issuer (its subject, key identifier and key usages).
    issuer: rcgen::Certificate,
    /// The CA's key.
    key: KeyPair,
    /// When the CA expires: no leaf outlives it.
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Leaves start this far in the past: a client whose clock is a little behind ours would
/// otherwise refuse a certificate made a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

impl Ca {
    /// Reads the pair and checks it: a CA certificate (basicConstraints CA, keyCertSign when
    /// keyUsage is present), valid now, and the key is the certificate's.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let bad_cert = |reason: String| CaError::Certificate {
            path: cert_path.to_owned(),
            reason,
        };
        let der: CertificateDer<'static> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .next()
            .ok_or_else(|| bad_cert("no CERTIFICATE block".into()))?
            .map_err(|e| bad_cert(e.to_string()))?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(e.to_string()))?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| bad_cert(e.to_string()))?
            .is_some_and(|b| b.value.ca);
        if !is_ca {
            return Err(CaError::NotCa {
                path: cert_path.to_owned(),
            });
        }
        if let Some(ku) = x509.key_usage().map_err(|e| bad_cert(e.to_string()))?
            && !ku.value.key_cert_sign()
        {
            return Err(CaError::NoKeyCertSign {
                path: cert_path.to_owned(),
            });
        }
        let validity = x509.validity();
        let now = OffsetDateTime::now_utc();
        let (from, until) = (
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime(),
        );
        if now > until {
            return Err(CaError::Validity {
                path: cert_path.to_owned(),
                what: format!("the CA certificate expired on {until}"),
            });
        }
        if now < from {
            return Err(CaError::Validity {
                path: cert_path.to_owned(),
                what: format!("the CA certificate is not valid before {from} (check the clock)"),
            });
        }
        let key_text = String::from_utf8(key_pem).map_err(|_| CaError::Key {
            path: key_path.to_owned(),
            reason: "not PEM text".into(),
        })?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| CaError::Key {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let params =
            CertificateParams::from_ca_cert_der(&der).map_err(|e| bad_cert(e.to_string()))?;
        // rcgen signs with an issuer `Certificate`; re-signing the parameters with the CA's own
        // key gives one with the same subject, key identifier and key usages (what a leaf's
        // issuer fields are made from). The re-signed copy itself is never sent.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| CaError::Make(e.to_string()))?;
        Ok(Self {
            issuer,
            key,
            not_after: until,
        })
    }

    /// A new leaf for `host` (a DNS name or an IP address): its own ECDSA P-256 key, SAN =
    /// `host`, serverAuth, valid from an hour ago for `validity` (never past the CA's end).
    pub fn leaf(&self, host: &str, validity: Duration) -> Result<Arc<CertifiedKey>, CaError> {
        let make = |e: rcgen::Error| CaError::Make(e.to_string());
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(make)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + validity).min(self.not_after);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(make)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(make)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| CaError::Make(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            signer,
        )))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// An operator CA made by `ca init` lives five years: replacing it means handing a new bundle
/// to every app, and the key's protection (a Secret, mode 0600, optional name constraints)
/// matters more than its age.
const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// `ca init`: writes `out/ca.crt` and `out/ca.key` (mode 0600), an ECDSA P-256 CA that may
/// sign only end-entity certificates (path length 0), limited to `name_constraints` (DNS names;
/// `*.example.com` is written as `example.com`, which covers its subdomains) when any are given.
/// Refuses to overwrite either file. Returns the two paths.
pub fn init(out: &Path, name_constraints: &[String]) -> Result<(PathBuf, PathBuf), CaError> {
    let make = |e: rcgen::Error| CaError::Make(e.to_string());
    let cert_path = out.join("ca.crt");
    let key_path = out.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bearer-proxy operator CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    if !name_constraints.is_empty() {
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: name_constraints
                .iter()
                .map(|h| {
                    let h = h.trim().trim_end_matches('.');
                    GeneralSubtree::DnsName(h.strip_prefix("*.").unwrap_or(h).to_ascii_lowercase())
                })
                .collect(),
            excluded_subtrees: Vec::new(),
        });
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(make)?;
    let cert = params.self_signed(&key).map_err(make)?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Io {
        path: out.to_owned(),
        source,
    })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Creates `path` (never overwriting) with `mode` from the start, so the key is never readable
/// by others, not even for a moment.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The certificates of a bundle: the system's roots (without any that is also in the CA file),
/// then the operator CA's.
struct BundleCerts {
    /// The system's root certificates.
    system: Vec<CertificateDer<'static>>,
    /// The certificates of the operator CA file (normally one).
    operator: Vec<CertificateDer<'static>>,
}

/// Reads the operator CA file and the system roots. Many runtimes replace their whole trust
/// store with the file they are given (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, a Java
/// truststore), so a bundle of only the operator CA would break the app's calls to every other
/// HTTPS host: no system roots is an error.
fn bundle_certs(ca_path: &Path) -> Result<BundleCerts, CaError> {
    let ca_pem = read(ca_path)?;
    let bad = |reason: String| CaError::Certificate {
        path: ca_path.to_owned(),
        reason,
    };
    let operator: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if operator.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    let system: Vec<_> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .filter(|d| !operator.contains(d))
        .collect();
    if system.is_empty() {
        return Err(CaError::NoSystemRoots);
    }
    Ok(BundleCerts { system, operator })
}

/// `ca bundle`: the system's root certificates followed by the operator CA, as one PEM text.
pub fn bundle(ca_path: &Path) -> Result<String, CaError> {
    let certs = bundle_certs(ca_path)?;
    let mut out = String::new();
    for der in &certs.system {
        push_pem(&mut out, der);
    }
    out.push_str("# bearer-proxy operator CA\n");
    for der in &certs.operator {
        push_pem(&mut out, der);
    }
    Ok(out)
}

/// Java derives the MAC key of a PKCS#12 file only from a printable-ASCII password (its
/// `PBEKey` refuses anything else with "Password is not ASCII"), and skips the integrity check
/// altogether without one.
fn check_truststore_password(password: &str) -> Result<(), CaError> {
    if password.is_empty() {
        return Err(CaError::Password(
            "it is empty (Java would not check the file's integrity)",
        ));
    }
    if !password.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(CaError::Password(
            "Java accepts only printable ASCII characters in a PKCS#12 password",
        ));
    }
    Ok(())
}

/// The alias of the operator CA in a PKCS#12 truststore (`-2`, `-3`… for further certificates
/// in the CA file); `keytool -list` shows it.
pub const TRUSTSTORE_CA_ALIAS: &str = "bearer-proxy-operator-ca";

/// What `ca bundle --pkcs12` wrote.
#[derive(Debug)]
pub struct Pkcs12Written {
    /// How many system roots the truststore holds.
    pub system_roots: usize,
    /// How many operator CA certificates it holds (normally one).
    pub operator: usize,
}

/// `ca bundle --pkcs12 OUT`: the same certificates as [`bundle`] as a PKCS#12 truststore of
/// trusted-certificate entries (system roots as `system-root-N`, then
/// [`TRUSTSTORE_CA_ALIAS`]), its integrity MAC keyed by `password`, for Java's
/// `-Djavax.net.ssl.trustStore=OUT -Djavax.net.ssl.trustStorePassword=…
/// -Djavax.net.ssl.trustStoreType=PKCS12`. Replaces `out` atomically (a temporary file renamed
/// over it), mode 0644: it holds only public certificates, and the app's user must read it.
pub fn bundle_pkcs12(
    ca_path: &Path,
    out: &Path,
    password: &crate::secret::Secret,
) -> Result<Pkcs12Written, CaError> {
    check_truststore_password(password.expose())?;
    let certs = bundle_certs(ca_path)?;
    let mut entries: Vec<crate::truststore::TrustedCert<'_>> = certs
        .system
        .iter()
        .enumerate()
        .map(|(i, der)| crate::truststore::TrustedCert {
            alias: format!("system-root-{}", i + 1),
            der,
        })
        .collect();
    entries.extend(certs.operator.iter().enumerate().map(|(i, der)| {
        crate::truststore::TrustedCert {
            alias: if i == 0 {
                TRUSTSTORE_CA_ALIAS.to_owned()
            } else {
                format!("{TRUSTSTORE_CA_ALIAS}-{}", i + 1)
            },
            der,
        }
    }));
    let file = crate::truststore::encode(&entries, password.expose());
    let io = |source| CaError::Io {
        path: out.to_owned(),
        source,
    };
    let name = out.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &file, 0o644)?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    Ok(Pkcs12Written {
        system_roots: certs.system.len(),
        operator: certs.operator.len(),
    })
}

/// Appends one `CERTIFICATE` PEM block (64-character lines, as OpenSSL writes them).
fn push_pem(out: &mut String, der: &[u8]) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        #[allow(clippy::expect_used)] // an invariant, see the message
        out.push_str(
            std::str::from_utf8(line)
                .expect("a chunk of Base64 text is UTF-8 because Base64 output is ASCII"),
        );
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

/// When a leaf made now should be replaced: at half its life, so an app never holds one that
/// expires mid-connection-pool.
pub fn renew_after(validity: Duration) -> Duration {
    validity / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = dir.join("c.pem");
        let k = dir.join("k.pem");
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p
    }

    #[test]
    fn init_writes_a_pair_that_loads_and_signs_leaves_for_its_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = init(dir.path(), &["*.example.com".into()]).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ca = Ca::load(&c, &k).unwrap();
        let leaf = ca
            .leaf("api.example.com", Duration::from_secs(3600))
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&leaf.cert[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"api.example.com\")]"
        );
        assert!(!x.basic_constraints().unwrap().is_some_and(|b| b.value.ca));
        assert!(x.extended_key_usage().unwrap().unwrap().value.server_auth);
        // Its own key, not the CA's.
        let ca_x = std::fs::read(&c).unwrap();
        let ca_der = rustls_pemfile::certs(&mut ca_x.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (_, ca_x) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_ne!(x.public_key().raw, ca_x.public_key().raw);
        assert_eq!(x.issuer().as_raw(), ca_x.subject().as_raw());
        assert!(ca_x.name_constraints().unwrap().is_some());
        // Never overwrites.
        assert!(matches!(init(dir.path(), &[]), Err(CaError::Exists(_))));
    }

    /// What `--name-constraint` is for: a client (rustls's WebPKI verifier, as any rustls app
    /// uses) accepts a leaf for a permitted name and refuses one for any other name, even though
    /// the operator CA's key signed both (as a thief of the key would).
    #[test]
    fn a_name_constrained_ca_cannot_vouch_for_other_domains() {
        use rustls::client::danger::ServerCertVerifier as _;
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = init(dir.path(), &["ob.example.com".into(), "*.wild.test".into()]).unwrap();
        let ca = Ca::load(&c, &k).unwrap();
        let pem = std::fs::read(&c).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls_pemfile::certs(&mut pem.as_slice())
                    .next()
                    .unwrap()
                    .unwrap(),
            )
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let verify = |host: &str| {
            let leaf = ca.leaf(host, Duration::from_secs(3600)).unwrap();
            verifier.verify_server_cert(
                &leaf.cert[0],
                &[],
                &rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
        };
        verify("ob.example.com").unwrap();
        verify("api.wild.test").unwrap();
        for other in [
            "bank.example",
            "example.com",
            "ob.example.com.evil.test",
            "wild.test.evil",
        ] {
            let e = verify(other).unwrap_err();
            assert!(
                format!("{e:?}").contains("NameConstraint"),
                "{other}: {e:?}"
            );
        }
    }

    #[test]
    fn bundle_pkcs12_writes_the_roots_and_the_ca_and_refuses_passwords_java_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = init(&dir.path().join("ca"), &[]).unwrap();
        let out = dir.path().join("truststore.p12");
        std::fs::write(&out, "an older truststore").unwrap();
        let written = bundle_pkcs12(&c, &out, &crate::secret::Secret::new("changeit")).unwrap();
        assert_eq!(written.operator, 1);
        assert!(written.system_roots > 0);
        let file = std::fs::read(&out).unwrap();
        // The CA's certificate is inside, as DER, after every system root.
        let ca_pem = std::fs::read(&c).unwrap();
        let ca_der = rustls_pemfile::certs(&mut ca_pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let at = file
            .windows(ca_der.len())
            .position(|w| w == ca_der.as_ref())
            .expect("the operator CA is in the truststore");
        assert!(at > file.len() / 2, "the operator CA comes last");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        for bad in ["", "pässword", "tab\there"] {
            let e = bundle_pkcs12(&c, &out, &crate::secret::Secret::new(bad)).unwrap_err();
            assert!(matches!(e, CaError::Password(_)), "{bad:?}: {e}");
        }
        // A refused password leaves the file it would have replaced as it was.
        assert_eq!(std::fs::read(&out).unwrap(), file);
    }

    #[test]
    fn load_names_each_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = pair(dir.path(), CertificateParams::default());
        let (_, k) = {
            let d2 = dir.path().join("other");
            std::fs::create_dir(&d2).unwrap();
            pair(&d2, ca_params())
        };
        assert!(matches!(Ca::load(&c, &k), Err(CaError::NotCa { .. })));

        let d3 = dir.path().join("nosign");
        std::fs::create_dir(&d3).unwrap();
        let mut p = ca_params();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (c3, k3) = pair(&d3, p);
        assert!(matches!(
            Ca::load(&c3, &k3),
            Err(CaError::NoKeyCertSign { .. })
        ));

        let d4 = dir.path().join("expired");
        std::fs::create_dir(&d4).unwrap();
        let mut p = ca_params();
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
        p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let (c4, k4) = pair(&d4, p);
        let e = Ca::load(&c4, &k4).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let d5 = dir.path().join("good");
        std::fs::create_dir(&d5).unwrap();
        let (c5, k5) = pair(&d5, ca_params());
        Ca::load(&c5, &k5).unwrap();
        // The right certificate with another CA's key.
        assert!(matches!(Ca::load(&c5, &k), Err(CaError::Mismatch { .. })));
        // Files that are not what they should be.
        assert!(matches!(
            Ca::load(&k5, &k5),
            Err(CaError::Certificate { .. })
        ));
        assert!(matches!(Ca::load(&c5, &c5), Err(CaError::Key { .. })));
        assert!(matches!(
            Ca::load(&dir.path().join("missing"), &k5),
            Err(CaError::Io { .. })
        ));
    }
}
