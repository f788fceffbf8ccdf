//! The Redis store (issue #13) against a real `redis-server` started by the test: restart from
//! the AOF after a crash, writers on separate connections racing, TLS with a throwaway CA,
//! passwords and ACL users, Redis going away and coming back, leases, shared access-token
//! slots, and what an attacker with access to Redis could change. The `SubjectStore` contract
//! itself runs in `subject_store.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bearer_proxy::metrics::Metrics;
use bearer_proxy::secret::Secret;
use bearer_proxy::subject::record::{CodeDigest, StoreError};
use bearer_proxy::subject::redis::{ConnectError, RedisStore, Scope};
use bearer_proxy::subject::{SubjectState, SubjectStore};
use tokio::time::Instant;

use crate::subject_store::{id, key_ring, record};
use crate::support::{PATIENCE, RedisOptions, RedisServer, never_log};

async fn plain() -> Option<RedisServer> {
    RedisServer::start(RedisOptions::default()).await
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.config()).await.unwrap()
}

#[tokio::test]
async fn a_crash_and_a_restart_from_the_aof_keep_every_subject_and_spent_code() {
    let Some(mut server) = plain().await else {
        return;
    };
    let store = connect(&server).await;
    let ring = key_ring().await;
    for i in 0..200 {
        let mut r = record(&ring, "flinks", &format!("c{i}"), &format!("rt-{i}"));
        if i % 7 == 0 {
            r.state = SubjectState::NeedsReauth;
        }
        let g = store.put("flinks", &r, None).await.unwrap();
        if i % 2 == 0 {
            store.put("flinks", &r, Some(g)).await.unwrap();
        }
        let code = CodeDigest::of(&Secret::new(format!("code-{i}")));
        store.spend_code("flinks", &r.subject, &code).await.unwrap();
    }
    let before = all(&store).await;
    assert_eq!(before.len(), 200);
    // SIGKILL: nothing beyond what Redis wrote to its AOF before answering survives.
    server.restart().await;
    let after_restart = connect(&server).await;
    assert_eq!(all(&after_restart).await, before);
    let reauth = after_restart
        .list("flinks", Some(SubjectState::NeedsReauth), None, 1000)
        .await
        .unwrap();
    assert_eq!(reauth.records.len(), 29);
    for i in [0, 1, 199] {
        let code = CodeDigest::of(&Secret::new(format!("code-{i}")));
        assert!(matches!(
            after_restart
                .spend_code("flinks", &id(&format!("c{i}")), &code)
                .await,
            Err(StoreError::CodeSpent)
        ));
        let got = after_restart
            .get("flinks", &id(&format!("c{i}")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.generation, if i % 2 == 0 { 2 } else { 1 });
        let rt = ring.open("flinks", &id(&format!("c{i}")), &got.refresh_token);
        assert_eq!(rt.unwrap().expose(), format!("rt-{i}"));
    }
    // The handle from before the crash recovers by itself (its connection manager).
    let deadline = Instant::now() + PATIENCE;
    while store.get("flinks", &id("c3")).await.is_err() {
        assert!(Instant::now() < deadline, "the old handle never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every record of `flinks`, by subject.
async fn all(store: &RedisStore) -> Vec<bearer_proxy::subject::Record> {
    let page = store.list("flinks", None, None, 1000).await.unwrap();
    assert_eq!(page.next, None);
    page.records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writers_on_separate_connections_from_one_generation_exactly_one_wins() {
    let Some(server) = plain().await else {
        return;
    };
    let ring = Arc::new(key_ring().await);
    let first = connect(&server).await;
    first
        .put("t", &record(&ring, "t", "s", "rt-0"), None)
        .await
        .unwrap();
    // Each writer is its own connection, as replicas are.
    let mut writers = Vec::new();
    for _ in 0..8 {
        writers.push(connect(&server).await);
    }
    for round in 1..=5u64 {
        let tasks: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let r = record(&ring, "t", "s", &format!("rt-{round}-{i}"));
                async move { w.put("t", &r, Some(round)).await.map(|_| i) }
            })
            .collect();
        let results = futures_util::future::join_all(tasks).await;
        let winners: Vec<usize> = results
            .into_iter()
            .filter_map(|r| match r {
                Ok(i) => Some(i),
                Err(StoreError::Conflict { .. }) => None,
                Err(e) => panic!("{e}"),
            })
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let got = first.get("t", &id("s")).await.unwrap().unwrap();
        assert_eq!(got.generation, round + 1);
        let rt = ring.open("t", &id("s"), &got.refresh_token).unwrap();
        assert_eq!(rt.expose(), format!("rt-{round}-{}", winners[0]));
    }
}

#[tokio::test]
async fn tls_connects_with_the_ca_file_and_fails_without_it() {
    let Some(server) = RedisServer::start(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    })
    .await
    else {
        return;
    };
    let cfg = server.config();
    let store = RedisStore::connect(&cfg).await.unwrap();
    let ring = key_ring().await;
    store
        .put("t", &record(&ring, "t", "s", "rt"), None)
        .await
        .unwrap();
    assert!(store.get("t", &id("s")).await.unwrap().is_some());
    store.ping().await.unwrap();

    // The default roots (Mozilla's) do not know the throwaway CA.
    let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
        ca_file: None,
        ..cfg.clone()
    })
    .await
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ConnectError::Redis { .. }), "{text}");
    assert!(
        text.contains("Redis") && text.contains(&server.url()),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // Another CA: refused too.
    let other = RedisServer::start(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    })
    .await
    .unwrap();
    let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
        ca_file: Some(other.ca_file()),
        ..cfg.clone()
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Plaintext to the TLS port: an error within connect_timeout, not a hang.
    let started = Instant::now();
    let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
        url: server.url().replace("rediss://", "redis://"),
        ca_file: None,
        ..cfg
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot connect to Redis"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{e}");
}

#[tokio::test]
async fn a_wrong_or_missing_password_is_a_clear_error_at_connect() {
    let password = "pw-canary-4d1f0a";
    never_log(password);
    let Some(server) = RedisServer::start(RedisOptions {
        password: Some(password.into()),
        ..RedisOptions::default()
    })
    .await
    else {
        return;
    };
    let cfg = server.config();
    RedisStore::connect(&cfg)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong-canary-pw").unwrap();
    for (password_file, want) in [
        (Some(wrong), "authentication failed"),
        (None, "authentication required"),
    ] {
        let started = Instant::now();
        let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
            password_file,
            ..cfg.clone()
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot connect to Redis at"), "{e}");
        assert!(e.to_lowercase().contains(want), "{e}");
        assert!(!e.contains("canary"), "{e}");
        // At once, not after the connection manager's retries.
        assert!(started.elapsed() < Duration::from_secs(2), "{e}");
    }
    let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
        password_file: Some(dir.path().join("missing")),
        ..cfg
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("redis.password_file") && e.contains("missing"),
        "{e}"
    );
}

#[tokio::test]
async fn an_acl_user_authenticates_with_its_own_password() {
    let Some(server) = RedisServer::start(RedisOptions {
        user: Some(("bearer-proxy".into(), "user-pw-canary".into())),
        ..RedisOptions::default()
    })
    .await
    else {
        return;
    };
    let cfg = server.config();
    let store = RedisStore::connect(&cfg).await.unwrap();
    store
        .spend_code("t", &id("s"), &CodeDigest::of(&Secret::new("c")))
        .await
        .unwrap();
    let e = RedisStore::connect(&bearer_proxy::subject::redis::RedisConfig {
        username: Some("someone-else".into()),
        ..cfg
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("authentication failed") && !e.contains("canary"),
        "{e}"
    );
}

#[tokio::test]
async fn with_redis_gone_every_operation_fails_fast_and_the_store_recovers_when_it_returns() {
    let Some(mut server) = plain().await else {
        return;
    };
    let cfg = server.config();
    let metrics = Metrics::new();
    let store = RedisStore::connect(&cfg)
        .await
        .unwrap()
        .with_metrics(metrics.clone());
    let ring = key_ring().await;
    let r = record(&ring, "t", "s", "rt");
    store.put("t", &r, None).await.unwrap();
    server.kill().await;

    // Generous over command_timeout for a loaded machine, far under anything that hangs.
    let bound = cfg.command_timeout + Duration::from_secs(1);
    let code = CodeDigest::of(&Secret::new("c"));
    let s = id("s");
    for round in 0..2 {
        macro_rules! fails_fast {
            ($op:literal, $call:expr) => {{
                let started = Instant::now();
                let e = $call.await.map(drop).unwrap_err();
                let elapsed = started.elapsed();
                assert!(elapsed <= bound, "round {round}: {} took {elapsed:?}", $op);
                assert!(matches!(e, StoreError::Io { .. }), "{e}");
                let text = e.to_string();
                assert!(text.contains(concat!("redis ", $op)), "{text}");
            }};
        }
        fails_fast!("get", store.get("t", &s));
        fails_fast!("put", store.put("t", &r, Some(1)));
        fails_fast!("list", store.list("t", None, None, 10));
        fails_fast!("delete", store.delete("t", &s));
        fails_fast!("spend_code", store.spend_code("t", &s, &code));
        fails_fast!(
            "lock",
            store.try_lock(&Scope::Subject("t", &s), Duration::from_secs(5))
        );
        fails_fast!(
            "access_token_get",
            store.get_access_token(&ring, &Scope::Named("t"))
        );
        fails_fast!("ping", store.ping());
    }
    let text = metrics.encode();
    for op in ["get", "put", "list", "delete", "spend_code", "lock", "ping"] {
        let line = format!("bearer_proxy_store_errors_total{{op=\"{op}\"}} 2");
        assert!(text.contains(&line), "missing {line}");
    }

    server.restart().await;
    let deadline = Instant::now() + PATIENCE;
    let got = loop {
        match store.get("t", &s).await {
            Ok(got) => break got,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got.unwrap().generation, 1);
    store.put("t", &r, Some(1)).await.unwrap();
    store.ping().await.unwrap();
}

#[tokio::test]
async fn a_lease_is_exclusive_expires_and_only_its_holder_releases_it() {
    let Some(server) = plain().await else {
        return;
    };
    let a = connect(&server).await;
    let b = connect(&server).await;
    let s = id("cust-1");
    let scope = Scope::Subject("flinks", &s);
    let long = Duration::from_secs(30);

    let held = a.try_lock(&scope, long).await.unwrap().unwrap();
    assert!(b.try_lock(&scope, long).await.unwrap().is_none());
    assert!(
        a.try_lock(&scope, long).await.unwrap().is_none(),
        "not re-entrant"
    );
    // Other scopes are independent: another subject, another token, the named token.
    let other = id("cust-2");
    for sc in [
        Scope::Subject("flinks", &other),
        Scope::Subject("other", &s),
        Scope::Named("flinks"),
    ] {
        let l = b.try_lock(&sc, long).await.unwrap().unwrap();
        assert!(b.release(l).await.unwrap());
    }
    assert!(a.release(held).await.unwrap());
    let next = b.try_lock(&scope, long).await.unwrap().unwrap();
    assert!(b.release(next).await.unwrap());

    // A stalled holder: its lease lapses, another takes it; the stale holder can neither
    // renew nor release the newer holder's lease.
    let ttl = Duration::from_millis(150);
    let stale = a.try_lock(&scope, ttl).await.unwrap().unwrap();
    let taken = Instant::now();
    let deadline = taken + PATIENCE;
    let newer = loop {
        if let Some(l) = b.try_lock(&scope, long).await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        taken.elapsed() >= ttl - Duration::from_millis(10),
        "expired early"
    );
    assert!(!a.renew(&stale, long).await.unwrap());
    assert!(!a.release(stale).await.unwrap());
    assert!(
        a.try_lock(&scope, long).await.unwrap().is_none(),
        "newer lease lost"
    );
    // Its holder renews and releases it.
    assert!(b.renew(&newer, long).await.unwrap());
    assert!(b.release(newer).await.unwrap());
    assert!(a.try_lock(&scope, long).await.unwrap().is_some());
}

#[tokio::test]
async fn a_shared_access_token_is_sealed_expires_before_the_token_and_cannot_be_moved() {
    let Some(server) = plain().await else {
        return;
    };
    let store = connect(&server).await;
    let ring = key_ring().await;
    let canary = "at-canary-3b9e1c";
    never_log(canary);
    let s1 = id("cust-1");
    let s2 = id("cust-2");
    let sub1 = Scope::Subject("flinks", &s1);
    let sub2 = Scope::Subject("flinks", &s2);
    let named = Scope::Named("flinks");
    let ttl = Duration::from_secs(240);
    assert_eq!(store.get_access_token(&ring, &sub1).await.unwrap(), None);
    store
        .put_access_token(&ring, &sub1, &Secret::new(canary), 1_800_000_300, ttl)
        .await
        .unwrap();
    store
        .put_access_token(&ring, &named, &Secret::new("named-at"), 1_800_000_100, ttl)
        .await
        .unwrap();
    let got = store.get_access_token(&ring, &sub1).await.unwrap().unwrap();
    assert_eq!(got.access_token.expose(), canary);
    assert_eq!(got.expires_at, 1_800_000_300);
    let n = store
        .get_access_token(&ring, &named)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.access_token.expose(), "named-at");
    assert_eq!(store.get_access_token(&ring, &sub2).await.unwrap(), None);
    // A zero TTL stores nothing.
    store
        .put_access_token(&ring, &sub2, &Secret::new("x"), 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(store.get_access_token(&ring, &sub2).await.unwrap(), None);

    let mut raw = server.raw().await;
    let keys: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*access*")
        .query_async(&mut raw)
        .await
        .unwrap();
    let k1 = "bearer-proxy:{flinks}:access:cust-1";
    let kn = "bearer-proxy:{flinks}:access";
    assert_eq!(keys, BTreeSet::from([k1.to_owned(), kn.to_owned()]));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(k1)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 240_000, "{pttl}");

    // Nothing in Redis or its AOF holds the token in plaintext.
    let mut bytes = server.dump().await;
    bytes.extend(server.disk_bytes());
    assert!(!String::from_utf8_lossy(&bytes).contains(canary));

    // Someone with write access to Redis moves values around: nothing opens.
    let value: String = redis::cmd("GET")
        .arg(k1)
        .query_async(&mut raw)
        .await
        .unwrap();
    let set = |key: &'static str, v: String| {
        let mut raw = raw.clone();
        async move {
            redis::cmd("SET")
                .arg(key)
                .arg(v)
                .query_async::<()>(&mut raw)
                .await
                .unwrap()
        }
    };
    // To another subject's slot, to the named slot, with a later expiry.
    set("bearer-proxy:{flinks}:access:cust-2", value.clone()).await;
    set(kn, value.clone()).await;
    let mut json: serde_json::Value = serde_json::from_str(&value).unwrap();
    json["expires_at"] = 1_900_000_000u64.into();
    set(k1, json.to_string()).await;
    for scope in [sub2, named, sub1] {
        let e = store.get_access_token(&ring, &scope).await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(!e.to_string().contains("canary"), "{e}");
    }
    // A sealed refresh token put in a slot does not open as an access token either.
    let rt = record(&ring, "flinks", "cust-1", "rt-canary");
    let forged = serde_json::json!({"expires_at": 1, "sealed": rt.refresh_token});
    set(k1, forged.to_string()).await;
    assert!(store.get_access_token(&ring, &sub1).await.is_err());
    // Another key ring (a key no longer configured) names the key id.
    store
        .put_access_token(&ring, &sub1, &Secret::new("at"), 1, ttl)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("k");
    std::fs::write(&other_key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
    let other = bearer_proxy::subject::KeyRing::load(&[other_key])
        .await
        .unwrap();
    let e = store
        .get_access_token(&other, &sub1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(ring.newest_id()), "{e}");
}

#[tokio::test]
async fn a_record_copied_to_another_subject_or_damaged_in_redis_is_an_error() {
    let Some(server) = plain().await else {
        return;
    };
    let store = connect(&server).await;
    let ring = key_ring().await;
    store
        .put("t", &record(&ring, "t", "a", "rt-a"), None)
        .await
        .unwrap();
    store
        .put("t", &record(&ring, "t", "b", "rt-b"), None)
        .await
        .unwrap();
    let mut raw = server.raw().await;
    let b_rec: String = redis::cmd("HGET")
        .arg("bearer-proxy:{t}:rec:b")
        .arg("rec")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("bearer-proxy:{t}:rec:a")
        .arg("rec")
        .arg(&b_rec)
        .query_async(&mut raw)
        .await
        .unwrap();
    let e = store.get("t", &id("a")).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(store.list("t", None, None, 10).await.is_err());
    // A generation field that disagrees with the record: refused, not guessed.
    let _: () = redis::cmd("HSET")
        .arg("bearer-proxy:{t}:rec:b")
        .arg("gen")
        .arg("7")
        .query_async(&mut raw)
        .await
        .unwrap();
    let e = store.get("t", &id("b")).await.unwrap_err().to_string();
    assert!(e.contains("bearer-proxy:{t}:rec:b"), "{e}");
}

#[tokio::test]
async fn the_key_prefix_separates_deployments_sharing_one_redis() {
    let Some(server) = plain().await else {
        return;
    };
    let ring = key_ring().await;
    let mut cfg = server.config();
    let a = RedisStore::connect(&cfg).await.unwrap();
    cfg.key_prefix = "staging:bp:".into();
    let b = RedisStore::connect(&cfg).await.unwrap();
    a.put("t", &record(&ring, "t", "s", "rt"), None)
        .await
        .unwrap();
    assert_eq!(b.get("t", &id("s")).await.unwrap(), None);
    assert!(
        b.list("t", None, None, 10)
            .await
            .unwrap()
            .records
            .is_empty()
    );
    b.put("t", &record(&ring, "t", "s", "rt"), None)
        .await
        .unwrap();
    let mut raw = server.raw().await;
    let keys: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*rec*")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        keys,
        BTreeSet::from([
            "bearer-proxy:{t}:rec:s".to_owned(),
            "staging:bp:{t}:rec:s".to_owned()
        ])
    );
}

#[tokio::test]
async fn the_listing_indexes_follow_every_state_change_and_delete() {
    let Some(server) = plain().await else {
        return;
    };
    let store = connect(&server).await;
    let ring = key_ring().await;
    let mut raw = server.raw().await;
    let mut index = async |name: &str| -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(format!("bearer-proxy:{{t}}:{name}"))
            .arg(0)
            .arg(-1)
            .query_async(&mut raw)
            .await
            .unwrap()
    };
    let a = record(&ring, "t", "a", "rt");
    let reauth = bearer_proxy::subject::Record {
        state: SubjectState::NeedsReauth,
        ..a.clone()
    };
    store.put("t", &a, None).await.unwrap();
    store.put("t", &reauth, Some(1)).await.unwrap();
    assert_eq!(index("state:active").await, Vec::<String>::new());
    assert_eq!(index("state:needs_reauth").await, ["a"]);
    store.put("t", &a, Some(2)).await.unwrap();
    assert_eq!(index("state:active").await, ["a"]);
    assert_eq!(index("state:needs_reauth").await, Vec::<String>::new());
    assert_eq!(index("subjects").await, ["a"]);
    assert!(store.delete("t", &id("a")).await.unwrap());
    for name in ["subjects", "state:active", "state:needs_reauth"] {
        assert_eq!(index(name).await, Vec::<String>::new(), "{name}");
    }
}
