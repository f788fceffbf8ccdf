//! `GET /api/v1/authorize`: Flinks' consent step for a Data Recipient's end user, without the
//! bank's pages. The user "consents" at once and the answer is the redirect the browser would
//! get: `302` to `redirect_uri?code=<fresh one-time code>&state=<as sent>`.
//!
//! Query parameters: `client_id` (a known client) and `redirect_uri` (an absolute URL; exactly
//! [`IssuerOptions::redirect_uri`] when that is set) are required; without them, or with an
//! unusable one, the answer is `400 {error, error_description}` and no redirect (RFC 6749
//! §4.1.2.1: never redirect to an unchecked URI). `state` is echoed when sent. `response_type`,
//! when sent, must be `code`, else the redirect carries `error=unsupported_response_type`.
//! Flinks' other parameters (`scope`, `provider_id`, `correlation_id`, language) are accepted
//! and ignored. Two dev-only parameters: `user` names the end user the code is for (1–128
//! visible ASCII characters; without it a fresh `dev-user-<hex>` id), and `deny=true` makes the
//! user refuse, redirecting with `error=access_denied` as Flinks does.
//!
//! The code is bound to the user, the client and the `redirect_uri`, works once and expires
//! after [`IssuerOptions::code_lifetime`]. Authorize requests are not token requests: they are
//! not counted, logged, delayed or failed by injected faults. The code never reaches a log line.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use url::Url;

#[cfg(doc)]
use super::IssuerOptions;
use super::params::{ParamError, Params};
use super::response::error_response;
use super::state::Shared;
use super::users::valid_user;

/// `GET /api/v1/authorize`.
pub(super) fn authorize_endpoint(
    shared: &Shared,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the authorize endpoint takes GET",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let params = Params::from_form(req.uri().query().unwrap_or("").as_bytes());
    match authorize(shared, &params) {
        Ok(location) => redirect(&location),
        Err(Refusal(description)) => {
            error_response(StatusCode::BAD_REQUEST, "invalid_request", description)
        }
    }
}

/// Why no redirect can be sent: answered 400 `invalid_request`.
struct Refusal(&'static str);

impl From<ParamError> for Refusal {
    fn from(e: ParamError) -> Self {
        Self(e.0)
    }
}

/// Checks the request and returns where to redirect the browser.
fn authorize(shared: &Shared, params: &Params) -> Result<Url, Refusal> {
    let client_id = params
        .one("client_id")?
        .ok_or(Refusal("client_id missing"))?;
    let redirect_uri = params
        .one("redirect_uri")?
        .ok_or(Refusal("redirect_uri missing"))?;
    let state = params.one("state")?;
    let user = params.one("user")?;
    if user.is_some_and(|u| !valid_user(u)) {
        return Err(Refusal("user must be 1 to 128 visible ASCII characters"));
    }
    let denied = match params.one("deny")? {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => return Err(Refusal("deny must be true or false")),
    };
    let mut location =
        Url::parse(redirect_uri).map_err(|_| Refusal("redirect_uri is not an absolute URL"))?;
    let mut inner = shared.lock();
    if !inner.clients.contains_key(client_id) {
        return Err(Refusal("unknown client_id"));
    }
    if inner
        .redirect_uri
        .as_deref()
        .is_some_and(|expected| expected != redirect_uri)
    {
        return Err(Refusal("redirect_uri is not the registered one"));
    }
    let error = if params.one("response_type")?.is_some_and(|t| t != "code") {
        Some(("unsupported_response_type", "response_type must be code"))
    } else if denied {
        Some(("access_denied", "the user denied the consent"))
    } else {
        None
    };
    {
        let mut query = location.query_pairs_mut();
        match error {
            Some((code, description)) => {
                query
                    .append_pair("error", code)
                    .append_pair("error_description", description);
                tracing::debug!(client_id, error = code, "dev issuer: authorize refused");
            }
            None => {
                let (user, code) = inner.users.authorize(
                    user,
                    Some(client_id),
                    Some(redirect_uri),
                    Instant::now(),
                );
                query.append_pair("code", &code);
                tracing::debug!(client_id, user, "dev issuer: authorize");
            }
        }
        if let Some(state) = state {
            query.append_pair("state", state);
        }
    }
    Ok(location)
}

/// `302 Found` to `location`, never cached (it carries a code).
fn redirect(location: &Url) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    #[allow(clippy::expect_used)]
    let value = HeaderValue::from_str(location.as_str())
        .expect("a valid header value because a Url serialises to visible ASCII only");
    let headers = response.headers_mut();
    headers.insert(LOCATION, value);
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use serde_json::json;

    use super::super::IssuerOptions;
    use super::super::harness::{claims_of, client, error_of, json_of, post_json, start};
    use super::*;

    /// A client that does not follow redirects, so the test sees the 302.
    fn no_redirects() -> reqwest::Client {
        let _ = client();
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// The query parameters of the `Location` of a 302.
    async fn redirected(response: reqwest::Response) -> (String, HashMap<String, String>) {
        assert_eq!(response.status(), StatusCode::FOUND);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let location = Url::parse(response.headers()[LOCATION].to_str().unwrap()).unwrap();
        let base = format!(
            "{}{}",
            location.origin().ascii_serialization(),
            location.path()
        );
        (base, location.query_pairs().into_owned().collect())
    }

    #[tokio::test]
    async fn redirects_with_a_code_for_the_user_that_buys_that_users_token() {
        let issuer = start(IssuerOptions::default()).await;
        let authorize = format!("{}/api/v1/authorize", issuer.base);
        let response = no_redirects()
            .get(&authorize)
            .query(&[
                ("client_id", "demo-client"),
                ("redirect_uri", "https://app.example/cb?keep=1"),
                ("state", "s t&ate"),
                ("response_type", "code"),
                ("scope", "ACCOUNT_BASIC"),
                ("provider_id", "1000"),
                ("user", "customer-7"),
            ])
            .send()
            .await
            .unwrap();
        let (base, query) = redirected(response).await;
        assert_eq!(base, "https://app.example/cb");
        assert_eq!(query["keep"], "1");
        assert_eq!(query["state"], "s t&ate");
        let code = query["code"].clone();
        let exchange = |redirect_uri: &str| {
            json!({
                "grant_type": "authorization_code",
                "client_id": "demo-client",
                "client_secret": "demo-secret",
                "code": code,
                "redirect_uri": redirect_uri,
            })
        };
        // The exchange must name the same redirect URI.
        assert_eq!(
            error_of(post_json(&issuer.url, &exchange("https://app.example/cb")).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        let (status, body) =
            json_of(post_json(&issuer.url, &exchange("https://app.example/cb?keep=1")).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            claims_of(body["access_token"].as_str().unwrap())["sub"],
            "customer-7"
        );
        assert!(body["refresh_token"].is_string());
        let log = issuer.control.requests();
        assert!(log.iter().all(|r| r.user.as_deref() == Some("customer-7")));
        assert_eq!(
            issuer
                .control
                .user_request_count("customer-7", "authorization_code"),
            2
        );
        assert_eq!(issuer.control.user_stats("customer-7").unwrap().logins, 1);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn without_a_user_each_code_is_a_new_user() {
        let issuer = start(IssuerOptions::default()).await;
        let mut users = Vec::new();
        for _ in 0..2 {
            let response = no_redirects()
                .get(format!(
                    "{}/api/v1/authorize?client_id=demo-client&redirect_uri=http://127.0.0.1:1/cb",
                    issuer.base
                ))
                .send()
                .await
                .unwrap();
            let (_, query) = redirected(response).await;
            assert!(!query.contains_key("state"));
            let body = json!({
                "grant_type": "authorization_code",
                "client_id": "demo-client",
                "code": query["code"],
                "redirect_uri": "http://127.0.0.1:1/cb",
            });
            let (status, body) = json_of(post_json(&issuer.url, &body).await).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            users.push(claims_of(body["access_token"].as_str().unwrap())["sub"].clone());
        }
        assert_ne!(users[0], users[1]);
        assert!(users[0].as_str().unwrap().starts_with("dev-user-"));
        issuer.stop().await;
    }

    #[tokio::test]
    async fn refusals_without_redirect_and_errors_with_one() {
        let issuer = start(IssuerOptions {
            redirect_uri: Some("https://app.example/cb".into()),
            ..IssuerOptions::default()
        })
        .await;
        let get = |query: &'static str| {
            let url = format!("{}/api/v1/authorize?{query}", issuer.base);
            async move { no_redirects().get(url).send().await.unwrap() }
        };
        for query in [
            "redirect_uri=https://app.example/cb",
            "client_id=demo-client",
            "client_id=stranger&redirect_uri=https://app.example/cb",
            "client_id=demo-client&redirect_uri=https://evil.example/cb",
            "client_id=demo-client&redirect_uri=/cb",
            "client_id=demo-client&client_id=x&redirect_uri=https://app.example/cb",
            "client_id=demo-client&redirect_uri=https://app.example/cb&user=a%20b",
            "client_id=demo-client&redirect_uri=https://app.example/cb&deny=maybe",
        ] {
            let response = get(query).await;
            assert!(!response.headers().contains_key(LOCATION), "{query}");
            assert_eq!(
                error_of(response).await,
                (StatusCode::BAD_REQUEST, "invalid_request".into()),
                "{query}"
            );
        }
        let (_, query) = redirected(
            get("client_id=demo-client&redirect_uri=https://app.example/cb&deny=true&state=x")
                .await,
        )
        .await;
        assert_eq!(query["error"], "access_denied");
        assert_eq!(query["state"], "x");
        assert!(!query.contains_key("code"));
        let (_, query) = redirected(
            get("client_id=demo-client&redirect_uri=https://app.example/cb&response_type=token")
                .await,
        )
        .await;
        assert_eq!(query["error"], "unsupported_response_type");
        let response = client()
            .post(format!("{}/api/v1/authorize", issuer.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET");
        // Not token requests.
        assert_eq!(issuer.control.request_count(), 0);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn an_expired_code_is_refused() {
        let issuer = start(IssuerOptions {
            code_lifetime: Duration::ZERO,
            ..IssuerOptions::default()
        })
        .await;
        let code = issuer.control.code_for("late");
        let body = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": code.expose(),
        });
        assert_eq!(
            error_of(post_json(&issuer.url, &body).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        issuer.control.set_code_lifetime(Duration::from_secs(60));
        let code = issuer.control.code_for("late");
        let body = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": code.expose(),
        });
        assert_eq!(post_json(&issuer.url, &body).await.status(), StatusCode::OK);
        issuer.stop().await;
    }
}
