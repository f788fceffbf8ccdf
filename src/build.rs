//! Build identity: the version, the git commit and the enabled cargo features this binary was
//! built with, as recorded by the build script (`build.rs` at the package root). Shown by
//! `bearer-proxy --version`, the `bearer_proxy_build_info` metric and `/status`.

/// The package version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built (full hex id), or `unknown` when built outside a git checkout (a
/// source tarball) without `BEARER_PROXY_GIT_COMMIT` set.
pub const COMMIT: &str = env!("BEARER_PROXY_COMMIT");

/// The enabled cargo features, sorted, comma-separated; empty when none.
pub const FEATURES: &str = env!("BEARER_PROXY_FEATURES");

/// What `--version` prints after the program name:
/// `0.1.0 (commit <id>, features: <list or none>)`.
pub const VERSION_LINE: &str = env!("BEARER_PROXY_VERSION_LINE");

/// The enabled cargo features, one by one.
pub fn features() -> impl Iterator<Item = &'static str> {
    split(FEATURES)
}

fn split(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').filter(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_a_hex_id_or_unknown() {
        assert!(
            COMMIT == "unknown"
                || (COMMIT.len() >= 7 && COMMIT.chars().all(|c| c.is_ascii_hexdigit())),
            "{COMMIT:?}"
        );
    }

    #[test]
    fn version_line_names_version_commit_and_features() {
        assert!(VERSION_LINE.starts_with(VERSION), "{VERSION_LINE}");
        assert!(
            VERSION_LINE.contains(&format!("commit {COMMIT}")),
            "{VERSION_LINE}"
        );
        let shown = if FEATURES.is_empty() {
            "none"
        } else {
            FEATURES
        };
        assert!(
            VERSION_LINE.ends_with(&format!("features: {shown})")),
            "{VERSION_LINE}"
        );
    }

    #[test]
    fn feature_lists_split_on_commas_and_none_is_empty() {
        assert_eq!(split("").count(), 0);
        assert_eq!(split("dev-tools").collect::<Vec<_>>(), ["dev-tools"]);
        assert_eq!(split("a,dev-tools").collect::<Vec<_>>(), ["a", "dev-tools"]);
        let listed: Vec<&str> = features().collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(listed, sorted, "the build script sorts them");
    }
}
