//! The dev issuer's failure switches and observations: [`IssuerControl`], the in-process handle
//! tests hold, and the same switches over HTTP under `/control/` on the issuer's own port (served
//! when [`IssuerOptions::control_api`] is set).
//!
//! | request | parameters (query string, JSON or form body) |
//! |---|---|
//! | `POST /control/fail` | `kind` = `server_error` (500) \| `unavailable` (503) \| `rate_limited` (429, `retry_after` seconds, default 1) \| `oauth_error` (400, `error` code, default `invalid_grant`) \| `malformed` (200 HTML); `count` (default 1) |
//! | `POST /control/clear_faults` | none |
//! | `POST /control/delay` | `ms`: delay before every token answer (0 turns it off) |
//! | `POST /control/lifetime` | `secs`: access token lifetime from now on |
//! | `POST /control/client_secret` | `client_id`, `client_secret`: the client's only valid secret from now on |
//! | `POST /control/codes` | `code` (repeatable, or a JSON array), the default user's; `replace=true` drops the old configured ones |
//! | `POST /control/refresh_tokens` | `refresh_token` (repeatable, or a JSON array), the default user's; `replace=true` retires every working one first |
//! | `POST /control/rotate` | `enabled` (`true`/`false`): refresh-token rotation from now on |
//! | `POST /control/code_lifetime` | `secs`: lifetime of codes from `/api/v1/authorize` from now on |
//! | `POST /control/revoke_consent` | `user`: revokes that user's consent, as `DELETE /api/v1/revoke` would |
//! | `GET /control/stats` | answers `{token_requests, by_grant, issued_tokens, pending_faults, retired_refresh_token_uses: {rotated, relogin, revoked, replaced}}` |
//! | `GET /control/user?user=U` | answers `{token_requests: {grant: n}, logins, live_refresh_tokens, consent_revoked, revocations, fdx_requests}`, 404 for a user never seen |
//!
//! Control answers are `200 {"ok":true}`, or `400 {error, error_description}` on bad parameters.
//! Control requests are not token requests: they are neither counted, logged, delayed nor failed.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

#[cfg(doc)]
use super::IssuerOptions;
use super::fault::Fault;
use super::params::{Params, header_string, read_body};
use super::response::{OAuthError, error_response, json_response, post_only};
use super::state::{IssuedToken, MAX_LIFETIME, RecordedRequest, Shared};
use super::users::{Retired, valid_user};

/// A cloneable handle on a dev issuer's failure switches and observations. Every method takes
/// effect immediately, for all connections.
#[derive(Clone)]
pub struct IssuerControl {
    pub(super) shared: Arc<Shared>,
}

impl fmt::Debug for IssuerControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerControl").finish_non_exhaustive()
    }
}

impl IssuerControl {
    /// The next `count` token requests get `fault` instead of their real answer, whatever they
    /// contain. Faults queue in order: `fail_next(2, ServerError)` then
    /// `fail_next(1, Malformed)` fails two requests with 500, then one with HTML.
    pub fn fail_next(&self, count: u32, fault: Fault) {
        if count > 0 {
            self.shared.lock().faults.push_back((fault, count));
        }
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Waits this long before answering every token request (a slow endpoint);
    /// [`Duration::ZERO`] turns it off.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Access tokens issued from now on live this long (clamped to one year).
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.shared.lock().lifetime = lifetime.min(MAX_LIFETIME);
    }

    /// Makes `secret` the only valid secret of `client_id` (adding the client if new): a secret
    /// rotation, after which the old secret gets `invalid_client`.
    pub fn set_client_secret(&self, client_id: &str, secret: &str) {
        self.shared
            .lock()
            .clients
            .insert(client_id.to_owned(), secret.to_owned());
    }

    /// Token endpoint requests received so far (any method, including refused and failed ones).
    pub fn request_count(&self) -> u64 {
        self.shared.lock().request_count
    }

    /// Token endpoint requests received so far whose body named this `grant_type`
    /// (e.g. `GrantType::RefreshToken.as_str()`; unknown grant names are counted too).
    pub fn request_count_for(&self, grant_type: &str) -> u64 {
        self.shared
            .lock()
            .by_grant
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// The request log, oldest first: the last 10 000 token endpoint and revoke endpoint
    /// requests (revoke requests are `DELETE /api/v1/revoke`, not counted by
    /// [`IssuerControl::request_count`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// Access tokens handed out, oldest first (the last 10 000).
    pub fn issued_tokens(&self) -> Vec<IssuedToken> {
        self.shared.lock().issued.iter().cloned().collect()
    }

    /// How many access tokens were handed out in all.
    pub fn issued_count(&self) -> u64 {
        self.shared.lock().issued_count
    }

    /// Whether `token` was issued by this issuer and has not expired.
    pub fn is_valid_token(&self, token: &str) -> bool {
        self.is_valid_token_at(token, SystemTime::now())
    }

    /// Whether `token` was issued by this issuer and is still valid at `now`. With
    /// [`IssuerOptions::fixed_token`] the latest expiry of that token counts.
    pub fn is_valid_token_at(&self, token: &str, now: SystemTime) -> bool {
        self.shared
            .lock()
            .valid
            .get(token)
            .is_some_and(|expires_at| now < *expires_at)
    }
}

/// The control API (see the module documentation for the table of commands).
pub(super) async fn control_endpoint(
    shared: &Shared,
    command: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if command == "stats" && (parts.method == Method::GET || parts.method == Method::POST) {
        let inner = shared.lock();
        let pending: u64 = inner.faults.iter().map(|(_, n)| u64::from(*n)).sum();
        let retired: serde_json::Map<String, serde_json::Value> = Retired::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), inner.users.retired_uses(*r).into()))
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "token_requests": inner.request_count,
                "by_grant": inner.by_grant,
                "issued_tokens": inner.issued_count,
                "pending_faults": pending,
                "retired_refresh_token_uses": retired,
            }),
        );
    }
    if command == "user" && parts.method == Method::GET {
        let params = Params::from_form(parts.uri.query().unwrap_or("").as_bytes());
        let Ok(user) = required(&params, "user") else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "user missing or repeated",
            );
        };
        let Some(s) = shared.lock().users.stats(user) else {
            return error_response(StatusCode::NOT_FOUND, "invalid_request", "unknown user");
        };
        return json_response(
            StatusCode::OK,
            &json!({
                "token_requests": s.token_requests,
                "logins": s.logins,
                "live_refresh_tokens": s.live_refresh_tokens,
                "consent_revoked": s.consent_revoked,
                "revocations": s.revocations,
                "fdx_requests": s.fdx_requests,
            }),
        );
    }
    if parts.method != Method::POST {
        return post_only("control commands take POST");
    }
    let body = match read_body(body, &parts.headers).await {
        Ok(body) => body,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read or is too large",
            );
        }
    };
    let content_type = header_string(&parts.headers, CONTENT_TYPE);
    let mut params = match Params::parse(content_type.as_deref(), &body) {
        Ok(params) => params,
        Err(e) => return OAuthError::from(e).into_response(),
    };
    if let Some(query) = parts.uri.query() {
        params.0.extend(Params::from_form(query.as_bytes()).0);
    }
    match apply_control(shared, command, &params) {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ok": true })),
        Err(ControlError::UnknownCommand) => error_response(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "unknown control command",
        ),
        Err(ControlError::BadParameter(description)) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "invalid_request", "error_description": description }),
        ),
    }
}

/// Why a control command was refused.
enum ControlError {
    /// No such command: 404.
    UnknownCommand,
    /// A missing or unusable parameter, described: 400.
    BadParameter(String),
}

/// Carries out one control command.
fn apply_control(shared: &Shared, command: &str, params: &Params) -> Result<(), ControlError> {
    let mut inner = shared.lock();
    match command {
        "fail" => {
            let count: u32 = number(params, "count", Some(1))?;
            let fault = match required(params, "kind")? {
                "server_error" => Fault::ServerError,
                "unavailable" | "temporarily_unavailable" => Fault::Unavailable,
                "rate_limited" => Fault::RateLimited {
                    retry_after_secs: number(params, "retry_after", Some(1))?,
                },
                "oauth_error" => {
                    let code = param(params, "error")?.unwrap_or("invalid_grant");
                    if code.is_empty() {
                        return Err(ControlError::BadParameter("error is empty".into()));
                    }
                    Fault::OAuthError(code.to_owned())
                }
                "malformed" => Fault::Malformed,
                other => {
                    return Err(ControlError::BadParameter(format!(
                        "unknown kind {other:?}: use server_error, unavailable, rate_limited, \
                         oauth_error or malformed"
                    )));
                }
            };
            if count > 0 {
                inner.faults.push_back((fault, count));
            }
        }
        "clear_faults" => inner.faults.clear(),
        "delay" => inner.delay = Duration::from_millis(number(params, "ms", None)?),
        "lifetime" => {
            inner.lifetime = Duration::from_secs(number(params, "secs", None)?).min(MAX_LIFETIME);
        }
        "client_secret" => {
            let id = required(params, "client_id")?.to_owned();
            let secret = required(params, "client_secret")?.to_owned();
            inner.clients.insert(id, secret);
        }
        "codes" => {
            let replace = flag(params, "replace")?;
            inner
                .users
                .add_codes(params.all("code").map(str::to_owned), replace);
        }
        "refresh_tokens" => {
            let replace = flag(params, "replace")?;
            inner
                .users
                .add_refresh_tokens(params.all("refresh_token").map(str::to_owned), replace);
        }
        "rotate" => {
            if param(params, "enabled")?.is_none() {
                return Err(ControlError::BadParameter("enabled missing".into()));
            }
            inner.rotate_refresh_tokens = flag(params, "enabled")?;
        }
        "code_lifetime" => {
            inner
                .users
                .set_code_lifetime(Duration::from_secs(number(params, "secs", None)?));
        }
        "revoke_consent" => {
            let user = required(params, "user")?;
            if !valid_user(user) {
                return Err(ControlError::BadParameter(
                    "user must be 1 to 128 visible ASCII characters".into(),
                ));
            }
            inner.users.revoke(user);
        }
        _ => return Err(ControlError::UnknownCommand),
    }
    Ok(())
}

/// A parameter that may be absent but not repeated.
fn param<'a>(params: &'a Params, name: &'static str) -> Result<Option<&'a str>, ControlError> {
    params
        .one(name)
        .map_err(|_| ControlError::BadParameter(format!("{name} is repeated")))
}

/// A parameter that must be present once.
fn required<'a>(params: &'a Params, name: &'static str) -> Result<&'a str, ControlError> {
    param(params, name)?.ok_or_else(|| ControlError::BadParameter(format!("{name} missing")))
}

/// A numeric parameter, or `default` when absent (absent with no default is an error).
fn number<T: FromStr>(
    params: &Params,
    name: &'static str,
    default: Option<T>,
) -> Result<T, ControlError> {
    match (param(params, name)?, default) {
        (Some(text), _) => text.trim().parse().map_err(|_| {
            ControlError::BadParameter(format!("{name} is not a non-negative integer"))
        }),
        (None, Some(default)) => Ok(default),
        (None, None) => Err(ControlError::BadParameter(format!("{name} missing"))),
    }
}

/// A boolean parameter (`true`/`1`, `false`/`0`); absent is false.
fn flag(params: &Params, name: &'static str) -> Result<bool, ControlError> {
    match param(params, name)? {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(_) => Err(ControlError::BadParameter(format!(
            "{name} must be true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use http::header::{AUTHORIZATION, RETRY_AFTER};
    use serde_json::Value;

    use super::super::harness::{
        basic_header, cc_json, client, error_of, json_of, post_form, post_json, start,
    };
    use super::super::{IssuerOptions, TOKEN_PATH};
    use super::*;
    use crate::secret::Secret;

    #[tokio::test]
    async fn secret_rotation_through_the_handle() {
        let issuer = start(IssuerOptions::default()).await;
        issuer
            .control
            .set_client_secret("demo-client", "new-secret");
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );
        let mut rotated = cc_json();
        rotated["client_secret"] = "new-secret".into();
        assert_eq!(
            post_json(&issuer.url, &rotated).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn request_log_records_what_was_sent_but_never_prints_secrets() {
        let issuer = start(IssuerOptions::default()).await;
        let response = client()
            .post(&issuer.url)
            .header(AUTHORIZATION, basic_header("demo-client", "demo-secret"))
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body("grant_type=refresh_token&refresh_token=demo-refresh-token&scope=a+b")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let log = issuer.control.requests();
        assert_eq!(log.len(), 1);
        let r = &log[0];
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, TOKEN_PATH);
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        assert!(r.has_authorization);
        assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(r.client_id.as_deref(), Some("demo-client"));
        assert_eq!(
            r.refresh_token.as_ref().map(Secret::expose),
            Some("demo-refresh-token")
        );
        assert_eq!(r.scope.as_deref(), Some("a b"));
        assert!(r.code.is_none());
        let printed = format!("{log:?} {:?}", issuer.control.issued_tokens());
        assert!(!printed.contains("demo-refresh-token"), "{printed}");
        let token = issuer.control.issued_tokens()[0]
            .access_token
            .expose()
            .to_owned();
        assert!(!printed.contains(&token));
        let opts = format!("{:?}", IssuerOptions::default());
        assert!(
            !opts.contains("demo-secret") && !opts.contains("demo-code"),
            "{opts}"
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn server_errors_for_n_requests_then_recovery() {
        let issuer = start(IssuerOptions::default()).await;
        issuer.control.fail_next(2, Fault::ServerError);
        issuer.control.fail_next(1, Fault::Unavailable);
        for _ in 0..2 {
            assert_eq!(
                error_of(post_json(&issuer.url, &cc_json()).await).await,
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error".into())
            );
        }
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable".into()
            )
        );
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        assert_eq!(issuer.control.issued_count(), 1);
        assert_eq!(issuer.control.request_count_for("client_credentials"), 4);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn rate_limit_oauth_error_and_malformed_faults() {
        let issuer = start(IssuerOptions::default()).await;
        issuer.control.fail_next(
            1,
            Fault::RateLimited {
                retry_after_secs: 7,
            },
        );
        issuer
            .control
            .fail_next(1, Fault::OAuthError("invalid_grant".into()));
        issuer.control.fail_next(1, Fault::Malformed);
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let text = response.text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
        // Queued faults can be dropped.
        issuer.control.fail_next(5, Fault::ServerError);
        issuer.control.clear_faults();
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn delay_slows_every_token_answer() {
        let issuer = start(IssuerOptions::default()).await;
        // Long enough to tell apart from a loopback round trip, short enough for a unit test.
        let delay = Duration::from_millis(300);
        issuer.control.set_delay(delay);
        let started = tokio::time::Instant::now();
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        assert!(started.elapsed() >= delay);
        // A client that gives up sooner sees a timeout.
        let err = client()
            .post(&issuer.url)
            .json(&cc_json())
            .timeout(Duration::from_millis(50))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        issuer.control.set_delay(Duration::ZERO);
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn token_validity_follows_expiry() {
        let issuer = start(IssuerOptions {
            lifetime: Duration::from_secs(1),
            ..IssuerOptions::default()
        })
        .await;
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 1);
        let token = body["access_token"].as_str().unwrap();
        let control = &issuer.control;
        assert!(control.is_valid_token(token));
        assert!(!control.is_valid_token("not-a-token"));
        let expires_at = control.issued_tokens()[0].expires_at;
        assert!(control.is_valid_token_at(token, expires_at - Duration::from_millis(1)));
        assert!(!control.is_valid_token_at(token, expires_at));
        assert!(!control.is_valid_token_at(token, SystemTime::now() + Duration::from_secs(2)));

        // A zero lifetime issues tokens that are expired on arrival.
        control.set_lifetime(Duration::ZERO);
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 0);
        assert!(!control.is_valid_token(body["access_token"].as_str().unwrap()));
        issuer.stop().await;
    }

    #[tokio::test]
    async fn control_api_over_http() {
        let issuer = start(IssuerOptions::default()).await;
        let control = |cmd: &str| format!("{}/control/{cmd}", issuer.base);
        let ok = |response: reqwest::Response| async move {
            let (status, body) = json_of(response).await;
            assert_eq!((status, &body), (StatusCode::OK, &json!({ "ok": true })));
        };

        // fail, by query string and by JSON body.
        ok(client()
            .post(control("fail") + "?kind=rate_limited&retry_after=3")
            .send()
            .await
            .unwrap())
        .await;
        ok(post_json(
            &control("fail"),
            &json!({ "kind": "server_error", "count": 2 }),
        )
        .await)
        .await;
        let stats = json_of(client().get(control("stats")).send().await.unwrap())
            .await
            .1;
        assert_eq!(stats["pending_faults"], 3);
        let response = post_json(&issuer.url, &cc_json()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
        for _ in 0..2 {
            assert_eq!(
                post_json(&issuer.url, &cc_json()).await.status(),
                StatusCode::INTERNAL_SERVER_ERROR
            );
        }
        ok(post_form(
            &control("fail"),
            &[("kind", "oauth_error"), ("error", "access_denied")],
        )
        .await)
        .await;
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "access_denied".into())
        );
        ok(post_form(&control("fail"), &[("kind", "malformed"), ("count", "4")]).await).await;
        ok(client().post(control("clear_faults")).send().await.unwrap()).await;

        // lifetime
        ok(post_form(&control("lifetime"), &[("secs", "42")]).await).await;
        let body = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        assert_eq!(body["expires_in"], 42);

        // delay on and off
        ok(post_form(&control("delay"), &[("ms", "0")]).await).await;

        // client secret rotation
        ok(post_json(
            &control("client_secret"),
            &json!({ "client_id": "demo-client", "client_secret": "rotated" }),
        )
        .await)
        .await;
        assert_eq!(
            error_of(post_json(&issuer.url, &cc_json()).await).await,
            (StatusCode::BAD_REQUEST, "invalid_client".into())
        );

        // codes and refresh tokens, added and replaced
        ok(post_json(&control("codes"), &json!({ "code": ["c1", "c2"] })).await).await;
        ok(post_json(&control("codes"), &json!({ "code": "c3", "replace": true })).await).await;
        let exchange = |code: &str| json!({ "grant_type": "authorization_code", "client_id": "demo-client", "code": code });
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange("c1")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(
            post_json(&issuer.url, &exchange("c3")).await.status(),
            StatusCode::OK
        );
        ok(post_form(
            &control("refresh_tokens"),
            &[("refresh_token", "r1"), ("replace", "true")],
        )
        .await)
        .await;
        let refresh = |rt: &str| json!({ "grant_type": "refresh_token", "client_id": "demo-client", "refresh_token": rt });
        assert_eq!(
            error_of(post_json(&issuer.url, &refresh("demo-refresh-token")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(
            post_json(&issuer.url, &refresh("r1")).await.status(),
            StatusCode::OK
        );

        // Bad commands and parameters.
        let response = post_form(&control("fail"), &[("kind", "explode")]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = post_form(&control("lifetime"), &[("secs", "-1")]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = client().post(control("nope")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        let stats = json_of(client().get(control("stats")).send().await.unwrap())
            .await
            .1;
        assert_eq!(stats["token_requests"], issuer.control.request_count());
        assert_eq!(stats["issued_tokens"], issuer.control.issued_count());
        assert_eq!(stats["by_grant"]["refresh_token"], 2);
        assert_eq!(stats["pending_faults"], 0);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn end_user_switches_over_http() {
        let issuer = start(IssuerOptions::default()).await;
        let control = |cmd: &str| format!("{}/control/{cmd}", issuer.base);
        let refresh = |rt: &str| json!({ "grant_type": "refresh_token", "client_id": "demo-client", "refresh_token": rt });
        // Rotation on: the configured token is superseded, and presenting it again is counted.
        let response = post_form(&control("rotate"), &[("enabled", "true")]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = json_of(post_json(&issuer.url, &refresh("demo-refresh-token")).await)
            .await
            .1;
        let rotated = body["refresh_token"].as_str().unwrap().to_owned();
        assert_eq!(
            error_of(post_json(&issuer.url, &refresh("demo-refresh-token")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(issuer.control.superseded_refresh_token_uses(), 1);
        let stats = json_of(client().get(control("stats")).send().await.unwrap())
            .await
            .1;
        assert_eq!(
            stats["retired_refresh_token_uses"],
            json!({ "rotated": 1, "relogin": 0, "revoked": 0, "replaced": 0 })
        );
        // Rotation off again: the same refresh token keeps working.
        post_form(&control("rotate"), &[("enabled", "false")]).await;
        for _ in 0..2 {
            let body = json_of(post_json(&issuer.url, &refresh(&rotated)).await)
                .await
                .1;
            assert!(body.get("refresh_token").is_none(), "{body}");
        }
        // Revoking the default user's consent ends its refresh token.
        let response = post_form(&control("revoke_consent"), &[("user", "dev-user-0001")]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            error_of(post_json(&issuer.url, &refresh(&rotated)).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let user = json_of(
            client()
                .get(control("user") + "?user=dev-user-0001")
                .send()
                .await
                .unwrap(),
        )
        .await
        .1;
        assert_eq!(user["consent_revoked"], true);
        assert_eq!(user["revocations"], 1);
        assert_eq!(user["live_refresh_tokens"], 0);
        assert_eq!(user["token_requests"]["refresh_token"], 5);
        // Codes expired on arrival.
        post_form(&control("code_lifetime"), &[("secs", "0")]).await;
        let code = issuer.control.code_for("u");
        let exchange = json!({ "grant_type": "authorization_code", "client_id": "demo-client", "code": code.expose() });
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        // Bad parameters and unknown users.
        for (cmd, params) in [
            ("rotate", &[][..]),
            ("rotate", &[("enabled", "maybe")][..]),
            ("revoke_consent", &[][..]),
            ("revoke_consent", &[("user", "a b")][..]),
            ("code_lifetime", &[("secs", "x")][..]),
        ] {
            let response = post_form(&control(cmd), params).await;
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{cmd} {params:?}"
            );
        }
        let response = client()
            .get(control("user") + "?user=nobody")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = client().get(control("user")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn control_api_can_be_turned_off() {
        let issuer = start(IssuerOptions {
            control_api: false,
            ..IssuerOptions::default()
        })
        .await;
        let response = post_form(
            &format!("{}/control/fail", issuer.base),
            &[("kind", "server_error")],
        )
        .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            post_json(&issuer.url, &cc_json()).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }
}
