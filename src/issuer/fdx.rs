//! A stand-in for Flinks' FDX data endpoints (`/api/fdx/...`): any method on any path under
//! `/api/fdx/` checks the bearer access token it receives and says whose it is, so tests and
//! the demo can route a per-subject route at the issuer itself and see whose token arrived.
//!
//! - A known, unexpired access token of a user whose consent stands: `200` JSON
//!   `{"user", "path", "method"}` (`user` is the token's `sub`).
//! - The same, but the user's consent was revoked since the token was minted (`DELETE
//!   /api/v1/revoke` or [`IssuerControl::revoke_consent`]): `401` with Flinks' error body
//!   `{"code": 602, "message", "debugMessage"}`; refreshing cannot fix it, only a new login.
//! - No bearer token, an unknown or an expired one: `401` with `{"code": 401, "message",
//!   "debugMessage"}` and `WWW-Authenticate: Bearer error="invalid_token"`. Flinks documents no
//!   code for this case; 401 was chosen because it is not 602 (a client must refresh, not give
//!   up).
//!
//! Every error carries `ob-correlation-id` and `ob-trace-id` headers (random), as Flinks'
//! do. FDX requests are counted per user ([`UserStats::fdx_requests`]) but are not token
//! requests: not logged, delayed or failed by injected faults.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderName, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use super::params::bearer;
use super::response::json_response;
use super::state::Shared;
use super::users::Access;
#[cfg(doc)]
use super::{IssuerControl, UserStats};

/// Flinks' error code for a consent that was revoked or expired.
pub(super) const CONSENT_REVOKED: u16 = 602;
/// Random bytes in a correlation or trace id (128 bits, as a UUID).
const ID_BYTES: usize = 16;

/// Any request under `/api/fdx/`.
pub(super) fn fdx_endpoint(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let access = bearer(req.headers()).map_or(Access::Invalid, |token| {
        shared.lock().users.access(token, SystemTime::now())
    });
    let path = req.uri().path();
    match access {
        Access::Granted(user) => {
            shared.lock().users.count_fdx(&user);
            tracing::debug!(user, path, "dev issuer: FDX request");
            json_response(
                StatusCode::OK,
                &json!({ "user": user, "path": path, "method": req.method().as_str() }),
            )
        }
        Access::ConsentRevoked(user) => {
            shared.lock().users.count_fdx(&user);
            tracing::debug!(user, path, "dev issuer: FDX request, consent revoked");
            flinks_error(
                CONSENT_REVOKED,
                "Customer not authorized",
                "the user's consent was revoked or expired; the user must consent again",
            )
        }
        Access::Invalid => {
            tracing::debug!(path, "dev issuer: FDX request without a valid token");
            let mut response = flinks_error(
                401,
                "Unauthorized",
                "the access token is missing, unknown or expired",
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            response
        }
    }
}

/// A 401 with Flinks' error body and its correlation headers.
fn flinks_error(code: u16, message: &str, debug_message: &str) -> Response<Full<Bytes>> {
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({ "code": code, "message": message, "debugMessage": debug_message }),
    );
    for name in ["ob-correlation-id", "ob-trace-id"] {
        let mut id = [0u8; ID_BYTES];
        rand::fill(&mut id);
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        #[allow(clippy::expect_used)]
        let value = HeaderValue::from_str(&hex)
            .expect("a valid header value because hex digits are visible ASCII");
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::IssuerOptions;
    use super::super::harness::{cc_json, client, json_of, post_json, start};
    use super::*;

    async fn token_for(url: &str, control: &super::super::IssuerControl, user: &str) -> String {
        let code = control.code_for(user);
        let body = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": code.expose(),
        });
        let (status, body) = json_of(post_json(url, &body).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn names_the_user_then_602_after_revocation_and_401_for_bad_tokens() {
        let issuer = start(IssuerOptions::default()).await;
        let fdx = format!("{}/api/fdx/5/accounts/7/transactions?offset=2", issuer.base);
        let alice = token_for(&issuer.url, &issuer.control, "alice").await;
        let bob = token_for(&issuer.url, &issuer.control, "bob").await;
        for (token, user) in [(&alice, "alice"), (&bob, "bob")] {
            let (status, body) =
                json_of(client().get(&fdx).bearer_auth(token).send().await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                body,
                json!({ "user": user, "path": "/api/fdx/5/accounts/7/transactions", "method": "GET" })
            );
        }
        // A client-credentials token is the default user's.
        let cc = json_of(post_json(&issuer.url, &cc_json()).await).await.1;
        let response = client()
            .post(format!("{}/api/fdx/x", issuer.base))
            .bearer_auth(cc["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(
            (status, &body["user"]),
            (StatusCode::OK, &json!("dev-user-0001"))
        );
        assert_eq!(body["method"], "POST");

        issuer.control.revoke_consent("alice");
        let response = client().get(&fdx).bearer_auth(&alice).send().await.unwrap();
        assert!(response.headers().contains_key("ob-correlation-id"));
        assert!(response.headers().contains_key("ob-trace-id"));
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], 602, "{body}");
        assert!(body["message"].is_string() && body["debugMessage"].is_string());
        // Bob is untouched.
        let response = client().get(&fdx).bearer_auth(&bob).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // A new login: the new token works, the old one stays revoked.
        let again = token_for(&issuer.url, &issuer.control, "alice").await;
        let response = client().get(&fdx).bearer_auth(&again).send().await.unwrap();
        assert_eq!(json_of(response).await.1["user"], "alice");
        let response = client().get(&fdx).bearer_auth(&alice).send().await.unwrap();
        assert_eq!(json_of(response).await.1["code"], 602);

        for request in [
            client().get(&fdx),
            client().get(&fdx).bearer_auth("unknown"),
            client()
                .get(&fdx)
                .header("authorization", format!("Basic {alice}")),
        ] {
            let response = request.send().await.unwrap();
            assert_eq!(
                response.headers()[WWW_AUTHENTICATE],
                "Bearer error=\"invalid_token\""
            );
            let (status, body): (StatusCode, Value) = json_of(response).await;
            assert_eq!(
                (status, &body["code"]),
                (StatusCode::UNAUTHORIZED, &json!(401))
            );
        }
        let stats = issuer.control.user_stats("alice").unwrap();
        assert_eq!(stats.fdx_requests, 4);
        assert_eq!(issuer.control.user_stats("bob").unwrap().fdx_requests, 2);
        issuer.stop().await;
    }

    #[tokio::test]
    async fn an_expired_token_is_401_not_602() {
        let issuer = start(IssuerOptions {
            lifetime: std::time::Duration::ZERO,
            ..IssuerOptions::default()
        })
        .await;
        let token = token_for(&issuer.url, &issuer.control, "dave").await;
        issuer.control.revoke_consent("dave");
        let response = client()
            .get(format!("{}/api/fdx/5/accounts", issuer.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(
            (status, &body["code"]),
            (StatusCode::UNAUTHORIZED, &json!(401))
        );
        issuer.stop().await;
    }
}
