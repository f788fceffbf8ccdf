//! [`Config::validate`]: every check serde cannot make (references between sections, ranges,
//! URLs, combinations), collected rather than stopping at the first, each naming its key.

use std::net::IpAddr;

use super::*;
use crate::subject::config::StoreKind;

/// A longer quiet time would only delay a reload an operator is waiting for; a change that
/// takes longer than this to write is a broken writer.
const MAX_RELOAD_DEBOUNCE: std::time::Duration = std::time::Duration::from_secs(60);

impl Config {
    /// Checks everything serde cannot: references, ranges, URLs, combinations.
    /// Returns every problem found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    pub(super) fn problems(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut push = |key: String, msg: String| errors.push(ConfigError::new(key, msg));

        let p = &self.proxy;
        if p.max_connections == 0 {
            push("proxy.max_connections".into(), "must be at least 1".into());
        }
        if p.max_header_bytes < 1024 {
            push(
                "proxy.max_header_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        for (key, d) in [
            ("header_read_timeout", p.header_read_timeout),
            ("idle_timeout", p.idle_timeout),
            ("connect_timeout", p.connect_timeout),
            ("response_timeout", p.response_timeout),
            ("token_wait", p.token_wait),
            ("shutdown_grace", p.shutdown_grace),
        ] {
            if d.is_zero() {
                push(format!("proxy.{key}"), "must be greater than zero".into());
            }
        }
        if p.listen == self.admin.listen && p.listen.port() != 0 {
            push(
                "admin.listen".into(),
                format!("same address as proxy.listen ({})", p.listen),
            );
        }
        if let Some(i) = &p.intercept {
            intercept_problems(i, &mut push);
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            push("log.level".into(), format!("not a valid filter: {e}"));
        }
        let debounce = self.reload.debounce;
        if debounce.is_zero() || debounce > MAX_RELOAD_DEBOUNCE {
            push(
                "reload.debounce".into(),
                format!(
                    "must be greater than zero and at most {}s",
                    MAX_RELOAD_DEBOUNCE.as_secs()
                ),
            );
        }

        for (name, t) in &self.tokens {
            token_problems(name, t, &mut push);
        }
        let per_subject: Vec<&str> = self
            .tokens
            .values()
            .filter(|t| t.per_subject)
            .map(|t| t.name.as_str())
            .collect();
        match &self.subjects {
            Some(s) => {
                s.problems(&mut push);
                if per_subject.is_empty() {
                    push(
                        "subjects".into(),
                        "no token has per_subject = true, so nothing would use this section".into(),
                    );
                }
                for (key, addr) in [
                    ("proxy.listen", self.proxy.listen),
                    ("admin.listen", self.admin.listen),
                ] {
                    if addr == s.listen && addr.port() != 0 {
                        push(
                            "subjects.listen".into(),
                            format!("same address as {key} ({addr})"),
                        );
                    }
                }
            }
            None if !per_subject.is_empty() => push(
                "subjects".into(),
                format!(
                    "missing: tokens {} have per_subject = true and need a [subjects] section \
                     (state_dir, encryption_key_file)",
                    per_subject.join(", ")
                ),
            ),
            None => {}
        }
        self.redis_problems(&mut push);

        let mut names = HashMap::new();
        let mut keys = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            let k = |field: &str| format!("routes[{i}].{field}");
            route_problems(r, &k, &mut push);
            if !self.tokens.contains_key(&r.token) {
                push(k("token"), format!("no [tokens.{}] is configured", r.token));
            }
            if let Some(j) = names.insert(r.label().to_owned(), i) {
                push(
                    k("name"),
                    format!("route name {:?} is already used by routes[{j}]", r.label()),
                );
            }
            let key = (
                r.host.to_ascii_lowercase(),
                r.port,
                r.path_prefix.clone().unwrap_or_default(),
            );
            if let Some(j) = keys.insert(key, i) {
                push(
                    k("host"),
                    format!("routes[{j}] already matches the same host, port and path_prefix"),
                );
            }
        }
        errors
    }

    /// `[redis]` exists exactly when something uses it, and is itself valid.
    fn redis_problems(&self, push: &mut impl FnMut(String, String)) {
        let redis_store = self
            .subjects
            .as_ref()
            .is_some_and(|s| s.store == StoreKind::Redis);
        let shared: Vec<&str> = self
            .tokens
            .values()
            .filter(|t| t.shared && !t.per_subject)
            .map(|t| t.name.as_str())
            .collect();
        for t in self.tokens.values().filter(|t| t.shared && t.per_subject) {
            push(
                format!("tokens.{}.shared", t.name),
                "not used with per_subject = true: per-subject tokens are shared through \
                 [subjects] store = \"redis\""
                    .into(),
            );
        }
        for t in self
            .tokens
            .values()
            .filter(|t| t.shared && !t.per_subject && t.grant_type != GrantType::ClientCredentials)
        {
            push(
                format!("tokens.{}.shared", t.name),
                format!(
                    "only for grant_type = \"client_credentials\": a {} token's refresh token \
                     is this process's own (state_dir), and sharing its access token while \
                     each replica rotates its own refresh token is unsafe; for consent shared \
                     by replicas use per_subject = true with [subjects] store = \"redis\"",
                    t.grant_type.as_str()
                ),
            );
        }
        match &self.redis {
            Some(r) => {
                r.problems(push);
                let has_key = r.encryption_key_file.is_some() || !r.encryption_key_files.is_empty();
                if !shared.is_empty() && !has_key {
                    push(
                        "redis.encryption_key_file".into(),
                        format!(
                            "missing: tokens {} have shared = true, and their access tokens are \
                             sealed in Redis; set encryption_key_file (make a key with `openssl \
                             rand -base64 32`) or encryption_key_files",
                            shared.join(", ")
                        ),
                    );
                }
                if shared.is_empty() && has_key {
                    push(
                        "redis.encryption_key_file".into(),
                        "no token has shared = true, so nothing is sealed with this key \
                         ([subjects] records use [subjects]' own key)"
                            .into(),
                    );
                }
                if !redis_store && shared.is_empty() {
                    push(
                        "redis".into(),
                        "nothing uses this section: set [subjects] store = \"redis\" or \
                         shared = true on a token"
                            .into(),
                    );
                }
            }
            None => {
                if redis_store {
                    push(
                        "redis".into(),
                        "missing: [subjects] store = \"redis\" needs a [redis] section (url)"
                            .into(),
                    );
                }
                if !shared.is_empty() {
                    push(
                        "redis".into(),
                        format!(
                            "missing: tokens {} have shared = true and need a [redis] section \
                             (url)",
                            shared.join(", ")
                        ),
                    );
                }
            }
        }
    }
}

/// Leaves shorter than this would be re-signed every few minutes, and a skewed client clock
/// would reject them.
const MIN_LEAF_VALIDITY: Duration = Duration::from_secs(3600);
/// The CA/Browser Forum's ceiling for a TLS server certificate (398 days); Apple's clients
/// refuse longer ones even from a private CA.
const MAX_LEAF_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);

fn intercept_problems(i: &InterceptConfig, push: &mut impl FnMut(String, String)) {
    let k = |field: &str| format!("proxy.intercept.{field}");
    if !(MIN_LEAF_VALIDITY..=MAX_LEAF_VALIDITY).contains(&i.leaf_validity) {
        push(k("leaf_validity"), "must be between 1h and 397 days".into());
    }
    if i.max_cached_leaves == 0 {
        push(k("max_cached_leaves"), "must be at least 1".into());
    }
    if i.ca_cert_file == i.ca_key_file {
        push(
            k("ca_key_file"),
            "is the same file as ca_cert_file: keep the key in its own file (mode 0600)".into(),
        );
    }
}

fn token_problems(name: &str, t: &TokenConfig, push: &mut impl FnMut(String, String)) {
    let k = |field: &str| format!("tokens.{name}.{field}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        push(
            format!("tokens.{name}"),
            "token names use only a-z, 0-9, '_' and '-' (they become metric labels and file names)"
                .into(),
        );
    }
    if let Err(msg) = check_endpoint_url(&t.token_url) {
        push(k("token_url"), msg);
    }
    match (&t.client_id, &t.client_id_file) {
        (Some(_), Some(_)) => push(
            k("client_id"),
            "set client_id or client_id_file, not both".into(),
        ),
        (None, None) => push(
            k("client_id"),
            "missing: set client_id or client_id_file".into(),
        ),
        _ => {}
    }
    match (&t.client_secret, &t.client_secret_file) {
        (Some(_), Some(_)) => push(
            k("client_secret"),
            "set client_secret or client_secret_file, not both".into(),
        ),
        (Some(_), _) | (_, Some(_)) if !t.client_auth.sends_secret() => push(
            k("client_secret"),
            format!(
                "not sent with client_auth = {:?}; remove it so nobody believes it is used",
                t.client_auth
            ),
        ),
        (None, None)
            if t.grant_type == GrantType::ClientCredentials && t.client_auth.sends_secret() =>
        {
            push(
                k("client_secret_file"),
                "missing: the client_credentials grant needs client_secret_file (or client_secret)"
                    .into(),
            )
        }
        (None, None) if t.client_auth == ClientAuth::Basic => push(
            k("client_secret_file"),
            "missing: client_auth = \"basic\" needs a client secret".into(),
        ),
        _ => {}
    }
    match t.grant_type {
        GrantType::ClientCredentials => {}
        GrantType::RefreshToken => {
            if t.refresh_token_file.is_none() && t.state_dir.is_none() {
                push(
                    k("refresh_token_file"),
                    "missing: the refresh_token grant needs refresh_token_file".into(),
                );
            }
        }
        GrantType::AuthorizationCode if t.per_subject => {
            for (field, set) in [
                ("code_file", t.code_file.is_some()),
                ("refresh_token_file", t.refresh_token_file.is_some()),
                ("state_dir", t.state_dir.is_some()),
            ] {
                if set {
                    push(
                        k(field),
                        "not used with per_subject = true: codes arrive through the subjects \
                         API and refresh tokens live in the [subjects] store"
                            .into(),
                    );
                }
            }
        }
        GrantType::AuthorizationCode => {
            if t.code_file.is_none() {
                push(
                    k("code_file"),
                    "missing: the authorization_code grant needs code_file".into(),
                );
            }
            if t.state_dir.is_none() {
                push(
                    k("state_dir"),
                    "missing: the authorization_code grant needs state_dir to keep the refresh \
                     token, or a restart would re-send a spent code"
                        .into(),
                );
            }
        }
    }
    if t.per_subject && t.grant_type != GrantType::AuthorizationCode {
        push(
            k("per_subject"),
            "needs grant_type = \"authorization_code\": each subject enrols with its own code"
                .into(),
        );
    }
    match &t.revoke_url {
        Some(_) if !t.per_subject => push(
            k("revoke_url"),
            "only used with per_subject = true (the subjects API revokes a subject's consent)"
                .into(),
        ),
        Some(url) => {
            if let Err(msg) = check_endpoint_url(url) {
                push(k("revoke_url"), msg);
            }
        }
        None => {}
    }
    if !(t.refresh_ratio > 0.0 && t.refresh_ratio < 1.0) {
        push(
            k("refresh_ratio"),
            "must be between 0 and 1 (exclusive)".into(),
        );
    }
    if t.default_lifetime < Duration::from_secs(1) {
        push(k("default_lifetime"), "must be at least 1s".into());
    }
    if t.timeout.is_zero() {
        push(k("timeout"), "must be greater than zero".into());
    }
    if t.backoff_initial.is_zero() {
        push(k("backoff_initial"), "must be greater than zero".into());
    }
    if t.backoff_max < t.backoff_initial {
        push(
            k("backoff_max"),
            "must not be shorter than backoff_initial".into(),
        );
    }
    const RESERVED: &[&str] = &[
        "grant_type",
        "client_id",
        "client_secret",
        "refresh_token",
        "code",
        "scope",
        "redirect_uri",
        "client_assertion",
        "client_assertion_type",
    ];
    for key in t.extra.keys() {
        if RESERVED.contains(&key.as_str()) {
            push(
                format!("tokens.{name}.extra.{key}"),
                "reserved field; use the dedicated key".into(),
            );
        }
    }
    header_problems(&t.headers, &|h| format!("tokens.{name}.headers.{h}"), push);
    client_auth_problems(t, &k, push);
}

/// The mutual TLS and `private_key_jwt` keys of a token (issue #16).
fn client_auth_problems(
    t: &TokenConfig,
    k: &impl Fn(&str) -> String,
    push: &mut impl FnMut(String, String),
) {
    cert_pair_problems(&t.client_cert_file, &t.client_key_file, k, push);
    if t.client_auth == ClientAuth::TlsClientAuth && t.client_cert_file.is_none() {
        push(
            k("client_cert_file"),
            "missing: client_auth = \"tls_client_auth\" needs client_cert_file and client_key_file"
                .into(),
        );
    }
    if t.client_auth == ClientAuth::PrivateKeyJwt {
        if t.client_assertion_key_file.is_none() {
            push(
                k("client_assertion_key_file"),
                "missing: client_auth = \"private_key_jwt\" needs client_assertion_key_file".into(),
            );
        }
        if let Some(aud) = &t.client_assertion_aud
            && aud.is_empty()
        {
            push(k("client_assertion_aud"), "must not be empty".into());
        }
    } else {
        for (key, set) in [
            (
                "client_assertion_key_file",
                t.client_assertion_key_file.is_some(),
            ),
            ("client_assertion_alg", t.client_assertion_alg.is_some()),
            ("client_assertion_kid", t.client_assertion_kid.is_some()),
            ("client_assertion_aud", t.client_assertion_aud.is_some()),
        ] {
            if set {
                push(
                    k(key),
                    "only used with client_auth = \"private_key_jwt\"".into(),
                );
            }
        }
    }
}

/// `client_cert_file` and `client_key_file` come together.
fn cert_pair_problems(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    k: &impl Fn(&str) -> String,
    push: &mut impl FnMut(String, String),
) {
    match (cert, key) {
        (Some(_), None) => push(
            k("client_key_file"),
            "missing: client_cert_file needs client_key_file".into(),
        ),
        (None, Some(_)) => push(
            k("client_cert_file"),
            "missing: client_key_file needs client_cert_file".into(),
        ),
        _ => {}
    }
}

fn route_problems(
    r: &RouteConfig,
    k: &impl Fn(&str) -> String,
    push: &mut impl FnMut(String, String),
) {
    let host = r.host.strip_prefix("*.").unwrap_or(&r.host);
    if host.is_empty()
        || host.contains('*')
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
    {
        push(
            k("host"),
            format!(
                "{:?} is not a host name, IP address or *.suffix pattern",
                r.host
            ),
        );
    }
    if let Some(prefix) = &r.path_prefix
        && (!prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#']))
    {
        push(
            k("path_prefix"),
            "must start with '/' and name a path (e.g. \"/flinks\")".into(),
        );
    }
    if let Some(up) = &r.upstream
        && let Err(msg) = check_endpoint_url(up)
    {
        push(k("upstream"), msg);
    }
    if r.port == Some(0) {
        push(k("port"), "must be 1-65535".into());
    }
    for s in &r.replay_statuses {
        if !(400..=599).contains(s) {
            push(
                k("replay_statuses"),
                format!("{s} is not an error status (400-599)"),
            );
        }
    }
    header_problems(&r.headers, &|h| format!("{}.{h}", k("headers")), push);
    cert_pair_problems(&r.client_cert_file, &r.client_key_file, k, push);
}

fn header_problems(
    headers: &BTreeMap<String, String>,
    k: &dyn Fn(&str) -> String,
    push: &mut impl FnMut(String, String),
) {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            push(k(name), "not a valid header name".into());
        } else if http::HeaderValue::from_str(value).is_err() {
            push(k(name), "not a valid header value".into());
        }
        if name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("host") {
            push(
                k(name),
                "set by bearer-proxy itself; cannot be configured".into(),
            );
        }
    }
}

/// Whether a URL may carry credentials: `https`, or `http` to a loopback address only.
pub fn check_endpoint_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user:password@".into());
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(url.host_str().unwrap_or_default()) => {}
        "http" => {
            return Err(format!(
                "{raw:?}: plain http is allowed only for loopback addresses; use https so \
                 credentials never cross a network in clear text"
            ));
        }
        other => return Err(format!("{raw:?}: scheme {other:?} is not http(s)")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    Ok(url)
}

/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
