//! The token endpoint client: builds one token request, sends it, and turns the answer into a
//! usable token or a classified error.
//!
//! Parsing is lenient where real servers differ (`expires_in` as integer, float or string; a
//! missing `expires_in` falls back to the JWT `exp`, then to `default_lifetime`) and strict
//! where safety needs it (a token that cannot be a header value, or of a type other than
//! `Bearer`, is refused; a lifetime of zero or less, or a JWT `exp` in the past, is malformed;
//! bodies are size-bounded). A lifetime is never raised: the token is not used a moment longer
//! than the server granted. Errors are [`FetchError`]s, classified as transient (retry soon) or
//! rejected (the credentials were refused: retry slowly). An error answer without an OAuth
//! `error` (a redirect, a 404 from a wrong `token_url`, a gateway's page) is not a rejection.
//!
//! Whatever text the server sends back (`error`, `error_description`, `token_type`, `scope`) is
//! shown on the status page and logged, so every secret the request carried (client secret,
//! refresh token, code, also URL-encoded and as the Basic credential) is replaced by
//! [`REDACTED`] before the text is cut to length or stored anywhere.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::StatusCode;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Deserialize;

use crate::config::{ClientAuth, Encoding, TokenConfig};
use crate::identity::ClientIdentity;
use crate::secret::Secret;
use crate::time::unix_secs_f64;
use crate::token::assertion::{ASSERTION_TYPE, AssertionSigner};
use crate::token::error::Redactor;
pub use crate::token::error::{FetchError, OAuthError, REDACTED};

/// Token responses are a few kilobytes at most (a JWT with generous claims). Anything larger is
/// a misbehaving server, and is refused without buffering it.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Lifetimes longer than this are capped: no sane access token lives a day, and a refresh per
/// day costs nothing.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What is being exchanged for an access token.
#[derive(Clone, Debug)]
pub enum Grant {
    /// `client_credentials`.
    ClientCredentials,
    /// `refresh_token` with this token.
    RefreshToken(Secret),
    /// `authorization_code` with this code.
    AuthorizationCode(Secret),
}

impl Grant {
    fn name(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken(_) => "refresh_token",
            Grant::AuthorizationCode(_) => "authorization_code",
        }
    }
}

/// Client credentials for one request, read fresh from their sources.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The client id.
    pub client_id: Secret,
    /// The client secret, if the client has one.
    pub client_secret: Option<Secret>,
}

/// Where the lifetime of a token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifetimeSource {
    /// The response's `expires_in`.
    ExpiresIn,
    /// The JWT `exp` claim.
    JwtExp,
    /// `default_lifetime` from the configuration.
    Default,
    /// The expiry another replica wrote to a shared token's slot (`shared = true`), less the
    /// clock-skew allowance.
    SharedSlot,
}

/// A successful token response.
#[derive(Clone, Debug)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: Secret,
    /// Its lifetime as granted (greater than zero), capped at [`MAX_LIFETIME`].
    pub lifetime: Duration,
    /// Where the lifetime came from.
    pub lifetime_source: LifetimeSource,
    /// A new refresh token, if the server sent one.
    pub refresh_token: Option<Secret>,
    /// The granted scope.
    pub scope: Option<String>,
    /// The token type as sent (`Bearer` or absent).
    pub token_type: Option<String>,
}

/// Something that can exchange credentials for a token: the real [`TokenClient`], or a fake in
/// tests that drive the refresher on a paused clock.
pub trait Fetch: Send + Sync + 'static {
    /// Sends one token request and parses the answer.
    fn fetch(
        &self,
        creds: &Credentials,
        grant: &Grant,
    ) -> impl std::future::Future<Output = Result<TokenResponse, FetchError>> + Send;
}

impl Fetch for TokenClient {
    async fn fetch(&self, creds: &Credentials, grant: &Grant) -> Result<TokenResponse, FetchError> {
        TokenClient::fetch(self, creds, grant).await
    }
}

/// Sends token requests for one configured credential.
#[derive(Clone, Debug)]
pub struct TokenClient {
    http: reqwest::Client,
    url: String,
    client_auth: ClientAuth,
    encoding: Encoding,
    scope: Option<String>,
    redirect_uri: Option<String>,
    extra: Vec<(String, String)>,
    headers: HeaderMap,
    default_lifetime: Duration,
    /// The client certificate offered to the token endpoint, if configured.
    identity: Option<Arc<ClientIdentity>>,
    /// Makes the `private_key_jwt` assertions, if that is how the client authenticates.
    signer: Option<AssertionSigner>,
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// Trust store problem.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// reqwest refused the configuration.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// A configured header (`headers.<name>`) is not a valid HTTP header.
    #[error("headers.{0}: not a valid header name and value")]
    Header(String),
    /// The client certificate or its key cannot be used.
    #[error("client_cert_file: {0}")]
    Identity(#[from] crate::identity::IdentityError),
}

impl TokenClient {
    /// A client for `cfg`. It follows no redirects, ignores `HTTP(S)_PROXY` (the sidecar must not
    /// send its own token requests into itself) and applies `cfg.timeout` to each request.
    pub fn new(cfg: &TokenConfig) -> Result<Self, ClientBuildError> {
        let identity = match (&cfg.client_cert_file, &cfg.client_key_file) {
            (Some(cert), Some(key)) => Some(ClientIdentity::load(cert, key)?),
            // `Config::validate` refuses one without the other.
            _ => None,
        };
        let tls =
            crate::tls::client_config(cfg.ca_file.as_deref(), &[b"http/1.1"], identity.clone())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            // `Config::validate` refuses these; a configuration built another way fails here.
            let invalid = || ClientBuildError::Header(k.clone());
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| invalid())?;
            headers.insert(name, HeaderValue::from_str(v).map_err(|_| invalid())?);
        }
        Ok(Self {
            http,
            url: cfg.token_url.clone(),
            client_auth: cfg.client_auth,
            encoding: cfg.encoding,
            scope: cfg.scope.clone(),
            redirect_uri: cfg.redirect_uri.clone(),
            extra: cfg
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            headers,
            default_lifetime: cfg.default_lifetime,
            identity,
            signer: match cfg.client_auth {
                ClientAuth::PrivateKeyJwt => AssertionSigner::new(cfg),
                _ => None,
            },
        })
    }

    /// The client certificate offered to the token endpoint, if any.
    pub fn identity(&self) -> Option<&Arc<ClientIdentity>> {
        self.identity.as_ref()
    }

    /// The request body fields, in order.
    fn fields<'a>(
        &'a self,
        creds: &'a Credentials,
        grant: &'a Grant,
        assertion: Option<&'a Secret>,
    ) -> Vec<(&'a str, &'a str)> {
        let mut f = vec![("grant_type", grant.name())];
        match grant {
            Grant::ClientCredentials => {}
            Grant::RefreshToken(rt) => f.push(("refresh_token", rt.expose())),
            Grant::AuthorizationCode(code) => f.push(("code", code.expose())),
        }
        if let Some(uri) = &self.redirect_uri {
            f.push(("redirect_uri", uri));
        }
        if let Some(scope) = &self.scope {
            f.push(("scope", scope));
        }
        match self.client_auth {
            ClientAuth::Body => {
                f.push(("client_id", creds.client_id.expose()));
                if let Some(s) = &creds.client_secret {
                    f.push(("client_secret", s.expose()));
                }
            }
            ClientAuth::Basic => {}
            // RFC 8705 §2 and RFC 7523 §3: the id identifies the client, the certificate or the
            // assertion authenticates it; no secret is sent.
            ClientAuth::TlsClientAuth => f.push(("client_id", creds.client_id.expose())),
            ClientAuth::PrivateKeyJwt => {
                f.push(("client_id", creds.client_id.expose()));
                if let Some(a) = assertion {
                    f.push(("client_assertion_type", ASSERTION_TYPE));
                    f.push(("client_assertion", a.expose()));
                }
            }
        }
        f.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        f
    }

    /// A fresh `private_key_jwt` assertion, when that is how the client authenticates.
    fn assertion(&self, creds: &Credentials) -> Result<Option<Secret>, FetchError> {
        self.signer
            .as_ref()
            .map(|s| s.assertion(creds.client_id.expose(), SystemTime::now()))
            .transpose()
            .map_err(|e| FetchError::Unusable(format!("client assertion: {e}")))
    }

    /// Builds the HTTP request (exposed for tests: it holds secrets, never log it).
    pub fn build(
        &self,
        creds: &Credentials,
        grant: &Grant,
    ) -> Result<reqwest::Request, FetchError> {
        let assertion = self.assertion(creds)?;
        self.build_with(creds, grant, assertion.as_ref())
            .map_err(transport_error)
    }

    fn build_with(
        &self,
        creds: &Credentials,
        grant: &Grant,
        assertion: Option<&Secret>,
    ) -> Result<reqwest::Request, reqwest::Error> {
        let fields = self.fields(creds, grant, assertion);
        let mut req = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .header(http::header::ACCEPT, "application/json");
        req = match self.encoding {
            Encoding::Json => {
                let map: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect();
                req.header(CONTENT_TYPE, "application/json")
                    .body(serde_json::Value::Object(map).to_string())
            }
            Encoding::Form => {
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields.iter())
                    .finish();
                req.header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body)
            }
        };
        if self.client_auth == ClientAuth::Basic {
            #[expect(
                clippy::expect_used,
                reason = "`Basic ` and Base64 are visible ASCII, which a header value always accepts"
            )]
            let mut value = HeaderValue::try_from(basic_auth(creds)).expect(
                "a Basic credential is a valid header value because it is `Basic ` and Base64",
            );
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        req.build()
    }

    /// Sends one token request and parses the answer.
    pub async fn fetch(
        &self,
        creds: &Credentials,
        grant: &Grant,
    ) -> Result<TokenResponse, FetchError> {
        let assertion = self.assertion(creds)?;
        let req = self
            .build_with(creds, grant, assertion.as_ref())
            .map_err(transport_error)?;
        let mut resp = self.http.execute(req).await.map_err(transport_error)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(too_large(status, retry_after));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(too_large(status, retry_after));
            }
            body.extend_from_slice(&chunk);
        }
        let mut sent = sent_secrets(self.client_auth, creds, grant);
        sent.extend(assertion.map(|a| a.expose().to_owned()));
        let redactor = Redactor::new(sent.iter().map(String::as_str));
        if status.is_success() {
            parse_response(&body, self.default_lifetime, SystemTime::now(), &redactor)
        } else {
            Err(http_error(status, &body, retry_after, &redactor))
        }
    }
}

/// Every secret value one token request carries, in every form the server saw it: the client
/// secret, the refresh token or code, and the Basic credential when that is how the client
/// authenticates.
fn sent_secrets(client_auth: ClientAuth, creds: &Credentials, grant: &Grant) -> Vec<String> {
    let mut sent: Vec<String> = creds
        .client_secret
        .iter()
        .map(|s| s.expose().to_owned())
        .collect();
    match grant {
        Grant::ClientCredentials => {}
        Grant::RefreshToken(s) | Grant::AuthorizationCode(s) => sent.push(s.expose().to_owned()),
    }
    if client_auth == ClientAuth::Basic && creds.client_secret.is_some() {
        let header = basic_auth(creds);
        if let Some(credential) = header.strip_prefix("Basic ") {
            sent.push(credential.to_owned());
        }
    }
    sent
}

fn too_large(status: StatusCode, retry_after: Option<Duration>) -> FetchError {
    if status.is_success() {
        FetchError::Malformed(format!(
            "response body larger than {MAX_RESPONSE_BYTES} bytes"
        ))
    } else {
        FetchError::Http {
            status: status.as_u16(),
            oauth: None,
            retry_after,
        }
    }
}

/// `client_secret_basic`: id and secret are form-urlencoded, joined by `:`, then Base64'd
/// (RFC 6749 §2.3.1), so secrets containing `+`, `/`, `:` or `%` survive.
fn basic_auth(creds: &Credentials) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let secret = creds
        .client_secret
        .as_ref()
        .map(|s| enc(s.expose()))
        .unwrap_or_default();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{secret}", enc(creds.client_id.expose())))
    )
}

fn transport_error(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout;
    }
    // The chain names the cause (refused, DNS, TLS) without any request content.
    let e = e.without_url();
    FetchError::Connect(crate::error::Chain(&e).to_string())
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(s).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn http_error(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    redactor: &Redactor,
) -> FetchError {
    #[derive(Deserialize)]
    struct Raw {
        error: Option<serde_json::Value>,
        error_description: Option<serde_json::Value>,
    }
    let as_text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    let oauth = serde_json::from_slice::<Raw>(body).ok().and_then(|raw| {
        let code = raw.error.and_then(as_text)?;
        Some(OAuthError {
            code: redactor.clean(&code),
            description: raw
                .error_description
                .and_then(as_text)
                .map(|d| redactor.clean(&d)),
        })
    });
    FetchError::Http {
        status: status.as_u16(),
        oauth,
        retry_after,
    }
}

/// Parses a 2xx token response body.
pub fn parse_token_response(
    body: &[u8],
    default_lifetime: Duration,
    now: SystemTime,
) -> Result<TokenResponse, FetchError> {
    parse_response(body, default_lifetime, now, &Redactor::default())
}

/// [`parse_token_response`], with the secrets of the request redacted from any text kept.
fn parse_response(
    body: &[u8],
    default_lifetime: Duration,
    now: SystemTime,
    redactor: &Redactor,
) -> Result<TokenResponse, FetchError> {
    #[derive(Deserialize)]
    struct Raw {
        access_token: Option<serde_json::Value>,
        token_type: Option<serde_json::Value>,
        expires_in: Option<serde_json::Value>,
        refresh_token: Option<serde_json::Value>,
        scope: Option<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|_| {
        // Never echo the body: it may be an HTML error page, or a token.
        FetchError::Malformed(format!("body is not a JSON object ({} bytes)", body.len()))
    })?;
    let access_token = match raw.access_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(_) => {
            return Err(FetchError::Malformed(
                "access_token is not a non-empty string".into(),
            ));
        }
        None => return Err(FetchError::Malformed("no access_token".into())),
    };
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FetchError::Malformed(
            "access_token contains characters not allowed in a header (control, space or non-ASCII)"
                .into(),
        ));
    }
    let token_type = match raw.token_type {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => Some(t),
        Some(serde_json::Value::String(t)) => {
            return Err(FetchError::UnsupportedToken(format!(
                "token_type {:?} is not Bearer",
                redactor.clean(&t)
            )));
        }
        Some(_) => return Err(FetchError::Malformed("token_type is not a string".into())),
    };
    let (seconds, lifetime_source) = match raw.expires_in.as_ref().and_then(number) {
        Some(s) => (s, LifetimeSource::ExpiresIn),
        None => match jwt_exp(&access_token).map(|exp| exp - unix_secs_f64(now)) {
            Some(s) => (s, LifetimeSource::JwtExp),
            None => (default_lifetime.as_secs_f64(), LifetimeSource::Default),
        },
    };
    let Some(lifetime) = granted_lifetime(seconds) else {
        return Err(FetchError::Malformed(match lifetime_source {
            LifetimeSource::ExpiresIn => format!("expires_in is {seconds}: not a lifetime"),
            LifetimeSource::JwtExp => format!(
                "the token's JWT exp is {:.0} s in the past (or this host's clock is ahead)",
                -seconds
            ),
            LifetimeSource::Default | LifetimeSource::SharedSlot => {
                "default_lifetime is zero".into()
            }
        }));
    };
    let refresh_token = match raw.refresh_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(Secret::new(s)),
        _ => None,
    };
    let scope = match raw.scope {
        Some(serde_json::Value::String(s)) => Some(redactor.clean(&s)),
        _ => None,
    };
    Ok(TokenResponse {
        access_token: Secret::new(access_token),
        lifetime,
        lifetime_source,
        refresh_token,
        scope,
        token_type,
    })
}

/// An `expires_in` as integer, float or numeric string; anything else counts as absent.
fn number(v: &serde_json::Value) -> Option<f64> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

/// A granted lifetime in seconds as a duration capped at [`MAX_LIFETIME`] (without overflow);
/// `None` for zero, a negative or a non-finite value. Short lifetimes are kept as they are:
/// the refresh *schedule* has a floor, the lifetime never does.
pub fn granted_lifetime(seconds: f64) -> Option<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 {
        None
    } else if seconds >= MAX_LIFETIME.as_secs_f64() {
        Some(MAX_LIFETIME)
    } else {
        Some(Duration::from_secs_f64(seconds)).filter(|d| !d.is_zero())
    }
}

/// The claims of a JWT, decoded without verifying anything (used only to learn the lifetime and
/// to describe a token). `None` if the token is not JWT-shaped.
pub fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

fn jwt_exp(token: &str) -> Option<f64> {
    jwt_claims(token)?.get("exp").and_then(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::error::MAX_ERROR_TEXT;
    use crate::token::status::ErrorKind;

    const DEFAULT: Duration = Duration::from_secs(60);

    fn parse(body: &str) -> Result<TokenResponse, FetchError> {
        parse_token_response(body.as_bytes(), DEFAULT, SystemTime::now())
    }

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn expires_in_forms() {
        let lt = |e: &str| {
            parse(&format!(r#"{{"access_token":"t","expires_in":{e}}}"#))
                .unwrap()
                .lifetime
        };
        assert_eq!(lt("299"), Duration::from_secs(299));
        assert_eq!(lt("299.5"), Duration::from_secs_f64(299.5));
        assert_eq!(lt("\"300\""), Duration::from_secs(300));
        // Short lifetimes are kept, never raised.
        assert_eq!(lt("3"), Duration::from_secs(3));
        assert_eq!(lt("1"), Duration::from_secs(1));
        assert_eq!(lt("0.5"), Duration::from_millis(500));
        assert_eq!(lt("1e12"), MAX_LIFETIME);
        assert_eq!(lt("\"1e400\""), DEFAULT, "non-finite counts as absent");
        assert_eq!(lt("\"NaN\""), DEFAULT);
        assert_eq!(lt("\"soon\""), DEFAULT);
    }

    #[test]
    fn zero_or_negative_lifetimes_are_malformed_and_transient() {
        for e in ["0", "-5", "\"0\"", "-0.5", "1e-300"] {
            let err = parse(&format!(r#"{{"access_token":"t","expires_in":{e}}}"#)).unwrap_err();
            assert!(matches!(err, FetchError::Malformed(_)), "{e}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::Transient, "{e}");
            assert_eq!(err.reason(), "malformed");
        }
    }

    #[test]
    fn a_jwt_exp_in_the_past_is_malformed() {
        let now = SystemTime::now();
        let exp = crate::time::unix_secs(now) - 30;
        let token = jwt(&format!(r#"{{"sub":"u","exp":{exp}}}"#));
        let err = parse_token_response(
            format!(r#"{{"access_token":"{token}"}}"#).as_bytes(),
            DEFAULT,
            now,
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Malformed(_)), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Transient);
        assert!(err.to_string().contains("in the past"), "{err}");
        assert!(!err.to_string().contains(&token));
    }

    #[test]
    fn missing_expires_in_uses_jwt_exp_then_default() {
        let now = SystemTime::now();
        let exp = crate::time::unix_secs(now) + 120;
        let token = jwt(&format!(r#"{{"sub":"u","exp":{exp}}}"#));
        let r = parse_token_response(
            format!(r#"{{"access_token":"{token}","token_type":"Bearer"}}"#).as_bytes(),
            DEFAULT,
            now,
        )
        .unwrap();
        assert_eq!(r.lifetime_source, LifetimeSource::JwtExp);
        assert!((r.lifetime.as_secs_f64() - 120.0).abs() < 1.5);

        let r = parse(r#"{"access_token":"opaque"}"#).unwrap();
        assert_eq!(r.lifetime_source, LifetimeSource::Default);
        assert_eq!(r.lifetime, DEFAULT);
    }

    #[test]
    fn token_type_must_be_bearer_or_absent() {
        assert!(parse(r#"{"access_token":"t","token_type":"bearer"}"#).is_ok());
        let e = parse(r#"{"access_token":"t","token_type":"DPoP"}"#).unwrap_err();
        assert!(matches!(e, FetchError::UnsupportedToken(_)));
        assert_eq!(e.kind(), ErrorKind::Rejected);
    }

    #[test]
    fn header_unsafe_tokens_are_refused() {
        for bad in [r#""a\r\nX: y""#, r#""a b""#, r#""""#, "42", r#""é""#] {
            let e = parse(&format!(r#"{{"access_token":{bad}}}"#)).unwrap_err();
            assert!(matches!(e, FetchError::Malformed(_)), "{bad}: {e:?}");
        }
    }

    #[test]
    fn non_json_bodies_are_transient_and_not_echoed() {
        let e = parse("<html>secret-looking page</html>").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(e.reason(), "malformed");
        assert!(!e.to_string().contains("secret-looking"));
    }

    #[test]
    fn error_classification() {
        let e = |status: u16, body: &str| {
            http_error(
                StatusCode::from_u16(status).unwrap(),
                body.as_bytes(),
                None,
                &Redactor::default(),
            )
        };
        let rejected = e(
            400,
            r#"{"error":"invalid_grant","error_description":"expired"}"#,
        );
        assert_eq!(rejected.kind(), ErrorKind::Rejected);
        assert_eq!(rejected.reason(), "invalid_grant");
        assert_eq!(
            rejected.oauth().unwrap().description.as_deref(),
            Some("expired")
        );
        assert!(rejected.to_string().contains("invalid_grant (expired)"));
        assert_eq!(
            e(401, r#"{"error":"invalid_client"}"#).reason(),
            "invalid_client"
        );
        assert_eq!(
            e(403, r#"{"error":"access_denied"}"#).kind(),
            ErrorKind::Rejected
        );
        assert_eq!(e(400, r#"{"error":"made_up"}"#).reason(), "other");
        assert_eq!(e(400, r#"{"error":"made_up"}"#).kind(), ErrorKind::Rejected);
        assert_eq!(e(500, "").kind(), ErrorKind::Transient);
        assert_eq!(e(503, "").reason(), "http_5xx");
        assert_eq!(e(429, "").reason(), "http_429");
        assert_eq!(e(429, "").kind(), ErrorKind::Transient);
        assert_eq!(e(408, "").kind(), ErrorKind::Transient);
        assert_eq!(
            e(400, r#"{"error":"temporarily_unavailable"}"#).kind(),
            ErrorKind::Transient
        );
        // Answers without an OAuth error are not a rejection of the credentials.
        for status in [301, 302, 307, 400, 401, 403, 404, 405] {
            let err = e(status, "<html>Not Found</html>");
            assert_eq!(err.kind(), ErrorKind::Transient, "{status}");
            assert_eq!(err.reason(), "not_oauth", "{status}");
            assert!(err.misconfigured(), "{status}");
            assert!(err.to_string().contains("token_url looks wrong"), "{err}");
            assert!(err.to_string().contains(&format!("HTTP {status}")), "{err}");
        }
        assert!(!e(503, "").misconfigured());
        assert!(!e(400, r#"{"error":"invalid_grant"}"#).misconfigured());
        let long = "x".repeat(10_000);
        let big = e(400, &format!(r#"{{"error":"{long}"}}"#));
        assert!(big.oauth().unwrap().code.len() <= MAX_ERROR_TEXT);
    }

    #[test]
    fn secrets_the_server_echoes_are_redacted_before_truncation() {
        let redactor = Redactor::new(["canary-s3cret/+", "rt-canary"]);
        let body = serde_json::json!({
            "error": "invalid_client rt-canary",
            // Raw, URL-encoded, with a planted control character, and cut at the length limit.
            "error_description": format!(
                "bad secret canary-s3cret/+ or {} or canary-s3\u{1}cret/+ {}canary-s3cret/+",
                "canary-s3cret%2F%2B",
                "x".repeat(MAX_ERROR_TEXT - 10)
            ),
        });
        let err = http_error(
            StatusCode::UNAUTHORIZED,
            body.to_string().as_bytes(),
            None,
            &redactor,
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(err.oauth().unwrap().description.as_ref().unwrap().len() <= MAX_ERROR_TEXT);
        // Text kept from a successful answer too.
        let t = parse_response(
            br#"{"access_token":"t","token_type":"rt-canary"}"#,
            DEFAULT,
            SystemTime::now(),
            &redactor,
        )
        .unwrap_err();
        assert!(!t.to_string().contains("canary"), "{t}");
        // And any other error, after the fact.
        let mut m = FetchError::Connect("rt-canary".into());
        m.redact(&["rt-canary", ""]);
        assert_eq!(m.to_string(), "cannot reach the token endpoint: [redacted]");
    }

    #[test]
    fn the_basic_credential_counts_as_a_sent_secret() {
        let creds = Credentials {
            client_id: Secret::new("id"),
            client_secret: Some(Secret::new("s")),
        };
        let sent = sent_secrets(
            ClientAuth::Basic,
            &creds,
            &Grant::RefreshToken(Secret::new("rt")),
        );
        assert!(sent.contains(&"s".to_owned()) && sent.contains(&"rt".to_owned()));
        assert!(sent.contains(&STANDARD.encode("id:s")), "{sent:?}");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7"), now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let d = parse_retry_after(&HeaderValue::from_str(&later).unwrap(), now).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("soon"), now),
            None
        );
    }

    fn cfg(encoding: Encoding, client_auth: ClientAuth) -> TokenConfig {
        let mut c: TokenConfig = serde_json::from_value(serde_json::json!({
            "token_url": "http://127.0.0.1:9/api/v1/token",
            "grant_type": "client_credentials",
            "client_id": "id",
        }))
        .unwrap();
        c.encoding = encoding;
        c.client_auth = client_auth;
        c.scope = Some("client:admin".into());
        c
    }

    fn body_text(req: &reqwest::Request) -> String {
        String::from_utf8(req.body().unwrap().as_bytes().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn an_invalid_configured_header_is_an_error_not_silently_dropped() {
        for (name, value) in [("x-ok", "bad\r\nvalue"), ("bad name", "v")] {
            let mut c = cfg(Encoding::Form, ClientAuth::Body);
            c.headers.insert(name.into(), value.into());
            match TokenClient::new(&c) {
                Err(ClientBuildError::Header(key)) => assert_eq!(key, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn json_body_carries_credentials_and_grant() {
        let c = TokenClient::new(&cfg(Encoding::Json, ClientAuth::Body)).unwrap();
        let creds = Credentials {
            client_id: Secret::new("id"),
            client_secret: Some(Secret::new("s3cret")),
        };
        let req = c
            .build(&creds, &Grant::RefreshToken(Secret::new("rt-1")))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body_text(&req)).unwrap();
        assert_eq!(v["grant_type"], "refresh_token");
        assert_eq!(v["refresh_token"], "rt-1");
        assert_eq!(v["client_id"], "id");
        assert_eq!(v["client_secret"], "s3cret");
        assert_eq!(v["scope"], "client:admin");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        assert!(req.headers().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn basic_auth_form_encodes_before_base64() {
        let c = TokenClient::new(&cfg(Encoding::Form, ClientAuth::Basic)).unwrap();
        let creds = Credentials {
            client_id: Secret::new("my id"),
            client_secret: Some(Secret::new("a+b/c:d%e")),
        };
        let req = c.build(&creds, &Grant::ClientCredentials).unwrap();
        let auth = req.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        let decoded = String::from_utf8(
            STANDARD
                .decode(auth.strip_prefix("Basic ").unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(decoded, "my+id:a%2Bb%2Fc%3Ad%25e");
        let body = body_text(&req);
        assert!(body.contains("grant_type=client_credentials"), "{body}");
        assert!(!body.contains("client_secret"), "{body}");
        assert_eq!(
            req.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
    }

    #[test]
    fn tls_client_auth_and_private_key_jwt_send_the_id_and_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("assertion.pem");
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&key, ec.serialize_pem()).unwrap();
        // A secret in the credentials (validation refuses configuring one) is still not sent.
        let creds = Credentials {
            client_id: Secret::new("id-9"),
            client_secret: Some(Secret::new("canary-unsent")),
        };
        for encoding in [Encoding::Form, Encoding::Json] {
            let c = TokenClient::new(&cfg(encoding, ClientAuth::TlsClientAuth)).unwrap();
            let req = c.build(&creds, &Grant::ClientCredentials).unwrap();
            let body = body_text(&req);
            assert!(body.contains("id-9"), "{body}");
            assert!(
                !body.contains("canary") && !body.contains("client_assertion"),
                "{body}"
            );
            assert!(req.headers().get(AUTHORIZATION).is_none());

            let mut pk = cfg(encoding, ClientAuth::PrivateKeyJwt);
            pk.client_assertion_key_file = Some(key.clone());
            let c = TokenClient::new(&pk).unwrap();
            let fields: Vec<(String, String)> = match encoding {
                Encoding::Form => url::form_urlencoded::parse(
                    body_text(&c.build(&creds, &Grant::ClientCredentials).unwrap()).as_bytes(),
                )
                .into_owned()
                .collect(),
                Encoding::Json => {
                    let v: serde_json::Value = serde_json::from_str(&body_text(
                        &c.build(&creds, &Grant::ClientCredentials).unwrap(),
                    ))
                    .unwrap();
                    v.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                }
            };
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            assert_eq!(get("client_id").as_deref(), Some("id-9"), "{encoding:?}");
            assert_eq!(
                get("client_assertion_type").as_deref(),
                Some(ASSERTION_TYPE),
                "{encoding:?}"
            );
            let jwt = get("client_assertion").unwrap();
            assert_eq!(jwt.split('.').count(), 3, "{jwt}");
            let claims = jwt_claims(&jwt).unwrap();
            assert_eq!(claims["aud"], "http://127.0.0.1:9/api/v1/token");
            assert!(get("client_secret").is_none(), "{encoding:?}");
            assert!(!fields.iter().any(|(_, v)| v.contains("canary")));
        }
    }

    #[test]
    fn an_unusable_assertion_key_fails_the_request_without_sending_it() {
        let mut pk = cfg(Encoding::Form, ClientAuth::PrivateKeyJwt);
        pk.client_assertion_key_file = Some("/nonexistent/assertion.pem".into());
        let c = TokenClient::new(&pk).unwrap();
        let creds = Credentials {
            client_id: Secret::new("id"),
            client_secret: None,
        };
        let e = c.build(&creds, &Grant::ClientCredentials).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/assertion.pem"), "{e}");
    }

    #[test]
    fn jwt_claims_decode_without_verification() {
        let c = jwt(r#"{"sub":"u1","client_id":"c1","exp":5}"#);
        let claims = jwt_claims(&c).unwrap();
        assert_eq!(claims["sub"], "u1");
        assert!(jwt_claims("opaque-token").is_none());
        assert!(jwt_claims("a.!!!.c").is_none());
    }
}
