//! The build script (`build.rs` at the package root) on its own: compiled with `rustc` and run
//! in the situations a build meets — a git checkout, a tarball without `.git`, a tarball
//! unpacked inside some other repository, a commit given from outside — since a normal build
//! only ever exercises the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the build script once into `dir`.
fn compile(dir: &Path) -> PathBuf {
    let exe = dir.join("build-script");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--edition", "2024", "-o"])
        .arg(&exe)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("build.rs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the build script as cargo would for a package in `manifest_dir`; returns the
/// `rustc-env` values it set and every `rerun-if-changed` path.
fn run(
    exe: &Path,
    manifest_dir: &Path,
    env: &[(&str, &str)],
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut cmd = Command::new(exe);
    cmd.current_dir(manifest_dir)
        .env("CARGO_MANIFEST_DIR", manifest_dir)
        .env("CARGO_PKG_VERSION", "9.8.7")
        .env_remove("BEARER_PROXY_GIT_COMMIT");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CARGO_FEATURE_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let vars = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cargo:rustc-env="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let watched = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cargo:rerun-if-changed="))
        .map(str::to_owned)
        .collect();
    (vars, watched)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.test"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn build_script_finds_the_commit_only_of_its_own_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path());

    // A tarball: no .git anywhere above (the temporary directory is outside any repository).
    let tarball = tmp.path().join("tarball");
    std::fs::create_dir(&tarball).unwrap();
    let (vars, _) = run(&exe, &tarball, &[]);
    assert_eq!(vars["BEARER_PROXY_COMMIT"], "unknown");
    assert_eq!(vars["BEARER_PROXY_FEATURES"], "");
    assert_eq!(
        vars["BEARER_PROXY_VERSION_LINE"],
        "9.8.7 (commit unknown, features: none)"
    );

    // A checkout: HEAD's commit, and HEAD and the branch ref are watched so that a new commit
    // rebuilds with the new id.
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "one"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let (vars, watched) = run(&exe, &repo, &[]);
    assert_eq!(vars["BEARER_PROXY_COMMIT"], head);
    assert!(
        watched.iter().any(|p| p.ends_with(".git/HEAD")),
        "{watched:?}"
    );
    assert!(
        watched.iter().any(|p| p.ends_with("refs/heads/main")),
        "{watched:?}"
    );

    // A tarball unpacked inside that repository: not its commit.
    let nested = repo.join("vendor").join("bearer-proxy");
    std::fs::create_dir_all(&nested).unwrap();
    let (vars, _) = run(&exe, &nested, &[]);
    assert_eq!(vars["BEARER_PROXY_COMMIT"], "unknown");

    // Given from outside (a container build): wins, and is reduced to what an id contains.
    let (vars, _) = run(
        &exe,
        &tarball,
        &[("BEARER_PROXY_GIT_COMMIT", " 0123abc\"} 1\nevil ")],
    );
    assert_eq!(vars["BEARER_PROXY_COMMIT"], "0123abc1evil");
    let (vars, _) = run(&exe, &repo, &[("BEARER_PROXY_GIT_COMMIT", "")]);
    assert_eq!(vars["BEARER_PROXY_COMMIT"], head, "empty means not given");
}

#[test]
fn build_script_lists_features_as_cargo_toml_spells_them() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path());
    let (vars, _) = run(
        &exe,
        tmp.path(),
        &[
            ("CARGO_FEATURE_DEV_TOOLS", "1"),
            ("CARGO_FEATURE_ALPHA", "1"),
        ],
    );
    assert_eq!(vars["BEARER_PROXY_FEATURES"], "alpha,dev-tools");
    assert_eq!(
        vars["BEARER_PROXY_VERSION_LINE"],
        "9.8.7 (commit unknown, features: alpha,dev-tools)"
    );
}
