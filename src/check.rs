//! The checks `bearer-proxy check` and a configuration reload make beyond
//! [`Config::validate`](crate::config::Config::validate): the files a configuration names
//! (secrets, CA and client certificates, assertion keys, encryption keys, state directories)
//! can be read and used. One function for both, so a reload refuses exactly what `check`
//! would.

use std::path::Path;

use crate::config::{ClientAuth, Config, GrantType, SubjectsConfig};

/// Secret and CA files that cannot be read, client certificates that do not match their key or
/// are not valid now, assertion keys that cannot sign, and state directories that cannot be
/// written.
pub async fn file_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, t) in &config.tokens {
        let mut files: Vec<(&str, &Path)> = Vec::new();
        if let Some(p) = &t.client_id_file {
            files.push(("client_id_file", p));
        }
        if let Some(p) = &t.client_secret_file {
            files.push(("client_secret_file", p));
        }
        if t.grant_type == GrantType::RefreshToken
            && let Some(p) = &t.refresh_token_file
        {
            files.push(("refresh_token_file", p));
        }
        for (key, p) in files {
            if let Err(e) = std::fs::read(p) {
                problems.push(format!(
                    "tokens.{name}.{key}: cannot read {}: {e}",
                    p.display()
                ));
            }
        }
        if let Some(ca) = &t.ca_file
            && let Err(e) = crate::tls::root_store(Some(ca))
        {
            problems.push(format!("tokens.{name}.ca_file: {e}"));
        }
        if let (Some(cert), Some(key)) = (&t.client_cert_file, &t.client_key_file)
            && let Err(e) = crate::identity::load(cert, key, std::time::SystemTime::now())
        {
            problems.push(format!("tokens.{name}.client_cert_file: {e}"));
        }
        if t.client_auth == ClientAuth::PrivateKeyJwt
            && let Some(key) = &t.client_assertion_key_file
            && let Err(e) = crate::token::assertion::AssertionKey::load(key, t.client_assertion_alg)
        {
            problems.push(format!("tokens.{name}.client_assertion_key_file: {e}"));
        }
        if let Some(dir) = &t.state_dir {
            problems.extend(dir_problem(&format!("tokens.{name}.state_dir"), dir));
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        if let (Some(cert), Some(key)) = (&r.client_cert_file, &r.client_key_file)
            && let Err(e) = crate::identity::load(cert, key, std::time::SystemTime::now())
        {
            problems.push(format!("routes[{i}].client_cert_file: {e}"));
        }
    }
    if let Some(sc) = &config.subjects {
        subjects_file_problems(sc, &mut problems).await;
    }
    // The key that seals shared tokens' slots: a wrong one would stop the start.
    if let Some(rc) = &config.redis
        && !rc.key_files().is_empty()
        && let Err(e) = crate::subject::keyring::KeyRing::load(&rc.key_files()).await
    {
        problems.push(format!("redis: {e}"));
    }
    if let Some(i) = &config.proxy.intercept
        && let Err(e) = crate::ca::Ca::load(&i.ca_cert_file, &i.ca_key_file)
    {
        problems.push(format!("proxy.intercept: {e}"));
    }
    problems
}

/// The `[subjects]` files: every encryption key loads (a wrong or missing key would stop the
/// start), the API token file is readable, the state directory is a writable directory.
async fn subjects_file_problems(sc: &SubjectsConfig, problems: &mut Vec<String>) {
    if let Err(e) = sc.key_ring().await {
        problems.push(format!("subjects: {e}"));
    }
    if let Some(p) = &sc.api_token_file
        && let Err(e) = std::fs::read(p)
    {
        problems.push(format!(
            "subjects.api_token_file: cannot read {}: {e}",
            p.display()
        ));
    }
    if let Some(dir) = &sc.state_dir {
        problems.extend(dir_problem("subjects.state_dir", dir));
    }
}

/// Why `dir` (the value of `key`) cannot hold state: missing, not a directory, or read-only.
pub(crate) fn dir_problem(key: &str, dir: &Path) -> Option<String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => None,
        Ok(_) => Some(format!(
            "{key}: {} is not a writable directory",
            dir.display()
        )),
        Err(e) => Some(format!("{key}: {}: {e}", dir.display())),
    }
}

/// Whether `[redis]` can be connected to now: connecting reads the password and CA files and
/// authenticates, within `redis.connect_timeout`, so a wrong password or CA shows in `check`,
/// not at the first start. Not part of [`file_problems`]: a reload does not reconnect
/// (`[redis]` changes need a restart), and must not fail because Redis is briefly away.
pub async fn redis_problems(config: &Config) -> Vec<String> {
    let Some(rc) = &config.redis else {
        return Vec::new();
    };
    match crate::subject::redis::RedisStore::connect(rc).await {
        Ok(_) => Vec::new(),
        Err(e) => vec![format!("redis: {}", crate::error::Chain(&e))],
    }
}
