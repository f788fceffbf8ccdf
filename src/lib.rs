//! bearer-proxy: a sidecar forward proxy that adds OAuth2 bearer tokens to a legacy app's plain
//! HTTP calls.
//!
//! # Layout
//! - [`config`]: the schema users write, defaults, loading, validation.
//! - [`secret`]: the redacting wrapper for credentials, and credential files.
//! - [`token`]: access tokens and the cell requests read them from; [`token::client`] talks to
//!   the token endpoint, [`token::refresher`] keeps a token fresh; private modules choose the
//!   grant, persist refresh tokens, compute the schedule and hold the status types.
//! - [`subject`]: per-subject tokens: subject ids, refresh tokens sealed at rest, the
//!   subject store, and each per-subject entry's access tokens (read by the proxy).
//! - [`metrics`]: the Prometheus registry and per-token/per-route handles.
//! - [`proxy`]: the forward proxy: routing, token injection, TLS origination, streaming.
//! - [`admin`]: the admin port (`/metrics`, `/livez`, `/readyz`, `/status`, `/-/reload`).
//! - [`reload`]: configuration reload (load, check, compare, swap) and its triggers.
//! - `check`: the file checks `check` and a reload share.
//! - `tls`: trust roots (and a client identity) for outbound TLS; [`identity`]: client certificates for mutual TLS.
//! - `ca`: the operator CA of HTTPS interception (`[proxy.intercept]`, `ca init`, `ca bundle`);
//!   `truststore`: the PKCS#12 truststore `ca bundle --pkcs12` writes for Java.
//! - [`shutdown`]: OS signals and the phases of a graceful stop.
//! - `time`: wall-clock time as text (RFC 3339) and as seconds since the Unix epoch.
//! - `logging`: the tracing subscriber.
//! - `issuer`: the built-in dev token endpoint (demo, tests, benchmarks).
//! - `demo`: `bearer-proxy demo`, the whole mechanism on loopback.
//! - [`cli`]: the command-line commands behind the thin `main.rs`.
//! - [`build`]: build identity (version, git commit, cargo features).
//!
//! # Features
//! - `dev-tools` (default): the dev issuer with its fault-injection control API, and the
//!   `dev-issuer` and `demo` commands. Build a sidecar without them with
//!   `--no-default-features`.
//!
//! Modules that tests, benchmarks and fuzz targets do not use (`demo`, `error`, `listener`,
//! `logging`, `time`, `tls`) are private, so the compiler reports their dead code.
//!
//! A token flows token endpoint → [`token::refresher::Refresher`] → [`token::TokenCell`] →
//! request. [`Server`] wires the parts together for `bearer-proxy run`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod build;
mod ca;
mod check;
pub mod cli;
pub mod config;
#[cfg(feature = "dev-tools")]
mod demo;
mod error;
pub mod identity;
#[cfg(feature = "dev-tools")]
pub mod issuer;
mod listener;
mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod shutdown;
pub mod subject;
mod time;
mod tls;
pub mod token;
mod truststore;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metrics::Metrics;
pub use crate::shutdown::Signal;
use crate::shutdown::{Phase, Shutdown, ShutdownController};
use crate::token::TokenCell;

/// A started bearer-proxy: listeners bound and tasks running.
pub struct Server {
    metrics: Arc<Metrics>,
    tokens: BTreeMap<String, Arc<TokenCell>>,
    /// Per-subject token entries, when some token has `per_subject = true`.
    subjects: Option<Arc<subject::Subjects>>,
    controller: ShutdownController,
    /// Where the proxy listens.
    proxy_addr: SocketAddr,
    /// Where the admin port listens.
    admin_addr: SocketAddr,
    /// Where the subjects API listens, when some token has `per_subject = true`.
    subjects_addr: Option<SocketAddr>,
    /// Tasks that serve connections; they finish by themselves once stopping and drained.
    servers: Vec<JoinHandle<()>>,
    /// Tasks that run until terminated (the admin port, keepalives; refreshers stop by
    /// themselves at `Terminated`).
    background: Vec<JoinHandle<()>>,
    /// Reloads the configuration (SIGHUP in [`Server::run`], `POST /-/reload`, the watch).
    reloader: Arc<reload::Reloader>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Builds every part and starts it. Fails, before anything is served, if a part cannot be
    /// built or a listener cannot be bound. Without a file, a reload has nothing to read (it
    /// reports so); see [`Server::start_from`].
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        Self::start_inner(config, None).await
    }

    /// [`Server::start`] for `config` loaded from `path`, which reloads read again (and
    /// `[reload] watch` watches).
    pub async fn start_from(config: Config, path: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_inner(config, Some(path.to_path_buf())).await
    }

    async fn start_inner(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        metrics.set_build_info(build::VERSION, build::COMMIT, build::FEATURES);
        let (controller, shutdown) = ShutdownController::new();
        let mut background = Vec::new();
        // One connection manager for everything replicas share (`[redis]`): subject records,
        // leases and shared access tokens. Connected before anything is served, so a wrong
        // URL, CA or password stops the start with a clear error.
        let redis = match &config.redis {
            Some(rc) => Some(Arc::new(
                subject::redis::RedisStore::connect(rc)
                    .await
                    .context("redis")?
                    .with_metrics(metrics.clone()),
            )),
            None => None,
        };
        // What `shared = true` tokens share through: the connection and the key that seals
        // their slots, loaded before anything is served.
        let sharing = match (&config.redis, &redis) {
            (Some(rc), Some(store)) if config.tokens.values().any(|t| t.shared) => {
                Some(reload::Sharing {
                    store: store.clone(),
                    ring: Arc::new(
                        subject::keyring::KeyRing::load(&rc.key_files())
                            .await
                            .context("redis.encryption_key_file")?,
                    ),
                })
            }
            _ => None,
        };
        // A per-subject token has no cell and no refresher: its tokens live in `subjects`,
        // fetched per subject on demand.
        // Refreshers are owned by the reloader, which keeps, starts and stops them.
        let hash = path.as_deref().and_then(reload::file_hash);
        let (tokens, started) = reload::Reloader::start(
            config.clone(),
            path,
            hash,
            metrics.clone(),
            shutdown.clone(),
            sharing,
        )?;
        let subjects =
            subject::Subjects::start_with_metrics(&config, &metrics, redis.clone()).await?;
        let proxy =
            proxy::Proxy::with_subjects(&config, &tokens, subjects.as_ref(), metrics.clone())?;
        let proxy_listener = TcpListener::bind(config.proxy.listen)
            .await
            .with_context(|| format!("proxy.listen: cannot listen on {}", config.proxy.listen))?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;
        let admin_addr = admin_listener.local_addr()?;
        // Bound before anything is spawned, like the other listeners, so a failure leaves
        // nothing running.
        let mut subjects_addr = None;
        let subjects_api = match (&subjects, &config.subjects) {
            (Some(subjects), Some(sc)) => {
                let api =
                    subject::api::SubjectsApi::new(&config, subjects.clone(), metrics.clone())
                        .await?;
                let listener = TcpListener::bind(sc.listen)
                    .await
                    .with_context(|| format!("subjects.listen: cannot listen on {}", sc.listen))?;
                let addr = listener.local_addr()?;
                tracing::info!(subjects_api = %addr, "subjects API listening");
                subjects_addr = Some(addr);
                Some((api, listener))
            }
            _ => None,
        };
        // Spawned only once every listener is bound, so a start that fails leaves no
        // keep-alive pass refreshing subjects behind it.
        if let Some(s) = &subjects {
            background.extend(s.spawn_keepalive());
        }
        let store_health = match (&redis, &config.redis) {
            (Some(store), Some(rc)) => {
                let (health, task) = subject::redis::health::StoreHealth::spawn(
                    store.clone(),
                    rc.gate_readiness,
                    metrics.clone(),
                );
                background.push(task);
                Some(health)
            }
            _ => None,
        };
        let admin = admin::Admin::new(&tokens, metrics.clone(), shutdown.clone())
            .with_subjects(subjects.clone())
            .with_store(store_health);
        let reloader = started.into_reloader(proxy.clone(), admin.clone(), subjects.clone());
        if config.reload.watch {
            reloader
                .watch(config.reload.debounce)
                .context("reload.watch: cannot watch the configuration file's directory")?;
        }
        let admin = admin.with_reload(Arc::new(reload::Endpoint(reloader.clone())));
        background.push(tokio::spawn(admin.serve(admin_listener)));
        let mut servers = vec![tokio::spawn(proxy.serve(proxy_listener, shutdown.clone()))];
        if let Some((api, listener)) = subjects_api {
            servers.push(tokio::spawn(api.serve(listener, shutdown.clone())));
        }
        tracing::info!(
            proxy = %proxy_addr,
            admin = %admin_addr,
            tokens = tokens.len(),
            routes = config.routes.len(),
            "started"
        );
        Ok(Self {
            metrics,
            tokens,
            subjects,
            controller,
            proxy_addr,
            admin_addr,
            subjects_addr,
            servers,
            background,
            reloader,
        })
    }

    /// Reloads the configuration file now (what SIGHUP does); see [`reload`].
    pub async fn reload(&self) -> reload::Outcome {
        self.reloader.reload(reload::Trigger::Call).await
    }

    /// The reloader (for a library user's own trigger).
    pub fn reloader(&self) -> &Arc<reload::Reloader> {
        &self.reloader
    }

    /// Where the proxy listens (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Where the admin port listens (useful with port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the subjects API listens (useful with port 0), when some token has
    /// `per_subject = true`.
    pub fn subjects_addr(&self) -> Option<SocketAddr> {
        self.subjects_addr
    }

    /// The token cells at start, by name ([`reload::Reloader::tokens`] has those in force).
    pub fn tokens(&self) -> &BTreeMap<String, Arc<TokenCell>> {
        &self.tokens
    }

    /// The per-subject token entries, if any token has `per_subject = true`.
    pub fn subjects(&self) -> Option<&Arc<subject::Subjects>> {
        self.subjects.as_ref()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A watcher of the shutdown phase.
    pub fn shutdown(&self) -> Shutdown {
        self.controller.watcher()
    }

    /// Serves until asked to stop: the first signal starts draining (readiness false, still
    /// accepting) for `drain_delay`; then accepting stops and in-flight requests get
    /// `shutdown_grace`. A second signal, or the grace running out, ends everything at once.
    /// Returns when everything has stopped.
    ///
    /// `SIGHUP` ([`Signal::Hangup`]) reloads the configuration while running (one reload at a
    /// time, on its own task so stop signals are still heard); once shutting down it is
    /// ignored.
    pub async fn run(mut self, mut signals: mpsc::Receiver<Signal>) {
        // A closed signal source means nobody can ask us to stop: serve until the process ends.
        let first = loop {
            match signals.recv().await {
                None => {
                    std::future::pending::<()>().await;
                    return;
                }
                Some(Signal::Hangup) => {
                    let reloader = self.reloader.clone();
                    tokio::spawn(async move {
                        reloader.reload(reload::Trigger::Signal).await;
                    });
                }
                Some(s) => break s,
            }
        };
        // The values in force now, a reload may have changed them.
        let (drain_delay, grace) = self.reloader.shutdown_timing();
        tracing::info!(signal = ?first, drain_delay_secs = drain_delay.as_secs_f64(), "shutting down: draining");
        self.controller.advance(Phase::Draining);
        let second = async {
            loop {
                match signals.recv().await {
                    Some(s) if !s.stops() => {
                        tracing::info!(signal = ?s, "shutting down: reload ignored");
                    }
                    Some(s) => {
                        tracing::warn!(signal = ?s, "second signal: stopping now");
                        return;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::pin!(second);
        let finished_draining = tokio::select! {
            () = tokio::time::sleep(drain_delay) => true,
            () = &mut second => false,
        };
        if finished_draining {
            tracing::info!(
                grace_secs = grace.as_secs_f64(),
                "no longer accepting; finishing in-flight requests"
            );
            self.controller.advance(Phase::Stopping);
            let servers = futures_util::future::join_all(self.servers.iter_mut());
            tokio::select! {
                _ = servers => {}
                () = tokio::time::sleep(grace) => {
                    tracing::warn!("shutdown grace elapsed; closing remaining connections");
                }
                () = &mut second => {}
            }
        }
        self.controller.advance(Phase::Terminated);
        for task in self.servers.iter().chain(&self.background) {
            task.abort();
        }
        tracing::info!("stopped");
    }
}
