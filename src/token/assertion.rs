//! `private_key_jwt` client assertions (RFC 7523 §2.2, OpenID Connect Core §9): a fresh JWT per
//! token request, signed with the key in `client_assertion_key_file`.
//!
//! Signing uses `ring`, which the tree already carries for TLS, rather than a JOSE crate: three
//! algorithms (RS256, PS256, ES256) over a fixed header and five claims are a few lines, and a
//! JOSE crate would add a second crypto stack and a parser surface the proxy never needs (it
//! verifies nothing here). The key file is read on every token request, like the client secret
//! file, so a rotated key is used from the next request on; token requests are minutes apart,
//! so parsing a key each time costs nothing that matters.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;

use crate::config::{AssertionAlg, TokenConfig};
use crate::secret::Secret;

/// `client_assertion_type` of a JWT bearer assertion (RFC 7523 §2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An assertion is valid this long after it is made. It is used at once, within one request
/// timeout; RFC 7523 asks for a short life, and servers commonly refuse more than 60 s
/// (FAPI 2.0's security profile allows at most 60 s of `exp - iat`).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// An assertion cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] crate::identity::IdentityError),
    /// The key cannot sign with the algorithm.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// ring could not sign (it does not say why).
    #[error("cannot sign the client assertion")]
    Sign,
}

/// A loaded signing key and the algorithm it signs with. Its `Debug` names the algorithm only.
pub struct AssertionKey {
    alg: AssertionAlg,
    key: KeyPair,
}

enum KeyPair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl std::fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl AssertionKey {
    /// Loads the PEM key in `path` (RSA as PKCS#8 or PKCS#1, P-256 as PKCS#8) and checks it can
    /// sign with `alg`; without `alg`, RSA keys sign RS256 and P-256 keys ES256.
    pub fn load(path: &Path, alg: Option<AssertionAlg>) -> Result<Self, AssertionError> {
        let der = crate::identity::read_private_key(path)?;
        let unsupported = |reason: &str| AssertionError::Unsupported {
            path: path.display().to_string(),
            reason: reason.to_owned(),
        };
        let rsa = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).ok(),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()).ok(),
            _ => None,
        };
        let key = if let Some(rsa) = rsa {
            KeyPair::Rsa(rsa)
        } else if let PrivateKeyDer::Pkcs8(k) = &der {
            let ec = EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                k.secret_pkcs8_der(),
                &SystemRandom::new(),
            )
            .map_err(|_| unsupported("not an RSA or ECDSA P-256 key"))?;
            KeyPair::Ec(ec)
        } else {
            return Err(unsupported(
                "not an RSA or ECDSA P-256 key (EC keys must be PKCS#8: `openssl pkcs8 -topk8 -nocrypt`)",
            ));
        };
        let alg = match (&key, alg) {
            (KeyPair::Rsa(_), None) => AssertionAlg::RS256,
            (KeyPair::Ec(_), None) => AssertionAlg::ES256,
            (KeyPair::Rsa(_), Some(a @ (AssertionAlg::RS256 | AssertionAlg::PS256)))
            | (KeyPair::Ec(_), Some(a @ AssertionAlg::ES256)) => a,
            (_, Some(a)) => {
                return Err(unsupported(&format!(
                    "client_assertion_alg = {a:?} does not match the key type"
                )));
            }
        };
        Ok(Self { alg, key })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> AssertionAlg {
        self.alg
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, AssertionError> {
        let rng = SystemRandom::new();
        match &self.key {
            KeyPair::Rsa(k) => {
                let padding: &dyn signature::RsaEncoding = match self.alg {
                    AssertionAlg::PS256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, input, &mut sig)
                    .map_err(|_| AssertionError::Sign)?;
                Ok(sig)
            }
            KeyPair::Ec(k) => k
                .sign(&rng, input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| AssertionError::Sign),
        }
    }
}

/// Makes the assertions of one `[tokens.NAME]` with `client_auth = "private_key_jwt"`.
#[derive(Clone, Debug)]
pub struct AssertionSigner {
    key_file: PathBuf,
    alg: Option<AssertionAlg>,
    kid: Option<String>,
    aud: String,
}

impl AssertionSigner {
    /// The signer of `cfg`, if it uses `private_key_jwt`.
    pub fn new(cfg: &TokenConfig) -> Option<Self> {
        let key_file = cfg.client_assertion_key_file.clone()?;
        Some(Self {
            key_file,
            alg: cfg.client_assertion_alg,
            kid: cfg.client_assertion_kid.clone(),
            aud: cfg
                .client_assertion_aud
                .clone()
                .unwrap_or_else(|| cfg.token_url.clone()),
        })
    }

    /// A fresh assertion for `client_id`, made at `now`, with the key as it is on disk now.
    pub fn assertion(&self, client_id: &str, now: SystemTime) -> Result<Secret, AssertionError> {
        let key = AssertionKey::load(&self.key_file, self.alg)?;
        let mut header = serde_json::json!({ "alg": format!("{:?}", key.alg()), "typ": "JWT" });
        if let Some(kid) = &self.kid {
            header["kid"] = kid.as_str().into();
        }
        let iat = crate::time::unix_secs(now);
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": self.aud,
            // 128 random bits: unique per request, which servers check to refuse replays.
            "jti": format!("{:032x}", rand::random::<u128>()),
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let mut jwt = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = key.sign(jwt.as_bytes())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(Secret::new(jwt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_KEY: &str = include_str!("../../tests/fixtures/throwaway-rsa-2048.pem");

    fn signer(dir: &Path, pem: &str, alg: Option<AssertionAlg>) -> AssertionSigner {
        let key_file = dir.join("key.pem");
        std::fs::write(&key_file, pem).unwrap();
        AssertionSigner {
            key_file,
            alg,
            kid: Some("k1".into()),
            aud: "https://issuer.test/token".into(),
        }
    }

    fn part(jwt: &str, i: usize) -> serde_json::Value {
        let p = jwt.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    /// Verifies with ring against the public key of the signing key.
    fn verify(jwt: &str, alg: AssertionAlg, public: &[u8]) {
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let params: &dyn signature::VerificationAlgorithm = match alg {
            AssertionAlg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            AssertionAlg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            AssertionAlg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(params, public)
            .verify(input.as_bytes(), &sig)
            .unwrap_or_else(|_| panic!("{alg:?} signature does not verify"));
    }

    #[test]
    fn each_algorithm_signs_verifiable_claims_with_a_unique_jti() {
        use ring::signature::KeyPair as _;
        let dir = tempfile::tempdir().unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        for (pem, alg, want) in [
            (RSA_KEY.to_owned(), None, AssertionAlg::RS256),
            (
                RSA_KEY.to_owned(),
                Some(AssertionAlg::PS256),
                AssertionAlg::PS256,
            ),
            (ec.serialize_pem(), None, AssertionAlg::ES256),
        ] {
            let s = signer(dir.path(), &pem, alg);
            let now = SystemTime::now();
            let a = s.assertion("client-7", now).unwrap();
            let b = s.assertion("client-7", now).unwrap();
            let (a, b) = (a.expose(), b.expose());
            let key = AssertionKey::load(&s.key_file, alg).unwrap();
            let public = match &key.key {
                KeyPair::Rsa(k) => k.public_key().as_ref().to_vec(),
                KeyPair::Ec(k) => k.public_key().as_ref().to_vec(),
            };
            verify(a, want, &public);
            let header = part(a, 0);
            assert_eq!(header["alg"], format!("{want:?}"));
            assert_eq!(header["kid"], "k1");
            let claims = part(a, 1);
            assert_eq!(claims["iss"], "client-7");
            assert_eq!(claims["sub"], "client-7");
            assert_eq!(claims["aud"], "https://issuer.test/token");
            let iat = claims["iat"].as_u64().unwrap();
            assert_eq!(iat, crate::time::unix_secs(now));
            assert_eq!(claims["exp"].as_u64().unwrap() - iat, 60);
            assert_ne!(claims["jti"], part(b, 1)["jti"], "jti must be unique");
            assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
            // A tampered payload does not verify.
            let mut forged: Vec<&str> = a.split('.').collect();
            let other = URL_SAFE_NO_PAD.encode(r#"{"iss":"evil"}"#);
            forged[1] = &other;
            let forged = forged.join(".");
            assert!(
                std::panic::catch_unwind(|| verify(&forged, want, &public)).is_err(),
                "{want:?}"
            );
        }
    }

    #[test]
    fn a_key_that_cannot_sign_the_algorithm_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let s = signer(dir.path(), &ec.serialize_pem(), Some(AssertionAlg::RS256));
        let e = s.assertion("c", SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("key.pem"), "{e}");
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let s = signer(dir.path(), &ed.serialize_pem(), None);
        assert!(s.assertion("c", SystemTime::now()).is_err());
        let s = signer(dir.path(), "nothing", None);
        assert!(s.assertion("c", SystemTime::now()).is_err());
    }

    #[test]
    fn a_rotated_key_signs_the_next_assertion() {
        use ring::signature::KeyPair as _;
        let dir = tempfile::tempdir().unwrap();
        let first = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let s = signer(dir.path(), &first.serialize_pem(), None);
        let public = |k: &rcgen::KeyPair| {
            let KeyPair::Ec(k) = AssertionKey::load_pem(&k.serialize_pem()).key else {
                panic!("EC");
            };
            k.public_key().as_ref().to_vec()
        };
        verify(
            s.assertion("c", SystemTime::now()).unwrap().expose(),
            AssertionAlg::ES256,
            &public(&first),
        );
        std::fs::write(&s.key_file, second.serialize_pem()).unwrap();
        verify(
            s.assertion("c", SystemTime::now()).unwrap().expose(),
            AssertionAlg::ES256,
            &public(&second),
        );
    }

    impl AssertionKey {
        fn load_pem(pem: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("k.pem");
            std::fs::write(&p, pem).unwrap();
            Self::load(&p, None).unwrap()
        }
    }
}
