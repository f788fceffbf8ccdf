//! `shared = true` named tokens (issue #13) end to end: three `bearer-proxy run` processes,
//! one real `redis-server` and the dev issuer. Processes rather than in-process servers, so
//! that nothing (a static, the metrics registry, one tokio runtime) is shared between the
//! replicas but Redis.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bearer_proxy::issuer::{IssuerControl, IssuerOptions};
use tokio::time::Instant;

use crate::support::{
    Child, RedisOptions, RedisServer, Reply, Upstream, get, issuer, metric, never_log, scrape,
};

const SECRET: &str = "shared-secret-canary";
/// Short enough to see several lifetimes in a test, long enough that the clock-skew allowance
/// (1 s) and whole-second expiries leave adopted tokens most of their life.
const LIFETIME: Duration = Duration::from_secs(6);

/// Writes one replica's configuration: its own ports, the shared token, the route.
fn write_config(
    dir: &Path,
    n: usize,
    token_url: &str,
    upstream: &str,
    redis: &RedisServer,
) -> PathBuf {
    let d = dir.display();
    let path = dir.join(format!("replica-{n}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
token_wait = "5s"
drain_delay = "0s"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"

[tokens.flinks]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "shared-client"
client_secret_file = "{d}/client_secret"
shared = true
timeout = "2s"
backoff_initial = "100ms"
backoff_max = "500ms"
refresh_ratio = 0.9
refresh_margin = "1s"

[redis]
url = "{url}"
encryption_key_file = "{d}/redis_key"
command_timeout = "300ms"
connect_timeout = "1s"

[[routes]]
name = "api"
host = "api.example"
token = "flinks"
upstream = "{upstream}"
"#,
            url = redis.url(),
        ),
    )
    .unwrap();
    path
}

/// Routes one request through each replica: each must reach the upstream with a token the
/// issuer says is valid (the upstream answers 401 otherwise).
async fn route_through_all(replicas: &[Child]) {
    for (i, r) in replicas.iter().enumerate() {
        let resp = get(r.proxy, "http://api.example/accounts", &[]).await;
        assert_eq!(resp.status, 200, "replica {i}: {}", resp.text());
    }
}

/// Routes requests through every replica every 100 ms for `d`.
async fn serve_for(replicas: &[Child], d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        route_through_all(replicas).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter of `token = "flinks"` summed over the replicas.
async fn sum(replicas: &[Child], name: &str) -> f64 {
    let mut total = 0.0;
    for r in replicas {
        let text = scrape(r.admin).await;
        total += metric(name)
            .label("token", "flinks")
            .value_in(&text)
            .unwrap_or_else(|| panic!("{name} missing"));
    }
    total
}

fn validating_upstream(
    control: IssuerControl,
) -> impl Fn(&crate::support::Recorded, usize) -> Reply {
    move |req, _| {
        let token = req
            .one("authorization")
            .and_then(|h| h.strip_prefix("Bearer ").map(str::to_owned));
        match token {
            Some(t) if control.is_valid_token(&t) => Reply::ok("{}"),
            _ => Reply::status(401),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_token_request_per_round_and_survive_redis_going_away() {
    let Some(mut redis) = RedisServer::start(RedisOptions::default()).await else {
        return;
    };
    never_log(SECRET);
    let (token_url, control) = issuer(IssuerOptions {
        clients: vec![("shared-client".into(), SECRET.into())],
        lifetime: LIFETIME,
        ..Default::default()
    })
    .await;
    let upstream = Upstream::plain(validating_upstream(control.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client_secret"), SECRET).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    never_log(&key);
    std::fs::write(dir.path().join("redis_key"), &key).unwrap();
    let upstream_url = upstream.url(false);
    let mut replicas = Vec::new();
    for n in 0..3 {
        let config = write_config(dir.path(), n, &token_url, &upstream_url, &redis);
        replicas.push(Child::spawn(&config).await);
    }
    route_through_all(&replicas).await;
    // The first replica requested; the other two adopted its token from Redis.
    assert_eq!(
        control.request_count(),
        1,
        "three replicas, one token request"
    );

    // Several lifetimes with Redis up: the replicas take turns, one request per round. One
    // replica alone refreshes a 6 s token about every 4.7 s (refresh_ratio 0.9, less the
    // jitter and twice the leeway), so three on their own would make about 8 requests in 12 s;
    // sharing makes one per round, and adopted tokens (1 s of clock-skew allowance less) are
    // renewed somewhat earlier: at most about one every 3 s.
    let before = control.request_count();
    let phase = LIFETIME * 2;
    serve_for(&replicas, phase).await;
    let shared = control.request_count() - before;
    assert!(
        (2..=5).contains(&shared),
        "{shared} token requests in {phase:?}"
    );
    assert!(sum(&replicas, "bearer_proxy_token_adoptions_total").await >= 2.0 + shared as f64);
    assert_eq!(
        sum(&replicas, "bearer_proxy_token_shared_fallbacks_total").await,
        0.0
    );

    // Redis goes away: every replica falls back to its own requests and keeps serving with
    // valid tokens, for longer than a token lives.
    redis.kill().await;
    serve_for(&replicas, LIFETIME + Duration::from_secs(1)).await;
    let fallbacks = sum(&replicas, "bearer_proxy_token_shared_fallbacks_total").await;
    assert!(
        fallbacks >= 3.0,
        "{fallbacks} fallbacks: every replica refreshed on its own"
    );

    // Redis is back (same port, its AOF): sharing resumes without a restart.
    redis.restart().await;
    let adoptions = sum(&replicas, "bearer_proxy_token_adoptions_total").await;
    serve_for(&replicas, LIFETIME + LIFETIME / 2).await;
    let after = sum(&replicas, "bearer_proxy_token_adoptions_total").await;
    assert!(
        after >= adoptions + 2.0,
        "no adoptions after Redis returned: {adoptions} → {after}"
    );
    // Once each replica's first refresh after the return went through Redis, no more
    // fallbacks.
    let settled = sum(&replicas, "bearer_proxy_token_shared_fallbacks_total").await;
    serve_for(&replicas, LIFETIME).await;
    assert_eq!(
        sum(&replicas, "bearer_proxy_token_shared_fallbacks_total").await,
        settled
    );

    // No access token in Redis in plaintext, none in any replica's logs.
    let issued: Vec<_> = control.issued_tokens();
    assert!(!issued.is_empty());
    let dump = redis.dump().await;
    for t in &issued {
        let raw = t.access_token.expose().as_bytes();
        assert!(
            !dump.windows(raw.len()).any(|w| w == raw),
            "a plaintext access token in Redis"
        );
    }
    let issued = Arc::new(issued);
    for mut r in replicas {
        r.signal("TERM");
        tokio::time::timeout(crate::support::PATIENCE, r.child.wait())
            .await
            .expect("did not stop")
            .unwrap();
        let logs = r.logs().await;
        assert!(!logs.contains(SECRET) && !logs.contains(&key));
        for t in issued.iter() {
            assert!(
                !logs.contains(t.access_token.expose()),
                "a token in the logs"
            );
        }
    }
}
