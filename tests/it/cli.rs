//! The binary as an operator runs it: `check`, `token`, `run` and its signals, with canary
//! secrets that must never reach any output, at the most verbose log level.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::issuer;
use bearer_proxy::issuer::IssuerOptions;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");
const CANARY_SECRET: &str = "canary-client-secret-5c1b";
const CANARY_TOKEN: &str = "canary-access-token-77e2";
const CANARY_REFRESH: &str = "canary-refresh-token-0d9f";

fn canary_issuer() -> IssuerOptions {
    IssuerOptions {
        clients: vec![("demo-client".into(), CANARY_SECRET.into())],
        fixed_token: Some(CANARY_TOKEN.into()),
        refresh_tokens: vec![CANARY_REFRESH.into()],
        ..Default::default()
    }
}

/// Writes a config using `token_url`, with the secret (and refresh token) in files.
fn write_config(dir: &Path, token_url: &str, grant: &str, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("client_secret"), format!("{CANARY_SECRET}\n")).unwrap();
    std::fs::write(dir.join("refresh_token"), CANARY_REFRESH).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
drain_delay = "100ms"
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:0"

[log]
level = "trace"

[tokens.flinks]
token_url = "{token_url}"
grant_type = "{grant}"
client_id = "demo-client"
client_secret_file = "{dir}/client_secret"
refresh_token_file = "{dir}/refresh_token"
state_dir = "{dir}"
{extra}
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    path
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("BEARER_PROXY_CONFIG", config)
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("command timed out")
        .unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_no_canary(text: &str) {
    for canary in [CANARY_SECRET, CANARY_TOKEN, CANARY_REFRESH] {
        assert!(!text.contains(canary), "{canary} leaked into:\n{text}");
    }
}

#[tokio::test]
async fn token_describes_the_token_without_printing_it() {
    let (url, _) = issuer(canary_issuer()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "client_credentials", "");
    let out = run(&["token"], &config, &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("lifetime     300s"), "{}", out.stdout);
    assert!(out.stdout.contains("type         Bearer"), "{}", out.stdout);
    assert_no_canary(&out.stdout);
    assert_no_canary(&out.stderr);
}

#[tokio::test]
async fn token_failure_prints_the_oauth_error_and_exits_non_zero() {
    let (url, _) = issuer(IssuerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "client_credentials", "");
    let out = run(&["token", "flinks"], &config, &[]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("invalid_client"), "{}", out.stderr);
    assert_no_canary(&out.stderr);
}

#[tokio::test]
async fn the_token_client_ignores_http_proxy_variables() {
    let (url, _) = issuer(canary_issuer()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "refresh_token", "");
    // A proxy that does not exist: going through it would fail.
    let dead = "http://127.0.0.1:9";
    let env = [
        ("HTTP_PROXY", dead),
        ("http_proxy", dead),
        ("HTTPS_PROXY", dead),
        ("ALL_PROXY", dead),
    ];
    let out = run(&["token"], &config, &env).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_no_canary(&out.stdout);
    assert_no_canary(&out.stderr);
}

#[tokio::test]
async fn check_accepts_a_good_config_and_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "https://ob.flinksapp.com/api/v1/token",
        "client_credentials",
        "",
    );
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("token  flinks: client_credentials"),
        "{}",
        out.stdout
    );
    assert_no_canary(&out.stdout);

    std::fs::remove_file(dir.path().join("client_secret")).unwrap();
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("tokens.flinks.client_secret_file"),
        "{}",
        out.stderr
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[proxy]\nlisten = \"nowhere\"\n[tokens.flinks]\ntoken_url = \"http://example.com/t\"\n\
         grant_type = \"client_credentials\"\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_ratio = 3\n",
    )
    .unwrap();
    let out = run(&["check"], &bad, &[]).await;
    assert_eq!(out.code, 2);
    for key in [
        "proxy.listen",
        "tokens.flinks.token_url",
        "tokens.flinks.refresh_ratio",
    ] {
        assert!(
            out.stderr.contains(key),
            "{key} not named in:\n{}",
            out.stderr
        );
    }
}

/// `check` loads the `[subjects]` encryption keys as `run` would: a key file that is not 32
/// bytes of base64 is named, and so is an unreadable API token file; a good key passes.
#[tokio::test]
async fn check_loads_the_subjects_encryption_keys() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = dir.path().join("subjects.toml");
    std::fs::write(
        &config,
        format!(
            "[tokens.fdx]\ntoken_url = \"https://ob.flinksapp.com/api/v1/token\"\n\
             grant_type = \"authorization_code\"\nper_subject = true\nclient_id = \"c\"\n\
             [subjects]\nstate_dir = \"{d}\"\nencryption_key_file = \"{d}/key\"\n\
             api_token_file = \"{d}/api_token\"\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("key"), "c2hvcnQ=\n").unwrap();
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stderr.contains("subjects: "), "{}", out.stderr);
    assert!(out.stderr.contains("holds 5 bytes"), "{}", out.stderr);
    assert!(
        out.stderr.contains("subjects.api_token_file"),
        "{}",
        out.stderr
    );

    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(dir.path().join("key"), key).unwrap();
    std::fs::write(dir.path().join("api_token"), "t").unwrap();
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    // `token` on a per-subject entry explains itself instead of trying a grant it cannot make
    // (the unreachable token_url shows that nothing was sent: the answer is immediate).
    let token = run(&["token", "fdx"], &config, &[]).await;
    assert_eq!(token.code, 2, "{}", token.stderr);
    assert!(
        token.stderr.contains("per_subject = true") && token.stderr.contains("subjects refresh"),
        "{}",
        token.stderr
    );
    assert!(
        out.stdout.contains("fdx: authorization_code per subject"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("subjects  API listen 127.0.0.1:9902"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn check_loads_the_shared_tokens_encryption_key() {
    // `check` also connects to Redis, so the good case needs a real one.
    let Some(redis) = crate::support::RedisServer::start(Default::default()).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = dir.path().join("shared.toml");
    std::fs::write(
        &config,
        format!(
            "[tokens.flinks]\ntoken_url = \"https://ob.flinksapp.com/api/v1/token\"\n\
             grant_type = \"client_credentials\"\nshared = true\nclient_id = \"c\"\n\
             client_secret = \"s\"\n\
             [redis]\nurl = \"{}\"\nencryption_key_file = \"{d}/key\"\n",
            redis.url()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("key"), "c2hvcnQ=\n").unwrap();
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stderr.contains("redis: "), "{}", out.stderr);
    assert!(out.stderr.contains("holds 5 bytes"), "{}", out.stderr);
    std::fs::write(
        dir.path().join("key"),
        [b'A'; 43].iter().chain(b"=").copied().collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = run(&["check"], &config, &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("flinks: client_credentials shared through redis"),
        "{}",
        out.stdout
    );
}

/// `--version` names the commit this checkout is at (the build script re-runs when HEAD moves),
/// `unknown` outside a checkout, or the commit given to the build in `BEARER_PROXY_GIT_COMMIT`.
#[tokio::test]
async fn version_prints_the_commit_and_features() {
    let out = Command::new(BIN).arg("--version").output().await.unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!("bearer-proxy {}\n", bearer_proxy::build::VERSION_LINE)
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let in_checkout = git(&["rev-parse", "--show-toplevel"]).is_some_and(|top| {
        Path::new(&top).canonicalize().ok() == Path::new(root).canonicalize().ok()
    });
    let expected = match option_env!("BEARER_PROXY_GIT_COMMIT").filter(|c| !c.is_empty()) {
        Some(given) => given.to_owned(),
        None if in_checkout => git(&["rev-parse", "HEAD"]).unwrap(),
        None => "unknown".to_owned(),
    };
    assert!(
        stdout.contains(&format!("(commit {expected}, features: ")),
        "{stdout}"
    );
}

#[tokio::test]
async fn run_without_config_exits_2() {
    let out = Command::new(BIN)
        .env_remove("BEARER_PROXY_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[tokio::test]
async fn run_exits_1_naming_the_key_when_the_proxy_port_is_taken() {
    let (url, _) = issuer(canary_issuer()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "client_credentials", "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", taken.local_addr().unwrap()),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let out = run(&["run"], &config, &[]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    // The failure is printed once, with its cause, on a line of its own.
    let printed: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("bearer-proxy: "))
        .collect();
    assert_eq!(printed.len(), 1, "{}", out.stderr);
    assert!(
        printed[0].starts_with("bearer-proxy: proxy.listen: cannot listen on 127.0.0.1:"),
        "{}",
        out.stderr
    );
    assert_no_canary(&out.stdout);
    assert_no_canary(&out.stderr);
}

#[tokio::test]
async fn run_refreshes_and_stops_on_sigterm_without_leaking_secrets() {
    let (url, control) = issuer(canary_issuer()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "refresh_token", "");
    let mut child = Command::new(BIN)
        .arg("run")
        .env("BEARER_PROXY_CONFIG", &config)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read logs until the refresh is reported.
    let mut logs = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&logs).contains("token refreshed") {
            let n = stderr.read(&mut buf).await.unwrap();
            assert!(n > 0, "exited early: {}", String::from_utf8_lossy(&logs));
            logs.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no refresh logged");
    assert_eq!(control.request_count(), 1);
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("did not stop after SIGTERM")
        .unwrap();
    stderr.read_to_end(&mut logs).await.unwrap();
    let logs = String::from_utf8_lossy(&logs);
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("shutting down"), "{logs}");
    assert_no_canary(&logs);
}

/// Starts `bearer-proxy demo` on free ports with `TMPDIR` at `tmp` and reads its stdout until
/// `until` appears; returns the child and what it printed.
async fn start_demo(tmp: &Path, until: &str) -> (tokio::process::Child, String) {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--subjects", "127.0.0.1:0"])
        .env("TMPDIR", tmp)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !String::from_utf8_lossy(&out).contains(until) {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "demo exited early: {}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the demo did not print its instructions");
    (child, String::from_utf8_lossy(&out).into_owned())
}

/// The proxy address the demo printed (`curl -x http://ADDR ...`).
fn demo_proxy(out: &str) -> String {
    let start = out.find("curl -x http://").expect("no curl line") + "curl -x ".len();
    out[start..].split_whitespace().next().unwrap().to_owned()
}

async fn through(proxy: &str, url: &str, subject: Option<&str>) -> (u16, String) {
    // reqwest's rustls needs a process-wide provider; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap())
        .build()
        .unwrap();
    let mut req = client.get(url);
    if let Some(s) = subject {
        req = req.header("x-bearer-proxy-subject", s);
    }
    let answer = req.send().await.unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap())
}

async fn sigterm(mut child: tokio::process::Child) -> Option<i32> {
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the demo did not stop after SIGTERM")
        .unwrap()
        .code()
}

/// The README's first command: the demo shows the Data Recipient flow (two customers enrolled
/// through the subjects API, each call getting its own customer's token) next to the named
/// token, and removes its scratch directory when stopped.
#[tokio::test]
async fn the_demo_shows_two_customers_getting_their_own_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, out) = start_demo(tmp.path(), "revoke_consent").await;
    let proxy = demo_proxy(&out);
    let fdx = "http://fdx.demo.test/api/fdx/5/accounts";
    for customer in ["customer-alice", "customer-bob"] {
        let (status, body) = through(&proxy, fdx, Some(customer)).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["user"], customer, "{body}");
    }
    let (status, body) = through(&proxy, fdx, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("subject_required"), "{body}");
    let (status, body) = through(&proxy, "http://api.demo.test/hello", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().count() == 1);
    assert_eq!(sigterm(child).await, Some(0));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "the demo left its scratch directory behind"
    );
}

/// In a read-only container (no writable TMPDIR) the demo still runs its named-token part.
#[tokio::test]
async fn the_demo_without_a_writable_tmpdir_skips_only_the_per_subject_part() {
    let missing = tempfile::tempdir().unwrap().path().join("absent");
    let (child, out) = start_demo(&missing, "Ctrl-C stops everything").await;
    assert!(!out.contains("Per-subject tokens"), "{out}");
    let (status, body) = through(&demo_proxy(&out), "http://api.demo.test/hello", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sigterm(child).await, Some(0));
}
