//! The dev issuer as Flinks for a Data Recipient with many end users (issue #12), over real
//! sockets: the authorize redirect, per-user codes and tokens, relogin, rotation, revocation,
//! the FDX-like resource, and the token engine against per-user codes.

use std::sync::Arc;
use std::time::Duration;

use bearer_proxy::config::{GrantType, TokenConfig};
use bearer_proxy::issuer::{IssuerOptions, Retired};
use bearer_proxy::metrics::Metrics;
use bearer_proxy::token::TokenCell;
use bearer_proxy::token::refresher::Refresher;
use http::{Method, StatusCode};
use serde_json::json;

use crate::support::{UsersIssuer, issuer_client, never_log, sub_of, users_issuer};

/// Where the app's web route would receive the browser.
const REDIRECT: &str = "https://app.example/oauth/callback";

/// Two clients: `demo-client` and `other-client`.
fn two_clients() -> IssuerOptions {
    IssuerOptions {
        clients: vec![
            ("demo-client".into(), "demo-secret".into()),
            ("other-client".into(), "other-secret".into()),
        ],
        ..IssuerOptions::default()
    }
}

#[tokio::test]
async fn authorize_redirects_with_one_time_codes_that_buy_each_users_own_tokens() {
    let issuer = users_issuer(two_clients()).await;
    let alice_code = issuer.authorize(REDIRECT, Some("alice")).await["code"].clone();
    let bob_code = issuer.authorize(REDIRECT, Some("bob")).await["code"].clone();
    assert_ne!(alice_code, bob_code);

    // Another client cannot redeem a code issued to demo-client.
    let stolen = issuer_client()
        .post(&issuer.token_url)
        .json(&json!({
            "grant_type": "authorization_code",
            "client_id": "other-client",
            "client_secret": "other-secret",
            "code": alice_code,
            "redirect_uri": REDIRECT,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), StatusCode::BAD_REQUEST);
    // Nor can demo-client without the redirect URI the code was issued for.
    let (status, body) = issuer
        .exchange(&alice_code, Some("https://evil.example/cb"))
        .await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );

    let (status, alice) = issuer.exchange(&alice_code, Some(REDIRECT)).await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    let (status, bob) = issuer.exchange(&bob_code, Some(REDIRECT)).await;
    assert_eq!(status, StatusCode::OK, "{bob}");
    // One-time: the same code again is refused, and buys nothing.
    let issued = issuer.control.issued_count();
    let (status, again) = issuer.exchange(&alice_code, Some(REDIRECT)).await;
    assert_eq!(
        (status, &again["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );
    assert_eq!(issuer.control.issued_count(), issued);

    let alice_at = alice["access_token"].as_str().unwrap();
    let bob_at = bob["access_token"].as_str().unwrap();
    assert_eq!(sub_of(alice_at), "alice");
    assert_eq!(sub_of(bob_at), "bob");
    assert_ne!(alice["refresh_token"], bob["refresh_token"]);
    assert_eq!(
        issuer.control.user_of_token(alice_at).as_deref(),
        Some("alice")
    );
    // Each refresh token buys its own user's tokens.
    for (login, user) in [(&alice, "alice"), (&bob, "bob")] {
        let (status, body) = issuer
            .refresh(login["refresh_token"].as_str().unwrap())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(sub_of(token), user);
        let (status, seen) = issuer.fdx("5/accounts", token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            seen,
            json!({ "user": user, "path": "/api/fdx/5/accounts", "method": "GET" })
        );
    }
    // Without `user`, every authorize is a new end user.
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let code = issuer.authorize(REDIRECT, None).await["code"].clone();
        let (status, body) = issuer.exchange(&code, Some(REDIRECT)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        fresh.push(sub_of(body["access_token"].as_str().unwrap()));
    }
    assert_ne!(fresh[0], fresh[1]);
    assert!(fresh.iter().all(|u| u != "alice" && u != "bob"));
}

#[tokio::test]
async fn a_new_login_invalidates_the_users_older_refresh_tokens_only() {
    let issuer = users_issuer(IssuerOptions::default()).await;
    let first = issuer.login("carol").await;
    let dave = issuer.login("dave").await;
    let second = issuer.login("carol").await;
    let (status, body) = issuer.refresh(&first.refresh_token).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );
    assert_eq!(
        issuer.control.retired_refresh_token_uses(Retired::Relogin),
        1
    );
    for rt in [&second.refresh_token, &dave.refresh_token] {
        assert_eq!(issuer.refresh(rt).await.0, StatusCode::OK);
    }
    let carol = issuer.control.user_stats("carol").unwrap();
    assert_eq!((carol.logins, carol.live_refresh_tokens), (2, 1));
    // Per-user counters, by grant: two logins and two refreshes (one refused) for carol.
    assert_eq!(
        issuer
            .control
            .user_request_count("carol", "authorization_code"),
        2
    );
    assert_eq!(
        issuer.control.user_request_count("carol", "refresh_token"),
        2
    );
    assert_eq!(
        issuer.control.user_request_count("dave", "refresh_token"),
        1
    );
    assert_eq!(
        issuer.control.user_request_count("nobody", "refresh_token"),
        0
    );
    // The request log names the user of every per-user request.
    let users: Vec<Option<String>> = issuer
        .control
        .requests()
        .into_iter()
        .map(|r| r.user)
        .collect();
    assert_eq!(
        users
            .iter()
            .filter(|u| u.as_deref() == Some("carol"))
            .count(),
        4
    );
    assert!(users.iter().all(Option::is_some));
    assert!(first.body["refresh_token"].is_string());
}

#[tokio::test]
async fn rotation_rejects_and_records_a_superseded_refresh_token() {
    let issuer = users_issuer(IssuerOptions::default()).await;
    let login = issuer.login("erin").await;
    // Off (Flinks): the refresh grant answers no new refresh token.
    let (status, body) = issuer.refresh(&login.refresh_token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none(), "{body}");
    issuer.control.set_rotate_refresh_tokens(true);
    let (status, body) = issuer.refresh(&login.refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rotated = body["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(sub_of(body["access_token"].as_str().unwrap()), "erin");
    assert_eq!(issuer.control.superseded_refresh_token_uses(), 0);
    let (status, body) = issuer.refresh(&login.refresh_token).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );
    assert_eq!(issuer.control.superseded_refresh_token_uses(), 1);
    assert_eq!(issuer.refresh(&rotated).await.0, StatusCode::OK);
    // The superseded token still counts against its user.
    assert_eq!(
        issuer.control.user_request_count("erin", "refresh_token"),
        4
    );
}

/// A `[tokens.t]` entry for the token engine against `issuer`.
fn token_config(issuer: &UsersIssuer, grant: GrantType) -> TokenConfig {
    let mut c: TokenConfig = serde_json::from_value(json!({
        "token_url": issuer.token_url,
        "grant_type": grant.as_str(),
        "client_id": "demo-client",
        "client_secret": "demo-secret",
        "timeout": "2s",
    }))
    .unwrap();
    c.name = "t".into();
    c
}

/// The raw token a cell holds.
fn raw_token(cell: &TokenCell) -> String {
    let token = cell.current().expect("a token");
    let raw = token.header().to_str().unwrap();
    raw.strip_prefix("Bearer ").unwrap().to_owned()
}

#[tokio::test]
async fn the_token_engine_gets_a_users_token_from_their_code_and_never_reuses_a_superseded_one() {
    let issuer = users_issuer(IssuerOptions {
        rotate_refresh_tokens: true,
        ..IssuerOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let code_file = dir.path().join("code");
    std::fs::write(&code_file, issuer.code_for("frank")).unwrap();
    let mut cfg = token_config(&issuer, GrantType::AuthorizationCode);
    cfg.code_file = Some(code_file);
    cfg.state_dir = Some(dir.path().to_owned());
    let cell = TokenCell::new("t", cfg.forced_refresh_interval);
    let mut refresher =
        Refresher::new(cfg.clone(), Arc::clone(&cell), Metrics::new().token("t")).unwrap();
    for _ in 0..4 {
        refresher.refresh().await.unwrap();
        let token = raw_token(&cell);
        never_log(&token);
        assert_eq!(sub_of(&token), "frank");
        assert_eq!(
            issuer.fdx("5/customers/current", &token).await.1["user"],
            "frank"
        );
    }
    // A restart reads the persisted (rotated) refresh token.
    drop(refresher);
    let mut restarted = Refresher::new(cfg, Arc::clone(&cell), Metrics::new().token("t")).unwrap();
    restarted.refresh().await.unwrap();
    assert_eq!(
        issuer
            .control
            .user_request_count("frank", "authorization_code"),
        1
    );
    assert_eq!(
        issuer.control.user_request_count("frank", "refresh_token"),
        4
    );
    assert_eq!(issuer.control.superseded_refresh_token_uses(), 0);
    // A new login by frank elsewhere: the engine's refresh token is now refused.
    issuer.login("frank").await;
    let error = restarted.refresh().await.unwrap_err();
    assert!(format!("{error}").contains("invalid_grant"), "{error}");
    assert_eq!(
        issuer.control.retired_refresh_token_uses(Retired::Relogin),
        1
    );
}

#[tokio::test]
async fn revoke_answers_204_ends_the_consent_and_is_logged() {
    let issuer = users_issuer(IssuerOptions::default()).await;
    let grace = issuer.login("grace").await;
    let heidi = issuer.login("heidi").await;
    assert_eq!(
        issuer.fdx("5/accounts", &grace.access_token).await.0,
        StatusCode::OK
    );
    assert_eq!(
        issuer.revoke(&grace.access_token).await,
        StatusCode::NO_CONTENT
    );
    // Her refresh token is dead, her access token answers 602; heidi is untouched.
    let (status, body) = issuer.refresh(&grace.refresh_token).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );
    let (status, body) = issuer.fdx("5/accounts", &grace.access_token).await;
    assert_eq!(
        (status, &body["code"]),
        (StatusCode::UNAUTHORIZED, &json!(602))
    );
    assert_eq!(
        issuer.fdx("5/accounts", &heidi.access_token).await.0,
        StatusCode::OK
    );
    assert_eq!(issuer.refresh(&heidi.refresh_token).await.0, StatusCode::OK);
    // Unknown token: 401, and nothing revoked.
    assert_eq!(issuer.revoke("not-a-token").await, StatusCode::UNAUTHORIZED);
    // A revoke names the user whose token it carried; the unknown one names nobody.
    let revokes: Vec<_> = issuer
        .control
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .collect();
    assert_eq!(revokes.len(), 2);
    assert_eq!(revokes[0].path, "/api/v1/revoke");
    assert_eq!(revokes[0].user.as_deref(), Some("grace"));
    assert_eq!(revokes[1].user, None);
    // She consents again: working tokens.
    let again = issuer.login("grace").await;
    assert_eq!(
        issuer.fdx("5/accounts", &again.access_token).await.1["user"],
        "grace"
    );
}

#[tokio::test]
async fn fdx_answers_401_not_602_for_an_expired_or_unknown_token() {
    let issuer = users_issuer(IssuerOptions {
        lifetime: Duration::ZERO,
        ..IssuerOptions::default()
    })
    .await;
    let ivan = issuer.login("ivan").await;
    issuer.control.revoke_consent("ivan");
    for token in [ivan.access_token.as_str(), "unknown"] {
        let (status, body) = issuer.fdx("5/accounts", token).await;
        assert_eq!(
            (status, &body["code"]),
            (StatusCode::UNAUTHORIZED, &json!(401))
        );
    }
    // The control switch revoked his consent without a token.
    assert!(issuer.control.user_stats("ivan").unwrap().consent_revoked);
}
