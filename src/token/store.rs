//! Refresh-token persistence under `state_dir`: one small JSON file per token, written
//! atomically (temporary file, fsync, rename, fsync of the directory) with mode 0600. The
//! temporary file is always created new (`O_CREAT|O_EXCL`, which never follows a symbolic
//! link), so nothing planted at its path, neither a link out of `state_dir` nor a file with a
//! wider mode, receives the refresh token.
//!
//! It remembers three things that must survive a restart:
//! - the refresh token obtained from a code exchange or rotated by the server;
//! - which content of `refresh_token_file` that token superseded, so that an operator who later
//!   puts a *new* refresh token in the file (the user re-authorized) is obeyed, while the old
//!   one is never sent again;
//! - which authorization code has been spent, so a restart never re-sends it.
//!
//! Codes and file contents are kept only as SHA-256 digests.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The persisted state of one token.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct State {
    /// The newest refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Digest of the `refresh_token_file` content that `refresh_token` replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_file_sha256: Option<String>,
    /// Digest of the last authorization code sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_code_sha256: Option<String>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Where one token's state lives.
#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

/// A state file problem.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {source}")]
pub struct StoreError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl Store {
    /// The store for token `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            path: dir.join(format!("{name}.state.json")),
        }
    }

    /// Reads the state; a missing file is an empty state.
    pub async fn load(&self) -> Result<State, StoreError> {
        let err = |source| StoreError {
            path: self.path.clone(),
            source,
        };
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(err(e)),
        }
    }

    /// Writes the state atomically: a reader (or a crash) sees the old file or the new one,
    /// never a mix.
    pub async fn save(&self, state: &State) -> Result<(), StoreError> {
        let path = self.path.clone();
        let bytes = serde_json::to_vec(state).map_err(|e| StoreError {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let result = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes)).await;
        let source = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(e) => std::io::Error::other(e),
        };
        Err(StoreError {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` atomically and durably with mode 0600 (see the module doc). The
/// subject file store (`crate::subject::file`) writes its records with it too.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
    };
    let mut f = match create() {
        // Left by a crash, or planted (a link, a file with another mode): remove the entry
        // itself (never what a link points to) and create a fresh file; if something puts it
        // back in between, give up rather than write through it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            create()?
        }
        other => other?,
    };
    // The umask can only have narrowed 0600; make it exactly that before the first byte.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()
}

/// Hex SHA-256 of a secret, for remembering it without keeping it.
pub fn digest(secret: &Secret) -> String {
    let hash = Sha256::digest(secret.expose().as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_is_private_and_atomic() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "flinks");
        assert_eq!(store.load().await.unwrap(), State::default());
        let state = State {
            refresh_token: Some("rt-canary".into()),
            superseded_file_sha256: Some(digest(&Secret::new("old"))),
            spent_code_sha256: None,
        };
        store.save(&state).await.unwrap();
        assert_eq!(store.load().await.unwrap(), state);
        let mode = std::fs::metadata(&store.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("flinks.state.json.tmp").exists());
        assert!(!format!("{state:?}").contains("rt-canary"));
    }

    #[tokio::test]
    async fn a_symlink_planted_at_the_temporary_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("stolen");
        std::fs::write(&target, "untouched").unwrap();
        let store = Store::new(dir.path(), "t");
        std::os::unix::fs::symlink(&target, dir.path().join("t.state.json.tmp")).unwrap();
        let state = State {
            refresh_token: Some("rt-canary".into()),
            ..State::default()
        };
        store.save(&state).await.unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(store.load().await.unwrap(), state);
        assert!(!std::fs::symlink_metadata(&store.path).unwrap().is_symlink());
        // A dangling link (pointing where a file could be created) is not followed either.
        let dangling = outside.path().join("created");
        std::os::unix::fs::symlink(&dangling, dir.path().join("t.state.json.tmp")).unwrap();
        store.save(&state).await.unwrap();
        assert!(!dangling.exists());
    }

    #[tokio::test]
    async fn a_wider_mode_left_on_existing_files_is_not_kept() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "t");
        let tmp = dir.path().join("t.state.json.tmp");
        for existing in [&tmp, &store.path] {
            std::fs::write(existing, "{}").unwrap();
            std::fs::set_permissions(existing, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        store.save(&State::default()).await.unwrap();
        let mode = std::fs::metadata(&store.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
    }

    #[tokio::test]
    async fn unwritable_directory_is_an_error_not_a_panic() {
        let store = Store::new(Path::new("/nonexistent/bearer-proxy"), "t");
        assert!(store.save(&State::default()).await.is_err());
    }

    #[test]
    fn digest_is_stable_hex() {
        assert_eq!(
            digest(&Secret::new("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
