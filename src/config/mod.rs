//! Configuration: the schema users write and its defaults (each `DEFAULT_*` with its reason).
//! Loading and the errors it reports are in [`load`](self::load) (the module `load.rs`);
//! every check serde cannot make is in `validate.rs` ([`Config::validate`]).
//!
//! Layers, later ones winning: built-in defaults (the constants below), the file (TOML or YAML by
//! extension), then environment overrides `BEARER_PROXY__<SECTION>__<KEY>`, for example
//! `BEARER_PROXY__TOKENS__FLINKS__CLIENT_ID`. [`load`] reads all of them and [`Config::validate`]
//! reports every problem at once, each naming its key, so an operator fixes a file in one pass.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::{Secret, SecretSource};
pub use crate::subject::config::SubjectsConfig;
pub use crate::subject::redis::config::RedisConfig;

mod load;
mod validate;

pub use load::{ConfigError, ConfigErrors, from_str, load, load_with_env, read};
pub use validate::{check_endpoint_url, is_loopback_host};

/// Prefix of environment overrides (`BEARER_PROXY__PROXY__LISTEN=...`).
pub const ENV_PREFIX: &str = "BEARER_PROXY";
/// Separator between the levels of an environment override. Double, because keys contain `_`.
pub const ENV_SEPARATOR: &str = "__";

// ---- [proxy] defaults ----

/// Squid's port, the one every `HTTP_PROXY` example uses; loopback so that only the app in the
/// same pod (network namespace) can reach the sidecar.
pub const DEFAULT_PROXY_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3128));
/// nginx allows 512 connections per worker and HAProxy 2000 per frontend by default; a sidecar
/// serves one app, whose pools rarely exceed a few hundred connections. Beyond this we stop
/// accepting (back-pressure in the kernel backlog) instead of running out of file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// HAProxy's recommended `timeout http-request`; nginx uses 60s, Envoy none. An app on loopback
/// sends its headers at once, so anything slower is a stuck or hostile client.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive connections from the app are closed after this. nginx uses 75s, HAProxy's
/// common `timeout client` is 60s; longer than most client pools' own idle timeouts, so it is
/// usually the client that closes first (avoiding a request racing our close).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Envoy's default `connect_timeout`; HAProxy examples use 5s too.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// nginx's `proxy_read_timeout`. Statement downloads from a bank API can be slow; Envoy's 15s
/// route timeout would cut them.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Large enough for any sane request (nginx's `large_client_header_buffers` is 4×8k), small
/// enough that a hostile client cannot make us hold much memory per connection.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Bodies up to this size are kept so a request can be replayed once after a 401; FDX requests
/// are GETs or small JSON documents.
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 64 * 1024;
/// The fast path is on: it serves exactly the requests the hyper path would serve the same
/// way, for less CPU and memory; the switch exists so an operator can rule it out at once if
/// an upstream ever behaves differently behind it.
pub const DEFAULT_FAST_PATH: bool = true;
/// How long a request waits for a token that is not there yet (start-up, outage) before a 503.
/// Short enough that the app's own timeout (usually 10s or more) sees our clear error first.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(5);
/// After SIGTERM we keep accepting this long: Kubernetes removes the pod from endpoints
/// asynchronously and a few seconds is what kube-proxy and ingress controllers need.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// In-flight requests get this long to finish once we stop accepting. With the drain delay this
/// stays inside Kubernetes' default 30s `terminationGracePeriodSeconds`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// nginx's default (`underscores_in_headers off`): header names with `_` are removed before
/// forwarding, because CGI-style upstreams (and many WSGI/Rack servers) read `_` as `-`, so such
/// a name can mean a different header upstream than the one the proxy checked.
pub const DEFAULT_UNDERSCORE_HEADERS: UnderscoreHeaders = UnderscoreHeaders::Drop;
/// A sidecar serves one app: one worker thread is the cheapest and is what linkerd2-proxy does.
/// A shared gateway sets this to its CPU count (or 0 for one per available CPU).
pub const DEFAULT_WORKERS: usize = 1;

// ---- [admin] and [log] defaults ----

/// All interfaces, because the kubelet probes the pod IP; the admin port serves no secrets and
/// never proxies. Envoy's admin port convention.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9901));
/// The default log level.
pub const DEFAULT_LOG_LEVEL: &str = "info";

// ---- [tokens.<name>] defaults ----

/// Refresh at three quarters of the lifetime: a Flinks token (300s) is renewed after ~225s,
/// which leaves ~75s of retries before it expires.
pub const DEFAULT_REFRESH_RATIO: f64 = 0.75;
/// Never refresh later than this before expiry, whatever the ratio says: covers clock jitter,
/// the request's own duration and a couple of quick retries.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// Assumed when the server sends neither `expires_in` nor a JWT `exp`. Deliberately short: an
/// assumed lifetime that is too long would send expired tokens; too short costs one request.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// A token endpoint answers in well under a second; ten leaves room for a slow day.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry after a transient failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest gap between retries, and the pace of retries after the credentials were rejected.
/// With a 300s token refreshed at ~225s this still allows several attempts before expiry.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Upstream 401s may force a refresh at most this often per token, so a misbehaving API cannot
/// turn every request into a token request.
pub const DEFAULT_FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Statuses that mean "your token was rejected" unless a route says otherwise.
pub const DEFAULT_REPLAY_STATUSES: &[u16] = &[401];

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[proxy]`: the listener the app talks to.
    pub proxy: ProxyConfig,
    /// `[admin]`: metrics, health and status.
    pub admin: AdminConfig,
    /// `[log]`: format and level of the logs.
    pub log: LogConfig,
    /// `[tokens.<name>]`: one credential each, keyed by name.
    pub tokens: BTreeMap<String, TokenConfig>,
    /// `[[routes]]`: which hosts get which token.
    pub routes: Vec<RouteConfig>,
    /// `[subjects]`: per-subject tokens (their API, store and encryption). Present exactly
    /// when some token has `per_subject = true`.
    pub subjects: Option<SubjectsConfig>,
    /// `[redis]`: the store replicas share (issue #13). Present exactly when `[subjects]
    /// store = "redis"` or some token has `shared = true`.
    pub redis: Option<RedisConfig>,
    /// `[reload]`: reloading the configuration file when it changes.
    pub reload: ReloadConfig,
}

/// What to do with a request for a host no route names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Plain proxying without any token.
    Forward,
    /// 403.
    Deny,
}

/// What to do with `CONNECT` to a host no route names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectPolicy {
    /// Open a blind TCP tunnel.
    Tunnel,
    /// 403.
    Deny,
}

/// What to do with request headers whose name contains `_` (Envoy's
/// `headers_with_underscores_action`). Whatever the setting, a name that reads as a framing,
/// hop-by-hop, `Host` or `Authorization` header once `_` is read as `-` is refused with 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Remove them before forwarding.
    Drop,
    /// Answer 400 `bad_request`.
    Reject,
    /// Forward them as they are.
    Allow,
}

/// `[proxy]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Unrouted hosts; unset means `forward` on a loopback listener, `deny` otherwise.
    pub unmatched: Option<Unmatched>,
    /// `CONNECT` to unrouted hosts; unset means `tunnel` on a loopback listener, `deny` otherwise.
    pub connect: Option<ConnectPolicy>,
    /// Connections served at once; above this the listener stops accepting.
    pub max_connections: usize,
    /// Time allowed to receive a request's header section.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Idle keep-alive connections from the app are closed after this.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Time allowed to connect (TCP and TLS) to an upstream.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response headers.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// Largest request header section accepted.
    pub max_header_bytes: usize,
    /// Largest request body kept for a replay after a 401.
    pub replay_body_limit: usize,
    /// How long a request waits for a valid token before a 503.
    #[serde(with = "duration")]
    pub token_wait: Duration,
    /// How long to keep accepting after SIGTERM.
    #[serde(with = "duration")]
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish after accepting stops.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Worker threads; 0 means one per available CPU.
    pub workers: usize,
    /// Extra CA certificates (PEM) trusted for upstream TLS, in addition to the webpki roots
    /// and the system store; for upstreams behind a private CA. Certificates are always
    /// verified: there is no way to turn verification off.
    pub ca_file: Option<PathBuf>,
    /// Request headers whose name contains `_`: `drop`, `reject` or `allow`.
    pub underscore_headers: UnderscoreHeaders,
    /// Serve plain-HTTP/1.1 requests on routes with a named token through the purpose-built
    /// fast path (`proxy/h1/`); `false` sends every request through hyper.
    pub fast_path: bool,
    /// `[proxy.intercept]`: terminate the app's TLS for routed hosts with an operator CA.
    /// Absent means `CONNECT` to a routed host is refused (the safe default: no CA, no
    /// certificates made).
    pub intercept: Option<InterceptConfig>,
}

/// A leaf certificate lives a day: a leaked leaf key is useless soon, and re-signing one per
/// routed host a day costs nothing. Apps never see it expire: it is renewed at half-life.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Leaf certificates kept for hosts matched by `*.suffix` routes (exact hosts are made at start
/// and always kept). A sidecar's app calls a handful of hosts; the bound only stops an app
/// that walks many subdomains from growing memory without limit.
pub const DEFAULT_MAX_CACHED_LEAVES: usize = 1000;

/// `[proxy.intercept]`.
#[derive(Clone, Debug, Deserialize)]
pub struct InterceptConfig {
    /// The operator CA's certificate (PEM).
    pub ca_cert_file: PathBuf,
    /// The operator CA's private key (PEM, PKCS#8, SEC1 or PKCS#1). Read once at start.
    pub ca_key_file: PathBuf,
    /// Lifetime of each leaf certificate.
    #[serde(with = "duration", default = "default_leaf_validity")]
    pub leaf_validity: Duration,
    /// Leaf certificates kept for wildcard-route hosts.
    #[serde(default = "default_max_cached_leaves")]
    pub max_cached_leaves: usize,
}

fn default_leaf_validity() -> Duration {
    DEFAULT_LEAF_VALIDITY
}

fn default_max_cached_leaves() -> usize {
    DEFAULT_MAX_CACHED_LEAVES
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_PROXY_LISTEN,
            unmatched: None,
            connect: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            replay_body_limit: DEFAULT_REPLAY_BODY_LIMIT,
            token_wait: DEFAULT_TOKEN_WAIT,
            drain_delay: DEFAULT_DRAIN_DELAY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: DEFAULT_WORKERS,
            ca_file: None,
            underscore_headers: DEFAULT_UNDERSCORE_HEADERS,
            fast_path: DEFAULT_FAST_PATH,
            intercept: None,
        }
    }
}

impl ProxyConfig {
    /// The effective policy for unrouted hosts.
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched.unwrap_or(if self.listen.ip().is_loopback() {
            Unmatched::Forward
        } else {
            Unmatched::Deny
        })
    }

    /// The effective policy for `CONNECT` to unrouted hosts.
    pub fn connect(&self) -> ConnectPolicy {
        self.connect.unwrap_or(if self.listen.ip().is_loopback() {
            ConnectPolicy::Tunnel
        } else {
            ConnectPolicy::Deny
        })
    }
}

/// `[admin]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Address of the admin server.
    pub listen: SocketAddr,
    /// Answer `POST /-/reload` (reload the configuration file).
    pub reload: bool,
}

/// Off: the admin port listens on all interfaces by default (the kubelet probes the pod IP), so
/// anyone who can reach the pod could otherwise make it re-read its files. SIGHUP and
/// `[reload] watch` need no network access.
pub const DEFAULT_ADMIN_RELOAD: bool = false;

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN,
            reload: DEFAULT_ADMIN_RELOAD,
        }
    }
}

// ---- [reload] defaults ----

/// Off: a file watch is one more moving part (an inotify handle on the file's directory);
/// operators who mount a ConfigMap and want edits applied turn it on.
pub const DEFAULT_RELOAD_WATCH: bool = false;
/// Kubernetes replaces a ConfigMap volume's content with a few renames and a symlink swap, and
/// editors write a file in several steps: changes are collected until the directory has been
/// quiet this long, then the file is read once. Short enough to feel immediate.
pub const DEFAULT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(500);

/// `[reload]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ReloadConfig {
    /// Reload when the configuration file changes (watching its directory, so a Kubernetes
    /// `..data` symlink swap is seen).
    pub watch: bool,
    /// Quiet time after the last change in the directory before the file is read.
    #[serde(with = "duration")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: DEFAULT_RELOAD_WATCH,
            debounce: DEFAULT_RELOAD_DEBOUNCE,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `json` or `text`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `bearer_proxy=debug`, …); `RUST_LOG` overrides it.
    pub level: String,
    /// One line per proxied request.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: DEFAULT_LOG_LEVEL.to_owned(),
            access: false,
        }
    }
}

/// OAuth2 grant used to obtain tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    /// Machine-to-machine: id and secret buy a token.
    ClientCredentials,
    /// A long-lived refresh token buys access tokens.
    RefreshToken,
    /// A one-time code is exchanged for a refresh token, which then buys access tokens.
    AuthorizationCode,
}

impl GrantType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::AuthorizationCode => "authorization_code",
        }
    }
}

/// How the client authenticates to the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` as body fields (what Flinks documents).
    #[default]
    Body,
    /// HTTP Basic (`client_secret_basic`, RFC 6749 §2.3.1).
    Basic,
    /// The TLS client certificate alone (RFC 8705 §2): `client_id` in the body, no secret.
    TlsClientAuth,
    /// A signed JWT assertion per request (RFC 7523 §2.2, `private_key_jwt`), no secret.
    PrivateKeyJwt,
}

impl ClientAuth {
    /// Whether the client secret is sent (and so needed).
    pub fn sends_secret(self) -> bool {
        matches!(self, ClientAuth::Body | ClientAuth::Basic)
    }
}

/// The JWS algorithm of `private_key_jwt` assertions (the ones FAPI and most servers accept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum AssertionAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256 (FAPI's choice for RSA keys).
    PS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

/// How the token request body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// `application/json` (Flinks).
    #[default]
    Json,
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
}

/// `[tokens.<name>]`: one credential and how to use it.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenConfig {
    /// The table's name; filled in by the loader.
    #[serde(skip)]
    pub name: String,
    /// The token endpoint.
    pub token_url: String,
    /// The grant used to obtain tokens.
    pub grant_type: GrantType,
    /// Client id, inline.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Client id, from a file.
    #[serde(default)]
    pub client_id_file: Option<PathBuf>,
    /// Client secret, inline (local use; deployments use the file form).
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// Client secret, from a file read on every token request.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Body fields or HTTP Basic.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// JSON or form body.
    #[serde(default)]
    pub encoding: Encoding,
    /// `scope`, sent when set.
    #[serde(default)]
    pub scope: Option<String>,
    /// `redirect_uri`, sent when set.
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// Extra body fields.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Refresh token for the `refresh_token` grant.
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    /// One-time code for the `authorization_code` bootstrap.
    #[serde(default)]
    pub code_file: Option<PathBuf>,
    /// Where refresh tokens obtained or rotated at run time are kept.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Fraction of the lifetime after which to refresh.
    #[serde(default = "default_refresh_ratio")]
    pub refresh_ratio: f64,
    /// Refresh no later than this before expiry.
    #[serde(default = "default_refresh_margin", with = "duration")]
    pub refresh_margin: Duration,
    /// Lifetime assumed when the response does not say.
    #[serde(default = "default_lifetime", with = "duration")]
    pub default_lifetime: Duration,
    /// Token request timeout.
    #[serde(default = "default_token_timeout", with = "duration")]
    pub timeout: Duration,
    /// First retry delay after a transient failure.
    #[serde(default = "default_backoff_initial", with = "duration")]
    pub backoff_initial: Duration,
    /// Longest retry delay; the retry pace after a rejection.
    #[serde(default = "default_backoff_max", with = "duration")]
    pub backoff_max: Duration,
    /// Minimum time between refreshes forced by upstream 401s.
    #[serde(default = "default_forced_refresh_interval", with = "duration")]
    pub forced_refresh_interval: Duration,
    /// Extra CA certificates (PEM) trusted for the token endpoint.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// One token per subject (end-user consent) instead of one in total; the subjects and
    /// their refresh tokens live in the `[subjects]` store. Needs `grant_type =
    /// "authorization_code"`; codes arrive through the subjects API, not `code_file`.
    #[serde(default)]
    pub per_subject: bool,
    /// Where a per-subject token's consent is revoked (Flinks: `DELETE /api/v1/revoke` with
    /// the subject's bearer token), used by the subjects API's `DELETE …?revoke=true`.
    #[serde(default)]
    pub revoke_url: Option<String>,
    /// Share this (named) token with the other replicas through `[redis]`: one token request
    /// per lifetime between them instead of one each. Off by default, because it adds a
    /// dependency on Redis to a token that works without one.
    #[serde(default)]
    pub shared: bool,
    /// Client certificate chain (PEM) presented to the token endpoint (mutual TLS).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Private key (PEM) that signs `private_key_jwt` assertions.
    #[serde(default)]
    pub client_assertion_key_file: Option<PathBuf>,
    /// Assertion algorithm; unset means RS256 for an RSA key, ES256 for a P-256 key.
    #[serde(default)]
    pub client_assertion_alg: Option<AssertionAlg>,
    /// `kid` header of the assertions, when the server holds several keys for the client.
    #[serde(default)]
    pub client_assertion_kid: Option<String>,
    /// `aud` of the assertions; unset means `token_url` (some servers want their issuer id).
    #[serde(default)]
    pub client_assertion_aud: Option<String>,
}

fn default_refresh_ratio() -> f64 {
    DEFAULT_REFRESH_RATIO
}
fn default_refresh_margin() -> Duration {
    DEFAULT_REFRESH_MARGIN
}
fn default_lifetime() -> Duration {
    DEFAULT_LIFETIME
}
fn default_token_timeout() -> Duration {
    DEFAULT_TOKEN_TIMEOUT
}
fn default_backoff_initial() -> Duration {
    DEFAULT_BACKOFF_INITIAL
}
fn default_backoff_max() -> Duration {
    DEFAULT_BACKOFF_MAX
}
fn default_forced_refresh_interval() -> Duration {
    DEFAULT_FORCED_REFRESH_INTERVAL
}
fn default_replay_statuses() -> Vec<u16> {
    DEFAULT_REPLAY_STATUSES.to_vec()
}

impl TokenConfig {
    /// Where the client id comes from.
    pub fn client_id_source(&self) -> Option<SecretSource> {
        match (&self.client_id, &self.client_id_file) {
            (Some(id), _) => Some(SecretSource::Inline(Secret::new(id.clone()))),
            (None, Some(path)) => Some(SecretSource::File(path.clone())),
            (None, None) => None,
        }
    }

    /// Where the client secret comes from.
    pub fn client_secret_source(&self) -> Option<SecretSource> {
        match (&self.client_secret, &self.client_secret_file) {
            (Some(s), _) => Some(SecretSource::Inline(s.clone())),
            (None, Some(path)) => Some(SecretSource::File(path.clone())),
            (None, None) => None,
        }
    }
}

/// `[[routes]]`: a host whose requests get a token.
#[derive(Clone, Debug, Deserialize)]
pub struct RouteConfig {
    /// Label in metrics and logs; defaults to the host.
    #[serde(default)]
    pub name: Option<String>,
    /// Exact host or `*.suffix`.
    pub host: String,
    /// Port to match; unset matches the default ports.
    #[serde(default)]
    pub port: Option<u16>,
    /// Origin-form prefix (gateway mode), stripped before forwarding.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The `[tokens.<name>]` to inject.
    pub token: String,
    /// Base URL to forward to; defaults to `https://<host>`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Static headers added upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Upstream statuses that mean "token rejected".
    #[serde(default = "default_replay_statuses")]
    pub replay_statuses: Vec<u16>,
    /// Client certificate chain (PEM) presented to the upstream (mutual TLS).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

impl RouteConfig {
    /// The route's label: its name, or its host.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.host)
    }
}

/// Durations written as `30s`, `5m`, `250ms`, `1h 30m` (lives in `crate::time`, so that
/// sections defined outside this module parse durations the same way).
pub use crate::time::duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Config, ConfigErrors> {
        from_str(text, config::FileFormat::Toml, Some(HashMap::new()))
    }

    const MINIMAL: &str = r#"
        [tokens.flinks]
        token_url = "https://ob.flinksapp.com/api/v1/token"
        grant_type = "client_credentials"
        client_id = "my-client"
        client_secret_file = "/var/run/secrets/flinks/client_secret"

        [[routes]]
        host = "ob.flinksapp.com"
        token = "flinks"
    "#;

    const PER_SUBJECT: &str = r#"
        [tokens.fdx]
        token_url = "https://ob.flinksapp.com/api/v1/token"
        grant_type = "authorization_code"
        per_subject = true
        client_id = "my-client"
        client_secret_file = "/s"
        revoke_url = "https://ob.flinksapp.com/api/v1/revoke"

        [subjects]
        state_dir = "/var/lib/bearer-proxy"
        encryption_key_file = "/k"

        [[routes]]
        host = "ob.flinksapp.com"
        token = "fdx"
    "#;

    fn problem_keys(text: &str) -> Vec<String> {
        match toml(text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|p| p.key).collect(),
        }
    }

    #[test]
    fn the_redis_section_is_required_exactly_when_something_uses_it() {
        let redis_store =
            PER_SUBJECT.replace("state_dir = \"/var/lib/bearer-proxy\"", "store = \"redis\"");
        assert_eq!(problem_keys(&redis_store), ["redis"]);
        let with_section = redis_store.clone() + "\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
        let c = toml(&with_section).unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://127.0.0.1:6379");
        // A Redis store keeps no files: a state_dir there is a mistake worth naming.
        let both = with_section.replace("[subjects]", "[subjects]\nstate_dir = \"/s\"");
        assert_eq!(problem_keys(&both), ["subjects.state_dir"]);

        let orphan = PER_SUBJECT.to_owned() + "\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
        assert_eq!(problem_keys(&orphan), ["redis"]);

        let shared = MINIMAL.replace("[tokens.flinks]", "[tokens.flinks]\nshared = true");
        assert_eq!(problem_keys(&shared), ["redis"]);
        let shared_ok = shared.clone()
            + "\n[redis]\nurl = \"rediss://redis.example:6380\"\nencryption_key_file = \"/k\"\n";
        assert!(toml(&shared_ok).unwrap().tokens["flinks"].shared);
        let bad_url = shared.clone()
            + "\n[redis]\nurl = \"http://redis.example\"\nencryption_key_file = \"/k\"\n";
        assert_eq!(problem_keys(&bad_url), ["redis.url"]);

        let shared_subject =
            with_section.replace("per_subject = true", "per_subject = true\nshared = true");
        assert_eq!(problem_keys(&shared_subject), ["tokens.fdx.shared"]);
    }

    #[test]
    fn a_shared_token_is_client_credentials_and_its_slot_has_a_key() {
        let shared = MINIMAL.replace("[tokens.flinks]", "[tokens.flinks]\nshared = true")
            + "\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
        // The access token is sealed in Redis: without a key there is nothing to seal with.
        let errors = toml(&shared).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].key, "redis.encryption_key_file");
        assert!(
            errors.0[0].message.contains("flinks"),
            "{}",
            errors.0[0].message
        );
        let keyed = shared.replace(
            "[redis]",
            "[redis]\nencryption_key_files = [\"/k/new\", \"/k/old\"]",
        );
        assert!(toml(&keyed).is_ok());
        // A refresh token per process cannot back one shared access token.
        let refresh = keyed
            .replace("client_credentials", "refresh_token")
            .replace(
                "[tokens.flinks]",
                "[tokens.flinks]\nrefresh_token_file = \"/rt\"",
            );
        let errors = toml(&refresh).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].key, "tokens.flinks.shared");
        assert!(errors.0[0].message.contains("client_credentials"));
        assert!(errors.0[0].message.contains("per_subject"));
        let code = keyed
            .replace("client_credentials", "authorization_code")
            .replace(
                "[tokens.flinks]",
                "[tokens.flinks]\ncode_file = \"/c\"\nstate_dir = \"/s\"",
            );
        assert_eq!(problem_keys(&code), ["tokens.flinks.shared"]);
        // A key with nothing to seal is named too.
        let unused =
            MINIMAL.to_owned() + "\n[redis]\nurl = \"redis://h\"\nencryption_key_file = \"/k\"\n";
        assert_eq!(
            problem_keys(&unused),
            ["redis.encryption_key_file", "redis"]
        );
    }

    #[test]
    fn a_per_subject_token_needs_no_code_file_but_a_subjects_section() {
        let c = toml(PER_SUBJECT).unwrap();
        let s = c.subjects.as_ref().unwrap();
        assert!(c.tokens["fdx"].per_subject);
        assert_eq!(s.listen, crate::subject::config::DEFAULT_LISTEN);
        assert_eq!(s.header, "x-bearer-proxy-subject");
        assert!(toml(MINIMAL).unwrap().subjects.is_none());

        let no_section = PER_SUBJECT.replace("[subjects]", "[ignored]");
        assert!(problem_keys(&no_section).contains(&"subjects".to_owned()));
        let orphan =
            MINIMAL.to_owned() + "\n[subjects]\nstate_dir = \"/s\"\nencryption_key_file = \"/k\"\n";
        assert_eq!(problem_keys(&orphan), ["subjects"]);
    }

    #[test]
    fn per_subject_settings_that_cannot_work_are_each_named() {
        let bad = PER_SUBJECT
            .replace("authorization_code", "client_credentials")
            .replace(
                "per_subject = true",
                "per_subject = true\ncode_file = \"/c\"\nstate_dir = \"/x\"",
            )
            .replace(
                "https://ob.flinksapp.com/api/v1/revoke",
                "http://example.com/revoke",
            )
            .replace("[subjects]", "[subjects]\nlisten = \"127.0.0.1:3128\"");
        assert_eq!(
            problem_keys(&bad),
            [
                "tokens.fdx.per_subject",
                "tokens.fdx.revoke_url",
                "subjects.listen",
            ]
        );
        let mixed = PER_SUBJECT.replace("grant_type", "code_file = \"/c\"\ngrant_type");
        assert_eq!(problem_keys(&mixed), ["tokens.fdx.code_file"]);
        let named_revoke =
            MINIMAL.replace("grant_type", "revoke_url = \"https://x/r\"\ngrant_type");
        assert_eq!(problem_keys(&named_revoke), ["tokens.flinks.revoke_url"]);
    }

    #[test]
    fn reload_triggers_are_off_by_default_and_the_debounce_is_bounded() {
        let c = toml(MINIMAL).unwrap();
        assert!(!c.admin.reload);
        assert!(!c.reload.watch);
        assert_eq!(c.reload.debounce, DEFAULT_RELOAD_DEBOUNCE);
        let on = MINIMAL.to_owned() + "\n[admin]\nreload = true\n[reload]\nwatch = true\n";
        let c = toml(&on).unwrap();
        assert!(c.admin.reload && c.reload.watch);
        for bad in ["0s", "61s"] {
            let text = format!("{MINIMAL}\n[reload]\ndebounce = \"{bad}\"\n");
            assert_eq!(problem_keys(&text), ["reload.debounce"], "{bad}");
        }
        let typo = MINIMAL.to_owned() + "\n[reload]\nwach = true\n";
        assert_eq!(problem_keys(&typo), ["reload.wach"]);
    }

    #[test]
    fn default_addresses_parse() {
        assert_eq!(
            "127.0.0.1:3128".parse::<SocketAddr>().unwrap(),
            ProxyConfig::default().listen
        );
        assert_eq!(
            "0.0.0.0:9901".parse::<SocketAddr>().unwrap(),
            AdminConfig::default().listen
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = toml(MINIMAL).unwrap();
        let t = &c.tokens["flinks"];
        assert_eq!(t.name, "flinks");
        assert_eq!(t.refresh_ratio, DEFAULT_REFRESH_RATIO);
        assert_eq!(t.refresh_margin, DEFAULT_REFRESH_MARGIN);
        assert_eq!(t.encoding, Encoding::Json);
        assert_eq!(t.client_auth, ClientAuth::Body);
        assert_eq!(c.routes[0].replay_statuses, vec![401]);
        assert_eq!(c.routes[0].label(), "ob.flinksapp.com");
        assert_eq!(c.proxy.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.proxy.unmatched(), Unmatched::Forward);
        assert_eq!(c.proxy.connect(), ConnectPolicy::Tunnel);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn non_loopback_listener_denies_by_default() {
        let c = toml(&format!("[proxy]\nlisten = \"0.0.0.0:3128\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.proxy.unmatched(), Unmatched::Deny);
        assert_eq!(c.proxy.connect(), ConnectPolicy::Deny);
    }

    #[test]
    fn durations_parse_with_units() {
        let c = toml(&format!(
            "[proxy]\ntoken_wait = \"250ms\"\nidle_timeout = \"2m\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.proxy.token_wait, Duration::from_millis(250));
        assert_eq!(c.proxy.idle_timeout, Duration::from_secs(120));
        assert!(duration::parse("30").unwrap_err().contains("no unit"));
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_its_key() {
        let errs = toml(
            r#"
            [proxy]
            listen = "127.0.0.1:3128"
            idle_timout = "5s"
            token_wait = "soon"

            [admin]
            listen = "not an address"

            [tokens.flinks]
            token_url = "http://ob.flinksapp.com/api/v1/token"
            grant_type = "client_credentials"
            client_id = "x"
            refresh_ratio = 1.5
            backoff_initial = "10s"
            backoff_max = "1s"

            [tokens.other]
            token_url = "https://a.example/token"
            grant_type = "password"

            [[routes]]
            host = "ob.flinksapp.com"
            token = "missing"
            upstream = "http://10.0.0.1"
            replay_statuses = [200]

            [surprise]
            x = 1
        "#,
        )
        .unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "proxy.idle_timout",
            "proxy.token_wait",
            "admin.listen",
            "tokens.flinks.token_url",
            "tokens.flinks.client_secret_file",
            "tokens.flinks.refresh_ratio",
            "tokens.flinks.backoff_max",
            "tokens.other.grant_type",
            "routes[0].token",
            "routes[0].upstream",
            "routes[0].replay_statuses",
            "surprise",
        ] {
            assert!(keys.contains(&expected), "{expected} not in {keys:?}");
        }
        let text = errs.to_string();
        assert!(text.contains("unknown key"), "{text}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = HashMap::from([
            (
                "BEARER_PROXY__TOKENS__FLINKS__CLIENT_ID".to_owned(),
                "from-env".to_owned(),
            ),
            (
                "BEARER_PROXY__PROXY__LISTEN".to_owned(),
                "127.0.0.1:4000".to_owned(),
            ),
            (
                "BEARER_PROXY__TOKENS__FLINKS__REFRESH_RATIO".to_owned(),
                "0.5".to_owned(),
            ),
        ]);
        let c = from_str(MINIMAL, config::FileFormat::Toml, Some(env)).unwrap();
        assert_eq!(c.tokens["flinks"].client_id.as_deref(), Some("from-env"));
        assert_eq!(c.tokens["flinks"].refresh_ratio, 0.5);
        assert_eq!(c.proxy.listen.port(), 4000);
    }

    #[test]
    fn yaml_is_accepted() {
        let c = from_str(
            "tokens:\n  flinks:\n    token_url: https://x.example/t\n    grant_type: client_credentials\n    client_id: a\n    client_secret: b\nroutes:\n  - host: \"*.example.com\"\n    token: flinks\n",
            config::FileFormat::Yaml,
            Some(HashMap::new()),
        )
        .unwrap();
        assert_eq!(c.routes[0].host, "*.example.com");
    }

    #[test]
    fn secrets_do_not_print_in_debug() {
        let c = toml(&MINIMAL.replace(
            "client_secret_file = \"/var/run/secrets/flinks/client_secret\"",
            "client_secret = \"canary-secret-77\"",
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("canary-secret-77"));
    }

    #[test]
    fn refresh_and_code_grants_need_their_files() {
        let errs = toml(
            r#"
            [tokens.a]
            token_url = "https://x.example/t"
            grant_type = "refresh_token"
            client_id = "a"
            [tokens.b]
            token_url = "https://x.example/t"
            grant_type = "authorization_code"
            client_id = "b"
        "#,
        )
        .unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"tokens.a.refresh_token_file"), "{keys:?}");
        assert!(keys.contains(&"tokens.b.code_file"), "{keys:?}");
        assert!(keys.contains(&"tokens.b.state_dir"), "{keys:?}");
    }

    #[test]
    fn underscore_headers_default_to_drop_and_name_the_key_when_invalid() {
        assert_eq!(
            toml(MINIMAL).unwrap().proxy.underscore_headers,
            UnderscoreHeaders::Drop
        );
        for (text, want) in [
            ("drop", UnderscoreHeaders::Drop),
            ("reject", UnderscoreHeaders::Reject),
            ("allow", UnderscoreHeaders::Allow),
        ] {
            let c = toml(&format!(
                "[proxy]\nunderscore_headers = \"{text}\"\n{MINIMAL}"
            ))
            .unwrap();
            assert_eq!(c.proxy.underscore_headers, want);
        }
        let env = HashMap::from([(
            "BEARER_PROXY__PROXY__UNDERSCORE_HEADERS".to_owned(),
            "reject".to_owned(),
        )]);
        let c = from_str(MINIMAL, config::FileFormat::Toml, Some(env)).unwrap();
        assert_eq!(c.proxy.underscore_headers, UnderscoreHeaders::Reject);
        let errs = toml(&format!("[proxy]\nunderscore_headers = \"off\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "proxy.underscore_headers", "{errs}");
    }

    #[test]
    fn loopback_http_is_allowed_for_local_use() {
        assert!(check_endpoint_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_endpoint_url("http://localhost/token").is_ok());
        assert!(check_endpoint_url("http://[::1]:9/token").is_ok());
        assert!(check_endpoint_url("http://example.com/token").is_err());
        assert!(check_endpoint_url("https://u:p@example.com/token").is_err());
        assert!(check_endpoint_url("ftp://example.com/").is_err());
    }

    #[test]
    fn intercept_settings_default_and_are_checked_naming_their_keys() {
        const TOKEN: &str = r#"
            [tokens.t]
            token_url = "https://issuer.example/token"
            grant_type = "client_credentials"
            client_id = "id"
            client_secret = "s"
        "#;
        let ok = toml(&format!(
            "[proxy.intercept]\nca_cert_file = \"/ca/ca.crt\"\nca_key_file = \"/ca/ca.key\"\n{TOKEN}"
        ))
        .unwrap();
        let i = ok.proxy.intercept.unwrap();
        assert_eq!(i.leaf_validity, DEFAULT_LEAF_VALIDITY);
        assert_eq!(i.max_cached_leaves, DEFAULT_MAX_CACHED_LEAVES);
        assert!(toml(TOKEN).unwrap().proxy.intercept.is_none());
        let errs = toml(&format!(
            "[proxy.intercept]\nca_cert_file = \"/ca/both.pem\"\nca_key_file = \"/ca/both.pem\"\n\
             leaf_validity = \"5m\"\nmax_cached_leaves = 0\n{TOKEN}"
        ))
        .unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        for k in ["leaf_validity", "max_cached_leaves", "ca_key_file"] {
            assert!(
                keys.contains(&format!("proxy.intercept.{k}").as_str()),
                "{k}: {keys:?}"
            );
        }
    }
}
