//! Replicas (issue #13): two bearer-proxy *processes* (the built binary, each with its own
//! configuration file) sharing one real `redis-server` and the real dev issuer, whose FDX
//! stand-in is the upstream of the per-subject route (so a request forwarded without a valid
//! token of the right customer would show as a 401 or a wrong `user`). Subjects are enrolled
//! through the subjects API of either process; the issuer counts token requests per user.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bearer_proxy::issuer::IssuerOptions;
use bearer_proxy::subject::redis::RedisConfig;
use tokio::time::Instant;

use crate::support::{
    Child, PATIENCE, RawResponse, RedisOptions, RedisServer, UsersIssuer, admin_get, get, raw,
    users_issuer,
};

const FDX_HOST: &str = "ob.flinksapp.com";
const HEADER: &str = "x-bearer-proxy-subject";

/// The files both processes share (encryption key) and each one's configuration.
struct Setup {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Setup {
    fn new() -> Self {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key-1");
        std::fs::write(
            &key,
            base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
        )
        .unwrap();
        Self { dir, key }
    }

    /// Writes `name.toml`: a per-subject token at `issuer`, the route `fdx` to the issuer's
    /// FDX stand-in, the subjects in `redis`.
    fn config(&self, name: &str, issuer: &UsersIssuer, redis: &RedisConfig, gate: bool) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let opt = |key: &str, v: &Option<PathBuf>| {
            v.as_ref()
                .map(|p| format!("{key} = \"{}\"\n", p.display()))
                .unwrap_or_default()
        };
        let username = redis
            .username
            .as_ref()
            .map(|u| format!("username = \"{u}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                r#"
[proxy]
listen = "127.0.0.1:0"
drain_delay = "0s"
token_wait = "5s"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"

[tokens.fdx]
token_url = "{token_url}"
grant_type = "authorization_code"
per_subject = true
client_id = "demo-client"
client_secret = "demo-secret"
timeout = "2s"

[subjects]
listen = "127.0.0.1:0"
store = "redis"
encryption_key_file = "{key}"

[redis]
url = "{url}"
{ca}{password}{username}command_timeout = "500ms"
connect_timeout = "2s"
gate_readiness = {gate}

[[routes]]
name = "fdx"
host = "{FDX_HOST}"
token = "fdx"
upstream = "{base}"
"#,
                token_url = issuer.token_url,
                base = issuer.base,
                key = self.key.display(),
                url = redis.url,
                ca = opt("ca_file", &redis.ca_file),
                password = opt("password_file", &redis.password_file),
            ),
        )
        .unwrap();
        path
    }
}

/// Enrols `subject` through `api` with a fresh code of `user`: the status and body.
async fn enrol(api: SocketAddr, issuer: &UsersIssuer, subject: &str, user: &str) -> RawResponse {
    let body = serde_json::json!({ "code": issuer.code_for(user) }).to_string();
    let request = format!(
        "POST /v1/tokens/fdx/subjects/{subject}/code HTTP/1.1\r\nHost: api\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(api, request.as_bytes()).await
}

/// A request for `subject` through `proxy` to the FDX stand-in.
async fn fdx(proxy: SocketAddr, subject: &str) -> RawResponse {
    get(
        proxy,
        &format!("http://{FDX_HOST}/api/fdx/accounts"),
        &[&format!("{HEADER}: {subject}")],
    )
    .await
}

/// Asserts the FDX stand-in answered `user`'s data: the request carried that user's valid token.
fn served_as(r: &RawResponse, user: &str) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"], user, "{}", r.text());
}

/// Polls `/readyz` of `admin` until `ok(status, body)` holds (the ping runs every 5 s).
async fn readyz_until(admin: SocketAddr, ok: impl Fn(u16, &serde_json::Value) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = admin_get(admin, "/readyz").await;
        if ok(r.status, &r.json()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops `p`; no log line of it carries an access token (the dev issuer's are JWTs: `eyJ…`).
/// Its logs, for more checks.
async fn assert_no_tokens_logged(p: &mut Child) -> String {
    let _ = p.child.start_kill();
    let _ = p.child.wait().await;
    let logs = p.logs().await;
    assert!(!logs.contains("eyJ"), "a token in the logs:\n{logs}");
    logs
}

async fn plain_redis() -> Option<RedisServer> {
    RedisServer::start(RedisOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_act_as_one_towards_the_issuer_and_the_subjects_api() {
    let Some(redis) = plain_redis().await else {
        return;
    };
    let issuer = users_issuer(IssuerOptions::default()).await;
    let setup = Setup::new();
    let rc = redis.config();
    let mut a = Child::spawn(&setup.config("a", &issuer, &rc, false)).await;
    let mut b = Child::spawn(&setup.config("b", &issuer, &rc, false)).await;

    // (a) Enrolled through A, served by B, which takes A's token from Redis: one token
    // request in all (the code exchange).
    let r = enrol(a.subjects.unwrap(), &issuer, "cust-1", "user-1").await;
    assert_eq!(r.status, 201, "{}", r.text());
    served_as(&fdx(b.proxy, "cust-1").await, "user-1");
    served_as(&fdx(a.proxy, "cust-1").await, "user-1");
    assert_eq!(
        issuer.control.user_request_count("user-1", "refresh_token"),
        0
    );
    // B's API knows the subject too.
    let show = raw(
        b.subjects.unwrap(),
        b"GET /v1/tokens/fdx/subjects/cust-1 HTTP/1.1\r\nHost: api\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(show.status, 200, "{}", show.text());
    assert_eq!(show.json()["state"], "active");

    // (b) A subject whose token expired: 200 concurrent requests over both processes cause
    // exactly one token request.
    issuer.control.set_lifetime(Duration::from_secs(2));
    let r = enrol(b.subjects.unwrap(), &issuer, "cust-2", "user-2").await;
    assert_eq!(r.status, 201, "{}", r.text());
    served_as(&fdx(a.proxy, "cust-2").await, "user-2");
    issuer.control.set_lifetime(Duration::from_secs(300));
    tokio::time::sleep(Duration::from_millis(2100)).await; // the token's lifetime, by design
    let before = issuer.control.user_request_count("user-2", "refresh_token");
    let requests = (0..200).map(|i| {
        let proxy = if i % 2 == 0 { a.proxy } else { b.proxy };
        tokio::spawn(async move { fdx(proxy, "cust-2").await })
    });
    for r in futures_util::future::join_all(requests).await {
        served_as(&r.unwrap(), "user-2");
    }
    assert_eq!(
        issuer.control.user_request_count("user-2", "refresh_token") - before,
        1
    );

    // (c) Rotation with reuse detection, a 2 s lifetime, both processes refreshing for about
    // five lifetimes: every request 200 with the right user, no superseded refresh token used.
    issuer.control.set_rotate_refresh_tokens(true);
    issuer.control.set_lifetime(Duration::from_secs(2));
    for (s, u) in [("cust-3", "user-3"), ("cust-4", "user-4")] {
        let r = enrol(a.subjects.unwrap(), &issuer, s, u).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let end = Instant::now() + Duration::from_secs(10);
    let mut n = 0u64;
    while Instant::now() < end {
        let round = [a.proxy, b.proxy].into_iter().flat_map(|proxy| {
            [("cust-3", "user-3"), ("cust-4", "user-4")]
                .map(|(s, u)| tokio::spawn(async move { (fdx(proxy, s).await, u) }))
        });
        for r in futures_util::future::join_all(round).await {
            let (r, u) = r.unwrap();
            served_as(&r, u);
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n > 100, "{n}");
    assert_eq!(issuer.control.superseded_refresh_token_uses(), 0);
    for u in ["user-3", "user-4"] {
        let refreshes = issuer.control.user_request_count(u, "refresh_token");
        // About one per lifetime between both processes (the refresh point is at ~75%).
        assert!((3..=12).contains(&refreshes), "{u}: {refreshes} refreshes");
    }
    assert_no_tokens_logged(&mut a).await;
    assert_no_tokens_logged(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_cached_tokens_serve_enrolment_is_503_and_both_recover() {
    let Some(mut redis) = plain_redis().await else {
        return;
    };
    let issuer = users_issuer(IssuerOptions::default()).await;
    let setup = Setup::new();
    let rc = redis.config();
    // A gates readiness on Redis, B does not.
    let mut a = Child::spawn(&setup.config("a", &issuer, &rc, true)).await;
    let mut b = Child::spawn(&setup.config("b", &issuer, &rc, false)).await;
    for (s, u) in [("cust-1", "user-1"), ("cust-2", "user-2")] {
        let r = enrol(a.subjects.unwrap(), &issuer, s, u).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // Both hold cust-1's token; only A holds cust-2's.
    served_as(&fdx(b.proxy, "cust-1").await, "user-1");
    for p in [&a, &b] {
        let r = admin_get(p.admin, "/readyz").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["dependencies"]["redis"]["up"], true);
    }

    redis.kill().await;
    readyz_until(a.admin, |s, v| {
        s == 503 && v["dependencies"]["redis"]["up"] == false
    })
    .await;
    readyz_until(b.admin, |s, v| {
        s == 200 && v["dependencies"]["redis"]["up"] == false
    })
    .await;
    // Valid cached tokens are still served by both.
    served_as(&fdx(a.proxy, "cust-1").await, "user-1");
    served_as(&fdx(b.proxy, "cust-1").await, "user-1");
    served_as(&fdx(a.proxy, "cust-2").await, "user-2");
    // B has no token for cust-2 and cannot refresh without Redis: the proxy answers itself,
    // and neither the issuer nor the upstream is asked.
    let token_requests = issuer.control.request_count();
    let r = fdx(b.proxy, "cust-2").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-bearer-proxy-error"), Some("token_unavailable"));
    assert_eq!(r.json()["error"], "token_unavailable");
    assert_eq!(issuer.control.request_count(), token_requests);
    // Enrolment answers 503 store_unavailable, without spending the code.
    let r = enrol(a.subjects.unwrap(), &issuer, "cust-3", "user-3").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-bearer-proxy-error"), Some("store_unavailable"));
    assert_eq!(issuer.control.request_count(), token_requests);
    // /status says so.
    let status = admin_get(b.admin, "/status").await.json();
    assert_eq!(status["store"]["up"], false, "{status}");
    assert!(
        status["store"]["errors"]["lock"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let metrics = admin_get(b.admin, "/metrics").await.text();
    assert!(metrics.contains("bearer_proxy_store_up 0"), "{metrics}");

    // Redis is back (from its AOF): both recover without a restart.
    redis.restart().await;
    readyz_until(a.admin, |s, v| {
        s == 200 && v["dependencies"]["redis"]["up"] == true
    })
    .await;
    readyz_until(b.admin, |s, v| {
        s == 200 && v["dependencies"]["redis"]["up"] == true
    })
    .await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = fdx(b.proxy, "cust-2").await;
        if r.status == 200 {
            served_as(&r, "user-2");
            break;
        }
        assert_eq!(r.header("x-bearer-proxy-error"), Some("token_unavailable"));
        assert!(Instant::now() < deadline, "B never recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = enrol(b.subjects.unwrap(), &issuer, "cust-3", "user-3").await;
    assert_eq!(r.status, 201, "{}", r.text());
    served_as(&fdx(a.proxy, "cust-3").await, "user-3");
    assert_no_tokens_logged(&mut a).await;
    assert_no_tokens_logged(&mut b).await;
}

#[tokio::test]
async fn tls_with_a_throwaway_ca_works_and_a_wrong_password_stops_the_start_naming_redis() {
    let Some(tls) = RedisServer::start(RedisOptions {
        tls: true,
        password: Some("right-password".into()),
        ..RedisOptions::default()
    })
    .await
    else {
        return;
    };
    let issuer = users_issuer(IssuerOptions::default()).await;
    let setup = Setup::new();
    let rc = tls.config();
    assert!(rc.url.starts_with("rediss://"));
    let mut p = Child::spawn(&setup.config("tls", &issuer, &rc, false)).await;
    let r = enrol(p.subjects.unwrap(), &issuer, "cust-1", "user-1").await;
    assert_eq!(r.status, 201, "{}", r.text());
    served_as(&fdx(p.proxy, "cust-1").await, "user-1");
    let logs = assert_no_tokens_logged(&mut p).await;
    assert!(!logs.contains("right-password"), "{logs}");

    // The wrong password: `run` exits non-zero naming Redis, and so does `check`.
    let wrong = setup.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let bad = RedisConfig {
        password_file: Some(wrong),
        ..rc.clone()
    };
    let config = setup.config("bad", &issuer, &bad, false);
    // Without the CA the server's certificate is not trusted: a clear error as well.
    let no_ca = setup.config(
        "no-ca",
        &issuer,
        &RedisConfig {
            ca_file: None,
            ..rc
        },
        false,
    );
    for (config, expect) in [(&config, "authentication failed"), (&no_ca, "certificate")] {
        for command in ["run", "check"] {
            let out = tokio::time::timeout(
                PATIENCE,
                tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
                    .arg(command)
                    .env("BEARER_PROXY_CONFIG", config)
                    .env_remove("RUST_LOG")
                    .stdin(std::process::Stdio::null())
                    .output(),
            )
            .await
            .expect("the process did not exit")
            .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{command}: {text}");
            assert!(text.contains("Redis"), "{command}: {text}");
            assert!(
                text.to_lowercase().contains(&expect.to_lowercase()),
                "{command}: {text}"
            );
            assert!(!text.contains("not-the-password"), "{text}");
            assert!(!text.contains("right-password"), "{text}");
        }
    }
}
