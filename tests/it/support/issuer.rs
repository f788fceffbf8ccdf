//! The dev issuer's end-user flows for tests (issue #12): its URLs, a code for a user in one
//! call (in-process or over the authorize redirect), a login (code exchange) and the FDX-like
//! resource, every code and token registered with the leak guard on the way.

use std::collections::HashMap;

use bearer_proxy::issuer::{IssuerControl, IssuerOptions};
use http::StatusCode;
use serde_json::{Value, json};

use super::{PATIENCE, issuer, never_log};

/// A dev issuer serving end users, with its URLs.
pub struct UsersIssuer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// `POST /api/v1/token`.
    pub token_url: String,
    /// `GET /api/v1/authorize`.
    pub authorize_url: String,
    /// `DELETE /api/v1/revoke`.
    pub revoke_url: String,
    /// The issuer's switches and observations.
    pub control: IssuerControl,
}

/// What a login (code exchange) bought.
pub struct Login {
    pub access_token: String,
    pub refresh_token: String,
    /// The JSON answer, whole.
    pub body: Value,
}

/// Starts a dev issuer on 127.0.0.1:0 (secrets registered, as [`issuer`] does).
pub async fn users_issuer(opts: IssuerOptions) -> UsersIssuer {
    let (token_url, control) = issuer(opts).await;
    let base = token_url
        .strip_suffix("/api/v1/token")
        .expect("the token URL ends in the token path because DevIssuer::token_url says so")
        .to_owned();
    UsersIssuer {
        authorize_url: format!("{base}/api/v1/authorize"),
        revoke_url: format!("{base}/api/v1/revoke"),
        base,
        token_url,
        control,
    }
}

/// A plain-HTTP client for the issuer: no proxy, no redirects followed, bounded waits.
pub fn issuer_client() -> reqwest::Client {
    // reqwest is built without a default crypto provider; a second install fails harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

impl UsersIssuer {
    /// A fresh one-time code for `user`, in-process (registered with the leak guard).
    pub fn code_for(&self, user: &str) -> String {
        let code = self.control.code_for(user).expose().to_owned();
        never_log(&code);
        code
    }

    /// `<base>/api/fdx/<path>`.
    pub fn fdx_url(&self, path: &str) -> String {
        format!("{}/api/fdx/{}", self.base, path.trim_start_matches('/'))
    }

    /// The authorize step over HTTP, as a browser would do it: `GET /api/v1/authorize` with
    /// `demo-client`, `redirect_uri`, `state` and `user` (when given). Returns the redirect's
    /// query parameters after checking it is a 302 to `redirect_uri` echoing `state`.
    pub async fn authorize(
        &self,
        redirect_uri: &str,
        user: Option<&str>,
    ) -> HashMap<String, String> {
        let mut query = vec![
            ("client_id", "demo-client"),
            ("redirect_uri", redirect_uri),
            ("state", "opaque-state"),
            ("response_type", "code"),
            ("scope", "ACCOUNT_BASIC"),
        ];
        if let Some(user) = user {
            query.push(("user", user));
        }
        let response = issuer_client()
            .get(&self.authorize_url)
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = response.headers()["location"].to_str().unwrap();
        assert!(location.starts_with(redirect_uri), "{location}");
        let params: HashMap<String, String> = url::Url::parse(location)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        assert_eq!(params["state"], "opaque-state");
        if let Some(code) = params.get("code") {
            never_log(code);
        }
        params
    }

    /// Exchanges `code` (with `redirect_uri` when given) as `demo-client`; the status and the
    /// JSON answer, its tokens registered with the leak guard.
    pub async fn exchange(&self, code: &str, redirect_uri: Option<&str>) -> (StatusCode, Value) {
        let mut body = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "code": code,
        });
        if let Some(uri) = redirect_uri {
            body["redirect_uri"] = uri.into();
        }
        self.token_request(&body).await
    }

    /// The refresh grant as `demo-client`.
    pub async fn refresh(&self, refresh_token: &str) -> (StatusCode, Value) {
        self.token_request(&json!({
            "grant_type": "refresh_token",
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "refresh_token": refresh_token,
        }))
        .await
    }

    /// A fresh code for `user` exchanged at once: a login that must succeed.
    pub async fn login(&self, user: &str) -> Login {
        let code = self.code_for(user);
        let (status, body) = self.exchange(&code, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Login {
            access_token: body["access_token"].as_str().unwrap().to_owned(),
            refresh_token: body["refresh_token"].as_str().unwrap().to_owned(),
            body,
        }
    }

    /// `GET <fdx path>` with `token`: the status and the JSON body.
    pub async fn fdx(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let response = issuer_client()
            .get(self.fdx_url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// `DELETE /api/v1/revoke` with `token`: the status.
    pub async fn revoke(&self, token: &str) -> StatusCode {
        issuer_client()
            .delete(&self.revoke_url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn token_request(&self, body: &Value) -> (StatusCode, Value) {
        let response = issuer_client()
            .post(&self.token_url)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        for field in ["access_token", "refresh_token"] {
            if let Some(value) = body[field].as_str() {
                never_log(value);
            }
        }
        (status, body)
    }
}

/// The `sub` claim of a JWT-shaped access token from the dev issuer.
pub fn sub_of(access_token: &str) -> String {
    use base64::Engine as _;
    let claims = access_token.split('.').nth(1).expect("JWT-shaped");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    claims["sub"].as_str().unwrap().to_owned()
}
