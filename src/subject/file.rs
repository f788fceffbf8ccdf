//! The embedded subject store: one JSON file per subject under `state_dir`, for a single
//! bearer-proxy process (replicas share the Redis store of issue #13 instead).
//!
//! Layout, under `<state_dir>/subjects/<token>/`:
//! - `records/<hh>/<hash>.json`: one record per subject. `<hash>` is the hex SHA-256 of the
//!   token name and subject id, `<hh>` its first two digits. Hashing keeps ids such as `..` out
//!   of paths and spreads 100,000 subjects over 256 directories of a few hundred files, so no
//!   directory grows huge and a listing reads only the files of the page it returns.
//! - `spent/<sha256 of the code>`: one empty-ish file per spent authorization code, created
//!   with `O_EXCL` and made durable before the code is sent. Creating it *is* the
//!   test-and-set, so a code can be spent once however many enrolments race.
//!
//! Records are written with the token store's atomic write
//! ([`crate::token::store::write_atomic`]: a new temporary file at 0600, fsync, rename, fsync
//! of the directory), so a crash leaves the old record or the new one, never a mix; a
//! temporary file left by a crash is never read as a record and is removed by
//! [`FileStore::open`]. New directories are made durable in their parent as well. Directories
//! are created 0700.
//!
//! Compare-and-set on the generation runs under one of [`STRIPES`] in-process locks chosen
//! by the subject's hash. Two processes must not share one `state_dir`.
//!
//! The record files hold the subject id, states and times in clear, and the refresh token only
//! sealed (see [`super::keyring`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::SubjectId;
use super::record::{
    CodeDigest, Cursor, MAX_PAGE, Page, Record, StoreError, SubjectState, SubjectStore,
};
use crate::token::write_atomic;

/// Number of compare-and-set locks: enough that writers of different subjects rarely wait for
/// each other, fixed so memory does not grow with the number of subjects.
pub const STRIPES: usize = 64;

/// Suffix of a record file.
const RECORD_SUFFIX: &str = ".json";
/// Suffix of the temporary files `write_atomic` creates (`<hash>.json.tmp`).
const TEMP_SUFFIX: &str = ".tmp";

/// The file store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    stripes: Box<[Mutex<()>]>,
}

impl FileStore {
    /// Opens (creating if needed) the store under `state_dir`, removing temporary files a
    /// crash left behind. Call once at start, before anything writes.
    pub async fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join("subjects");
        let r = root.clone();
        blocking(move || {
            ensure_dir(&r).map_err(io_at(&r))?;
            sweep_temporary_files(&r)
        })
        .await?;
        Ok(Self {
            root,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// `<root>/<token>`, after checking the token name cannot leave `root`.
    fn token_dir(&self, token: &str) -> Result<PathBuf, StoreError> {
        // The same alphabet config validation enforces for token names.
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(self.root.join(token))
        } else {
            Err(StoreError::InvalidToken(token.to_owned()))
        }
    }

    /// The record file of a subject, and the hash that names it.
    fn record_path(
        &self,
        token: &str,
        subject: &SubjectId,
    ) -> Result<(PathBuf, String), StoreError> {
        let hash = subject_hash(token, subject);
        let path = self
            .token_dir(token)?
            .join("records")
            .join(&hash[..2])
            .join(format!("{hash}{RECORD_SUFFIX}"));
        Ok((path, hash))
    }

    fn stripe(&self, hash: &str) -> &Mutex<()> {
        let n = usize::from_str_radix(&hash[..4], 16).unwrap_or(0);
        &self.stripes[n % self.stripes.len()]
    }
}

impl SubjectStore for FileStore {
    fn get<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move {
            let (path, _) = self.record_path(token, subject)?;
            let subject = subject.clone();
            blocking(move || read_record(&path, &subject)).await
        })
    }

    fn put<'a>(
        &'a self,
        token: &'a str,
        record: &'a Record,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let (path, hash) = self.record_path(token, &record.subject)?;
            let _guard = self.stripe(&hash).lock().await;
            let mut record = record.clone();
            blocking(move || {
                let found = read_record(&path, &record.subject)?.map(|r| r.generation);
                if found != expected {
                    return Err(StoreError::Conflict {
                        subject: record.subject,
                        expected,
                        found,
                    });
                }
                record.generation = found.map_or(1, |g| g + 1);
                let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Io {
                    location: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
                let dir = parent(&path);
                ensure_dir(dir).map_err(io_at(dir))?;
                write_atomic(&path, &bytes).map_err(io_at(&path))?;
                Ok(record.generation)
            })
            .await
        })
    }

    fn list<'a>(
        &'a self,
        token: &'a str,
        state: Option<SubjectState>,
        after: Option<&'a Cursor>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(async move {
            let dir = self.token_dir(token)?.join("records");
            let after = match after {
                Some(c) if is_hex_hash(&c.0) => Some(c.0.clone()),
                Some(_) => return Err(StoreError::InvalidCursor),
                None => None,
            };
            let limit = limit.clamp(1, MAX_PAGE);
            blocking(move || list_records(&dir, state, after.as_deref(), limit)).await
        })
    }

    fn delete<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let (path, hash) = self.record_path(token, subject)?;
            let _guard = self.stripe(&hash).lock().await;
            blocking(move || match fs::remove_file(&path) {
                Ok(()) => {
                    sync_dir(parent(&path)).map_err(io_at(parent(&path)))?;
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_at(&path)(e)),
            })
            .await
        })
    }

    fn spend_code<'a>(
        &'a self,
        token: &'a str,
        subject: &'a SubjectId,
        code: &'a CodeDigest,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dir = self.token_dir(token)?.join("spent");
            let path = dir.join(code.as_str());
            let line = format!("{subject}\n");
            blocking(move || {
                ensure_dir(&dir).map_err(io_at(&dir))?;
                let created = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path);
                let mut f = match created {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(StoreError::CodeSpent);
                    }
                    Err(e) => return Err(io_at(&path)(e)),
                };
                // Which subject spent it, for an operator investigating a 409.
                f.write_all(line.as_bytes()).map_err(io_at(&path))?;
                f.sync_all().map_err(io_at(&path))?;
                sync_dir(&dir).map_err(io_at(&dir))
            })
            .await
        })
    }
}

/// Hex SHA-256 of the token name and subject id, each length-prefixed.
fn subject_hash(token: &str, subject: &SubjectId) -> String {
    let mut h = Sha256::new();
    for part in [token, subject.as_str()] {
        // Token names and subject ids are far shorter than 4 GiB.
        h.update((part.len() as u32).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The hash naming a record file, if `name` is one (temporary files and strays are not).
fn record_hash(name: &str) -> Option<&str> {
    name.strip_suffix(RECORD_SUFFIX).filter(|h| is_hex_hash(h))
}

fn read_record(path: &Path, subject: &SubjectId) -> Result<Option<Record>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(path)(e)),
    };
    let record = parse_record(path, &bytes)?;
    if record.subject != *subject {
        return Err(corrupt(path, "it belongs to another subject"));
    }
    Ok(Some(record))
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<Record, StoreError> {
    // serde_json's message names the line and column and the expected type, never a value.
    serde_json::from_slice(bytes).map_err(|e| corrupt(path, &e.to_string()))
}

fn list_records(
    dir: &Path,
    state: Option<SubjectState>,
    after: Option<&str>,
    limit: usize,
) -> Result<Page, StoreError> {
    let mut records = Vec::new();
    let mut last: Option<String> = None;
    let shards = sorted_names(dir, |n| {
        n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })?;
    let after_shard = after.map(|a| &a[..2]);
    for shard in shards {
        if after_shard.is_some_and(|a| shard.as_str() < a) {
            continue;
        }
        let shard_dir = dir.join(&shard);
        let names = sorted_names(&shard_dir, |n| record_hash(n).is_some())?;
        for name in names {
            let hash = record_hash(&name).unwrap_or_default();
            if after.is_some_and(|a| hash <= a) {
                continue;
            }
            if records.len() == limit {
                // Something is left after the page: hand out where it ends.
                return Ok(Page {
                    records,
                    next: last.map(Cursor),
                });
            }
            let path = shard_dir.join(&name);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                // Deleted since the directory was read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_at(&path)(e)),
            };
            let record = parse_record(&path, &bytes)?;
            last = Some(hash.to_owned());
            if state.is_none_or(|s| s == record.state) {
                records.push(record);
            }
        }
    }
    Ok(Page {
        records,
        next: None,
    })
}

/// Sorted names of the entries of `dir` that `keep` accepts; a missing `dir` has none.
fn sorted_names(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| keep(n)) {
            names.push(name.to_owned());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Removes `*.tmp` files under every `<token>/records/<hh>/`: leftovers of a crash between
/// creating a temporary file and renaming it. The record they were replacing is intact.
fn sweep_temporary_files(root: &Path) -> Result<(), StoreError> {
    for token in sorted_names(root, |_| true)? {
        let records = root.join(token).join("records");
        for shard in sorted_names(&records, |_| true)? {
            let shard_dir = records.join(shard);
            for name in sorted_names(&shard_dir, |n| n.ends_with(TEMP_SUFFIX))? {
                let path = shard_dir.join(&name);
                fs::remove_file(&path).map_err(io_at(&path))?;
                tracing::info!(path = %path.display(), "removed a temporary file left by an interrupted write");
            }
        }
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700, making each new entry durable in its
/// parent. An existing directory is left as it is.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => sync_dir(parent(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if fs::metadata(dir)?.is_dir() {
                Ok(())
            } else {
                Err(std::io::Error::other("exists and is not a directory"))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.parent().is_some() => {
            ensure_dir(parent(dir))?;
            ensure_dir(dir)
        }
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        location: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, reason: &str) -> StoreError {
    StoreError::Corrupt {
        location: path.display().to_string(),
        reason: reason.to_owned(),
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            location: "subject store worker".into(),
            source: std::io::Error::other(e),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;

    use super::*;
    use crate::secret::Secret;
    use crate::subject::keyring::KeyRing;
    use crate::subject::keyring::tests::ring;

    fn id(s: &str) -> SubjectId {
        SubjectId::parse(s).unwrap()
    }

    fn record(ring: &KeyRing, token: &str, subject: &str, rt: &str) -> Record {
        let s = id(subject);
        let sealed = ring.seal(token, &s, &Secret::new(rt)).unwrap();
        Record::enrolled(s, sealed, 1_767_323_045)
    }

    /// Every regular file under `dir`, recursively.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn put_get_delete_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let s = id("cust-1");
        assert_eq!(store.get("flinks", &s).await.unwrap(), None);
        let r = record(&ring, "flinks", "cust-1", "rt-1");
        assert_eq!(store.put("flinks", &r, None).await.unwrap(), 1);
        let got = store.get("flinks", &s).await.unwrap().unwrap();
        assert_eq!(got.generation, 1);
        assert_eq!(
            Record {
                generation: 0,
                ..got.clone()
            },
            r
        );
        assert_eq!(
            ring.open("flinks", &s, &got.refresh_token)
                .unwrap()
                .expose(),
            "rt-1"
        );
        // Another token's subject of the same id is a different subject.
        assert_eq!(store.get("other", &s).await.unwrap(), None);
        for f in files(dir.path()) {
            let mode = fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let token_dir = dir.path().join("subjects/flinks");
        let mode = fs::metadata(&token_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert!(store.delete("flinks", &s).await.unwrap());
        assert!(!store.delete("flinks", &s).await.unwrap());
        assert_eq!(store.get("flinks", &s).await.unwrap(), None);
    }

    #[tokio::test]
    async fn put_is_a_compare_and_set_on_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let r = record(&ring, "t", "s", "rt-1");
        assert_eq!(store.put("t", &r, None).await.unwrap(), 1);
        // Creating again, or writing from a stale read, loses.
        for expected in [None, Some(0), Some(2)] {
            let e = store.put("t", &r, expected).await.unwrap_err();
            assert!(
                matches!(e, StoreError::Conflict { found: Some(1), .. }),
                "{expected:?}: {e}"
            );
        }
        assert!(matches!(
            store
                .put("t", &record(&ring, "t", "new", "x"), Some(1))
                .await,
            Err(StoreError::Conflict { found: None, .. })
        ));
        assert_eq!(store.put("t", &r, Some(1)).await.unwrap(), 2);
        // The caller's generation field does not matter; the store's does.
        let claimed = Record {
            generation: 99,
            ..r.clone()
        };
        assert_eq!(store.put("t", &claimed, Some(2)).await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_concurrent_writers_from_one_generation_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).await.unwrap());
        let ring = Arc::new(ring(&[1]));
        store
            .put("t", &record(&ring, "t", "s", "rt-0"), None)
            .await
            .unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, ring) = (store.clone(), ring.clone());
                tokio::spawn(async move {
                    let r = record(&ring, "t", "s", &format!("rt-{i}"));
                    store.put("t", &r, Some(1)).await.map(|_| i)
                })
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
        let got = store.get("t", &id("s")).await.unwrap().unwrap();
        assert_eq!(got.generation, 2);
        let rt = ring.open("t", &id("s"), &got.refresh_token).unwrap();
        assert_eq!(rt.expose(), format!("rt-{}", winners[0]));
    }

    #[tokio::test]
    async fn no_plaintext_refresh_token_or_code_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let canary = "rt-canary-5c1e9b";
        let code = "code-canary-77aa03";
        for i in 0..20 {
            let subject = format!("cust-{i}");
            store
                .spend_code(
                    "flinks",
                    &id(&subject),
                    &CodeDigest::of(&Secret::new(format!("{code}-{i}"))),
                )
                .await
                .unwrap();
            let r = record(&ring, "flinks", &subject, &format!("{canary}-{i}"));
            let g = store.put("flinks", &r, None).await.unwrap();
            // Rewritten too, as a refresh would.
            store.put("flinks", &r, Some(g)).await.unwrap();
        }
        let needles = [
            canary.to_owned(),
            code.to_owned(),
            BASE64.encode(format!("{canary}-1")),
        ];
        let all = files(dir.path());
        assert!(all.len() >= 40, "{}", all.len());
        for f in all {
            let bytes = fs::read(&f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for needle in &needles {
                assert!(
                    !text.contains(needle.as_str()),
                    "{} holds a secret",
                    f.display()
                );
            }
            // File names neither.
            assert!(!f.display().to_string().contains("canary"));
        }
    }

    #[tokio::test]
    async fn a_code_is_spent_once_per_token_and_the_record_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let code = CodeDigest::of(&Secret::new("code-1"));
        store.spend_code("t", &id("a"), &code).await.unwrap();
        // Again, for the same or another subject: refused.
        for who in ["a", "b"] {
            assert!(matches!(
                store.spend_code("t", &id(who), &code).await,
                Err(StoreError::CodeSpent)
            ));
        }
        // After a restart (a new store on the same directory) too.
        let reopened = FileStore::open(dir.path()).await.unwrap();
        assert!(matches!(
            reopened.spend_code("t", &id("a"), &code).await,
            Err(StoreError::CodeSpent)
        ));
        // Another token has its own codes; another code is fine.
        reopened.spend_code("u", &id("a"), &code).await.unwrap();
        let other = CodeDigest::of(&Secret::new("code-2"));
        reopened.spend_code("t", &id("a"), &other).await.unwrap();
    }

    #[tokio::test]
    async fn listing_pages_through_every_subject_once_and_filters_by_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let mut reauth = BTreeSet::new();
        for i in 0..50 {
            let mut r = record(&ring, "t", &format!("s{i}"), "rt");
            if i % 3 == 0 {
                r.state = SubjectState::NeedsReauth;
                reauth.insert(r.subject.clone());
            }
            store.put("t", &r, None).await.unwrap();
        }
        store
            .put("u", &record(&ring, "u", "s0", "rt"), None)
            .await
            .unwrap();
        let collect = |state| {
            let store = &store;
            async move {
                let mut seen = Vec::new();
                let mut cursor = None;
                let mut pages = 0;
                loop {
                    let page = store.list("t", state, cursor.as_ref(), 7).await.unwrap();
                    assert!(page.records.len() <= 7);
                    seen.extend(page.records.into_iter().map(|r| r.subject));
                    pages += 1;
                    match page.next {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
                (seen, pages)
            }
        };
        let (all, pages) = collect(None).await;
        assert_eq!(all.len(), 50);
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 50);
        assert_eq!(pages, 8); // 7 full pages, then 1
        let (only, _) = collect(Some(SubjectState::NeedsReauth)).await;
        assert_eq!(only.into_iter().collect::<BTreeSet<_>>(), reauth);
        // Exactly one full page: no cursor.
        let one = store.list("u", None, None, 1).await.unwrap();
        assert_eq!((one.records.len(), one.next), (1, None));
        assert_eq!(
            store
                .list("none", None, None, 10)
                .await
                .unwrap()
                .records
                .len(),
            0
        );
        // A cursor the store did not hand out (say, a path) is refused.
        for bad in ["../../etc", "", "ABCDEF"] {
            assert!(matches!(
                store
                    .list("t", None, Some(&Cursor::from_text(bad)), 10)
                    .await,
                Err(StoreError::InvalidCursor)
            ));
        }
    }

    #[tokio::test]
    async fn token_names_cannot_leave_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("state")).await.unwrap();
        let r = record(&ring(&[1]), "t", "s", "rt");
        for bad in ["..", "../x", "a/b", "", "UPPER", "a.b"] {
            assert!(matches!(
                store.put(bad, &r, None).await,
                Err(StoreError::InvalidToken(_))
            ));
            assert!(store.get(bad, &r.subject).await.is_err());
        }
        // `..` as a subject id is just a subject.
        let dots = record(&ring(&[1]), "t", "..", "rt");
        store.put("t", &dots, None).await.unwrap();
        assert!(store.get("t", &id("..")).await.unwrap().is_some());
        assert!(
            files(dir.path())
                .iter()
                .all(|f| f.starts_with(dir.path().join("state/subjects/t")))
        );
    }

    #[tokio::test]
    async fn a_temporary_file_left_by_a_crash_is_ignored_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let r = record(&ring, "t", "s", "rt-old");
        store.put("t", &r, None).await.unwrap();
        let (path, _) = store.record_path("t", &r.subject).unwrap();
        // A crash after the temporary file was written half, before the rename.
        let tmp = PathBuf::from(format!("{}{TEMP_SUFFIX}", path.display()));
        fs::write(&tmp, b"{\"subject\":\"s\",\"refresh_tok").unwrap();
        let got = store.get("t", &r.subject).await.unwrap().unwrap();
        assert_eq!(got.generation, 1);
        let page = store.list("t", None, None, 10).await.unwrap();
        assert_eq!(page.records.len(), 1);
        // The next start removes it; the record is intact.
        let reopened = FileStore::open(dir.path()).await.unwrap();
        assert!(!tmp.exists());
        assert_eq!(reopened.get("t", &r.subject).await.unwrap(), Some(got));
        // And a write with a leftover in place still succeeds (write_atomic replaces it).
        fs::write(&tmp, b"junk").unwrap();
        assert_eq!(reopened.put("t", &r, Some(1)).await.unwrap(), 2);
        assert!(!tmp.exists());
    }

    #[tokio::test]
    async fn a_write_replaces_the_record_whole_never_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let r = record(&ring, "t", "s", "rt-old");
        store.put("t", &r, None).await.unwrap();
        let (path, _) = store.record_path("t", &r.subject).unwrap();
        // A second name for the old file: if the write modified the file in place, the
        // old name would see the new (or a partial) content.
        let old = dir.path().join("old-link");
        fs::hard_link(&path, &old).unwrap();
        let before = fs::read(&old).unwrap();
        let newer = record(&ring, "t", "s", "rt-new-and-much-longer-than-the-old-one");
        store.put("t", &newer, Some(1)).await.unwrap();
        assert_eq!(fs::read(&old).unwrap(), before);
        let old_record: Record = serde_json::from_slice(&before).unwrap();
        assert_eq!(old_record.generation, 1);
        let now = store.get("t", &r.subject).await.unwrap().unwrap();
        assert_eq!(now.generation, 2);
        assert_eq!(
            ring.open("t", &r.subject, &now.refresh_token)
                .unwrap()
                .expose(),
            "rt-new-and-much-longer-than-the-old-one"
        );
    }

    #[tokio::test]
    async fn a_damaged_or_misplaced_record_is_an_error_not_a_missing_subject() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let ring = ring(&[1]);
        let a = record(&ring, "t", "a", "rt-a");
        let b = record(&ring, "t", "b", "rt-b");
        store.put("t", &a, None).await.unwrap();
        store.put("t", &b, None).await.unwrap();
        let (pa, _) = store.record_path("t", &a.subject).unwrap();
        let (pb, _) = store.record_path("t", &b.subject).unwrap();
        // b's file copied over a's: refused, rather than serving b's token as a's.
        fs::copy(&pb, &pa).unwrap();
        let e = store.get("t", &a.subject).await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        // And a put over it does not paper over it.
        assert!(store.put("t", &a, Some(1)).await.is_err());
        // A truncated file: an error naming the file, in get and in list.
        fs::write(&pb, b"{\"subject\":").unwrap();
        let e = store.get("t", &b.subject).await.unwrap_err().to_string();
        assert!(e.contains(&pb.display().to_string()), "{e}");
        assert!(store.list("t", None, None, 10).await.is_err());
        // Even a sealed value moved by hand inside a well-formed record does not open.
        let moved = Record {
            subject: a.subject.clone(),
            refresh_token: b.refresh_token.clone(),
            ..a.clone()
        };
        fs::write(&pa, serde_json::to_vec(&moved).unwrap()).unwrap();
        let got = store.get("t", &a.subject).await.unwrap().unwrap();
        assert!(ring.open("t", &a.subject, &got.refresh_token).is_err());
    }

    #[tokio::test]
    async fn a_missing_state_directory_is_created_and_an_unusable_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        FileStore::open(&deep).await.unwrap();
        assert!(deep.join("subjects").is_dir());
        let file = dir.path().join("plain-file");
        fs::write(&file, "").unwrap();
        let e = FileStore::open(&file).await.unwrap_err().to_string();
        assert!(e.contains("plain-file"), "{e}");
    }

    #[test]
    fn the_file_name_hash_separates_token_and_subject() {
        // Length prefixes: ("ab", "c") and ("a", "bc") must not share a file.
        assert_ne!(subject_hash("ab", &id("c")), subject_hash("a", &id("bc")));
        assert!(is_hex_hash(&subject_hash("t", &id("s"))));
    }
}
