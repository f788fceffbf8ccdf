//! `DELETE /api/v1/revoke`: a Data Recipient ends one end user's connection, Flinks' way, with
//! that user's access token as `Authorization: Bearer <token>`.
//!
//! A known, unexpired access token answers `204` (no body) and revokes its user's consent:
//! every refresh token of theirs gets `invalid_grant` from then on and every access token
//! minted for them so far answers `602` at the FDX endpoint, until the user logs in again
//! (exchanges a new code). A token whose consent is already revoked answers `204` again and
//! changes nothing (revocation is idempotent, as RFC 7009 §2.2 has it). No bearer token, an
//! unknown or an expired one answers `401 {error, error_description}` with a `WWW-Authenticate:
//! Bearer` challenge (RFC 6750 §3). Other methods get `405`.
//!
//! Every revoke request is appended to the request log ([`RecordedRequest`] with method
//! `DELETE`, this path and the `user` when the token was known) but not counted as a token
//! request, and neither delayed nor failed by injected faults.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::params::{bearer, header_string};
use super::response::error_response;
use super::state::{RecordedRequest, Shared};
use super::users::Access;

/// The challenge sent with a 401 when a token was sent but is not accepted (RFC 6750 §3).
const INVALID_TOKEN_CHALLENGE: &str = "Bearer error=\"invalid_token\"";
/// The challenge sent with a 401 when no bearer token was sent (RFC 6750 §3.1: no error code).
const BEARER_CHALLENGE: &str = "Bearer";

/// `DELETE /api/v1/revoke`.
pub(super) fn revoke_endpoint(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::DELETE {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the revoke endpoint takes DELETE",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("DELETE"));
        return response;
    }
    let token = bearer(req.headers());
    let mut inner = shared.lock();
    let access = token.map_or(Access::Invalid, |t| {
        inner.users.access(t, SystemTime::now())
    });
    let user = match &access {
        Access::Granted(user) | Access::ConsentRevoked(user) => Some(user.clone()),
        Access::Invalid => None,
    };
    inner.push_log(RecordedRequest {
        received_at: SystemTime::now(),
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        content_type: header_string(req.headers(), CONTENT_TYPE),
        has_authorization: req.headers().contains_key(AUTHORIZATION),
        grant_type: None,
        client_id: None,
        refresh_token: None,
        code: None,
        redirect_uri: None,
        scope: None,
        user: user.clone(),
    });
    if let Access::Granted(user) = &access {
        inner.users.revoke(user);
    }
    drop(inner);
    tracing::debug!(
        user = user.as_deref().unwrap_or("-"),
        "dev issuer: revoke request"
    );
    match (token, user) {
        (_, Some(_)) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        (None, None) => unauthorized(
            "invalid_request",
            "an Authorization: Bearer header is required",
            BEARER_CHALLENGE,
        ),
        (Some(_), None) => unauthorized(
            "invalid_token",
            "the access token is unknown or expired",
            INVALID_TOKEN_CHALLENGE,
        ),
    }
}

/// 401 with this OAuth error and challenge.
fn unauthorized(code: &str, description: &str, challenge: &'static str) -> Response<Full<Bytes>> {
    let mut response = error_response(StatusCode::UNAUTHORIZED, code, description);
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::harness::{client, error_of, json_of, post_json, start};
    use super::super::{IssuerOptions, Retired};
    use super::*;

    /// Logs `user` in with a fresh code; returns their access and refresh tokens.
    async fn login(
        url: &str,
        control: &super::super::IssuerControl,
        user: &str,
    ) -> (String, String) {
        let code = control.code_for(user);
        let body = json!({
            "grant_type": "authorization_code",
            "client_id": "demo-client",
            "code": code.expose(),
        });
        let (status, body) = json_of(post_json(url, &body).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["access_token"].as_str().unwrap().to_owned(),
            body["refresh_token"].as_str().unwrap().to_owned(),
        )
    }

    fn refresh(rt: &str) -> Value {
        json!({ "grant_type": "refresh_token", "client_id": "demo-client", "refresh_token": rt })
    }

    #[tokio::test]
    async fn revoke_ends_that_users_refresh_tokens_only() {
        let issuer = start(IssuerOptions::default()).await;
        let revoke_url = format!("{}/api/v1/revoke", issuer.base);
        let (alice_at, alice_rt) = login(&issuer.url, &issuer.control, "alice").await;
        let (_, bob_rt) = login(&issuer.url, &issuer.control, "bob").await;
        let response = client()
            .delete(&revoke_url)
            .bearer_auth(&alice_at)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.bytes().await.unwrap().is_empty());
        assert_eq!(
            error_of(post_json(&issuer.url, &refresh(&alice_rt)).await).await,
            (StatusCode::BAD_REQUEST, "invalid_grant".into())
        );
        assert_eq!(
            issuer.control.retired_refresh_token_uses(Retired::Revoked),
            1
        );
        assert_eq!(
            post_json(&issuer.url, &refresh(&bob_rt)).await.status(),
            StatusCode::OK
        );
        // Idempotent: the same token again is 204 and counts no second revocation.
        let again = client()
            .delete(&revoke_url)
            .bearer_auth(&alice_at)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NO_CONTENT);
        let stats = issuer.control.user_stats("alice").unwrap();
        assert!(stats.consent_revoked);
        assert_eq!(stats.revocations, 1);
        assert!(!issuer.control.user_stats("bob").unwrap().consent_revoked);
        // In the request log, not in the token request count.
        let revokes: Vec<_> = issuer
            .control
            .requests()
            .into_iter()
            .filter(|r| r.path == "/api/v1/revoke")
            .collect();
        assert_eq!(revokes.len(), 2);
        assert!(revokes.iter().all(|r| r.method == Method::DELETE
            && r.has_authorization
            && r.user.as_deref() == Some("alice")));
        assert_eq!(issuer.control.request_count(), 4);
        let users: Vec<String> = issuer
            .control
            .issued_tokens()
            .into_iter()
            .map(|t| t.user)
            .collect();
        assert_eq!(
            users,
            ["alice", "bob", "bob"],
            "the refused refresh bought nothing"
        );
        // A new login gives alice working tokens again.
        let (_, rt) = login(&issuer.url, &issuer.control, "alice").await;
        assert_eq!(
            post_json(&issuer.url, &refresh(&rt)).await.status(),
            StatusCode::OK
        );
        issuer.stop().await;
    }

    #[tokio::test]
    async fn unknown_missing_or_expired_tokens_are_401() {
        let issuer = start(IssuerOptions::default()).await;
        let revoke_url = format!("{}/api/v1/revoke", issuer.base);
        issuer.control.set_lifetime(std::time::Duration::ZERO);
        let (expired, rt) = login(&issuer.url, &issuer.control, "carol").await;
        for request in [
            client().delete(&revoke_url),
            client().delete(&revoke_url).bearer_auth("not-a-token"),
            client().delete(&revoke_url).bearer_auth(&expired),
            client()
                .delete(&revoke_url)
                .basic_auth("demo-client", Some("demo-secret")),
        ] {
            let response = request.send().await.unwrap();
            assert!(
                response.headers()[WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        // Nothing was revoked.
        assert_eq!(
            post_json(&issuer.url, &refresh(&rt)).await.status(),
            StatusCode::OK
        );
        let response = client().get(&revoke_url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "DELETE");
        issuer.stop().await;
    }
}
