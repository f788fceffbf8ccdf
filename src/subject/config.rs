//! The `[subjects]` settings the subject store and key ring need, and their validation.
//!
//! `crate::config::Config::subjects` holds it (parsed by `from_tree` like the other sections;
//! `Config::problems` calls [`SubjectsConfig::problems`]). This module does not import
//! `crate::config`, so that `config → subject::config` stays one-way.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::FileStore;
use super::keyring::{KeyError, KeyRing};
use super::record::StoreError;
use crate::time::duration;

/// Loopback, so that only the app in the same pod can enrol subjects without an API token; the
/// port follows the admin port (9901).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9902));
/// The request header naming the subject; `x-` because it is private to the app and the proxy,
/// which strips it from every request.
pub const DEFAULT_HEADER: &str = "x-bearer-proxy-subject";
/// Flinks drops a refresh token unused for 30 days; refreshing idle subjects after 20 leaves
/// ten days of retries for an outage of the token endpoint or of this process.
pub const DEFAULT_KEEPALIVE_AFTER: Duration = Duration::from_secs(20 * 24 * 3600);
/// Access tokens held in memory: 10,000 subjects at well under 1 KiB each is a few MiB. Beyond
/// it the least recently used subject's token is dropped and fetched again on its next use.
pub const DEFAULT_MAX_CACHED: usize = 10_000;
/// The shortest keep-alive accepted: below it the keep-alive would refresh every subject all
/// the time, which is the token-request storm per-subject laziness exists to avoid.
pub const MIN_KEEPALIVE_AFTER: Duration = Duration::from_secs(3600);

/// Header names the subject header may not take: ones HTTP, the proxy or the token use.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "via",
    "keep-alive",
    "proxy-connection",
    "trailer",
];

/// Where subject records live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// One file per subject under `state_dir`. The default because it needs nothing else
    /// running; one process only (a shared store for replicas is issue #13).
    #[default]
    File,
    /// Records in the `[redis]` store, shared by every replica (issue #13).
    Redis,
}

/// `[subjects]`: the subjects API, the request header, storage and encryption of per-subject
/// refresh tokens.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SubjectsConfig {
    /// Where the subjects API listens. Never the proxy or admin port.
    pub listen: SocketAddr,
    /// The request header that names the subject on a per-subject route.
    pub header: String,
    /// A file holding the bearer token the subjects API requires (`Authorization: Bearer …`).
    /// Required when `listen` is not a loopback address.
    pub api_token_file: Option<PathBuf>,
    /// A subject whose refresh token was last used longer ago than this is refreshed in the
    /// background, so the provider's idle timeout never drops it.
    #[serde(with = "duration")]
    pub keepalive_after: Duration,
    /// Most subjects whose access token is held in memory.
    pub max_cached: usize,
    /// Which store holds the records.
    pub store: StoreKind,
    /// The directory of the file store (records go to `<state_dir>/subjects/`). Required with
    /// `store = "file"`; no default, because losing it means every customer consents again, so
    /// the operator must choose a persistent place.
    pub state_dir: Option<PathBuf>,
    /// One key file (32 random bytes, base64). Shorthand for a one-element
    /// `encryption_key_files`.
    pub encryption_key_file: Option<PathBuf>,
    /// Several key files, newest first: the first seals new writes, the rest only open older
    /// records (rotation; see [`crate::subject`]).
    pub encryption_key_files: Vec<PathBuf>,
}

impl Default for SubjectsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            header: DEFAULT_HEADER.to_owned(),
            api_token_file: None,
            keepalive_after: DEFAULT_KEEPALIVE_AFTER,
            max_cached: DEFAULT_MAX_CACHED,
            store: StoreKind::default(),
            state_dir: None,
            encryption_key_file: None,
            encryption_key_files: Vec::new(),
        }
    }
}

impl SubjectsConfig {
    /// Every problem with these settings, as `(key, message)` pairs named under `subjects.`,
    /// the shape `Config::problems` collects.
    pub fn problems(&self, push: &mut impl FnMut(String, String)) {
        let k = |field: &str| format!("subjects.{field}");
        if !self.listen.ip().is_loopback() && self.api_token_file.is_none() {
            push(
                k("api_token_file"),
                format!(
                    "missing: listen = {} is not a loopback address, so the subjects API needs \
                     api_token_file (callers send Authorization: Bearer <its content>)",
                    self.listen
                ),
            );
        }
        if self
            .api_token_file
            .as_deref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            push(k("api_token_file"), "empty path".into());
        }
        match http::HeaderName::from_bytes(self.header.as_bytes()) {
            Err(_) => push(k("header"), "not a valid header name".into()),
            Ok(name) if RESERVED_HEADERS.contains(&name.as_str()) => push(
                k("header"),
                format!(
                    "{} has a meaning of its own; choose an x- header",
                    name.as_str()
                ),
            ),
            Ok(_) => {}
        }
        if self.keepalive_after < MIN_KEEPALIVE_AFTER {
            push(
                k("keepalive_after"),
                "must be at least 1h (and below the provider's idle timeout, 30 days for \
                 Flinks)"
                    .into(),
            );
        }
        if self.max_cached == 0 {
            push(k("max_cached"), "must be at least 1".into());
        }
        match (
            &self.encryption_key_file,
            self.encryption_key_files.is_empty(),
        ) {
            (Some(_), false) => push(
                k("encryption_key_file"),
                "set encryption_key_file or encryption_key_files, not both".into(),
            ),
            (None, true) => push(
                k("encryption_key_file"),
                "missing: refresh tokens are stored encrypted; set encryption_key_file (make a \
                 key with `openssl rand -base64 32`) or encryption_key_files"
                    .into(),
            ),
            _ => {}
        }
        let mut seen = HashSet::new();
        for (i, path) in self.encryption_key_files.iter().enumerate() {
            if path.as_os_str().is_empty() {
                push(
                    format!("subjects.encryption_key_files[{i}]"),
                    "empty path".into(),
                );
            } else if !seen.insert(path) {
                push(
                    format!("subjects.encryption_key_files[{i}]"),
                    format!("{} is listed twice", path.display()),
                );
            }
        }
        if self
            .encryption_key_file
            .as_deref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            push(k("encryption_key_file"), "empty path".into());
        }
        match self.store {
            StoreKind::File => match &self.state_dir {
                None => push(
                    k("state_dir"),
                    "missing: the file store keeps subjects' refresh tokens there; put it on \
                     persistent storage"
                        .into(),
                ),
                Some(p) if p.as_os_str().is_empty() => push(k("state_dir"), "empty path".into()),
                Some(_) => {}
            },
            StoreKind::Redis => {
                if self.state_dir.is_some() {
                    push(
                        k("state_dir"),
                        "not used with store = \"redis\": records live in [redis]".into(),
                    );
                }
            }
        }
    }

    /// Every problem at once; `Ok` when there is none.
    pub fn validate(&self) -> Result<(), Vec<(String, String)>> {
        let mut errors = Vec::new();
        self.problems(&mut |key, message| errors.push((key, message)));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The key files, newest first, whichever key gave them.
    pub fn key_files(&self) -> Vec<PathBuf> {
        match &self.encryption_key_file {
            Some(one) => vec![one.clone()],
            None => self.encryption_key_files.clone(),
        }
    }

    /// Loads the key ring (at start: an unusable key file stops the start, naming it).
    pub async fn key_ring(&self) -> Result<KeyRing, KeyError> {
        KeyRing::load(&self.key_files()).await
    }

    /// Opens the configured store. Call after [`SubjectsConfig::validate`] passed.
    pub async fn open_store(&self) -> Result<FileStore, StoreError> {
        match self.store {
            StoreKind::File => {
                let dir = self.state_dir.as_deref().unwrap_or(Path::new(""));
                FileStore::open(dir).await
            }
            // Opened by the caller, which holds the `[redis]` section and the metrics.
            StoreKind::Redis => Err(StoreError::Io {
                location: "subjects.store".into(),
                source: std::io::Error::other("the Redis store is opened by Subjects::start"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> SubjectsConfig {
        let value: config::Value = config::Config::builder()
            .add_source(config::File::from_str(toml_text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        value.try_deserialize().unwrap()
    }

    fn keys(c: &SubjectsConfig) -> Vec<String> {
        c.validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn one_key_file_or_several_newest_first() {
        let one = parse("state_dir = \"/var/lib/bp\"\nencryption_key_file = \"/k/1\"");
        assert_eq!(one.validate(), Ok(()));
        assert_eq!(one.store, StoreKind::File);
        assert_eq!(one.key_files(), vec![PathBuf::from("/k/1")]);
        let many = parse("state_dir = \"/s\"\nencryption_key_files = [\"/k/new\", \"/k/old\"]");
        assert_eq!(many.validate(), Ok(()));
        assert_eq!(
            many.key_files(),
            vec![PathBuf::from("/k/new"), PathBuf::from("/k/old")]
        );
    }

    #[test]
    fn every_problem_is_reported_naming_its_key() {
        assert_eq!(
            keys(&SubjectsConfig::default()),
            ["subjects.encryption_key_file", "subjects.state_dir"]
        );
        let exposed = parse(
            "listen = \"0.0.0.0:9902\"\nheader = \"Authorization\"\nkeepalive_after = \"5m\"\n\
             max_cached = 0\nstate_dir = \"/s\"\nencryption_key_file = \"/k\"",
        );
        assert_eq!(
            keys(&exposed),
            [
                "subjects.api_token_file",
                "subjects.header",
                "subjects.keepalive_after",
                "subjects.max_cached",
            ]
        );
        let with_token = parse(
            "listen = \"0.0.0.0:9902\"\napi_token_file = \"/t\"\nstate_dir = \"/s\"\n\
             encryption_key_file = \"/k\"",
        );
        assert_eq!(with_token.validate(), Ok(()));
        assert_eq!(with_token.header, DEFAULT_HEADER);
        assert_eq!(with_token.keepalive_after, DEFAULT_KEEPALIVE_AFTER);
        let both = parse(
            "state_dir = \"\"\nencryption_key_file = \"/k\"\nencryption_key_files = [\"/a\", \"/a\", \"\"]",
        );
        assert_eq!(
            keys(&both),
            [
                "subjects.encryption_key_file",
                "subjects.encryption_key_files[1]",
                "subjects.encryption_key_files[2]",
                "subjects.state_dir",
            ]
        );
    }

    #[tokio::test]
    async fn the_configured_store_and_keys_open() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(
            &key,
            base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
        )
        .unwrap();
        let c = SubjectsConfig {
            state_dir: Some(dir.path().join("state")),
            encryption_key_file: Some(key),
            ..SubjectsConfig::default()
        };
        assert_eq!(c.key_ring().await.unwrap().ids().count(), 1);
        c.open_store().await.unwrap();
        assert!(dir.path().join("state/subjects").is_dir());
    }
}
