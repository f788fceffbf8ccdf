//! The `[redis]` settings: where the shared store is, how to authenticate and verify it, and
//! the timeouts every command runs under; with their validation.
//!
//! Not yet part of [`crate::config::Config`]: the session that adds `[subjects] store =
//! "redis"` hangs it in (`Config::redis: Option<RedisConfig>`, checked by calling
//! [`RedisConfig::problems`] from `Config::problems` when the store is Redis). Like
//! [`crate::subject::config`], this module does not import `crate::config`, so the dependency
//! stays one-way (durations are parsed by `crate::time::duration`, as everywhere).

use std::path::PathBuf;
use std::time::Duration;

use crate::time::duration;

use serde::Deserialize;

/// Key prefix when none is configured: names the product, so the keys are recognisable in a
/// Redis shared with other applications.
pub const DEFAULT_KEY_PREFIX: &str = "bearer-proxy:";

/// How long one connection attempt (TCP, TLS and authentication) may take. A handshake inside
/// a cluster takes milliseconds; 5 s leaves room for a cold DNS lookup or a Redis failover
/// while bounding how long a start or a reconnect waits before reporting the failure.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one command (or one script, or one listing's pipeline) may take, including a wait
/// for a reconnect in progress. Redis answers in well under a millisecond; a command that
/// takes a second means Redis is overloaded or gone. It must stay well under the proxy's
/// `token_wait` (5 s by default) so a request waiting for a token learns of the failure in
/// time, and under a lock's TTL.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest key prefix: prefixes are repeated in every key.
pub const MAX_KEY_PREFIX_LEN: usize = 64;

/// `[redis]`: the shared store for replicas (issue #13).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS, verified). Required; no
    /// default, because a Redis that is not the operator's persistent one loses every subject.
    pub url: String,
    /// PEM file of the CA(s) that sign the Redis server certificate (`rediss://` only), trusted
    /// instead of the default: the Mozilla roots built into the binary (webpki-roots), which
    /// work in the `scratch` image where there is no system trust store.
    pub ca_file: Option<PathBuf>,
    /// ACL user name (Redis 6+). Needs `password_file`.
    pub username: Option<String>,
    /// File holding the password (`requirepass`, or the ACL user's). Read at start; a
    /// password in the URL is refused, so that it never sits in the configuration.
    pub password_file: Option<PathBuf>,
    /// Prefix of every key this process writes.
    pub key_prefix: String,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Whether `/readyz` fails while Redis is unreachable. Off by default: every replica shares
    /// the one Redis, so gating would take all of them out of the Service at once, turning a
    /// degraded state (cached access tokens still served, enrolment answering 503) into a full
    /// outage. `/readyz` and `/status` report Redis either way.
    pub gate_readiness: bool,
    /// The key that seals the access tokens of `shared = true` named tokens in Redis (base64
    /// of 32 random bytes, the `[subjects]` key format): Redis never holds one in plaintext.
    /// Required when some token is shared. Set this or `encryption_key_files`, not both.
    pub encryption_key_file: Option<PathBuf>,
    /// Several keys, newest first, for rotation exactly as `[subjects]`' own: new slots are
    /// sealed with the first, a slot sealed with any listed key still opens.
    pub encryption_key_files: Vec<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_file: None,
            username: None,
            password_file: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            gate_readiness: false,
            encryption_key_file: None,
            encryption_key_files: Vec::new(),
        }
    }
}

impl RedisConfig {
    /// Every problem with these settings, as `(key, message)` pairs named under `redis.`, the
    /// shape `Config::problems` collects.
    pub fn problems(&self, push: &mut impl FnMut(String, String)) {
        let k = |field: &str| format!("redis.{field}");
        let tls = match url_problem(&self.url) {
            Ok(tls) => Some(tls),
            Err(message) => {
                push(k("url"), message);
                None
            }
        };
        if let Some(ca) = &self.ca_file {
            if ca.as_os_str().is_empty() {
                push(k("ca_file"), "empty path".into());
            } else if tls == Some(false) {
                push(
                    k("ca_file"),
                    "set, but the url is redis:// (plaintext): use rediss:// for TLS".into(),
                );
            }
        }
        if self
            .password_file
            .as_deref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            push(k("password_file"), "empty path".into());
        }
        match &self.username {
            Some(u) if u.is_empty() || u.bytes().any(|b| !b.is_ascii_graphic()) => push(
                k("username"),
                "must be non-empty printable ASCII without spaces".into(),
            ),
            Some(_) if self.password_file.is_none() => push(
                k("username"),
                "set without password_file: Redis authenticates a user with its password".into(),
            ),
            _ => {}
        }
        let p = &self.key_prefix;
        if p.is_empty() || p.len() > MAX_KEY_PREFIX_LEN {
            push(
                k("key_prefix"),
                format!("must be 1 to {MAX_KEY_PREFIX_LEN} characters"),
            );
        } else if p
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'{' || b == b'}')
        {
            push(
                k("key_prefix"),
                "use printable ASCII without spaces or braces (braces mark Redis Cluster hash \
                 tags, which the store places itself)"
                    .into(),
            );
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
        ] {
            if d.is_zero() {
                push(k(key), "must be greater than zero".into());
            }
        }
        self.key_file_problems(push);
    }

    /// The shape of the key-file settings (whether a key is needed at all is
    /// `Config::validate`'s business: it knows which tokens are shared).
    fn key_file_problems(&self, push: &mut impl FnMut(String, String)) {
        if self.encryption_key_file.is_some() && !self.encryption_key_files.is_empty() {
            push(
                "redis.encryption_key_file".into(),
                "set encryption_key_file or encryption_key_files, not both".into(),
            );
        }
        if self
            .encryption_key_file
            .as_deref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            push("redis.encryption_key_file".into(), "empty path".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, path) in self.encryption_key_files.iter().enumerate() {
            let key = format!("redis.encryption_key_files[{i}]");
            if path.as_os_str().is_empty() {
                push(key, "empty path".into());
            } else if !seen.insert(path) {
                push(key, format!("{} is listed twice", path.display()));
            }
        }
    }

    /// The key files that seal shared access tokens, newest first, whichever key gave them
    /// (empty when none is configured).
    pub fn key_files(&self) -> Vec<PathBuf> {
        match &self.encryption_key_file {
            Some(one) => vec![one.clone()],
            None => self.encryption_key_files.clone(),
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

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        url_problem(&self.url) == Ok(true)
    }
}

/// Checks the URL; `Ok(true)` for `rediss://`. Messages never echo the URL (it could hold a
/// password an operator pasted in), only what is wrong with it.
fn url_problem(text: &str) -> Result<bool, String> {
    if text.is_empty() {
        return Err("missing: the Redis that holds the subjects, e.g. rediss://redis:6379".into());
    }
    let url =
        url::Url::parse(text).map_err(|e| format!("not a URL like rediss://redis:6379 ({e})"))?;
    let tls = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        _ => return Err("the scheme must be redis:// or rediss:// (TLS)".into()),
    };
    if url.password().is_some() || !url.username().is_empty() {
        return Err(
            "holds credentials: put the password in password_file and the user in \
                    username"
                .into(),
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if url.fragment().is_some() {
        // redis-rs reads `#insecure` as "do not verify the certificate".
        return Err("has a #fragment; certificate verification cannot be turned off".into());
    }
    if url.query().is_some() {
        return Err("has a ?query; connection settings are keys of [redis]".into());
    }
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() && path.parse::<u16>().is_err() {
        return Err("the path, if any, must be a database number such as /0".into());
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RedisConfig, String> {
        let value: config::Value = config::Config::builder()
            .add_source(config::File::from_str(toml_text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        value.try_deserialize().map_err(|e| e.to_string())
    }

    fn keys(c: &RedisConfig) -> Vec<String> {
        c.validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn defaults_and_a_full_section() {
        let d = parse("url = \"redis://127.0.0.1:6379\"").unwrap();
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(d.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(d.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(d.command_timeout, DEFAULT_COMMAND_TIMEOUT);
        assert!(!d.gate_readiness && !d.is_tls());
        let full = parse(
            "url = \"rediss://redis.internal:6380/2\"\nca_file = \"/ca.pem\"\n\
             username = \"bp\"\npassword_file = \"/pw\"\nkey_prefix = \"bp:prod:\"\n\
             connect_timeout = \"2s\"\ncommand_timeout = \"250ms\"\ngate_readiness = true",
        )
        .unwrap();
        assert_eq!(full.validate(), Ok(()));
        assert!(full.is_tls() && full.gate_readiness);
        assert!(d.key_files().is_empty());
        let rotating =
            parse("url = \"redis://h\"\nencryption_key_files = [\"/k/new\", \"/k/old\"]").unwrap();
        assert_eq!(rotating.validate(), Ok(()));
        assert_eq!(
            rotating.key_files(),
            [PathBuf::from("/k/new"), "/k/old".into()]
        );
        assert_eq!(full.command_timeout, Duration::from_millis(250));
        let e = parse("url = \"redis://h\"\ncommand_timeout = \"2\"").unwrap_err();
        assert!(e.contains("no unit"), "{e}");
        let e = parse("url = \"redis://h\"\npasword_file = \"/pw\"").unwrap_err();
        assert!(e.contains("pasword_file"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_naming_its_key() {
        let all = RedisConfig {
            url: String::new(),
            ca_file: Some(PathBuf::new()),
            username: Some("a user".into()),
            password_file: Some(PathBuf::new()),
            key_prefix: String::new(),
            connect_timeout: Duration::ZERO,
            command_timeout: Duration::ZERO,
            gate_readiness: false,
            encryption_key_file: Some(PathBuf::new()),
            encryption_key_files: vec!["/k".into(), "/k".into()],
        };
        assert_eq!(
            keys(&all),
            [
                "redis.url",
                "redis.ca_file",
                "redis.password_file",
                "redis.username",
                "redis.key_prefix",
                "redis.connect_timeout",
                "redis.command_timeout",
                "redis.encryption_key_file",
                "redis.encryption_key_file",
                "redis.encryption_key_files[1]",
            ]
        );
        let plain_with_ca = RedisConfig {
            url: "redis://h:6379".into(),
            ca_file: Some("/ca.pem".into()),
            username: Some("bp".into()),
            key_prefix: "a{b}".into(),
            ..RedisConfig::default()
        };
        assert_eq!(
            keys(&plain_with_ca),
            ["redis.ca_file", "redis.username", "redis.key_prefix"]
        );
    }

    #[test]
    fn urls_that_would_weaken_or_hide_settings_are_refused_without_echoing_them() {
        for (url, want) in [
            ("redis://:canary-pw@h:6379", "credentials"),
            ("rediss://user:canary-pw@h:6379", "credentials"),
            ("rediss://h:6379/#insecure", "verification"),
            ("redis://h:6379/?protocol=resp3", "query"),
            ("redis://h:6379/canary", "database number"),
            ("http://h:6379", "scheme"),
            ("redis+unix:///tmp/canary.sock", "scheme"),
            ("canary", "not a URL"),
        ] {
            let c = RedisConfig {
                url: url.into(),
                ..RedisConfig::default()
            };
            let errors = c.validate().unwrap_err();
            assert_eq!(errors.len(), 1, "{url}: {errors:?}");
            let (key, message) = &errors[0];
            assert_eq!(key, "redis.url");
            assert!(message.contains(want), "{url}: {message}");
            assert!(!message.contains("canary"), "{url}: {message}");
        }
        for ok in [
            "redis://h",
            "rediss://10.0.0.1:6380/15",
            "redis://[::1]:6379/",
        ] {
            let c = RedisConfig {
                url: ok.into(),
                ..RedisConfig::default()
            };
            assert_eq!(c.validate(), Ok(()), "{ok}");
        }
    }
}
