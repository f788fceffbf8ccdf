//! A real `redis-server` for the Redis store's tests: started on a free loopback port with a
//! temporary directory (AOF on, RDB snapshots off), ready once its log says so, stopped by PID
//! when dropped. Optional TLS with a throwaway CA made by rcgen, and optional password or ACL
//! user. A missing `redis-server` skips the test loudly, or fails it when `CI` is set (as the
//! other external tools do).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bearer_proxy::subject::redis::RedisConfig;
use tokio::time::Instant;

use super::{PATIENCE, guard_logs, never_log};

/// How the server is started.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// TLS only (`--port 0 --tls-port`), with a fresh CA.
    pub tls: bool,
    /// `requirepass` (the default user's password).
    pub password: Option<String>,
    /// An ACL user and its password (the default user is then disabled).
    pub user: Option<(String, String)>,
}

/// A running `redis-server` child.
pub struct RedisServer {
    child: Option<tokio::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    starts: u32,
    opts: RedisOptions,
}

/// The CA and server files of a TLS server.
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";

impl RedisServer {
    /// Starts a server; `None` (after a loud message) when `redis-server` is not installed
    /// outside CI.
    pub async fn start(opts: RedisOptions) -> Option<Self> {
        guard_logs();
        if !installed() {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed (.ci/run installs it)"
            );
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        if opts.tls {
            write_tls_files(dir.path());
        }
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            args: Vec::new(),
            starts: 0,
            opts,
        };
        // A free port can be taken by someone else between our probe and redis' bind: retry.
        for _ in 0..5 {
            server.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            server.args = args(server.dir.path(), server.port, &server.opts);
            if server.spawn().await {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of several free ports");
    }

    /// Starts the process with `self.args`; whether it became ready.
    async fn spawn(&mut self) -> bool {
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut child = tokio::process::Command::new("redis-server")
            .args(&self.args)
            .arg("--logfile")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections") {
                self.child = Some(child);
                return true;
            }
            if let Some(status) = child.try_wait().unwrap() {
                eprintln!("redis-server exited ({status}) before it was ready:\n{text}");
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not ready within {PATIENCE:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed beyond what Redis wrote
    /// before answering) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts the server again on the same port and directory (it loads its AOF).
    pub async fn restart(&mut self) {
        self.kill().await;
        assert!(self.spawn().await, "redis-server did not restart");
    }

    /// The URL of this server (`rediss://` with TLS). `localhost`, the name its certificate
    /// carries.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        format!("{scheme}://localhost:{}", self.port)
    }

    /// The CA that signed the server certificate (TLS servers only).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(CA_FILE)
    }

    /// A `[redis]` section for this server: its URL, CA, credentials (a password file in the
    /// server's directory) and short timeouts, so failure tests finish fast.
    pub fn config(&self) -> RedisConfig {
        let password = self
            .opts
            .user
            .as_ref()
            .map(|(_, p)| p)
            .or(self.opts.password.as_ref());
        let password_file = password.map(|p| {
            // A Redis password is a secret like any other: never in a log line.
            never_log(p);
            let path = self.dir.path().join("password");
            std::fs::write(&path, format!("{p}\n")).unwrap();
            path
        });
        RedisConfig {
            url: self.url(),
            ca_file: self.opts.tls.then(|| self.ca_file()),
            username: self.opts.user.as_ref().map(|(u, _)| u.clone()),
            password_file,
            command_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            ..RedisConfig::default()
        }
    }

    /// Every byte Redis keeps on disk (the AOF directory), for canary searches.
    pub fn disk_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let aof = self.dir.path().join("appendonlydir");
        for entry in std::fs::read_dir(&aof).unwrap() {
            let path = entry.unwrap().path();
            out.extend(path.display().to_string().into_bytes());
            out.extend(std::fs::read(&path).unwrap());
        }
        out
    }

    /// A plain connection for inspecting what the store wrote (plaintext servers without a
    /// password only).
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        assert!(!self.opts.tls && self.opts.password.is_none() && self.opts.user.is_none());
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every key and the value Redis returns for it (strings, hashes, sorted sets), in one
    /// byte string, for canary searches.
    pub async fn dump(&self) -> Vec<u8> {
        let mut c = self.raw().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = Vec::new();
        for key in keys {
            out.extend(key.as_bytes());
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "string" => vec![
                    redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .unwrap(),
                ],
                "hash" => redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
                    .unwrap(),
                other => panic!("unexpected key type {other} at {key}"),
            };
            for v in values {
                out.extend(v);
            }
        }
        out
    }
}

fn installed() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p| p.join("redis-server").is_file())
    })
}

/// The command line: loopback only, AOF on, RDB off, everything under `dir`.
fn args(dir: &Path, port: u16, opts: &RedisOptions) -> Vec<String> {
    let mut a: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.display().to_string(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let file = |name: &str| dir.join(name).display().to_string();
    if opts.tls {
        a.extend([
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            file(CERT_FILE),
            "--tls-key-file".to_owned(),
            file(KEY_FILE),
            "--tls-ca-cert-file".to_owned(),
            file(CA_FILE),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ]);
    } else {
        a.extend(["--port".to_owned(), port.to_string()]);
    }
    if let Some(p) = &opts.password {
        a.extend(["--requirepass".to_owned(), p.clone()]);
    }
    if let Some((user, p)) = &opts.user {
        a.extend(
            ["--user", "default", "off"]
                .iter()
                .map(|s| s.to_string())
                .chain(["--user".to_owned(), user.clone(), "on".to_owned()])
                .chain([format!(">{p}"), "~*".to_owned(), "+@all".to_owned()]),
        );
    }
    a
}

/// A throwaway CA and a server certificate for `localhost` signed by it.
fn write_tls_files(dir: &Path) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "bearer-proxy Redis test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join(CA_FILE), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
    std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
}
