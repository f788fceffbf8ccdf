//! What a configuration reload is (issue #14): read the file → validate it with the same
//! checks as `bearer-proxy check` → compare it with the configuration in force → build the new
//! parts → swap them in at once; and its triggers (`SIGHUP` in [`crate::Server::run`],
//! `POST /-/reload` through [`crate::admin::ReloadEndpoint`], and [`Reloader::watch`] on the
//! file's directory).
//!
//! Reloads are serialized (one lock around the whole of one). An invalid file changes nothing.
//! A valid one is applied as a whole, except the settings that cannot change in a running
//! process (`RESTART_NEEDED` below): those keep their running value and are reported.
//!
//! Tokens: a named token whose settings did not change (its [`TokenConfig`] and the contents of
//! the files it reads: client id and secret files, CA file, assertion key) keeps its refresher,
//! cell and state, so the reload makes no token request. A new or changed one gets a new cell
//! and refresher; the old refresher keeps serving the requests that started before the swap
//! and stops once they are done (at most `proxy.token_wait` + `proxy.response_timeout` later).
//! A removed token stops the same way; its state file stays on disk. Per-subject tokens,
//! `[subjects]` and `[redis]` need a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::admin::{Admin, ReloadEndpoint};
use crate::config::{self, Config, TokenConfig};
use crate::logging::LogChange;
use crate::metrics::{Metrics, ReloadResult};
use crate::proxy::Proxy;
use crate::shutdown::{Phase, Shutdown, ShutdownController};
use crate::subject::Subjects;
use crate::subject::keyring::KeyRing;
use crate::subject::redis::RedisStore;
use crate::subject::redis::named::RedisSlot;
use crate::time::{rfc3339, unix_secs_f64};
use crate::token::TokenCell;
use crate::token::refresher::Refresher;

/// What asked for a reload (logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /-/reload` on the admin port.
    Admin,
    /// A change in the configuration file's directory (`[reload] watch`).
    Watch,
    /// A direct call ([`Reloader::reload`] from a library user or a test).
    Call,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "sighup",
            Self::Admin => "admin",
            Self::Watch => "watch",
            Self::Call => "call",
        }
    }
}

/// The result of one reload.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// In force (`Ok`) or refused (`Invalid`).
    pub result: ReloadResult,
    /// Hash of the file read (first 16 hex digits of its SHA-256), when it could be read.
    pub hash: Option<String>,
    /// Every problem that refused the file, each naming its key.
    pub problems: Vec<String>,
    /// Settings that changed in the file but keep their running value until a restart.
    pub restart_needed: Vec<String>,
    /// Named tokens kept as they were (no token request).
    pub tokens_kept: Vec<String>,
    /// Named tokens started (new, or changed settings).
    pub tokens_started: Vec<String>,
    /// Named tokens stopped (removed, or replaced by a changed one).
    pub tokens_stopped: Vec<String>,
    /// What became of `[log] level`.
    pub log_level: &'static str,
}

impl Outcome {
    /// Whether the new configuration is in force.
    pub fn is_ok(&self) -> bool {
        self.result == ReloadResult::Ok
    }

    fn invalid(hash: Option<String>, problems: Vec<String>) -> Self {
        Self {
            result: ReloadResult::Invalid,
            hash,
            problems,
            restart_needed: Vec::new(),
            tokens_kept: Vec::new(),
            tokens_started: Vec::new(),
            tokens_stopped: Vec::new(),
            log_level: "unchanged",
        }
    }

    /// The JSON answer of `POST /-/reload` (and `last_reload` on `/status`).
    pub fn to_json(&self) -> Value {
        json!({
            "result": self.result.as_str(),
            "hash": self.hash,
            "problems": self.problems,
            "restart_needed": self.restart_needed,
            "tokens": {
                "kept": self.tokens_kept,
                "started": self.tokens_started,
                "stopped": self.tokens_stopped,
            },
            "log_level": self.log_level,
        })
    }
}

/// A running named token: its cell and the switch that stops its refresher.
struct RunningToken {
    /// See [`fingerprint`].
    fingerprint: [u8; 32],
    cell: Arc<TokenCell>,
    /// Reaching `Terminated` stops this refresher (the server's termination does too).
    stop: Arc<ShutdownController>,
}

/// What the lock serializes: the configuration in force and its tokens.
struct State {
    config: Config,
    tokens: BTreeMap<String, RunningToken>,
}

/// What `/status`, the admin port and [`crate::Server::run`] read without the lock.
struct View {
    hash: Option<String>,
    loaded_at: SystemTime,
    admin_reload: bool,
    drain_delay: Duration,
    shutdown_grace: Duration,
    last: Option<(SystemTime, Trigger, Value)>,
}

impl View {
    fn of(
        config: &Config,
        hash: Option<String>,
        last: Option<(SystemTime, Trigger, Value)>,
    ) -> Self {
        Self {
            hash,
            loaded_at: SystemTime::now(),
            admin_reload: config.admin.reload,
            drain_delay: config.proxy.drain_delay,
            shutdown_grace: config.proxy.shutdown_grace,
            last,
        }
    }
}

/// Reloads a running server's configuration. Built by [`crate::Server::start`].
pub struct Reloader {
    /// The configuration file; `None` when the server was started from a value.
    path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    proxy: Proxy,
    admin: Admin,
    subjects: Option<Arc<Subjects>>,
    /// The server's phases: refreshers stop at its `Terminated`.
    shutdown: Shutdown,
    /// What `shared = true` tokens share through; fixed for the process's life.
    sharing: Option<Sharing>,
    state: tokio::sync::Mutex<State>,
    view: ArcSwap<View>,
    /// Hash of the text the last reload read (valid or not), so the watch skips events that
    /// did not change the file.
    last_read: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// First 16 hex digits of the SHA-256 of `text`: enough to tell a fleet's configurations apart,
/// short enough for a label.
fn hash_text(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What decides whether a named token's refresher can be kept: every setting (its `Debug`,
/// which names files but redacts inline secrets), the inline secret itself, and the contents of
/// the files read once when the refresher is built (CA, assertion key) or that name the
/// credentials (client id and secret files), so a rotated credential or CA starts a refresher
/// that uses it at once. Client certificates reload by themselves (`identity.rs`) and
/// refresh-token and code files are the grant's business (`token/grant.rs`), so neither is
/// read here. Never logged.
fn fingerprint(t: &TokenConfig) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(format!("{t:?}").as_bytes());
    if let Some(s) = &t.client_secret {
        h.update(b"\0client_secret\0");
        h.update(s.expose().as_bytes());
    }
    for file in [
        &t.client_id_file,
        &t.client_secret_file,
        &t.ca_file,
        &t.client_assertion_key_file,
    ]
    .into_iter()
    .flatten()
    {
        h.update(b"\0file\0");
        // An unreadable file was refused by the checks already; empty is only a placeholder.
        h.update(std::fs::read(file).unwrap_or_default());
    }
    h.finalize().into()
}

/// What `shared = true` named tokens share through: the server's one connection to `[redis]`
/// and the key ring sealing their slots. Made at start; `[redis]` changes need a restart.
#[derive(Clone, Debug)]
pub(crate) struct Sharing {
    /// The server's Redis connection.
    pub store: Arc<RedisStore>,
    /// `[redis] encryption_key_file(s)`.
    pub ring: Arc<KeyRing>,
}

/// Starts `cfg`'s refresher on a new cell, stopped by its own switch or the server's
/// termination. Fails before anything is spawned.
fn prepare_token(
    name: &str,
    cfg: &TokenConfig,
    metrics: &Metrics,
    sharing: Option<&Sharing>,
) -> anyhow::Result<(RunningToken, Refresher)> {
    let cell = TokenCell::new(name, cfg.forced_refresh_interval);
    let mut refresher = Refresher::new(cfg.clone(), cell.clone(), metrics.token(name))
        .map_err(|e| anyhow::anyhow!("tokens.{name}: {e}"))?;
    if cfg.shared {
        let Some(sharing) = sharing else {
            anyhow::bail!(
                "tokens.{name}.shared: this process started without a shared [redis] key; \
                 sharing a token needs a restart"
            );
        };
        refresher = refresher.with_shared(Arc::new(RedisSlot::new(
            sharing.store.clone(),
            sharing.ring.clone(),
            name,
        )));
    }
    let (stop, _) = ShutdownController::new();
    Ok((
        RunningToken {
            fingerprint: fingerprint(cfg),
            cell,
            stop: Arc::new(stop),
        },
        refresher,
    ))
}

/// Spawns a prepared refresher: it stops when its switch or the server reaches `Terminated`.
fn spawn_token(
    name: &str,
    token: &RunningToken,
    refresher: Refresher,
    metrics: &Metrics,
    server: &Shutdown,
) {
    if let Some(identity) = refresher.client_identity() {
        metrics.watch_client_certificate("token", name, identity.probe());
    }
    let own = token.stop.watcher();
    let stop = token.stop.clone();
    let server = server.clone();
    let watcher = own.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = server.reached(Phase::Terminated) => stop.advance(Phase::Terminated),
            () = watcher.reached(Phase::Terminated) => {}
        }
    });
    drop(refresher.spawn(own));
}

/// The named (not per-subject) tokens of `config`.
fn named(config: &Config) -> impl Iterator<Item = (&String, &TokenConfig)> {
    config.tokens.iter().filter(|(_, t)| !t.per_subject)
}

/// Notes `key` as needing a restart when `next` differs from `running`, and puts the running
/// value back into `next`.
fn pin<T: PartialEq + Clone>(keys: &mut Vec<String>, key: &str, running: &T, next: &mut T) {
    if running != next {
        keys.push(key.to_owned());
        next.clone_from(running);
    }
}

/// The settings of `next` that cannot change without a restart and differ from `running`, and
/// `next` with their running values put back (what is actually applied).
fn restart_needed(running: &Config, mut next: Config) -> (Config, Vec<String>) {
    let mut keys = Vec::new();
    // The listeners and the runtime are made once, at start.
    pin(
        &mut keys,
        "proxy.listen",
        &running.proxy.listen,
        &mut next.proxy.listen,
    );
    pin(
        &mut keys,
        "proxy.workers",
        &running.proxy.workers,
        &mut next.proxy.workers,
    );
    // The accept loop's connection slots are one semaphore made when it starts.
    pin(
        &mut keys,
        "proxy.max_connections",
        &running.proxy.max_connections,
        &mut next.proxy.max_connections,
    );
    pin(
        &mut keys,
        "admin.listen",
        &running.admin.listen,
        &mut next.admin.listen,
    );
    // The subscriber's format layer is a different type per format.
    pin(
        &mut keys,
        "log.format",
        &running.log.format,
        &mut next.log.format,
    );
    // The watch is started (or not) once, with its debounce.
    pin(&mut keys, "reload", &running.reload, &mut next.reload);
    // The subjects API listener, store and key ring, and Redis' connection, are made at start.
    pin(&mut keys, "subjects", &running.subjects, &mut next.subjects);
    pin(&mut keys, "redis", &running.redis, &mut next.redis);
    // Per-subject tokens live in `Subjects`, built at start.
    let subject_tokens = |c: &Config| -> BTreeMap<String, [u8; 32]> {
        c.tokens
            .iter()
            .filter(|(_, t)| t.per_subject)
            .map(|(n, t)| (n.clone(), fingerprint(t)))
            .collect()
    };
    let (old, new) = (subject_tokens(running), subject_tokens(&next));
    let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        if old.get(name) != new.get(name) {
            keys.push(format!("tokens.{name} (per_subject)"));
            match running.tokens.get(name).filter(|t| t.per_subject) {
                Some(t) => {
                    next.tokens.insert(name.clone(), t.clone());
                }
                None => {
                    next.tokens.remove(name);
                }
            }
        }
    }
    (next, keys)
}

impl Reloader {
    /// Starts the named tokens of `config` (the server's start); returns their cells and
    /// what becomes the reloader once the rest of the server is built.
    pub(crate) fn start(
        config: Config,
        path: Option<PathBuf>,
        hash: Option<String>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        sharing: Option<Sharing>,
    ) -> anyhow::Result<(BTreeMap<String, Arc<TokenCell>>, StartedTokens)> {
        let mut tokens = BTreeMap::new();
        let mut prepared = Vec::new();
        for (name, cfg) in named(&config) {
            let (running, refresher) = prepare_token(name, cfg, &metrics, sharing.as_ref())?;
            tokens.insert(name.clone(), running.cell.clone());
            prepared.push((name.clone(), running, refresher));
        }
        let mut running = BTreeMap::new();
        for (name, token, refresher) in prepared {
            spawn_token(&name, &token, refresher, &metrics, &shutdown);
            running.insert(name, token);
        }
        Ok((
            tokens,
            StartedTokens {
                config,
                path,
                hash,
                running,
                metrics,
                shutdown,
                sharing,
            },
        ))
    }

    /// The named tokens in force, by name.
    pub async fn tokens(&self) -> BTreeMap<String, Arc<TokenCell>> {
        let state = self.state.lock().await;
        state
            .tokens
            .iter()
            .map(|(n, t)| (n.clone(), t.cell.clone()))
            .collect()
    }

    /// `proxy.drain_delay` and `proxy.shutdown_grace` in force.
    pub(crate) fn shutdown_timing(&self) -> (Duration, Duration) {
        let view = self.view.load();
        (view.drain_delay, view.shutdown_grace)
    }

    /// Reads, checks and applies the configuration file. Never fails: an invalid file leaves
    /// everything as it was and the outcome says why.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let mut state = self.state.lock().await;
        let outcome = self.reload_locked(&mut state, trigger).await;
        let now = SystemTime::now();
        match outcome.result {
            ReloadResult::Ok => {
                tracing::info!(
                    trigger = trigger.as_str(),
                    hash = outcome.hash.as_deref().unwrap_or(""),
                    restart_needed = ?outcome.restart_needed,
                    tokens_started = ?outcome.tokens_started,
                    tokens_stopped = ?outcome.tokens_stopped,
                    tokens_kept = outcome.tokens_kept.len(),
                    "configuration reloaded"
                );
                if !outcome.restart_needed.is_empty() {
                    tracing::warn!(
                        settings = ?outcome.restart_needed,
                        "configuration reload: these settings changed but keep their running \
                         value until a restart"
                    );
                }
                self.metrics.config_loaded(
                    Some(ReloadResult::Ok),
                    outcome.hash.as_deref(),
                    unix_secs_f64(now),
                );
                self.view.store(Arc::new(View::of(
                    &state.config,
                    outcome.hash.clone(),
                    Some((now, trigger, outcome.to_json())),
                )));
            }
            ReloadResult::Invalid => {
                tracing::error!(
                    trigger = trigger.as_str(),
                    problems = ?outcome.problems,
                    "configuration reload refused; the running configuration stays"
                );
                self.metrics
                    .config_loaded(Some(ReloadResult::Invalid), None, 0.0);
                let view = self.view.load();
                self.view.store(Arc::new(View {
                    hash: view.hash.clone(),
                    loaded_at: view.loaded_at,
                    admin_reload: view.admin_reload,
                    drain_delay: view.drain_delay,
                    shutdown_grace: view.shutdown_grace,
                    last: Some((now, trigger, outcome.to_json())),
                }));
            }
        }
        outcome
    }

    async fn reload_locked(&self, state: &mut State, _trigger: Trigger) -> Outcome {
        let Some(path) = &self.path else {
            return Outcome::invalid(
                None,
                vec!["(file): the server was started without a configuration file".to_owned()],
            );
        };
        let (text, format) = match config::read(path) {
            Ok(read) => read,
            Err(e) => return Outcome::invalid(None, problem_lines(&e)),
        };
        let hash = hash_text(&text);
        *self
            .last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hash.clone());
        let next = match config::from_str(&text, format, None) {
            Ok(c) => c,
            Err(e) => return Outcome::invalid(Some(hash), problem_lines(&e)),
        };
        let problems = crate::check::file_problems(&next).await;
        if !problems.is_empty() {
            return Outcome::invalid(Some(hash), problems);
        }
        let (next, restart_needed) = restart_needed(&state.config, next);

        // Tokens: keep the unchanged, prepare (not yet spawn) the new and changed.
        let mut cells = BTreeMap::new();
        let mut kept = Vec::new();
        let mut prepared = Vec::new();
        for (name, cfg) in named(&next) {
            let print = fingerprint(cfg);
            match state.tokens.get(name) {
                Some(t) if t.fingerprint == print => {
                    cells.insert(name.clone(), t.cell.clone());
                    kept.push(name.clone());
                }
                _ => match prepare_token(name, cfg, &self.metrics, self.sharing.as_ref()) {
                    Ok((token, refresher)) => {
                        cells.insert(name.clone(), token.cell.clone());
                        prepared.push((name.clone(), token, refresher));
                    }
                    Err(e) => return Outcome::invalid(Some(hash), vec![format!("{e:#}")]),
                },
            }
        }
        let proxy =
            match Proxy::with_subjects(&next, &cells, self.subjects.as_ref(), self.metrics.clone())
            {
                Ok(p) => p,
                Err(e) => return Outcome::invalid(Some(hash), vec![e.to_string()]),
            };

        // From here on nothing fails: start the new tokens and give them up to `token_wait`
        // to get a first token, so requests after the swap do not wait for it.
        let started: Vec<String> = prepared.iter().map(|(n, _, _)| n.clone()).collect();
        let mut new_tokens = Vec::new();
        for (name, token, refresher) in prepared {
            spawn_token(&name, &token, refresher, &self.metrics, &self.shutdown);
            new_tokens.push((name, token));
        }
        let wait = next.proxy.token_wait;
        futures_util::future::join_all(new_tokens.iter().map(|(_, t)| t.cell.wait_valid(wait)))
            .await;

        let log_level = match crate::logging::apply(&next.log) {
            Ok((LogChange::Applied, _)) => "applied",
            Ok((LogChange::EnvWins, _)) => "RUST_LOG wins",
            Ok((LogChange::NotInstalled, _)) => "not ours",
            Err(e) => {
                tracing::error!(error = %e, "configuration reload: log level not changed");
                "unchanged"
            }
        };

        // The swap: every request from now on sees `next`.
        let released = self.proxy.released();
        self.proxy.replace(&proxy);
        self.admin.set_tokens(&cells);

        // Retire what was replaced or removed once the requests that may use it are done.
        let mut stopped = Vec::new();
        let mut retiring = Vec::new();
        let old = std::mem::take(&mut state.tokens);
        for (name, token) in old {
            if cells
                .get(&name)
                .is_some_and(|c| Arc::ptr_eq(c, &token.cell))
            {
                state.tokens.insert(name, token);
            } else {
                stopped.push(name.clone());
                retiring.push((name, token));
            }
        }
        for (name, token) in new_tokens {
            state.tokens.insert(name, token);
        }
        if !retiring.is_empty() {
            let cap = state.config.proxy.token_wait + state.config.proxy.response_timeout;
            tokio::spawn(async move {
                tokio::select! {
                    () = released => {}
                    () = tokio::time::sleep(cap) => {}
                }
                for (name, token) in retiring {
                    tracing::info!(token = %name, "configuration reload: old refresher stopped");
                    token.stop.advance(Phase::Terminated);
                }
            });
        }
        let routes: Vec<&str> = next.routes.iter().map(|r| r.label()).collect();
        self.metrics
            .retain_client_certificates(|kind, name| match kind {
                "route" => routes.contains(&name),
                "token" => cells.contains_key(name),
                _ => true,
            });
        state.config = next;
        Outcome {
            result: ReloadResult::Ok,
            hash: Some(hash),
            problems: Vec::new(),
            restart_needed,
            tokens_kept: kept,
            tokens_started: started,
            tokens_stopped: stopped,
            log_level,
        }
    }

    /// Reloads whenever the configuration file's directory changes (after `debounce` of
    /// quiet) and the file's text differs from the last one read, until the server
    /// terminates. The directory, not the file: Kubernetes updates a mounted ConfigMap by
    /// pointing its `..data` symlink at a new directory, which a watch on the file (or the
    /// file the symlink resolved to) would miss.
    pub(crate) fn watch(self: &Arc<Self>, debounce: Duration) -> anyhow::Result<()> {
        use notify::Watcher as _;
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // One pending wake-up is enough: the loop below reads the file after the last event.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        tracing::info!(dir = %dir.display(), "watching the configuration file's directory");
        let me = self.clone();
        tokio::spawn(async move {
            // Owned by the task: dropping it ends the watch.
            let _watcher = watcher;
            let terminated = me.shutdown.clone();
            loop {
                tokio::select! {
                    () = terminated.reached(Phase::Terminated) => return,
                    event = rx.recv() => if event.is_none() { return },
                }
                // Debounce: wait until the directory has been quiet for `debounce`.
                loop {
                    tokio::select! {
                        () = terminated.reached(Phase::Terminated) => return,
                        () = tokio::time::sleep(debounce) => break,
                        event = rx.recv() => if event.is_none() { return },
                    }
                }
                if !me.file_changed(&path) {
                    continue;
                }
                if terminated.phase() != Phase::Running {
                    continue;
                }
                me.reload(Trigger::Watch).await;
            }
        });
        Ok(())
    }

    /// Whether the file's text differs from the last one read (an unreadable file counts as
    /// changed, so the reload reports it).
    fn file_changed(&self, path: &Path) -> bool {
        let now = std::fs::read_to_string(path).ok().map(|t| hash_text(&t));
        let last = self
            .last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        now.is_none() || now != *last
    }
}

/// The tokens [`Reloader::start`] started, waiting for the rest of the server to be built.
pub(crate) struct StartedTokens {
    config: Config,
    path: Option<PathBuf>,
    hash: Option<String>,
    running: BTreeMap<String, RunningToken>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    sharing: Option<Sharing>,
}

impl StartedTokens {
    /// The reloader of a server whose proxy, admin port and subjects are built.
    pub(crate) fn into_reloader(
        self,
        proxy: Proxy,
        admin: Admin,
        subjects: Option<Arc<Subjects>>,
    ) -> Arc<Reloader> {
        self.metrics
            .config_loaded(None, self.hash.as_deref(), unix_secs_f64(SystemTime::now()));
        let view = View::of(&self.config, self.hash.clone(), None);
        Arc::new(Reloader {
            path: self.path,
            metrics: self.metrics,
            proxy,
            admin,
            subjects,
            shutdown: self.shutdown,
            sharing: self.sharing,
            state: tokio::sync::Mutex::new(State {
                config: self.config,
                tokens: self.running,
            }),
            view: ArcSwap::from_pointee(view),
            last_read: std::sync::Mutex::new(self.hash),
        })
    }
}

/// Each problem as `key: message`.
fn problem_lines(e: &config::ConfigErrors) -> Vec<String> {
    e.0.iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect()
}

/// The hash of the file at `path` as [`crate::Server::start_from`] loads it.
pub(crate) fn file_hash(path: &Path) -> Option<String> {
    config::read(path).ok().map(|(text, _)| hash_text(&text))
}

/// The admin port's handle on a [`Reloader`].
pub(crate) struct Endpoint(pub(crate) Arc<Reloader>);

impl ReloadEndpoint for Endpoint {
    fn enabled(&self) -> bool {
        self.0.view.load().admin_reload
    }

    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = (StatusCode, Value)> + Send + 'static>>
    {
        let me = self.0.clone();
        Box::pin(async move {
            let outcome = me.reload(Trigger::Admin).await;
            let status = match outcome.result {
                ReloadResult::Ok => StatusCode::OK,
                ReloadResult::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (status, outcome.to_json())
        })
    }

    fn status(&self) -> Value {
        let view = self.0.view.load();
        json!({
            "file": self.0.path.as_ref().map(|p| p.display().to_string()),
            "hash": view.hash,
            "loaded_at": rfc3339(view.loaded_at),
            "last_reload": view.last.as_ref().map(|(at, trigger, outcome)| json!({
                "at": rfc3339(*at),
                "trigger": trigger.as_str(),
                "outcome": outcome,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        config::from_str(
            text,
            ::config::FileFormat::Toml,
            Some(std::collections::HashMap::new()),
        )
        .unwrap()
    }

    fn file(extra_proxy: &str, token: &str) -> String {
        format!(
            "[proxy]\n{extra_proxy}\n[tokens.t]\ntoken_url = \"http://127.0.0.1:9/token\"\n\
             grant_type = \"client_credentials\"\nclient_id = \"c\"\n{token}\n\
             [[routes]]\nhost = \"api.test\"\ntoken = \"t\"\n"
        )
    }

    #[test]
    fn restart_only_settings_keep_their_running_value_and_are_named() {
        let running = parse(&file(
            "listen = \"127.0.0.1:3128\"",
            "client_secret = \"s\"",
        ));
        let next = parse(&file(
            "listen = \"127.0.0.1:4000\"\nworkers = 2\ntoken_wait = \"1s\"",
            "client_secret = \"s\"",
        ));
        let (applied, keys) = restart_needed(&running, next);
        assert_eq!(keys, ["proxy.listen", "proxy.workers"]);
        assert_eq!(applied.proxy.listen, running.proxy.listen);
        assert_eq!(applied.proxy.workers, running.proxy.workers);
        // What can change in place does.
        assert_eq!(applied.proxy.token_wait, Duration::from_secs(1));
        let (_, none) = restart_needed(&running, running.clone());
        assert!(none.is_empty());
    }

    #[test]
    fn a_per_subject_token_change_needs_a_restart_and_keeps_the_running_one() {
        let running = parse(&file("", "client_secret = \"s\""));
        let mut next = running.clone();
        let mut added = running.tokens["t"].clone();
        added.name = "p".into();
        added.per_subject = true;
        next.tokens.insert("p".into(), added);
        let (applied, keys) = restart_needed(&running, next);
        assert_eq!(keys, ["tokens.p (per_subject)"]);
        assert!(!applied.tokens.contains_key("p"));
    }

    #[test]
    fn the_fingerprint_sees_inline_secrets_and_file_contents_not_just_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id");
        std::fs::write(&id, "one").unwrap();
        let a = parse(&file("", "client_secret = \"s1\""));
        let b = parse(&file("", "client_secret = \"s2\""));
        assert_eq!(
            fingerprint(&a.tokens["t"]),
            fingerprint(&a.clone().tokens["t"])
        );
        // `Debug` prints both secrets as `[redacted]`; the fingerprint still tells them apart.
        assert_eq!(
            format!("{:?}", a.tokens["t"]),
            format!("{:?}", b.tokens["t"])
        );
        assert_ne!(fingerprint(&a.tokens["t"]), fingerprint(&b.tokens["t"]));
        let mut with_file = a.tokens["t"].clone();
        with_file.client_id = None;
        with_file.client_id_file = Some(id.clone());
        let before = fingerprint(&with_file);
        std::fs::write(&id, "two").unwrap();
        assert_ne!(fingerprint(&with_file), before);
    }

    #[test]
    fn the_hash_is_16_hex_digits_of_the_text() {
        let h = hash_text("a");
        assert_eq!(h.len(), 16);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(h, hash_text("a"));
        assert_ne!(h, hash_text("b"));
    }
}
