//! The admin port of a running server: metrics values, readiness transitions, status page,
//! and the exposition format as Prometheus' own linter sees it.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{issuer, metric};
use bearer_proxy::issuer::{Fault, IssuerOptions};
use bearer_proxy::{Server, Signal};

fn config(token_url: &str) -> bearer_proxy::config::Config {
    bearer_proxy::config::from_str(
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
drain_delay = "10s"
[admin]
listen = "127.0.0.1:0"
[tokens.flinks]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret = "demo-secret"
backoff_initial = "50ms"
backoff_max = "200ms"
"#
        ),
        config::FileFormat::Toml,
        Some(HashMap::new()),
    )
    .unwrap()
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    // Plain http only, but reqwest still wants a crypto provider chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn metrics_count_refreshes_and_expose_expiry() {
    let (url, _) = issuer(IssuerOptions::default()).await;
    let server = Server::start(config(&url)).await.unwrap();
    let admin = server.admin_addr();
    let token = server.tokens()["flinks"]
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap();
    let (code, text) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    let refreshes = |result| {
        metric("bearer_proxy_token_refreshes_total")
            .label("token", "flinks")
            .label("result", result)
            .value_in(&text)
    };
    assert_eq!(refreshes("ok"), Some(1.0));
    assert_eq!(refreshes("rejected"), Some(0.0));
    assert_eq!(
        metric("bearer_proxy_token_valid")
            .label("token", "flinks")
            .value_in(&text),
        Some(1.0)
    );
    let expiry = metric("bearer_proxy_token_expiry_timestamp_seconds")
        .label("token", "flinks")
        .value_in(&text)
        .unwrap();
    let expected = token
        .expires_wall()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - expected).abs() < 1.0, "{expiry} vs {expected}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - now - 300.0).abs() < 5.0);
    assert!(
        metric("bearer_proxy_build_info")
            .label("version", env!("CARGO_PKG_VERSION"))
            .label("commit", bearer_proxy::build::COMMIT)
            .label("features", bearer_proxy::build::FEATURES)
            .value_in(&text)
            == Some(1.0)
    );
    let (_, status) = get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["commit"], bearer_proxy::build::COMMIT);
    let features: Vec<&str> = bearer_proxy::build::features().collect();
    assert_eq!(status["features"], serde_json::json!(features));
    assert!(text.contains("process_resident_memory_bytes"));
}

#[tokio::test]
async fn exposition_passes_promtool() {
    let Some(promtool) = support_tool("promtool") else {
        return;
    };
    let (url, control) = issuer(IssuerOptions::default()).await;
    control.fail_next(1, Fault::OAuthError("invalid_client".into()));
    let server = Server::start(config(&url)).await.unwrap();
    server.tokens()["flinks"]
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap();
    let (_, text) = get(server.admin_addr(), "/metrics").await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An external tool's path; in CI a missing tool fails the test, elsewhere it skips it loudly.
fn support_tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

#[tokio::test]
async fn readiness_flips_with_first_token_outage_and_sigterm() {
    let (url, control) = issuer(IssuerOptions {
        lifetime: Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    control.set_delay(Duration::from_millis(300));
    let server = Server::start(config(&url)).await.unwrap();
    let admin = server.admin_addr();
    let cell = server.tokens()["flinks"].clone();

    // Before the first token.
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("flinks"), "{body}");
    assert_eq!(get(admin, "/livez").await.0, 200);

    let token = cell.wait_valid(Duration::from_secs(5)).await.unwrap();
    assert_eq!(get(admin, "/readyz").await.0, 200);

    // The token endpoint goes down until past expiry.
    control.fail_next(10_000, Fault::ServerError);
    tokio::time::sleep_until(token.expires_at()).await;
    assert!(cell.current().is_none());
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let (_, status) = get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let t = &status["tokens"]["flinks"];
    assert_eq!(t["state"], "expired");
    assert_eq!(t["last_error"]["kind"], "transient");
    assert_eq!(t["last_error"]["http_status"], 500);
    assert!(t["consecutive_failures"].as_u64().unwrap() >= 1);
    assert_eq!(
        get(admin, "/livez").await.0,
        200,
        "liveness must not follow the token"
    );

    // Recovery, then SIGTERM: not ready while draining, still live.
    control.clear_faults();
    cell.wait_valid(Duration::from_secs(5)).await.unwrap();
    assert_eq!(get(admin, "/readyz").await.0, 200);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let running = tokio::spawn(server.run(rx));
    tx.send(Signal::Terminate).await.unwrap();
    let mut attempts = 0;
    // The phase changes as soon as the signal is processed; ask until it has been.
    loop {
        let (code, body) = get(admin, "/readyz").await;
        if code == 503 {
            assert!(body.contains("shutting down"), "{body}");
            break;
        }
        attempts += 1;
        assert!(attempts < 100, "readiness never turned false");
        tokio::task::yield_now().await;
    }
    assert_eq!(get(admin, "/livez").await.0, 200);
    tx.send(Signal::Interrupt).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
}

/// Number of series in an exposition, ignoring the process collector (whose values move but
/// whose series are fixed).
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
        .count()
}

#[tokio::test]
async fn random_hosts_add_no_series() {
    let (url, _) = issuer(IssuerOptions::default()).await;
    let mut cfg = config(&url);
    cfg.proxy.unmatched = Some(bearer_proxy::config::Unmatched::Deny);
    cfg.proxy.connect = Some(bearer_proxy::config::ConnectPolicy::Deny);
    let server = Server::start(cfg).await.unwrap();
    let proxy = server.proxy_addr();
    let mut conn = crate::support::connect(proxy).await;
    let mut ask = async |request: String| {
        use tokio::io::AsyncWriteExt;
        conn.write_all(request.as_bytes()).await.unwrap();
        crate::support::read_response(&mut conn).await.unwrap()
    };
    let host = |i: u32| format!("h{i:x}-{}.example", i.wrapping_mul(2_654_435_761));
    // Warm up: the first denial creates its `code` series.
    assert_eq!(
        ask(format!(
            "GET http://{}/ HTTP/1.1\r\nhost: x\r\n\r\n",
            host(0)
        ))
        .await
        .status,
        403
    );
    let before = series(&get(server.admin_addr(), "/metrics").await.1);
    for i in 1..10_000u32 {
        let h = host(i);
        let path = format!("/p{i}?q={i}");
        let port = 1024 + i % 60_000;
        let resp = ask(format!(
            "GET http://{h}:{port}{path} HTTP/1.1\r\nhost: {h}\r\n\r\n"
        ))
        .await;
        assert_eq!(resp.status, 403);
    }
    let after = get(server.admin_addr(), "/metrics").await.1;
    assert_eq!(series(&after), before, "request data created metric series");
    assert!(!after.contains(".example"));
    assert_eq!(
        metric("bearer_proxy_requests_total")
            .label("route", "unmatched")
            .label("code", "403")
            .value_in(&after),
        Some(10_000.0)
    );
}
