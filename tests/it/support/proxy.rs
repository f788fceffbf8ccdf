//! The proxy under test in-process: configuration from TOML, tokens registered with the leak
//! guard, [`TestProxy`] on port 0, a dev issuer, and waits on a token cell's refresh attempts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bearer_proxy::config::Config;
use bearer_proxy::metrics::Metrics;
use bearer_proxy::proxy::Proxy;
use bearer_proxy::shutdown::{Phase, ShutdownController};
use bearer_proxy::token::{AccessToken, TokenCell};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Metric, PATIENCE, guard_logs, never_log};

/// Starts a dev token issuer on 127.0.0.1:0, registering its secrets with the leak guard.
/// It runs until the test's runtime ends.
pub async fn issuer(
    opts: bearer_proxy::issuer::IssuerOptions,
) -> (String, bearer_proxy::issuer::IssuerControl) {
    for (_, secret) in &opts.clients {
        never_log(secret);
    }
    for v in opts
        .refresh_tokens
        .iter()
        .chain(&opts.codes)
        .chain(&opts.fixed_token)
    {
        never_log(v);
    }
    let issuer = bearer_proxy::issuer::DevIssuer::bind("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let url = issuer.token_url();
    let control = issuer.control();
    tokio::spawn(issuer.serve(std::future::pending()));
    (url, control)
}

/// A `[tokens.flinks]` table that passes validation (nothing calls its endpoint unless a test
/// starts a refresher).
pub const TOKENS: &str = r#"
[tokens.flinks]
token_url = "https://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "test-client"
client_secret = "test-secret"
"#;

/// Parses a TOML configuration (plus [`TOKENS`] unless it has its own `[tokens.flinks]`).
pub fn config(toml: &str) -> Config {
    never_log("test-secret");
    let text = if toml.contains("[tokens.flinks]") {
        toml.to_owned()
    } else {
        format!("{TOKENS}\n{toml}")
    };
    bearer_proxy::config::from_str(&text, config::FileFormat::Toml, Some(Default::default()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A valid token `raw`, for `TokenCell::publish` (registered with the leak guard).
pub fn token(raw: &str) -> AccessToken {
    never_log(raw);
    AccessToken::new(
        raw,
        Instant::now(),
        SystemTime::now(),
        Duration::from_secs(300),
        None,
    )
    .unwrap()
}

/// An in-process proxy on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub tokens: BTreeMap<String, Arc<TokenCell>>,
    pub shutdown: ShutdownController,
    pub serving: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Builds and serves a proxy for `config`, with an empty token cell per `[tokens.*]`.
    pub async fn start(config: &Config) -> Self {
        let tokens = config
            .tokens
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    TokenCell::new(name.as_str(), Duration::from_secs(5)),
                )
            })
            .collect();
        Self::start_with(config, tokens, Metrics::new()).await
    }

    /// Builds and serves a proxy with the given cells and metrics.
    pub async fn start_with(
        config: &Config,
        tokens: BTreeMap<String, Arc<TokenCell>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        guard_logs();
        let proxy = Proxy::new(config, &tokens, metrics.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, watcher) = ShutdownController::new();
        let serving = tokio::spawn(proxy.serve(listener, watcher));
        Self {
            addr,
            metrics,
            tokens,
            shutdown,
            serving: Some(serving),
        }
    }

    /// The `flinks` cell.
    pub fn cell(&self) -> &Arc<TokenCell> {
        &self.tokens["flinks"]
    }

    /// Publishes a token in the `flinks` cell.
    pub fn publish(&self, raw: &str) -> u64 {
        self.cell().publish(token(raw))
    }

    /// One metric's value from the text exposition.
    pub fn metric(&self, series: Metric) -> Option<f64> {
        series.value_in(&self.metrics.encode())
    }

    /// Moves to `phase` and waits for `serve` to return.
    pub async fn stop(&mut self, phase: Phase) {
        self.shutdown.advance(phase);
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(PATIENCE, serving)
                .await
                .expect("serve did not return")
                .unwrap();
        }
    }
}

/// Waits until `cell`'s refresher has finished at least `n` attempts in all (successful or not).
pub async fn attempts(cell: &TokenCell, n: u64) {
    let mut rx = cell.watch_attempts();
    tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} refresh attempts"))
        .unwrap();
}

/// Refresh attempts finished so far.
pub fn attempts_so_far(cell: &TokenCell) -> u64 {
    *cell.watch_attempts().borrow()
}
