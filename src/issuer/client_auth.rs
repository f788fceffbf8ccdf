//! The dev issuer's stronger client authentication (issue #16): mutual TLS (`tls_client_auth`,
//! RFC 8705 §2) and signed JWT assertions (`private_key_jwt`, RFC 7523), so the demo and the
//! tests can exercise both end to end.
//!
//! - TLS: with [`ClientAuthOptions::tls`] the issuer serves HTTPS with that rustls
//!   configuration; a test builds one that requires client certificates from a CA of its own
//!   (rustls' `WebPkiClientVerifier`), so a client without one fails at the handshake. A client
//!   in [`ClientAuthOptions::tls_clients`] is then authenticated by the verified certificate of
//!   its connection alone: it sends `client_id` and no secret. (Any certificate from the CA will
//!   do; the issuer does not bind a certificate's subject to a client id.)
//! - Assertions: a request with `client_assertion_type` = `…:jwt-bearer` and a `client_assertion`
//!   is verified against the public key registered for its `iss`: signature (RS256, PS256,
//!   ES256), `iss` = `sub` = the client, `aud` = [`ClientAuthOptions::assertion_audience`], `exp`
//!   in the future and at most [`MAX_ASSERTION_LIFETIME`] after `iat`, and a `jti` never seen
//!   before. Any failure is `invalid_client`.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;
use serde_json::Value;

use super::params::Params;
use super::response::OAuthError;
use crate::config::AssertionAlg;
use crate::token::assertion::ASSERTION_TYPE;

/// Longest `exp - iat` accepted: the proxy makes 60 s assertions, and RFC 7523 wants them short.
pub const MAX_ASSERTION_LIFETIME: u64 = 60;

/// A client's registered assertion key.
#[derive(Clone, Debug)]
pub struct AssertionKeySpec {
    /// The client (the assertion's `iss` and `sub`).
    pub client_id: String,
    /// The algorithm it signs with.
    pub alg: AssertionAlg,
    /// The public key as ring reads it: for RSA the DER `RSAPublicKey`, for ES256 the
    /// uncompressed point.
    pub public_key: Vec<u8>,
}

/// How clients may authenticate besides a secret. Off by default.
#[derive(Clone, Default)]
pub struct ClientAuthOptions {
    /// Serve HTTPS with this configuration (for example one requiring client certificates).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Clients authenticated by their connection's verified client certificate alone.
    pub tls_clients: Vec<String>,
    /// Clients authenticated by `private_key_jwt`, with their keys.
    pub assertion_keys: Vec<AssertionKeySpec>,
    /// The `aud` assertions must carry (an issuer identifier); unset means the URL the request
    /// was sent to (scheme, `Host` and path), which is the proxy's default `aud`, `token_url`.
    pub assertion_audience: Option<String>,
}

impl fmt::Debug for ClientAuthOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuthOptions")
            .field("tls", &self.tls.is_some())
            .field("tls_clients", &self.tls_clients)
            .field("assertion_keys", &self.assertion_keys.len())
            .field("assertion_audience", &self.assertion_audience)
            .finish()
    }
}

/// Marks a request that arrived over TLS with a verified client certificate (a request
/// extension set by the server).
#[derive(Clone, Copy, Debug)]
pub(super) struct VerifiedClientCert;

/// Where a request was sent: the default audience of its assertion.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RequestTarget<'a> {
    /// The `Host` header.
    pub(super) host: Option<&'a str>,
    /// The path.
    pub(super) path: &'a str,
}

/// The options and the `jti`s already used.
#[derive(Debug, Default)]
pub(super) struct ClientAuthState {
    options: ClientAuthOptions,
    seen_jti: HashSet<String>,
}

impl ClientAuthState {
    pub(super) fn new(options: ClientAuthOptions) -> Self {
        Self {
            options,
            seen_jti: HashSet::new(),
        }
    }

    /// Authenticates by assertion or by certificate when the request uses either; `Ok(None)`
    /// leaves it to the secret-based methods.
    pub(super) fn authenticate(
        &mut self,
        params: &Params,
        cert: Option<VerifiedClientCert>,
        target: RequestTarget<'_>,
        now: SystemTime,
    ) -> Result<Option<String>, OAuthError> {
        let body_id = params.one("client_id")?;
        if let Some(kind) = params.one("client_assertion_type")? {
            if kind != ASSERTION_TYPE {
                return Err(OAuthError::invalid_client(
                    false,
                    "unsupported client_assertion_type",
                ));
            }
            if params.one("client_secret")?.is_some() {
                return Err(OAuthError::invalid_request(
                    "client authenticated both with an assertion and a client_secret",
                ));
            }
            let jwt = params
                .one("client_assertion")?
                .ok_or_else(|| OAuthError::invalid_request("client_assertion missing"))?;
            let id = self.verify(jwt, target, now)?;
            if body_id.is_some_and(|b| b != id) {
                return Err(OAuthError::invalid_client(
                    false,
                    "client_id differs from the assertion's",
                ));
            }
            return Ok(Some(id));
        }
        match body_id {
            Some(id)
                if self.options.tls_clients.iter().any(|c| c == id)
                    && params.one("client_secret")?.is_none() =>
            {
                if cert.is_none() {
                    return Err(OAuthError::invalid_client(false, "no client certificate"));
                }
                Ok(Some(id.to_owned()))
            }
            _ => Ok(None),
        }
    }

    /// Verifies an assertion and returns its client; the `jti` is spent even when a later
    /// check fails, so a replay of anything once seen is refused.
    fn verify(
        &mut self,
        jwt: &str,
        target: RequestTarget<'_>,
        now: SystemTime,
    ) -> Result<String, OAuthError> {
        let bad = |why: &'static str| OAuthError::invalid_client(false, why);
        let (input, sig) = jwt
            .rsplit_once('.')
            .ok_or_else(|| bad("malformed assertion"))?;
        let (header, claims) = input
            .split_once('.')
            .ok_or_else(|| bad("malformed assertion"))?;
        let decode = |part: &str| -> Option<Value> {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
        };
        let header = decode(header).ok_or_else(|| bad("malformed assertion header"))?;
        let claims = decode(claims).ok_or_else(|| bad("malformed assertion claims"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| bad("malformed assertion signature"))?;
        let iss = claims["iss"].as_str().ok_or_else(|| bad("iss missing"))?;
        let key = self
            .options
            .assertion_keys
            .iter()
            .find(|k| k.client_id == iss)
            .ok_or_else(|| bad("unknown client"))?;
        // The algorithm is the registered one, whatever the header claims ("alg": "none" or an
        // algorithm confusion gets nowhere).
        if header["alg"].as_str() != Some(alg_name(key.alg)) {
            return Err(bad("unexpected alg"));
        }
        let verifier: &dyn signature::VerificationAlgorithm = match key.alg {
            AssertionAlg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            AssertionAlg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            AssertionAlg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(verifier, &key.public_key)
            .verify(input.as_bytes(), &sig)
            .map_err(|_| bad("bad assertion signature"))?;
        let client = key.client_id.clone();
        if claims["sub"].as_str() != Some(client.as_str()) {
            return Err(bad("sub is not the client"));
        }
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty())
            .ok_or_else(|| bad("jti missing"))?;
        if !self.seen_jti.insert(jti.to_owned()) {
            return Err(bad("jti already used"));
        }
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let want = match &self.options.assertion_audience {
            Some(aud) => aud.clone(),
            None => format!(
                "{scheme}://{}{}",
                target.host.unwrap_or_default(),
                target.path
            ),
        };
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == want,
            Value::Array(list) => list.iter().any(|a| a.as_str() == Some(&want)),
            _ => false,
        };
        if !aud_ok {
            return Err(bad("wrong aud"));
        }
        let now = crate::time::unix_secs(now);
        let exp = claims["exp"].as_u64().ok_or_else(|| bad("exp missing"))?;
        let iat = claims["iat"].as_u64().unwrap_or(now);
        if exp <= now {
            return Err(bad("assertion expired"));
        }
        if exp.saturating_sub(iat) > MAX_ASSERTION_LIFETIME {
            return Err(bad("assertion lives too long"));
        }
        Ok(client)
    }
}

fn alg_name(alg: AssertionAlg) -> &'static str {
    match alg {
        AssertionAlg::RS256 => "RS256",
        AssertionAlg::PS256 => "PS256",
        AssertionAlg::ES256 => "ES256",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn es256() -> (ring::signature::EcdsaKeyPair, AssertionKeySpec) {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let spec = AssertionKeySpec {
            client_id: "c1".into(),
            alg: AssertionAlg::ES256,
            public_key: kp.public_key().as_ref().to_vec(),
        };
        (kp, spec)
    }

    fn sign(kp: &ring::signature::EcdsaKeyPair, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = kp
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn params(jwt: &str) -> Params {
        let body = serde_json::json!({
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt,
        })
        .to_string();
        Params::parse(Some("application/json"), body.as_bytes()).unwrap()
    }

    #[test]
    fn assertions_are_checked_claim_by_claim() {
        let (kp, spec) = es256();
        let (other, _) = es256();
        let mut state = ClientAuthState::new(ClientAuthOptions {
            assertion_keys: vec![spec],
            assertion_audience: Some("https://as.test/token".into()),
            ..Default::default()
        });
        let now = SystemTime::now();
        let t = crate::time::unix_secs(now);
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
        let claims = |jti: &str, aud: &str, iat: u64, exp: u64| serde_json::json!({"iss": "c1", "sub": "c1", "aud": aud, "jti": jti, "iat": iat, "exp": exp});
        let aud = "https://as.test/token";
        let good = sign(&kp, header.clone(), claims("j1", aud, t, t + 60));
        assert_eq!(
            state
                .authenticate(&params(&good), None, RequestTarget::default(), now)
                .unwrap()
                .as_deref(),
            Some("c1")
        );
        let refused = |state: &mut ClientAuthState, jwt: &str, why: &str| {
            let e = state
                .authenticate(&params(jwt), None, RequestTarget::default(), now)
                .unwrap_err();
            let text = format!("{e:?}");
            assert!(text.contains("invalid_client"), "{why}: {text}");
            assert!(text.contains(why), "{why}: {text}");
        };
        refused(&mut state, &good, "jti already used");
        refused(
            &mut state,
            &sign(
                &kp,
                header.clone(),
                claims("j2", "https://other/", t, t + 60),
            ),
            "wrong aud",
        );
        refused(
            &mut state,
            &sign(&kp, header.clone(), claims("j3", aud, t - 120, t - 60)),
            "expired",
        );
        refused(
            &mut state,
            &sign(&kp, header.clone(), claims("j4", aud, t, t + 600)),
            "too long",
        );
        refused(
            &mut state,
            &sign(&other, header.clone(), claims("j5", aud, t, t + 60)),
            "signature",
        );
        refused(
            &mut state,
            &sign(
                &kp,
                serde_json::json!({"alg": "none"}),
                claims("j6", aud, t, t + 60),
            ),
            "alg",
        );
        let mut wrong_sub = claims("j7", aud, t, t + 60);
        wrong_sub["sub"] = "c2".into();
        refused(&mut state, &sign(&kp, header.clone(), wrong_sub), "sub");
        refused(&mut state, "a.b", "malformed");
    }

    #[test]
    fn certificate_clients_need_a_verified_certificate() {
        let mut state = ClientAuthState::new(ClientAuthOptions {
            tls_clients: vec!["mtls-client".into()],
            ..Default::default()
        });
        let body = br#"{"grant_type":"client_credentials","client_id":"mtls-client"}"#;
        let p = Params::parse(Some("application/json"), body).unwrap();
        let now = SystemTime::now();
        assert_eq!(
            state
                .authenticate(&p, Some(VerifiedClientCert), RequestTarget::default(), now)
                .unwrap()
                .as_deref(),
            Some("mtls-client")
        );
        assert!(
            state
                .authenticate(&p, None, RequestTarget::default(), now)
                .is_err()
        );
        let other = br#"{"grant_type":"client_credentials","client_id":"demo-client"}"#;
        let p = Params::parse(Some("application/json"), other).unwrap();
        assert!(
            state
                .authenticate(&p, Some(VerifiedClientCert), RequestTarget::default(), now)
                .unwrap()
                .is_none()
        );
    }
}
