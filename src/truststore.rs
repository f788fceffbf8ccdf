//! PKCS#12 truststores (RFC 7292) holding only trusted certificates, in the shape Java's
//! `PKCS12` KeyStore loads with `-Djavax.net.ssl.trustStore` (used by `ca bundle --pkcs12`).
//!
//! The layout is the one `keytool -importcert` writes for trusted entries, minus the
//! encryption of the certificates (they are public; Java and OpenSSL read an unencrypted
//! `data` SafeContents): one certificate bag per certificate with a `friendlyName` (the alias)
//! and Oracle's trusted-key-usage attribute, without which Java's `PKCS12` KeyStore skips a
//! bag that has no private key; and an HMAC-SHA-256 integrity MAC keyed from the password by
//! the PKCS#12 key derivation (RFC 7292 appendix B), which Java checks when it is given a
//! `trustStorePassword`.
//!
//! Written with yasna (already in the tree through rcgen) and ring: a certificate-only file
//! does not need a PKCS#12 crate's private-key encryption.

use ring::hmac;
use sha2::{Digest as _, Sha256};
use yasna::models::ObjectIdentifier;

/// PKCS#7 `data` (RFC 2315).
const OID_DATA: &[u64] = &[1, 2, 840, 113_549, 1, 7, 1];
/// PKCS#12 `certBag` (RFC 7292 §4.2.3).
const OID_CERT_BAG: &[u64] = &[1, 2, 840, 113_549, 1, 12, 10, 1, 3];
/// PKCS#9 `x509Certificate` certificate type (RFC 7292 §4.2.3).
const OID_X509_CERTIFICATE: &[u64] = &[1, 2, 840, 113_549, 1, 9, 22, 1];
/// PKCS#9 `friendlyName`: Java's alias.
const OID_FRIENDLY_NAME: &[u64] = &[1, 2, 840, 113_549, 1, 9, 20];
/// Oracle's "trusted key usage" bag attribute: marks a certificate bag as a trusted entry.
const OID_JAVA_TRUSTED_KEY_USAGE: &[u64] = &[2, 16, 840, 1, 113_894, 746_875, 1, 1];
/// `anyExtendedKeyUsage` (RFC 5280): the value keytool writes, trusted for every purpose.
const OID_ANY_EXTENDED_KEY_USAGE: &[u64] = &[2, 5, 29, 37, 0];
/// SHA-256 (RFC 5754): the MAC's digest.
const OID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];

/// The MAC's key derivation iterations: Java's own default for new PKCS#12 files (10,000).
/// The password guards only the integrity of public certificates, so more buys nothing.
pub const MAC_ITERATIONS: u32 = 10_000;

/// Salt length of the MAC key derivation: SHA-256's output size, as OpenSSL 3 and Java write.
const SALT_LEN: usize = 32;

/// One trusted certificate of the truststore.
#[derive(Debug, Clone)]
pub struct TrustedCert<'a> {
    /// The entry's alias (`keytool -list` shows it); unique within the file, since Java keys
    /// entries by alias and a repeated one would replace the earlier certificate.
    pub alias: String,
    /// The certificate (DER).
    pub der: &'a [u8],
}

/// The PKCS#12 file holding `certs` as trusted entries, its MAC keyed by `password` with a
/// fresh random salt.
pub fn encode(certs: &[TrustedCert<'_>], password: &str) -> Vec<u8> {
    encode_with(
        certs,
        password,
        &rand::random::<[u8; SALT_LEN]>(),
        MAC_ITERATIONS,
    )
}

/// [`encode`] with a given salt and iteration count (tests use small ones).
fn encode_with(certs: &[TrustedCert<'_>], password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    let oid = ObjectIdentifier::from_slice;
    let safe_contents = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for cert in certs {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&oid(OID_CERT_BAG));
                    w.next().write_tagged(yasna::Tag::context(0), |w| {
                        w.write_sequence(|w| {
                            w.next().write_oid(&oid(OID_X509_CERTIFICATE));
                            w.next()
                                .write_tagged(yasna::Tag::context(0), |w| w.write_bytes(cert.der));
                        });
                    });
                    w.next().write_set_of(|w| {
                        w.next().write_sequence(|w| {
                            w.next().write_oid(&oid(OID_FRIENDLY_NAME));
                            w.next()
                                .write_set_of(|w| w.next().write_bmp_string(&cert.alias));
                        });
                        w.next().write_sequence(|w| {
                            w.next().write_oid(&oid(OID_JAVA_TRUSTED_KEY_USAGE));
                            w.next().write_set_of(|w| {
                                w.next().write_oid(&oid(OID_ANY_EXTENDED_KEY_USAGE));
                            });
                        });
                    });
                });
            }
        });
    });
    let authenticated_safe = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            w.next()
                .write_sequence(|w| data_content_info(w, &safe_contents));
        });
    });
    let key = kdf(password, salt, iterations, KDF_MAC_KEY, 32);
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        &authenticated_safe,
    );
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            // PFX version: always v3.
            w.next().write_u8(3);
            w.next()
                .write_sequence(|w| data_content_info(w, &authenticated_safe));
            w.next().write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&oid(OID_SHA256));
                        w.next().write_null();
                    });
                    w.next().write_bytes(mac.as_ref());
                });
                w.next().write_bytes(salt);
                w.next().write_u32(iterations);
            });
        });
    })
}

/// The fields of a `ContentInfo` of type `data` wrapping `content`.
fn data_content_info(w: &mut yasna::DERWriterSeq<'_>, content: &[u8]) {
    w.next().write_oid(&ObjectIdentifier::from_slice(OID_DATA));
    w.next()
        .write_tagged(yasna::Tag::context(0), |w| w.write_bytes(content));
}

/// The PKCS#12 KDF's "ID" byte for deriving a MAC key (RFC 7292 B.3).
const KDF_MAC_KEY: u8 = 3;

/// The PKCS#12 key derivation (RFC 7292 appendix B.2) with SHA-256 (u = 32, v = 64): `n`
/// bytes of key material for `id` from the password as a NUL-terminated big-endian BMPString.
fn kdf(password: &str, salt: &[u8], iterations: u32, id: u8, n: usize) -> Vec<u8> {
    /// SHA-256's block size in bytes (v).
    const V: usize = 64;
    let mut password_bytes: Vec<u8> = password
        .encode_utf16()
        .chain([0])
        .flat_map(u16::to_be_bytes)
        .collect();
    let repeat = |s: &[u8]| -> Vec<u8> {
        s.iter()
            .copied()
            .cycle()
            .take(s.len().div_ceil(V) * V)
            .collect()
    };
    let mut i = repeat(salt);
    i.append(&mut repeat(&password_bytes));
    password_bytes.fill(0);
    let d = [id; V];
    let mut out = Vec::with_capacity(n);
    loop {
        let mut a = Sha256::new().chain_update(d).chain_update(&i).finalize();
        for _ in 1..iterations {
            a = Sha256::digest(a);
        }
        let take = (n - out.len()).min(a.len());
        out.extend_from_slice(&a[..take]);
        if out.len() == n {
            i.fill(0);
            return out;
        }
        // I_j = (I_j + B + 1) mod 2^(8v) for every v-byte block, B = A repeated to v bytes.
        let b: Vec<u8> = a.iter().copied().cycle().take(V).collect();
        for block in i.chunks_mut(V) {
            let mut carry = 1u16;
            for (x, y) in block.iter_mut().zip(&b).rev() {
                let sum = u16::from(*x) + u16::from(*y) + carry;
                *x = sum.to_be_bytes()[1];
                carry = sum >> 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of the file sees: its version, each bag's (alias, trusted key usages,
    /// certificate), and the MAC's (digest OID, value, salt, iterations) with the bytes it
    /// covers.
    struct Parsed {
        version: u8,
        bags: Vec<(String, Vec<ObjectIdentifier>, Vec<u8>)>,
        mac: (ObjectIdentifier, Vec<u8>, Vec<u8>, u32),
        authenticated_safe: Vec<u8>,
    }

    fn data_content(r: &mut yasna::BERReaderSeq<'_, '_>) -> yasna::ASN1Result<Vec<u8>> {
        assert_eq!(r.next().read_oid()?, ObjectIdentifier::from_slice(OID_DATA));
        r.next()
            .read_tagged(yasna::Tag::context(0), |r| r.read_bytes())
    }

    /// The outer PFX: version, the AuthenticatedSafe's bytes, and the MAC data.
    #[allow(clippy::type_complexity)] // a test's one-off tuple
    fn parse_pfx(file: &[u8]) -> (u8, Vec<u8>, (ObjectIdentifier, Vec<u8>, Vec<u8>, u32)) {
        yasna::parse_der(file, |r| {
            r.read_sequence(|r| {
                let version = r.next().read_u8()?;
                let safe = r.next().read_sequence(data_content)?;
                let mac = r.next().read_sequence(|r| {
                    let (digest, value) = r.next().read_sequence(|r| {
                        let digest = r.next().read_sequence(|r| {
                            let oid = r.next().read_oid()?;
                            r.next().read_null()?;
                            Ok(oid)
                        })?;
                        Ok((digest, r.next().read_bytes()?))
                    })?;
                    Ok((digest, value, r.next().read_bytes()?, r.next().read_u32()?))
                })?;
                Ok((version, safe, mac))
            })
        })
        .unwrap()
    }

    fn parse(file: &[u8]) -> Parsed {
        let (version, authenticated_safe, mac) = parse_pfx(file);
        let safe_contents = yasna::parse_der(&authenticated_safe, |r| {
            r.collect_sequence_of(|r| r.read_sequence(data_content))
        })
        .unwrap();
        assert_eq!(safe_contents.len(), 1, "one unencrypted SafeContents");
        let bags = yasna::parse_der(&safe_contents[0], |r| {
            r.collect_sequence_of(|r| {
                r.read_sequence(|r| {
                    assert_eq!(
                        r.next().read_oid()?,
                        ObjectIdentifier::from_slice(OID_CERT_BAG)
                    );
                    let der = r.next().read_tagged(yasna::Tag::context(0), |r| {
                        r.read_sequence(|r| {
                            assert_eq!(
                                r.next().read_oid()?,
                                ObjectIdentifier::from_slice(OID_X509_CERTIFICATE)
                            );
                            r.next()
                                .read_tagged(yasna::Tag::context(0), |r| r.read_bytes())
                        })
                    })?;
                    let mut alias = None;
                    let mut usages = Vec::new();
                    r.next().read_set_of(|r| {
                        r.read_sequence(|r| {
                            let id = r.next().read_oid()?;
                            r.next().read_set_of(|r| {
                                if id == ObjectIdentifier::from_slice(OID_FRIENDLY_NAME) {
                                    alias = Some(r.read_bmp_string()?);
                                } else if id
                                    == ObjectIdentifier::from_slice(OID_JAVA_TRUSTED_KEY_USAGE)
                                {
                                    usages.push(r.read_oid()?);
                                } else {
                                    panic!("unexpected attribute {id}");
                                }
                                Ok(())
                            })
                        })
                    })?;
                    Ok((alias.expect("every bag has an alias"), usages, der))
                })
            })
        })
        .unwrap();
        Parsed {
            version,
            bags,
            mac,
            authenticated_safe,
        }
    }

    #[test]
    fn every_certificate_is_a_trusted_entry_under_its_alias_and_the_mac_checks() {
        let certs = [
            TrustedCert {
                alias: "system-root-1".into(),
                der: b"\x30\x03\x02\x01\x01",
            },
            TrustedCert {
                alias: "bearer-proxy-operator-ca".into(),
                der: b"\x30\x03\x02\x01\x02",
            },
        ];
        let file = encode_with(&certs, "s3cret-pässword", &[7; SALT_LEN], 3);
        let p = parse(&file);
        assert_eq!(p.version, 3);
        assert_eq!(p.bags.len(), 2);
        for (bag, cert) in p.bags.iter().zip(&certs) {
            assert_eq!(bag.0, cert.alias);
            assert_eq!(
                bag.1,
                [ObjectIdentifier::from_slice(OID_ANY_EXTENDED_KEY_USAGE)]
            );
            assert_eq!(bag.2, cert.der);
        }
        let (digest, value, salt, iterations) = p.mac;
        assert_eq!(digest, ObjectIdentifier::from_slice(OID_SHA256));
        assert_eq!((salt.as_slice(), iterations), (&[7u8; SALT_LEN][..], 3));
        let key = kdf("s3cret-pässword", &salt, iterations, KDF_MAC_KEY, 32);
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, &key),
            &p.authenticated_safe,
            &value,
        )
        .unwrap();
        // Another password does not verify: the MAC depends on it.
        let wrong = kdf("s3cret-password", &salt, iterations, KDF_MAC_KEY, 32);
        assert!(
            hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, &wrong),
                &p.authenticated_safe,
                &value
            )
            .is_err()
        );
        // The password itself is nowhere in the file, in either encoding.
        let utf16: Vec<u8> = "s3cret".encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert!(!file.windows(6).any(|w| w == b"s3cret"));
        assert!(!file.windows(utf16.len()).any(|w| w == utf16));
        // A fresh salt each time.
        assert_ne!(encode(&certs, "x"), encode(&certs, "x"));
    }

    /// `openssl pkcs12 -export -nokeys -in ca.crt -certpbe NONE -macalg sha256 -iter 2048
    /// -passout pass:interop-pässword` (OpenSSL 3.0.19): an independent implementation's MAC.
    const OPENSSL_PKCS12: &str = "MIICNwIBAzCCAe0GCSqGSIb3DQEHAaCCAd4EggHaMIIB1jCCAdIGCSqGSIb3DQEHAaCCAcMEggG/MIIBuzCCAbcGCyqGSIb3DQEMCgEDoIIBpjCCAaIGCiqGSIb3DQEJFgGgggGSBIIBjjCCAYowggEwoAMCAQICEDKdF5IP90hTOLQYYiKiujkwCgYIKoZIzj0EAwIwIzEhMB8GA1UEAwwYYmVhcmVyLXByb3h5IG9wZXJhdG9yIENBMB4XDTI2MTEyNzIwMjAwMloXDTMxMTEyNjIxMjAwMlowIzEhMB8GA1UEAwwYYmVhcmVyLXByb3h5IG9wZXJhdG9yIENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEgOMBg5apJVRcvG1fMIIrhBWNpdJVXKeXeeJ6lsMq4GZeuDD8wBKhQOpe9RCAp9Gl12M3DB+ndHY7DnlGzprjRKNGMEQwDwYDVR0PAQH/BAUDAweGADAdBgNVHQ4EFgQUxscXQH2EhU6tzjioYcgqvlWlXXEwEgYDVR0TAQH/BAgwBgEB/wIBADAKBggqhkjOPQQDAgNIADBFAiBk788udE3H0KtUf6ZUBBD21ido+7q79RZwqGPQOFT7PAIhAMDi/qRae4jRaTXhXjUFqdgHsn0I76HA25mPVxxJsRAhMEEwMTANBglghkgBZQMEAgEFAAQgknY0HjogLc/CQ+JlQ0AenX2XsIt8UG715duClpvdS/8ECF3FVpdEiQHUAgIIAA==";

    #[test]
    fn the_mac_key_matches_what_openssl_derives() {
        use base64::Engine as _;
        let file = base64::engine::general_purpose::STANDARD
            .decode(OPENSSL_PKCS12)
            .unwrap();
        let (version, authenticated_safe, (digest, value, salt, iterations)) = parse_pfx(&file);
        assert_eq!((version, iterations), (3, 2048));
        assert_eq!(digest, ObjectIdentifier::from_slice(OID_SHA256));
        let verify = |password: &str| {
            let key = kdf(password, &salt, iterations, KDF_MAC_KEY, 32);
            hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, &key),
                &authenticated_safe,
                &value,
            )
        };
        verify("interop-pässword").unwrap();
        assert!(verify("interop-password").is_err());
    }

    #[test]
    fn the_kdf_follows_rfc_7292_appendix_b() {
        // Computed step by step from the RFC's definition for one iteration: A = H(D || I)
        // with D = 64 bytes of ID, I = salt and password each repeated to a multiple of 64.
        let salt = [1u8, 2, 3];
        let mut i: Vec<u8> = salt.iter().copied().cycle().take(64).collect();
        // "ab" as a NUL-terminated BMPString is 00 61 00 62 00 00.
        i.extend([0u8, 0x61, 0, 0x62, 0, 0].iter().copied().cycle().take(64));
        let mut h = Sha256::new();
        h.update([KDF_MAC_KEY; 64]);
        h.update(&i);
        let a1 = h.finalize();
        assert_eq!(kdf("ab", &salt, 1, KDF_MAC_KEY, 32), a1.as_slice());
        // Two iterations hash A again; more than 32 bytes needs a second round whose first
        // bytes differ from the first's.
        assert_eq!(
            kdf("ab", &salt, 2, KDF_MAC_KEY, 32),
            Sha256::digest(a1).as_slice()
        );
        let long = kdf("ab", &salt, 1, KDF_MAC_KEY, 40);
        assert_eq!(&long[..32], a1.as_slice());
        assert_ne!(&long[32..], &a1[..8]);
    }
}
