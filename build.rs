//! Build script: records the build identity (git commit and enabled cargo features) in
//! environment variables that `src/build.rs` reads with `env!`. It only reads; it generates no
//! code and links nothing.
//!
//! The commit, in order of preference:
//! 1. `BEARER_PROXY_GIT_COMMIT` when set and non-empty: builds without a `.git` directory that
//!    still know their commit (the container build, whose context excludes `.git`; packagers
//!    building from a tarball).
//! 2. `git rev-parse HEAD`, but only when this package's directory is the top of that checkout:
//!    a tarball unpacked inside some other repository must not report that repository's commit.
//! 3. `unknown` (a tarball, or no `git` on the build machine).
//!
//! Uncommitted changes are not flagged: detecting them would mean re-running this script on
//! every edit of every file, and a stale "dirty" flag would be worse than none.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The commit value when it cannot be known.
const UNKNOWN: &str = "unknown";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=BEARER_PROXY_GIT_COMMIT");

    let commit = match std::env::var("BEARER_PROXY_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => sanitize(c.trim()),
        _ => git_commit().unwrap_or_else(|| UNKNOWN.to_owned()),
    };

    // Cargo passes one CARGO_FEATURE_<NAME> per enabled feature, upper-cased with `-` turned
    // into `_`; the Cargo.toml spelling (lower case, `-`) is the one users type.
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(str::to_owned))
        .map(|f| f.to_ascii_lowercase().replace('_', "-"))
        .collect();
    features.sort();
    let features = features.join(",");
    let shown = if features.is_empty() {
        "none"
    } else {
        &features
    };

    println!("cargo:rustc-env=BEARER_PROXY_COMMIT={commit}");
    println!("cargo:rustc-env=BEARER_PROXY_FEATURES={features}");
    println!(
        "cargo:rustc-env=BEARER_PROXY_VERSION_LINE={} (commit {commit}, features: {shown})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}

/// Keeps a commit given from outside to what a commit id can contain, so it is a safe label
/// value and one line of `--version`.
fn sanitize(c: &str) -> String {
    c.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect()
}

/// `git rev-parse HEAD` of the checkout whose top is this package, and the files to watch so
/// that a new commit or checkout rebuilds with the new id.
fn git_commit() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = git(&dir, &["rev-parse", "--show-toplevel"])?;
    if !same_dir(Path::new(&top), &dir) {
        return None;
    }
    let commit = git(&dir, &["rev-parse", "HEAD"])?;
    if commit.len() < 7 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // HEAD moves on checkout; the branch ref moves on commit; packed-refs after `git gc`. Only
    // paths that exist: cargo re-runs a script on every build while a watched path is missing.
    let mut watch = vec![git(&dir, &["rev-parse", "--git-path", "HEAD"])];
    watch.push(git(&dir, &["rev-parse", "--git-path", "packed-refs"]));
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&dir, &["rev-parse", "--git-path", &branch]));
    }
    for path in watch.into_iter().flatten() {
        let path = dir.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
