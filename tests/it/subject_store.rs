//! The `SubjectStore` contract (src/subject/record.rs), one suite run against every store: the
//! embedded file store and the Redis store (against a real `redis-server`). A store passes when
//! records are read and written whole, `put` is a compare-and-set whose generation the store
//! assigns (of concurrent writers from one generation exactly one wins), a code is spent once
//! per token even across a reopen, listings page through every subject once and filter by
//! state, token names that could leave the store's namespace are refused, everything survives
//! a reopen, and no plaintext refresh token or code reaches what the store persists.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bearer_proxy::secret::Secret;
use bearer_proxy::subject::record::{CodeDigest, Cursor, Record, StoreError};
use bearer_proxy::subject::redis::RedisStore;
use bearer_proxy::subject::{FileStore, KeyRing, SubjectId, SubjectState, SubjectStore};

use crate::support::{RedisOptions, RedisServer, never_log};

/// A store under test: how to open it (again) and what it has persisted.
trait Backend {
    /// A new handle on the same data (a restart of the process).
    async fn open(&self) -> Arc<dyn SubjectStore>;
    /// Every byte the store keeps (files, or Redis' AOF and values), for canary searches.
    async fn persisted(&self) -> Vec<u8>;
}

struct Files(tempfile::TempDir);

impl Backend for Files {
    async fn open(&self) -> Arc<dyn SubjectStore> {
        Arc::new(FileStore::open(self.0.path()).await.unwrap())
    }

    async fn persisted(&self) -> Vec<u8> {
        fn walk(dir: &Path, out: &mut Vec<u8>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                out.extend(path.display().to_string().into_bytes());
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.extend(std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.0.path(), &mut out);
        out
    }
}

struct Redis(RedisServer);

impl Backend for Redis {
    async fn open(&self) -> Arc<dyn SubjectStore> {
        Arc::new(RedisStore::connect(&self.0.config()).await.unwrap())
    }

    async fn persisted(&self) -> Vec<u8> {
        let mut out = self.0.disk_bytes();
        out.extend(self.0.dump().await);
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_keeps_the_contract() {
    contract(&Files(tempfile::tempdir().unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract() {
    let Some(server) = RedisServer::start(RedisOptions::default()).await else {
        return;
    };
    contract(&Redis(server)).await;
}

/// Every check, in order (each uses its own token names, so they do not see each other).
async fn contract(b: &impl Backend) {
    let store = b.open().await;
    let ring = key_ring().await;
    round_trip(&*store, &ring).await;
    compare_and_set(&*store, &ring).await;
    one_of_concurrent_writers_wins(store.clone(), &ring).await;
    codes_are_spent_once(b, &*store).await;
    listing(&*store, &ring).await;
    state_changes_and_deletes_move_listings(&*store, &ring).await;
    token_names_cannot_leave_the_namespace(&*store, &ring).await;
    everything_survives_a_reopen(b, &*store).await;
    no_plaintext_secret_is_persisted(b, &*store, &ring).await;
}

pub fn id(s: &str) -> SubjectId {
    SubjectId::parse(s).unwrap()
}

/// A key ring with one random key (its file in a directory dropped at once: loaded keys stay).
pub async fn key_ring() -> KeyRing {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
    std::fs::write(&path, BASE64.encode(key)).unwrap();
    KeyRing::load(&[path]).await.unwrap()
}

pub fn record(ring: &KeyRing, token: &str, subject: &str, rt: &str) -> Record {
    let s = id(subject);
    let sealed = ring.seal(token, &s, &Secret::new(rt)).unwrap();
    Record::enrolled(s, sealed, 1_700_000_000)
}

async fn round_trip(store: &dyn SubjectStore, ring: &KeyRing) {
    let s = id("cust-1");
    let r = Record {
        last_refresh: Some(5),
        last_use: Some(6),
        last_error: Some("temporarily_unavailable".into()),
        ..record(ring, "rt", "cust-1", "rt-1")
    };
    assert_eq!(store.get("rt", &s).await.unwrap(), None);
    assert_eq!(store.put("rt", &r, None).await.unwrap(), 1);
    let got = store.get("rt", &s).await.unwrap().unwrap();
    assert_eq!(got.generation, 1);
    assert_eq!(
        Record {
            generation: 0,
            ..got.clone()
        },
        r
    );
    let rt = ring.open("rt", &s, &got.refresh_token).unwrap();
    assert_eq!(rt.expose(), "rt-1");
    // Another token's subject of the same id is a different subject.
    assert_eq!(store.get("rt-other", &s).await.unwrap(), None);
    assert!(store.delete("rt", &s).await.unwrap());
    assert!(!store.delete("rt", &s).await.unwrap());
    assert_eq!(store.get("rt", &s).await.unwrap(), None);
}

async fn compare_and_set(store: &dyn SubjectStore, ring: &KeyRing) {
    let r = record(ring, "cas", "s", "rt-1");
    assert_eq!(store.put("cas", &r, None).await.unwrap(), 1);
    // Creating again, or writing from a stale or invented read, loses.
    for expected in [None, Some(0), Some(2)] {
        let e = store.put("cas", &r, expected).await.unwrap_err();
        assert!(
            matches!(e, StoreError::Conflict { found: Some(1), .. }),
            "{expected:?}: {e}"
        );
    }
    let fresh = record(ring, "cas", "new", "x");
    assert!(matches!(
        store.put("cas", &fresh, Some(1)).await,
        Err(StoreError::Conflict { found: None, .. })
    ));
    assert_eq!(store.get("cas", &id("new")).await.unwrap(), None);
    assert_eq!(store.put("cas", &r, Some(1)).await.unwrap(), 2);
    // The caller's generation field does not matter; the store's does.
    let claimed = Record {
        generation: 99,
        ..r.clone()
    };
    assert_eq!(store.put("cas", &claimed, Some(2)).await.unwrap(), 3);
    assert_eq!(
        store
            .get("cas", &id("s"))
            .await
            .unwrap()
            .unwrap()
            .generation,
        3
    );
}

async fn one_of_concurrent_writers_wins(store: Arc<dyn SubjectStore>, ring: &KeyRing) {
    store
        .put("race", &record(ring, "race", "s", "rt-0"), None)
        .await
        .unwrap();
    let records: Vec<Record> = (0..16)
        .map(|i| record(ring, "race", "s", &format!("rt-{i}")))
        .collect();
    let tasks: Vec<_> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let store = store.clone();
            tokio::spawn(async move { store.put("race", &r, Some(1)).await.map(|_| i) })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(i) => winners.push(i),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let got = store.get("race", &id("s")).await.unwrap().unwrap();
    assert_eq!(got.generation, 2);
    let rt = ring.open("race", &id("s"), &got.refresh_token).unwrap();
    assert_eq!(rt.expose(), format!("rt-{}", winners[0]));
}

async fn codes_are_spent_once(b: &impl Backend, store: &dyn SubjectStore) {
    let code = CodeDigest::of(&Secret::new("code-1"));
    store.spend_code("codes", &id("a"), &code).await.unwrap();
    // Again, for the same or another subject: refused.
    for who in ["a", "b"] {
        assert!(matches!(
            store.spend_code("codes", &id(who), &code).await,
            Err(StoreError::CodeSpent)
        ));
    }
    // After a restart (a new handle on the same data) too.
    let reopened = b.open().await;
    assert!(matches!(
        reopened.spend_code("codes", &id("a"), &code).await,
        Err(StoreError::CodeSpent)
    ));
    // Another token has its own codes; another code is fine.
    reopened
        .spend_code("codes-other", &id("a"), &code)
        .await
        .unwrap();
    let other = CodeDigest::of(&Secret::new("code-2"));
    reopened
        .spend_code("codes", &id("a"), &other)
        .await
        .unwrap();
}

/// Every subject of `token` in `state`, paging by `limit`; and the number of pages.
async fn collect(
    store: &dyn SubjectStore,
    token: &str,
    state: Option<SubjectState>,
    limit: usize,
) -> (Vec<SubjectId>, usize) {
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list(token, state, cursor.as_ref(), limit)
            .await
            .unwrap();
        assert!(page.records.len() <= limit);
        seen.extend(page.records.into_iter().map(|r| r.subject));
        pages += 1;
        assert!(pages < 1000, "the listing does not end");
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    (seen, pages)
}

async fn listing(store: &dyn SubjectStore, ring: &KeyRing) {
    let mut reauth = BTreeSet::new();
    for i in 0..50 {
        let mut r = record(ring, "list", &format!("s{i}"), "rt");
        if i % 3 == 0 {
            r.state = SubjectState::NeedsReauth;
            reauth.insert(r.subject.clone());
        }
        store.put("list", &r, None).await.unwrap();
    }
    store
        .put("list-one", &record(ring, "list-one", "s0", "rt"), None)
        .await
        .unwrap();
    let (all, pages) = collect(store, "list", None, 7).await;
    assert_eq!(all.len(), 50);
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 50);
    assert_eq!(pages, 8); // 7 full pages, then 1
    let (only, _) = collect(store, "list", Some(SubjectState::NeedsReauth), 7).await;
    assert_eq!(only.into_iter().collect::<BTreeSet<_>>(), reauth);
    // Exactly one full page: no cursor.
    let one = store.list("list-one", None, None, 1).await.unwrap();
    assert_eq!((one.records.len(), one.next), (1, None));
    assert!(
        store
            .list("list-none", None, None, 10)
            .await
            .unwrap()
            .records
            .is_empty()
    );
    // A cursor the store did not hand out (a path, nothing, junk) is refused.
    for bad in ["../../etc", "", "ABCDEF", "zz"] {
        assert!(
            matches!(
                store
                    .list("list", None, Some(&Cursor::from_text(bad)), 10)
                    .await,
                Err(StoreError::InvalidCursor)
            ),
            "{bad:?}"
        );
    }
}

async fn state_changes_and_deletes_move_listings(store: &dyn SubjectStore, ring: &KeyRing) {
    // Sorted: each store has its own order.
    let listed = |state| async move {
        let mut ids: Vec<String> = collect(store, "states", state, 10)
            .await
            .0
            .into_iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let a = record(ring, "states", "a", "rt");
    let b = record(ring, "states", "b", "rt");
    store.put("states", &a, None).await.unwrap();
    store.put("states", &b, None).await.unwrap();
    assert_eq!(listed(Some(SubjectState::Active)).await, ["a", "b"]);
    let a_reauth = Record {
        state: SubjectState::NeedsReauth,
        ..a.clone()
    };
    store.put("states", &a_reauth, Some(1)).await.unwrap();
    assert_eq!(listed(Some(SubjectState::Active)).await, ["b"]);
    assert_eq!(listed(Some(SubjectState::NeedsReauth)).await, ["a"]);
    // A lost compare-and-set changes no listing either.
    let b_reauth = Record {
        state: SubjectState::NeedsReauth,
        ..b.clone()
    };
    assert!(store.put("states", &b_reauth, Some(7)).await.is_err());
    assert_eq!(listed(Some(SubjectState::NeedsReauth)).await, ["a"]);
    // Re-enrolled: active again.
    store.put("states", &a, Some(2)).await.unwrap();
    assert_eq!(
        listed(Some(SubjectState::NeedsReauth)).await,
        Vec::<String>::new()
    );
    assert!(store.delete("states", &id("a")).await.unwrap());
    assert_eq!(listed(None).await, ["b"]);
    assert_eq!(listed(Some(SubjectState::Active)).await, ["b"]);
}

async fn token_names_cannot_leave_the_namespace(store: &dyn SubjectStore, ring: &KeyRing) {
    let r = record(ring, "t", "s", "rt");
    let code = CodeDigest::of(&Secret::new("c"));
    for bad in [
        "..", "../x", "a/b", "", "UPPER", "a.b", "a}b", "a:b", "a{b", "a b",
    ] {
        let invalid = |e: StoreError| matches!(e, StoreError::InvalidToken(_));
        assert!(
            invalid(store.put(bad, &r, None).await.unwrap_err()),
            "{bad}"
        );
        assert!(
            invalid(store.get(bad, &r.subject).await.unwrap_err()),
            "{bad}"
        );
        assert!(
            invalid(store.delete(bad, &r.subject).await.unwrap_err()),
            "{bad}"
        );
        assert!(
            invalid(store.list(bad, None, None, 1).await.unwrap_err()),
            "{bad}"
        );
        assert!(
            invalid(store.spend_code(bad, &r.subject, &code).await.unwrap_err()),
            "{bad}"
        );
    }
    // `..` as a subject id is just a subject.
    let dots = record(ring, "t", "..", "rt");
    store.put("t", &dots, None).await.unwrap();
    assert!(store.get("t", &id("..")).await.unwrap().is_some());
}

async fn everything_survives_a_reopen(b: &impl Backend, store: &dyn SubjectStore) {
    let reopened = b.open().await;
    for token in ["list", "cas", "race", "states", "t"] {
        let (before, _) = collect(store, token, None, 1000).await;
        let (after, _) = collect(&*reopened, token, None, 1000).await;
        assert!(!before.is_empty(), "{token}");
        assert_eq!(before, after, "{token}");
        for s in &after {
            assert_eq!(
                reopened.get(token, s).await.unwrap(),
                store.get(token, s).await.unwrap()
            );
        }
    }
}

async fn no_plaintext_secret_is_persisted(
    b: &impl Backend,
    store: &dyn SubjectStore,
    ring: &KeyRing,
) {
    let canary = "rt-canary-5c1e9b";
    let code = "code-canary-77aa03";
    never_log(canary);
    never_log(code);
    for i in 0..20 {
        let subject = format!("cust-{i}");
        store
            .spend_code(
                "canary",
                &id(&subject),
                &CodeDigest::of(&Secret::new(format!("{code}-{i}"))),
            )
            .await
            .unwrap();
        let r = record(ring, "canary", &subject, &format!("{canary}-{i}"));
        let g = store.put("canary", &r, None).await.unwrap();
        // Rewritten too, as a refresh would.
        store.put("canary", &r, Some(g)).await.unwrap();
    }
    let bytes = b.persisted().await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("cust-19"), "the search sees the records");
    for needle in [
        canary.to_owned(),
        code.to_owned(),
        BASE64.encode(format!("{canary}-1")),
    ] {
        assert!(!text.contains(&needle), "{needle} persisted in plaintext");
    }
}
