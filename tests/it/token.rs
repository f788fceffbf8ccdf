//! The token engine against a real token endpoint (the dev issuer) over real sockets.

use std::sync::Arc;
use std::time::Duration;

use crate::support::issuer;
use bearer_proxy::config::{ClientAuth, Encoding, GrantType, TokenConfig};
use bearer_proxy::issuer::{Fault, IssuerOptions};
use bearer_proxy::metrics::Metrics;
use bearer_proxy::shutdown::ShutdownController;
use bearer_proxy::token::client::FetchError;
use bearer_proxy::token::refresher::Refresher;
use bearer_proxy::token::{ErrorKind, TokenCell};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn token_config(url: &str, grant: GrantType) -> TokenConfig {
    let mut c: TokenConfig = serde_json::from_value(serde_json::json!({
        "token_url": url,
        "grant_type": grant.as_str(),
        "client_id": "demo-client",
        "client_secret": "demo-secret",
        "backoff_initial": "100ms",
        "backoff_max": "500ms",
        "timeout": "2s",
    }))
    .unwrap();
    c.name = "t".into();
    c
}

fn refresher(cfg: TokenConfig) -> (Refresher, Arc<TokenCell>) {
    let cell = TokenCell::new("t", cfg.forced_refresh_interval);
    let r = Refresher::new(cfg, cell.clone(), Metrics::new().token("t")).unwrap();
    (r, cell)
}

#[tokio::test]
async fn json_body_auth_obtains_a_jwt_with_its_lifetime() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let (mut r, cell) = refresher(token_config(&url, GrantType::ClientCredentials));
    let f = r.refresh().await.unwrap();
    assert_eq!(f.lifetime, Duration::from_secs(300));
    let claims = f.claims.expect("JWT claims");
    assert_eq!(claims["client_id"], "demo-client");
    assert!(claims.contains_key("exp") && !claims.contains_key("jti"));
    let token = cell.current().unwrap();
    let raw = token
        .header()
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    assert!(control.is_valid_token(&raw));
    let req = &control.requests()[0];
    assert_eq!(req.content_type.as_deref(), Some("application/json"));
    assert!(!req.has_authorization);
}

#[tokio::test]
async fn client_secret_basic_with_reserved_characters_in_the_secret() {
    let secret = "p+a/s:s%w=rd";
    let (url, control) = issuer(IssuerOptions {
        clients: vec![("demo-client".into(), secret.into())],
        ..Default::default()
    })
    .await;
    let mut cfg = token_config(&url, GrantType::ClientCredentials);
    cfg.client_auth = ClientAuth::Basic;
    cfg.encoding = Encoding::Form;
    cfg.client_secret = Some(bearer_proxy::secret::Secret::new(secret));
    let (mut r, _) = refresher(cfg);
    r.refresh().await.unwrap();
    let req = &control.requests()[0];
    assert!(req.has_authorization);
    assert_eq!(
        req.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
}

#[tokio::test]
async fn wrong_secret_is_rejected_with_the_oauth_code() {
    let (url, _) = issuer(IssuerOptions::default()).await;
    let mut cfg = token_config(&url, GrantType::ClientCredentials);
    cfg.client_secret = Some(bearer_proxy::secret::Secret::new("canary-wrong-secret"));
    let (mut r, cell) = refresher(cfg);
    let e = r.refresh().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Rejected);
    assert_eq!(e.oauth().unwrap().code, "invalid_client");
    assert!(!e.to_string().contains("canary"));
    assert!(!format!("{e:?}").contains("canary"));
    let status = cell.status();
    assert_eq!(status.state.as_str(), "rejected");
    assert_eq!(
        status.last_error.unwrap().oauth_error.as_deref(),
        Some("invalid_client")
    );
}

#[tokio::test]
async fn retry_after_and_server_errors_are_transient() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    control.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 7,
        },
    );
    control.fail_next(1, Fault::Unavailable);
    control.fail_next(1, Fault::Malformed);
    let (mut r, _) = refresher(token_config(&url, GrantType::ClientCredentials));
    let e = r.refresh().await.unwrap_err();
    assert_eq!((e.kind(), e.reason()), (ErrorKind::Transient, "http_429"));
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    let e = r.refresh().await.unwrap_err();
    assert_eq!((e.kind(), e.reason()), (ErrorKind::Transient, "http_5xx"));
    let e = r.refresh().await.unwrap_err();
    assert_eq!((e.kind(), e.reason()), (ErrorKind::Transient, "malformed"));
    assert!(r.refresh().await.is_ok());
}

#[tokio::test]
async fn timeout_is_transient() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    control.set_delay(Duration::from_secs(5));
    let mut cfg = token_config(&url, GrantType::ClientCredentials);
    cfg.timeout = Duration::from_millis(200);
    let (mut r, _) = refresher(cfg);
    assert!(matches!(
        r.refresh().await.unwrap_err(),
        FetchError::Timeout
    ));
}

/// A one-shot HTTP server answering `response` to the first connection; returns its URL and a
/// receiver told when a connection was made.
async fn raw_server(response: Vec<u8>) -> (String, tokio::sync::mpsc::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = tx.send(()).await;
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&response).await;
            let _ = s.shutdown().await;
        }
    });
    (format!("http://{addr}/api/v1/token"), rx)
}

#[tokio::test]
async fn a_five_megabyte_body_is_an_error_not_an_allocation() {
    let body = vec![b'a'; 5 * 1024 * 1024];
    for framing in ["content-length", "chunked"] {
        let mut resp = if framing == "chunked" {
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
                body.len()
            )
            .into_bytes()
        } else {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes()
        };
        resp.extend_from_slice(&body);
        if framing == "chunked" {
            resp.extend_from_slice(b"\r\n0\r\n\r\n");
        }
        let (url, _) = raw_server(resp).await;
        let (mut r, _) = refresher(token_config(&url, GrantType::ClientCredentials));
        let e = r.refresh().await.unwrap_err();
        assert_eq!(e.reason(), "malformed", "{framing}: {e}");
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (target, mut contacted) =
        raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
    let (url, _) = raw_server(
        format!("HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n")
            .into_bytes(),
    )
    .await;
    let (mut r, _) = refresher(token_config(&url, GrantType::ClientCredentials));
    let e = r.refresh().await.unwrap_err();
    assert_eq!(e.status(), Some(302));
    assert!(
        contacted.try_recv().is_err(),
        "the redirect target was contacted"
    );
}

#[tokio::test]
async fn invalid_grant_recovers_after_the_refresh_token_file_is_swapped() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Kubernetes mounts secrets as symlinks into a `..data` directory that is swapped whole.
    let v1 = dir.path().join("..v1");
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("refresh_token"), "revoked-token\n").unwrap();
    std::fs::write(v2.join("refresh_token"), "demo-refresh-token\n").unwrap();
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/refresh_token", dir.path().join("refresh_token")).unwrap();

    let mut cfg = token_config(&url, GrantType::RefreshToken);
    cfg.refresh_token_file = Some(dir.path().join("refresh_token"));
    let (r, cell) = refresher(cfg);
    let (_ctl, sd) = ShutdownController::new();
    r.spawn(sd);
    // Rejected, and retried slowly (backoff_max = 500ms here) without a token.
    assert!(cell.wait_valid(Duration::from_millis(300)).await.is_none());
    assert_eq!(cell.status().state.as_str(), "rejected");
    assert_eq!(
        cell.status().last_error.unwrap().oauth_error.as_deref(),
        Some("invalid_grant")
    );
    // The atomic swap the kubelet does.
    std::os::unix::fs::symlink("..v2", dir.path().join("..data.tmp")).unwrap();
    std::fs::rename(dir.path().join("..data.tmp"), dir.path().join("..data")).unwrap();
    assert!(cell.wait_valid(Duration::from_secs(5)).await.is_some());
    assert_eq!(cell.status().state.as_str(), "fresh");
    let sent: Vec<_> = control
        .requests()
        .iter()
        .filter_map(|r| r.refresh_token.as_ref().map(|t| t.expose().to_owned()))
        .collect();
    assert_eq!(sent.last().map(String::as_str), Some("demo-refresh-token"));
}

#[tokio::test]
async fn rotated_refresh_token_is_persisted_and_used_after_a_restart() {
    let (url, control) = issuer(IssuerOptions {
        rotate_refresh_tokens: true,
        refresh_tokens: vec!["rt-original".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("refresh_token");
    std::fs::write(&file, "rt-original").unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut cfg = token_config(&url, GrantType::RefreshToken);
    cfg.refresh_token_file = Some(file.clone());
    cfg.state_dir = Some(state.clone());

    let (mut first, _) = refresher(cfg.clone());
    assert!(first.refresh().await.unwrap().refresh_token_rotated);
    first.refresh().await.unwrap();
    drop(first);
    // A restart: a new refresher reads the persisted token, not the (now invalid) file.
    let (mut second, _) = refresher(cfg);
    second.refresh().await.unwrap();

    let sent: Vec<String> = control
        .requests()
        .iter()
        .filter_map(|r| r.refresh_token.as_ref().map(|t| t.expose().to_owned()))
        .collect();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0], "rt-original");
    assert!(
        sent[1..].iter().all(|t| t != "rt-original"),
        "old token sent again"
    );
    let state_text = std::fs::read_to_string(state.join("t.state.json")).unwrap();
    assert!(!state_text.contains("rt-original"));
}

#[tokio::test]
async fn a_new_refresh_token_in_the_file_wins_over_the_stored_one() {
    let (url, control) = issuer(IssuerOptions {
        rotate_refresh_tokens: true,
        refresh_tokens: vec!["rt-a".into(), "rt-b".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("refresh_token");
    std::fs::write(&file, "rt-a").unwrap();
    let mut cfg = token_config(&url, GrantType::RefreshToken);
    cfg.refresh_token_file = Some(file.clone());
    cfg.state_dir = Some(dir.path().to_owned());
    let (mut r, _) = refresher(cfg);
    r.refresh().await.unwrap();
    // The user re-authorized; the operator puts the new token in the secret.
    std::fs::write(&file, "rt-b").unwrap();
    r.refresh().await.unwrap();
    let last = control
        .requests()
        .last()
        .unwrap()
        .refresh_token
        .clone()
        .unwrap();
    assert_eq!(last.expose(), "rt-b");
}

#[tokio::test]
async fn authorization_code_is_exchanged_once_even_across_restarts() {
    let (url, control) = issuer(IssuerOptions {
        codes: vec!["code-1".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("code");
    std::fs::write(&code, "code-1\n").unwrap();
    let mut cfg = token_config(&url, GrantType::AuthorizationCode);
    cfg.code_file = Some(code);
    cfg.state_dir = Some(dir.path().to_owned());
    let (mut r, _) = refresher(cfg.clone());
    r.refresh().await.unwrap();
    r.refresh().await.unwrap();
    drop(r);
    let (mut restarted, _) = refresher(cfg);
    restarted.refresh().await.unwrap();
    assert_eq!(control.request_count_for("authorization_code"), 1);
    assert_eq!(control.request_count_for("refresh_token"), 2);
}

/// A rotated refresh token that cannot be written is kept in memory, and says so on the status
/// and in `bearer_proxy_token_state_persisted` until a later attempt manages to write it.
#[tokio::test]
async fn a_rotated_refresh_token_held_only_in_memory_is_reported_until_persisted() {
    let (url, _) = issuer(IssuerOptions {
        rotate_refresh_tokens: true,
        refresh_tokens: vec!["rt-memory".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("refresh_token");
    std::fs::write(&file, "rt-memory").unwrap();
    let state = dir.path().join("not-yet");
    let mut cfg = token_config(&url, GrantType::RefreshToken);
    cfg.refresh_token_file = Some(file);
    cfg.state_dir = Some(state.clone());
    let metrics = Metrics::new();
    let cell = TokenCell::new("t", cfg.forced_refresh_interval);
    let mut r = Refresher::new(cfg, cell.clone(), metrics.token("t")).unwrap();
    let gauge = |m: &Metrics| {
        crate::support::metric("bearer_proxy_token_state_persisted")
            .label("token", "t")
            .value_in(&m.encode())
    };
    assert_eq!(gauge(&metrics), Some(1.0), "nothing held in memory yet");
    assert!(r.refresh().await.unwrap().refresh_token_rotated);
    assert!(cell.status().refresh_token_in_memory_only);
    assert_eq!(gauge(&metrics), Some(0.0));
    // Still unwritable: still reported, and the token in memory keeps working.
    r.refresh().await.unwrap();
    assert_eq!(gauge(&metrics), Some(0.0));
    // The directory appears: the next attempt saves the token and clears the report.
    std::fs::create_dir(&state).unwrap();
    r.refresh().await.unwrap();
    assert!(!cell.status().refresh_token_in_memory_only);
    assert_eq!(gauge(&metrics), Some(1.0));
    assert!(state.join("t.state.json").exists());
}

/// Absurd lifetimes from a real token endpoint (zero, negative, a JWT `exp` in the past) are
/// malformed answers: transient, nothing published.
#[tokio::test]
async fn zero_negative_and_past_lifetimes_are_malformed_and_publish_nothing() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 60;
    use base64::Engine as _;
    let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jwt = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"none"}"#.into()),
        b64(format!(r#"{{"sub":"u","exp":{past}}}"#))
    );
    for body in [
        r#"{"access_token":"canary-zero","token_type":"Bearer","expires_in":0}"#.to_owned(),
        r#"{"access_token":"canary-neg","token_type":"Bearer","expires_in":-30}"#.to_owned(),
        format!(r#"{{"access_token":"{jwt}","token_type":"Bearer"}}"#),
    ] {
        control.fail_next(
            1,
            Fault::Raw {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body,
            },
        );
    }
    let (mut r, cell) = refresher(token_config(&url, GrantType::ClientCredentials));
    for _ in 0..3 {
        let e = r.refresh().await.unwrap_err();
        assert!(matches!(e, FetchError::Malformed(_)), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(cell.latest().is_none(), "a token was published");
    }
    assert!(r.refresh().await.is_ok());
}

#[tokio::test]
async fn an_unwritable_state_dir_keeps_the_code_unsent() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("code");
    std::fs::write(&code, "demo-code").unwrap();
    let mut cfg = token_config(&url, GrantType::AuthorizationCode);
    cfg.code_file = Some(code);
    cfg.state_dir = Some(dir.path().join("missing-dir"));
    let (mut r, _) = refresher(cfg);
    let e = r.refresh().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Rejected);
    assert_eq!(
        control.request_count(),
        0,
        "the code was sent without being recorded"
    );
}

#[tokio::test]
async fn concurrent_invalidations_share_one_token_request() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let (r, cell) = refresher(token_config(&url, GrantType::ClientCredentials));
    let (_ctl, sd) = ShutdownController::new();
    r.spawn(sd);
    let seen = cell
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap()
        .generation();
    control.set_delay(Duration::from_millis(100));
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let cell = cell.clone();
            tokio::spawn(async move { cell.invalidate(seen, Duration::from_secs(5)).await })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap().generation(), seen + 1);
    }
    assert_eq!(control.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_readers_cause_one_token_request_per_lifetime() {
    let (url, control) = issuer(IssuerOptions::default()).await;
    let (r, cell) = refresher(token_config(&url, GrantType::ClientCredentials));
    let (_ctl, sd) = ShutdownController::new();
    r.spawn(sd);
    let readers: Vec<_> = (0..1000)
        .map(|_| {
            let cell = cell.clone();
            tokio::spawn(async move {
                let first = cell.wait_valid(Duration::from_secs(5)).await.unwrap();
                for _ in 0..200 {
                    let t = cell.current().expect("valid token");
                    assert_eq!(t.generation(), first.generation());
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    // 300s tokens: the next refresh is minutes away, so every read came from one request.
    assert_eq!(control.request_count(), 1);
}
