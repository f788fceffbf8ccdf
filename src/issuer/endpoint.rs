//! The dev issuer's token endpoint: `POST /api/v1/token` (alias `POST /token`), Flinks'
//! contract. It records the request, waits the configured delay, answers a queued [`Fault`]
//! if there is one, and otherwise authenticates the client and runs the grant.
//!
//! The body is `application/json` or `application/x-www-form-urlencoded`, at most 64 KiB. The
//! client authenticates with `client_id`/`client_secret` body fields or with HTTP Basic
//! (`client_secret_basic`: Base64 of `form-urlencode(id):form-urlencode(secret)`), never both.
//! `client_credentials` needs the secret; `authorization_code` and `refresh_token` need a known
//! `client_id` and check the secret only when one is sent (public clients).
//!
//! Grants: `client_credentials`; `authorization_code` (a configured code or one from
//! `/api/v1/authorize`, usable once, and the configured or authorized `redirect_uri` if any;
//! answers a new `refresh_token` of the code's user); `refresh_token` (a working refresh token
//! the issuer knows; like Flinks it answers no new refresh token unless
//! [`IssuerOptions::rotate_refresh_tokens`] is set, which then also retires the old one). What
//! codes and refresh tokens are worth, per end user, is decided in `users.rs`.
//!
//! Success is `200 {access_token, token_type: "Bearer", expires_in, scope?, refresh_token?}`
//! with `Cache-Control: no-store` (RFC 6749 §5.1). Access tokens are JWT-shaped
//! (`header.claims.signature`, Base64url) with claims `client_id`, `sub` (the end user whose code
//! or refresh token bought it, else [`IssuerOptions::subject`]), `iat`, `exp`, `jti` and
//! `scope` when one was requested; the signature part is random bytes and nobody can verify it.
//!
//! Errors are `{error, error_description}` JSON, following RFC 6749 §5.2:
//! * 400 `invalid_request`: unparsable body, unsupported content type, a repeated parameter,
//!   a missing `grant_type`/`code`/`refresh_token`/`redirect_uri`, a malformed `Authorization`
//!   header, or two client authentication methods at once;
//! * 400 `invalid_client`: unknown client, wrong or missing secret, sent in the body;
//! * 401 `invalid_client` with `WWW-Authenticate: Basic`: the same, when the client tried the
//!   `Authorization` header (RFC 6749 §5.2 requires 401 then);
//! * 400 `invalid_grant`: unknown, spent or expired code, a code issued to another client,
//!   unknown or retired refresh token (rotated, newer login, revoked), `redirect_uri` mismatch;
//! * 400 `unsupported_grant_type`: any other grant;
//! * 405 (not `POST`), 413 (body over 64 KiB), 404 (other paths), all as `invalid_request`.
//!
//! With [`IssuerOptions::client_auth`] clients may also authenticate by client certificate
//! (`tls_client_auth`) or signed assertion (`private_key_jwt`); see `client_auth.rs`.
//!
//! Secrets, codes and tokens never reach a log line: tracing (debug level) shows only the grant
//! type, client id and status.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::client_auth::{RequestTarget, VerifiedClientCert};
use super::params::{BodyError, Params, form_decode, header_string, read_body};
use super::response::{OAuthError, error_response, json_response, post_only};
use super::state::{Inner, RecordedRequest, Shared};
#[cfg(doc)]
use super::{Fault, IssuerOptions};
use crate::config::GrantType;
use crate::secret::Secret;

/// `POST /api/v1/token`: record, delay, injected fault, then the real grant.
pub(super) async fn token_endpoint(
    shared: &Shared,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let content_type = header_string(&parts.headers, CONTENT_TYPE);
    let mut record = RecordedRequest {
        received_at: SystemTime::now(),
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        content_type: content_type.clone(),
        has_authorization: parts.headers.contains_key(AUTHORIZATION),
        grant_type: None,
        client_id: None,
        refresh_token: None,
        code: None,
        redirect_uri: None,
        scope: None,
        user: None,
    };
    if parts.method != Method::POST {
        shared.record(record);
        return post_only("the token endpoint takes POST");
    }
    let body = match read_body(body, &parts.headers).await {
        Ok(body) => body,
        Err(e) => {
            shared.record(record);
            return match e {
                BodyError::TooLarge => error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "the request body is larger than 64 KiB",
                ),
                BodyError::Broken => error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request body could not be read",
                ),
            };
        }
    };
    let params = Params::parse(content_type.as_deref(), &body);
    let basic = basic_auth(&parts.headers);
    let cert = parts.extensions.get::<VerifiedClientCert>().copied();
    if let Ok(p) = &params {
        record.grant_type = p.first("grant_type").map(str::to_owned);
        record.client_id = p.first("client_id").map(str::to_owned);
        record.refresh_token = p.first("refresh_token").map(Secret::new);
        record.code = p.first("code").map(Secret::new);
        record.redirect_uri = p.first("redirect_uri").map(str::to_owned);
        record.scope = p.first("scope").map(str::to_owned);
    }
    if let Some(BasicAuth::Credentials { id, .. }) = &basic {
        record.client_id = Some(id.clone());
    }
    record.user = shared.lock().users.owner(
        record.code.as_ref().map(Secret::expose),
        record.refresh_token.as_ref().map(Secret::expose),
    );
    let grant_type = record.grant_type.clone();
    let client_id = record.client_id.clone();
    shared.record(record);

    let delay = shared.lock().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match shared.take_fault() {
        Some(fault) => fault.response(),
        None => match params.map_err(OAuthError::from).and_then(|p| {
            let target = RequestTarget {
                host: parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok()),
                path: parts.uri.path(),
            };
            shared.grant(&p, basic, cert, target)
        }) {
            Ok(granted) => token_response(granted),
            Err(e) => e.into_response(),
        },
    };
    tracing::debug!(
        grant_type = grant_type.as_deref().unwrap_or("-"),
        client_id = client_id.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        "dev issuer: token request"
    );
    response
}

impl Shared {
    /// Runs a grant: authenticates the client, checks and consumes the grant, issues a token.
    fn grant(
        &self,
        params: &Params,
        basic: Option<BasicAuth>,
        cert: Option<VerifiedClientCert>,
        target: RequestTarget<'_>,
    ) -> Result<Granted, OAuthError> {
        let grant_name = params
            .one("grant_type")?
            .ok_or_else(|| OAuthError::invalid_request("grant_type missing"))?;
        let grant = match grant_name {
            "client_credentials" => Some(GrantType::ClientCredentials),
            "authorization_code" => Some(GrantType::AuthorizationCode),
            "refresh_token" => Some(GrantType::RefreshToken),
            _ => None,
        };
        let scope = params.one("scope")?.map(str::to_owned);
        let redirect_uri = params.one("redirect_uri")?;
        let mut inner = self.lock();
        let strong = match basic {
            None => inner
                .client_auth
                .authenticate(params, cert, target, SystemTime::now())?,
            Some(_) => None,
        };
        let client_id = match strong {
            Some(id) => id,
            None => {
                inner.authenticate(params, basic, grant == Some(GrantType::ClientCredentials))?
            }
        };
        let Some(grant) = grant else {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "the grant_type is not one of client_credentials, authorization_code, \
                 refresh_token",
            ));
        };
        let (user, refresh_token) = match grant {
            GrantType::ClientCredentials => (inner.users.default_user.clone(), None),
            GrantType::AuthorizationCode => {
                let code = params
                    .one("code")?
                    .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
                // Used once: spent here, even if something below failed (nothing below can).
                let configured = inner.redirect_uri.clone();
                let (user, new) = inner.users.exchange_code(
                    code,
                    &client_id,
                    redirect_uri,
                    configured.as_deref(),
                    Instant::now(),
                )?;
                (user, Some(new))
            }
            GrantType::RefreshToken => {
                let sent = params
                    .one("refresh_token")?
                    .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
                if let (Some(expected), Some(uri)) = (&inner.redirect_uri, redirect_uri)
                    && uri != expected
                {
                    return Err(OAuthError::invalid_grant("redirect_uri mismatch"));
                }
                let rotate = inner.rotate_refresh_tokens;
                inner.users.refresh(sent, rotate)?
            }
        };
        let expires_in = inner.lifetime.as_secs();
        let access_token = inner.issue(
            &client_id,
            &user,
            grant,
            scope.as_deref(),
            SystemTime::now(),
        );
        Ok(Granted {
            access_token,
            expires_in,
            scope,
            refresh_token,
        })
    }
}

impl Inner {
    /// Authenticates the client and returns its id. With `secret_required` false (public
    /// clients) a known `client_id` alone is enough, but a secret that is sent must be right.
    fn authenticate(
        &self,
        params: &Params,
        basic: Option<BasicAuth>,
        secret_required: bool,
    ) -> Result<String, OAuthError> {
        let body_id = params.one("client_id")?;
        let body_secret = params.one("client_secret")?;
        let (client_id, secret, via_header) = match basic {
            Some(BasicAuth::Invalid(e)) => return Err(e),
            Some(BasicAuth::Credentials { id, secret }) => {
                if body_secret.is_some() {
                    return Err(OAuthError::invalid_request(
                        "client authenticated both with HTTP Basic and a client_secret field",
                    ));
                }
                if body_id.is_some_and(|b| b != id) {
                    return Err(OAuthError::invalid_request(
                        "the client_id field differs from the HTTP Basic user",
                    ));
                }
                (id, Some(secret), true)
            }
            None => match body_id {
                Some(id) => (id.to_owned(), body_secret.map(str::to_owned), false),
                None => {
                    return Err(OAuthError::invalid_client(
                        false,
                        "no client authentication",
                    ));
                }
            },
        };
        let Some(expected) = self.clients.get(&client_id) else {
            return Err(OAuthError::invalid_client(via_header, "unknown client"));
        };
        match secret {
            Some(secret) if secret == *expected => Ok(client_id),
            Some(_) => Err(OAuthError::invalid_client(
                via_header,
                "wrong client secret",
            )),
            None if secret_required => Err(OAuthError::invalid_client(
                via_header,
                "client_secret missing",
            )),
            None => Ok(client_id),
        }
    }
}

/// A successful grant.
struct Granted {
    access_token: String,
    expires_in: u64,
    scope: Option<String>,
    refresh_token: Option<String>,
}

enum BasicAuth {
    /// Well-formed Basic credentials, form-url-decoded.
    Credentials { id: String, secret: String },
    /// A header that is not usable Basic credentials.
    Invalid(OAuthError),
}

/// Reads HTTP Basic client credentials (`client_secret_basic`, RFC 6749 §2.3.1): Base64 of
/// `form-urlencode(id):form-urlencode(secret)`. `None` without an `Authorization` header.
fn basic_auth(headers: &HeaderMap) -> Option<BasicAuth> {
    let value = headers.get(AUTHORIZATION)?;
    Some(match parse_basic(value) {
        Ok((id, secret)) => BasicAuth::Credentials { id, secret },
        Err(e) => BasicAuth::Invalid(e),
    })
}

/// Decodes `Basic <base64(id:secret)>`.
fn parse_basic(value: &HeaderValue) -> Result<(String, String), OAuthError> {
    let malformed = || OAuthError::invalid_request("malformed HTTP Basic credentials");
    let text = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(OAuthError::invalid_client(
            true,
            "only HTTP Basic client authentication is supported",
        ));
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok((form_decode(id), form_decode(secret)))
}

/// The success answer (RFC 6749 §5.1).
fn token_response(granted: Granted) -> Response<Full<Bytes>> {
    let mut body = Map::new();
    body.insert("access_token".into(), granted.access_token.into());
    body.insert("token_type".into(), "Bearer".into());
    body.insert("expires_in".into(), granted.expires_in.into());
    if let Some(scope) = granted.scope {
        body.insert("scope".into(), scope.into());
    }
    if let Some(refresh_token) = granted.refresh_token {
        body.insert("refresh_token".into(), refresh_token.into());
    }
    json_response(StatusCode::OK, &Value::Object(body))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::{CACHE_CONTROL, WWW_AUTHENTICATE};
    use serde_json::json;

    use super::super::IssuerOptions;
    use super::super::harness::{
        Refused, basic_header, cc_json, claims_of, client, error_of, json_of, post_form, post_json,
        start,
    };
    use super::super::params::MAX_BODY;
    use super::*;

    #[tokio::test]
    async fn client_credentials_json_body_issues_a_jwt_shaped_token() {
        let issuer = start(IssuerOptions::default()).await;
        let mut body = cc_json();
        body["scope"] = "client:admin".into();
        let response = post_json(&issuer.url, &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["scope"], "client:admin");
        assert!(body.get("refresh_token").is_none(), "{body}");
        let token = body["access_token"].as_str().unwrap();
        let claims = claims_of(token);
        assert_eq!(claims["client_id"], "demo-client");
        assert_eq!(claims["sub"], "dev-user-0001");
        assert_eq!(claims["scope"], "client:admin");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            300
        );
        assert!(!claims["jti"].as_str().unwrap().is_empty());
        assert!(issuer.control.is_valid_token(token));
        let issued = issuer.control.issued_tokens();
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].access_token.expose(), token);
        assert_eq!(issued[0].grant_type, GrantType::ClientCredentials);
        assert_eq!(
            issued[0]
                .expires_at
                .duration_since(issued[0].issued_at)
                .unwrap(),
            Duration::from_secs(300)
        );
        // Two tokens in a row differ (random jti and signature).
        let second = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_ne!(second["access_token"].as_str().unwrap(), token);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn form_body_and_token_alias_path_work() {
        let issuer = start(IssuerOptions::default()).await;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        let (status, body) = json_of(post_form(&issuer.url, &form).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            issuer
                .control
                .is_valid_token(body["access_token"].as_str().unwrap())
        );
        let alias = format!("{}/token", issuer.base);
        let (status, _) = json_of(post_form(&alias, &form).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(issuer.control.request_count(), 2);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn basic_auth_decodes_form_encoded_id_and_secret() {
        let secret = "s+cr/t:with%and space";
        let id = "id:with+plus";
        let issuer = start(IssuerOptions {
            clients: vec![(id.into(), secret.into())],
            ..IssuerOptions::default()
        })
        .await;
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header(id, secret))
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            claims_of(body["access_token"].as_str().unwrap())["client_id"],
            id
        );
        let log = issuer.control.requests();
        assert!(log[0].has_authorization);
        assert_eq!(log[0].client_id.as_deref(), Some(id));

        // A wrong secret over Basic: 401 with a challenge.
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header(id, "s+cr/t:with%and"))
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        assert!(response.headers().contains_key(WWW_AUTHENTICATE));
        assert_eq!(
            error_of(response).await,
            (StatusCode::UNAUTHORIZED, "invalid_client".into())
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn client_authentication_failures() {
        let issuer = start(IssuerOptions::default()).await;
        let mut wrong = cc_json();
        wrong["client_secret"] = "nope".into();
        let mut unknown = cc_json();
        unknown["client_id"] = "stranger".into();
        let bad = StatusCode::BAD_REQUEST;
        let bare = json!({ "grant_type": "client_credentials" });
        Refused::check_all(
            &issuer.url,
            vec![
                Refused::json("a wrong secret", wrong, bad, "invalid_client"),
                Refused::json("an unknown client", unknown, bad, "invalid_client"),
                Refused::json(
                    "client_credentials without a secret",
                    json!({ "grant_type": "client_credentials", "client_id": "demo-client" }),
                    bad,
                    "invalid_client",
                ),
                Refused::json("two methods at once", cc_json(), bad, "invalid_request")
                    .authorization(basic_header("demo-client", "demo-secret")),
                Refused::json(
                    "an Authorization that is not Basic",
                    bare.clone(),
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                )
                .authorization("Bearer abc"),
                Refused::json("Basic but not Base64", bare, bad, "invalid_request")
                    .authorization("Basic !!!"),
            ],
        )
        .await;
        assert!(issuer.control.issued_tokens().is_empty());
        issuer.stop().await;
    }

    #[tokio::test]
    async fn unknown_or_missing_grant_and_bad_bodies() {
        let issuer = start(IssuerOptions::default()).await;
        let mut password = cc_json();
        password["grant_type"] = "password".into();
        let bad = StatusCode::BAD_REQUEST;
        let raw = |case, content_type, body: &str| Refused {
            case,
            authorization: None,
            content_type,
            body: body.as_bytes().to_vec(),
            status: bad,
            error: "invalid_request",
        };
        Refused::check_all(
            &issuer.url,
            vec![
                Refused::json("an unknown grant", password, bad, "unsupported_grant_type"),
                Refused::json(
                    "no grant_type",
                    json!({ "client_id": "demo-client", "client_secret": "demo-secret" }),
                    bad,
                    "invalid_request",
                ),
                raw(
                    "not JSON although labelled so",
                    "application/json",
                    "grant_type=client_credentials",
                ),
                raw("a text/plain body", "text/plain", "{}"),
                raw(
                    "a repeated parameter",
                    "application/x-www-form-urlencoded",
                    "grant_type=client_credentials&grant_type=client_credentials\
                     &client_id=demo-client&client_secret=demo-secret",
                ),
            ],
        )
        .await;
        // Too large, wrong method, wrong path.
        let response = client()
            .post(&issuer.url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(vec![b'a'; MAX_BODY + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let response = client().get(&issuer.url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[http::header::ALLOW], "POST");
        let response = client()
            .post(format!("{}/oauth/token", issuer.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(issuer.control.request_count(), 7);
        assert!(issuer.control.issued_tokens().is_empty());
        issuer.stop().await;
    }

    #[tokio::test]
    async fn authorization_code_works_once_and_its_refresh_token_works_repeatedly() {
        let issuer = start(IssuerOptions {
            codes: vec!["code-1".into()],
            redirect_uri: Some("https://app.example/cb".into()),
            ..IssuerOptions::default()
        })
        .await;
        let mut exchange = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "code": "code-1",
            "redirect_uri": "https://app.example/cb/",
        });
        // A redirect_uri that is not an exact match is refused and does not spend the code.
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        exchange["redirect_uri"] = "https://app.example/cb".into();
        let (status, body) = json_of(post_json(&issuer.url, &exchange).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let refresh_token = body["refresh_token"].as_str().unwrap().to_owned();
        assert!(
            issuer
                .control
                .is_valid_token(body["access_token"].as_str().unwrap())
        );
        // Spent.
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        // The refresh token buys tokens without a new refresh token, and keeps working.
        let refresh = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "refresh_token": refresh_token,
        });
        for _ in 0..2 {
            let (status, body) = json_of(post_json(&issuer.url, &refresh).await).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.get("refresh_token").is_none(), "{body}");
        }
        // A public client: the id alone is enough for the refresh grant.
        let public = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": refresh_token,
        });
        assert_eq!(
            post_json(&issuer.url, &public).await.status(),
            StatusCode::OK
        );
        let unknown = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": "rt-unknown",
        });
        assert_eq!(
            error_of(post_json(&issuer.url, &unknown).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(issuer.control.request_count_for("authorization_code"), 3);
        assert_eq!(issuer.control.request_count_for("refresh_token"), 4);
        assert_eq!(issuer.control.issued_count(), 4);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn refresh_token_rotation_retires_the_old_token() {
        let issuer = start(IssuerOptions {
            refresh_tokens: vec!["rt-first".into()],
            rotate_refresh_tokens: true,
            ..IssuerOptions::default()
        })
        .await;
        let form = |rt: &str| {
            vec![
                ("grant_type", "refresh_token".to_owned()),
                ("client_id", "demo-client".to_owned()),
                ("client_secret", "demo-secret".to_owned()),
                ("refresh_token", rt.to_owned()),
            ]
        };
        let send = |rt: String| {
            let url = issuer.url.clone();
            async move {
                let pairs = form(&rt);
                let pairs: Vec<(&str, &str)> =
                    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                post_form(&url, &pairs).await
            }
        };
        let (status, body) = json_of(send("rt-first".into()).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let second = body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(second, "rt-first");
        assert_eq!(
            error_of(send("rt-first".into()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let (status, body) = json_of(send(second.clone()).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(body["refresh_token"].as_str().unwrap(), second);
        // The log shows which refresh token each request sent.
        let sent: Vec<String> = issuer
            .control
            .requests()
            .iter()
            .map(|r| r.refresh_token.as_ref().unwrap().expose().to_owned())
            .collect();
        assert_eq!(sent, ["rt-first", "rt-first", second.as_str()]);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn fixed_token_is_answered_by_every_grant() {
        let issuer = start(IssuerOptions {
            fixed_token: Some("bench-token".into()),
            ..IssuerOptions::default()
        })
        .await;
        let code = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": "demo-code",
        });
        let refresh = json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "refresh_token": "demo-refresh-token",
        });
        for body in [cc_json(), code, refresh] {
            let (status, answer) = json_of(post_json(&issuer.url, &body).await).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            assert_eq!(answer["access_token"], "bench-token");
        }
        assert!(issuer.control.is_valid_token("bench-token"));
        assert_eq!(issuer.control.issued_count(), 3);
        issuer.stop().await;
    }
}
