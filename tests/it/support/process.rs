//! The product as an operating-system process: the binary as a child with its stderr
//! collected, and this process's own peak memory.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{PATIENCE, admin_get};

/// The proxy binary, with a configuration file, as a child process whose stderr is collected.
pub struct Child {
    pub child: tokio::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// Where the subjects API listens, when the configuration has `[subjects]`.
    pub subjects: Option<SocketAddr>,
    logs: Arc<Mutex<String>>,
    /// The task collecting stderr; it ends at EOF, once the process has exited.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Child {
    /// Starts `bearer-proxy run` and waits for its "started" log line.
    pub async fn spawn(config: &std::path::Path) -> Self {
        Self::spawn_bin(
            std::path::Path::new(env!("CARGO_BIN_EXE_bearer-proxy")),
            config,
        )
        .await
    }

    /// Starts `bin run` and waits for its "started" log line.
    pub async fn spawn_bin(bin: &std::path::Path, config: &std::path::Path) -> Self {
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .env("BEARER_PROXY_CONFIG", config)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let keep = logs.clone();
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            let mut subjects = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"message\":\"subjects API listening\"") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    subjects = v["subjects_api"].as_str().and_then(|a| a.parse().ok());
                }
                if line.contains("\"message\":\"started\"")
                    && let Some(tx) = tx.take()
                {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    let _ = tx.send((addr("proxy"), addr("admin"), subjects)).await;
                }
                let mut logs = keep.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (proxy, admin, subjects) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("no \"started\" line")
            .expect("exited before starting");
        Self {
            child,
            proxy,
            admin,
            subjects,
            logs,
            reader: Some(reader),
        }
    }

    /// Polls `GET /readyz` until it answers `want` (bounded: the proxy is another process).
    pub async fn ready_is(&self, want: u16) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if admin_get(self.admin, "/readyz").await.status == want {
                return;
            }
            assert!(Instant::now() < deadline, "/readyz never answered {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// What the process has written to stderr so far (it may still be running).
    pub fn logs_so_far(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Everything the process wrote to stderr. Call after it exited: this waits (bounded) for
    /// the collecting task to reach EOF, so the last lines are not lost to a race with `wait()`.
    pub async fn logs(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(PATIENCE, reader)
                .await
                .expect("stderr not closed after the process exited")
                .unwrap();
        }
        self.logs.lock().unwrap().clone()
    }
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kb * 1024
}
