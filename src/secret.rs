//! Secrets: a redacting wrapper for credential strings, and where a credential comes from.
//!
//! Every client secret, refresh token, authorization code and access token that passes through
//! the process lives in a [`Secret`]. Its `Debug` and `Display` print a placeholder, so a secret
//! cannot reach a log line, an error message or a status page by accident. The only way to read
//! one is [`Secret::expose`], which is easy to grep for.

use std::fmt;
use std::path::{Path, PathBuf};

/// What `Debug` and `Display` print instead of a secret.
pub const REDACTED: &str = "[redacted]";

/// A credential string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself. Call this only where the value is sent to the token endpoint or
    /// written to the state directory.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Where a credential comes from: written in the configuration, or read from a file on every
/// use (a Kubernetes secret mount, which the kubelet swaps in place when the secret changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// Written in the configuration file or an environment override.
    Inline(Secret),
    /// Read from this file each time it is needed.
    File(PathBuf),
}

/// A credential file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} from {path}: {source}")]
pub struct SecretFileError {
    /// Which credential (`client_secret`, `refresh_token`, …), for the message.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl SecretSource {
    /// The current value. A file is read anew on every call, and its surrounding whitespace
    /// (the trailing newline editors and `kubectl create secret --from-file` leave) is dropped.
    pub async fn read(&self, what: &'static str) -> Result<Secret, SecretFileError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => read_file(path, what).await,
        }
    }

    /// The file behind this source, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            SecretSource::Inline(_) => None,
            SecretSource::File(p) => Some(p),
        }
    }
}

/// Reads a credential file, trimming surrounding whitespace.
pub async fn read_file(path: &Path, what: &'static str) -> Result<Secret, SecretFileError> {
    let err = |source| SecretFileError {
        what,
        path: path.to_owned(),
        source,
    };
    let raw = tokio::fs::read(path).await.map_err(err)?;
    let text = String::from_utf8(raw).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })?;
    Ok(Secret(text.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("canary-8f3a");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        let src = SecretSource::Inline(s);
        assert!(!format!("{src:?}").contains("canary"));
    }

    #[tokio::test]
    async fn file_is_reread_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let src = SecretSource::File(path.clone());
        assert_eq!(src.read("client_secret").await.unwrap().expose(), "first");
        std::fs::write(&path, "  second\r\n").unwrap();
        assert_eq!(src.read("client_secret").await.unwrap().expose(), "second");
    }

    #[tokio::test]
    async fn missing_file_names_the_credential_and_path() {
        let src = SecretSource::File("/nonexistent/bp-secret".into());
        let e = src.read("client_secret").await.unwrap_err().to_string();
        assert!(
            e.contains("client_secret") && e.contains("/nonexistent/bp-secret"),
            "{e}"
        );
    }
}
