//! The setup most proxy tests share, built in one call: a private CA, one route `fdx` (token
//! `flinks`) to an upstream that CA signed, and the proxy in front of it — either the proxy
//! alone in-process with tokens published by hand ([`FixtureBuilder::in_process`]), or the
//! whole server with its refresher and admin port ([`FixtureBuilder::server`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bearer_proxy::config::Config;
use bearer_proxy::metrics::Metrics;
use bearer_proxy::token::TokenCell;
use bearer_proxy::{Server, Signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{
    Captured, Metric, PATIENCE, RawResponse, Recorded, Reply, TestCa, TestProxy, Upstream,
    admin_get, config, get, metric, scrape, settle,
};

/// A change to the parsed configuration.
type Configure = Box<dyn FnOnce(&mut Config)>;

/// What a test changes about the shared setup; [`fixture`] starts one.
pub struct FixtureBuilder {
    /// The route's host.
    host: &'static str,
    ca: TestCa,
    /// Extra `[proxy]` TOML.
    proxy: String,
    /// Extra keys of the route.
    route: String,
    /// More routes (name, host) to the same upstream with the same token.
    more_routes: Vec<(&'static str, &'static str)>,
    /// Extra `[tokens.flinks]` TOML for [`FixtureBuilder::server`] (at least `token_url` and
    /// the secret).
    token: String,
    /// What the TLS upstream offers; HTTP/1.1 only unless a test says otherwise.
    alpn: Vec<&'static [u8]>,
    /// The level from which [`ServerFixture::logs`] captures; INFO is what operators see.
    level: tracing::Level,
    /// Changes to the parsed configuration, for what TOML here does not reach.
    configure: Option<Configure>,
    /// The in-process proxy's `flinks` cell, when the test keeps one itself.
    cell: Option<Arc<TokenCell>>,
    /// The in-process proxy's metrics, when the test shares them with a refresher.
    metrics: Option<Arc<Metrics>>,
}

/// A builder for the route `fdx` with host `host` and a fresh CA.
pub fn fixture(host: &'static str) -> FixtureBuilder {
    FixtureBuilder {
        host,
        ca: TestCa::new(),
        proxy: String::new(),
        route: String::new(),
        more_routes: Vec::new(),
        token: String::new(),
        alpn: vec![b"http/1.1"],
        level: tracing::Level::INFO,
        configure: None,
        cell: None,
        metrics: None,
    }
}

impl FixtureBuilder {
    /// Adds `[proxy]` TOML.
    pub fn proxy(mut self, toml: &str) -> Self {
        self.proxy.push_str(toml);
        self.proxy.push('\n');
        self
    }

    /// Adds keys to the route.
    pub fn route(mut self, toml: &str) -> Self {
        self.route.push_str(toml);
        self.route.push('\n');
        self
    }

    /// Adds a route `name` for `host` to the same upstream and token.
    pub fn also_route(mut self, name: &'static str, host: &'static str) -> Self {
        self.more_routes.push((name, host));
        self
    }

    /// Adds `[tokens.flinks]` TOML (whole server only).
    pub fn token(mut self, toml: &str) -> Self {
        self.token.push_str(toml);
        self.token.push('\n');
        self
    }

    /// The protocols the TLS upstream offers.
    pub fn alpn(mut self, alpn: &[&'static [u8]]) -> Self {
        self.alpn = alpn.to_vec();
        self
    }

    /// Captures the whole server's logs from `level` up.
    pub fn logs(mut self, level: tracing::Level) -> Self {
        self.level = level;
        self
    }

    /// Changes the parsed configuration before the proxy is built.
    pub fn configure(mut self, change: impl FnOnce(&mut Config) + 'static) -> Self {
        self.configure = Some(Box::new(change));
        self
    }

    /// Serves the in-process proxy's `flinks` token from `cell`.
    pub fn cell(mut self, cell: Arc<TokenCell>) -> Self {
        self.cell = Some(cell);
        self
    }

    /// Records the in-process proxy's metrics in `metrics`.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The CA, for an upstream a test builds itself.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The configuration text of the in-process proxy with the route to `upstream` (the
    /// `[tokens.flinks]` table comes from [`super::TOKENS`] unless [`FixtureBuilder::token`]
    /// was given).
    pub fn toml(&self, upstream: &str) -> String {
        let more_routes: String = self
            .more_routes
            .iter()
            .map(|(name, host)| {
                format!(
                    "[[routes]]\nname = \"{name}\"\nhost = \"{host}\"\ntoken = \"flinks\"\n\
                     upstream = \"{upstream}\"\n"
                )
            })
            .collect();
        format!(
            r#"
            {tokens}
            [proxy]
            ca_file = "{ca}"
            {proxy}
            [[routes]]
            name = "fdx"
            host = "{host}"
            token = "flinks"
            upstream = "{upstream}"
            {route}
            {more_routes}
            "#,
            tokens = self.token_table(),
            ca = self.ca.pem_file().display(),
            proxy = self.proxy,
            host = self.host,
            route = self.route,
        )
    }

    /// `[tokens.flinks]` with the test's keys, defaults for the rest; empty if the test gave
    /// none.
    fn token_table(&self) -> String {
        if self.token.is_empty() {
            return String::new();
        }
        // Short backoffs and timeout, so failures and recoveries happen within a test's
        // patience.
        let defaults: String = [
            ("grant_type", "\"client_credentials\""),
            ("client_id", "\"demo-client\""),
            ("backoff_initial", "\"50ms\""),
            ("backoff_max", "\"200ms\""),
            ("timeout", "\"2s\""),
        ]
        .iter()
        .filter(|(k, _)| {
            !self
                .token
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{k} ")))
        })
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
        format!("[tokens.flinks]\n{defaults}{}", self.token)
    }

    /// The parsed configuration, with the test's changes.
    fn config(&mut self, upstream: &str) -> Config {
        let mut config = config(&self.toml(upstream));
        if let Some(change) = self.configure.take() {
            change(&mut config);
        }
        config
    }

    /// A TLS upstream for `localhost` signed by the CA, answering through `handler`.
    pub async fn tls_upstream(
        &self,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        Upstream::tls(self.ca.server_config(&["localhost"], &self.alpn), handler).await
    }

    /// The proxy alone, in-process, in front of a TLS upstream answering through `handler`;
    /// its token cells stay empty until the test publishes.
    pub async fn in_process(
        self,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> ProxyFixture {
        let upstream = self.tls_upstream(handler).await;
        let mut fixture = self.in_process_to(&upstream.url(true)).await;
        fixture.upstream = Some(upstream);
        fixture
    }

    /// The proxy alone, in-process, with the route pointing at `upstream`, which the test runs.
    pub async fn in_process_to(mut self, upstream: &str) -> ProxyFixture {
        let config = self.config(upstream);
        let proxy = match (self.cell.take(), self.metrics.take()) {
            (None, None) => TestProxy::start(&config).await,
            (cell, metrics) => {
                // The route's token is `flinks`; five seconds is TokenCell's usual grace.
                let cell = cell.unwrap_or_else(|| TokenCell::new("flinks", Duration::from_secs(5)));
                let tokens = BTreeMap::from([("flinks".to_owned(), cell)]);
                TestProxy::start_with(&config, tokens, metrics.unwrap_or_else(Metrics::new)).await
            }
        };
        ProxyFixture {
            _ca: self.ca,
            upstream: None,
            proxy,
        }
    }

    /// The whole server (`Server::start`) in front of a TLS upstream answering through
    /// `handler`.
    pub async fn server(
        self,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> ServerFixture {
        let upstream = self.tls_upstream(handler).await;
        let url = upstream.url(true);
        let mut server = self.server_to(&url).await;
        server.upstream = Some(upstream);
        server
    }

    /// The whole server with the route pointing at `upstream`, which the test runs.
    pub async fn server_to(mut self, upstream: &str) -> ServerFixture {
        let logs = Captured::default();
        let guard = logs.install(self.level);
        // The whole server listens on its own ports, has an admin port, and drains at once.
        self.proxy.push_str(
            "listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        );
        let cfg = self.config(upstream);
        let server = Server::start(cfg).await.unwrap();
        let (signals, rx) = mpsc::channel(4);
        ServerFixture {
            host: self.host,
            proxy: server.proxy_addr(),
            admin: server.admin_addr(),
            cell: server.tokens()["flinks"].clone(),
            upstream: None,
            signals,
            running: Some(tokio::spawn(server.run(rx))),
            logs,
            _log_guard: guard,
            _ca: self.ca,
        }
    }
}

/// The proxy alone in front of an upstream.
pub struct ProxyFixture {
    /// Signed the upstream's certificate; its PEM file lives as long as this.
    _ca: TestCa,
    /// The upstream [`FixtureBuilder::in_process`] started (none with `in_process_to`).
    upstream: Option<Upstream>,
    pub proxy: TestProxy,
}

impl ProxyFixture {
    /// The upstream [`FixtureBuilder::in_process`] started.
    pub fn upstream(&self) -> &Upstream {
        self.upstream
            .as_ref()
            .expect("an upstream, because the fixture was built with `in_process`")
    }
}

/// A running server with its admin port, and the logs of this test's thread.
pub struct ServerFixture {
    host: &'static str,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub cell: Arc<TokenCell>,
    /// The upstream [`FixtureBuilder::server`] started (none with `server_to`).
    upstream: Option<Upstream>,
    signals: mpsc::Sender<Signal>,
    running: Option<JoinHandle<()>>,
    pub logs: Captured,
    _log_guard: tracing::subscriber::DefaultGuard,
    _ca: TestCa,
}

impl ServerFixture {
    /// The upstream [`FixtureBuilder::server`] started.
    pub fn upstream(&self) -> &Upstream {
        self.upstream
            .as_ref()
            .expect("an upstream, because the fixture was built with `server`")
    }

    /// `GET http://<host><path>` through the proxy.
    pub async fn get(&self, path: &str) -> RawResponse {
        get(self.proxy, &format!("http://{}{path}", self.host), &[]).await
    }

    /// A series' value on the admin port, 0 if absent.
    pub async fn metric(&self, series: Metric) -> f64 {
        series.value_in(&scrape(self.admin).await).unwrap_or(0.0)
    }

    /// `bearer_proxy_token_refresh_errors_total` for `reason` and the `flinks` token.
    pub async fn refresh_errors(&self, reason: &str) -> f64 {
        self.metric(
            metric("bearer_proxy_token_refresh_errors_total")
                .label("reason", reason)
                .label("token", "flinks"),
        )
        .await
    }

    /// The `flinks` entry of `GET /status`.
    pub async fn token_status(&self) -> serde_json::Value {
        admin_get(self.admin, "/status").await.json()["tokens"]["flinks"].clone()
    }

    /// Every accepted connection has closed and its task has ended; nothing panicked.
    pub async fn settled(&self) {
        settle(self.admin, metric("bearer_proxy_open_connections"), 0.0).await;
        let logs = self.logs.text();
        assert!(!logs.contains("panicked"), "{logs}");
    }

    /// SIGTERM; waits for `run` to return, then checks nothing is left behind.
    pub async fn terminate(mut self) {
        self.signals.send(Signal::Terminate).await.unwrap();
        tokio::time::timeout(PATIENCE, self.running.take().unwrap())
            .await
            .expect("the server did not stop")
            .unwrap();
        let logs = self.logs.text();
        assert!(!logs.contains("panicked"), "{logs}");
    }
}

impl Drop for ServerFixture {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.abort();
        }
    }
}
