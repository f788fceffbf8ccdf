//! The command line: `run` (the default), `check`, `token`, `dev-issuer`. `main.rs` only calls
//! [`main`] and exits with the code it returns.
//!
//! Exit codes: [`EXIT_OK`], [`EXIT_FAILURE`] (a runtime failure: a listener could not be bound,
//! a token could not be obtained), [`EXIT_CONFIG`] (invalid configuration or usage; nothing was
//! started).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};

use crate::config::{self, Config, GrantType};
use crate::metrics::Metrics;
use crate::token::TokenCell;
use crate::token::refresher::Refresher;

/// Success.
pub const EXIT_OK: u8 = 0;
/// A runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Invalid configuration or command line; nothing was started.
pub const EXIT_CONFIG: u8 = 2;

/// Adds OAuth2 bearer tokens to a legacy app's HTTP calls.
#[derive(Debug, Parser)]
#[command(name = "bearer-proxy", version = crate::build::VERSION_LINE, about)]
pub struct Cli {
    /// Configuration file (TOML or YAML).
    #[arg(long, short, global = true, env = "BEARER_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and check that every secret file is readable.
    Check,
    /// Fetch one token and describe it (never printing the token itself).
    Token {
        /// Which `[tokens.<name>]`; may be omitted when only one is configured.
        name: Option<String>,
    },
    /// Run a local token endpoint implementing Flinks' `/api/v1/token` contract, for demos,
    /// tests and benchmarks. Its failure switches are under `POST /control/...`.
    DevIssuer(DevIssuerArgs),
    /// Run the whole mechanism on loopback: dev issuer, an echo API and the proxy.
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:3128")]
        listen: std::net::SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
    },
}

/// Options of `bearer-proxy dev-issuer`.
#[derive(Debug, clap::Args)]
pub struct DevIssuerArgs {
    /// Address to listen on (loopback: this is a development tool).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: std::net::SocketAddr,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 300)]
    pub lifetime: u64,
    /// Accepted client id.
    #[arg(long, default_value = "demo-client")]
    pub client_id: String,
    /// Accepted client secret.
    #[arg(long, default_value = "demo-secret")]
    pub client_secret: String,
    /// Issue this exact access token every time (benchmarks: the upstream can check it).
    #[arg(long)]
    pub fixed_token: Option<String>,
    /// Accepted one-time authorization codes.
    #[arg(long = "code")]
    pub codes: Vec<String>,
    /// Accepted refresh tokens.
    #[arg(long = "refresh-token")]
    pub refresh_tokens: Vec<String>,
    /// Answer the refresh grant with a new refresh token, invalidating the old one.
    #[arg(long)]
    pub rotate_refresh_tokens: bool,
}

/// Parses the command line and runs the command.
pub fn main() -> u8 {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config.as_deref()),
        Command::Check => check(cli.config.as_deref()),
        Command::Token { name } => token(cli.config.as_deref(), name.as_deref()),
        Command::DevIssuer(args) => dev_issuer(args),
        Command::Demo { listen, admin } => match runtime(1) {
            Ok(rt) => rt.block_on(crate::demo::run(crate::demo::DemoAddrs {
                proxy: listen,
                admin,
            })),
            Err(e) => {
                eprintln!("bearer-proxy: cannot start the runtime: {e}");
                EXIT_FAILURE
            }
        },
    }
}

fn load(path: Option<&Path>) -> Result<Config, u8> {
    let Some(path) = path else {
        eprintln!(
            "bearer-proxy: no configuration: pass --config PATH or set BEARER_PROXY_CONFIG \
             (try `bearer-proxy demo` for a local demo)"
        );
        return Err(EXIT_CONFIG);
    };
    config::load(path).map_err(|e| {
        eprintln!("bearer-proxy: {}: {e}", path.display());
        EXIT_CONFIG
    })
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    b.enable_all().build()
}

fn run(path: Option<&Path>) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = crate::logging::init(&config.log) {
        eprintln!("bearer-proxy: logging: {e}");
        return EXIT_CONFIG;
    }
    let rt = match runtime(config.proxy.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bearer-proxy: cannot start the runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        let server = match crate::Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot start");
                eprintln!("bearer-proxy: {e:#}");
                return EXIT_FAILURE;
            }
        };
        let signals = match os_signals() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bearer-proxy: cannot install signal handlers: {e}");
                return EXIT_FAILURE;
            }
        };
        server.run(signals).await;
        EXIT_OK
    })
}

/// SIGTERM and SIGINT, delivered as [`crate::Signal`]s.
pub fn os_signals() -> std::io::Result<tokio::sync::mpsc::Receiver<crate::Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                Some(()) = term.recv() => crate::Signal::Terminate,
                Some(()) = int.recv() => crate::Signal::Interrupt,
                else => return,
            };
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn check(path: Option<&Path>) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let problems = file_problems(&config);
    print!("{}", summary(&config));
    if problems.is_empty() {
        println!("configuration OK");
        EXIT_OK
    } else {
        eprintln!(
            "bearer-proxy: {} problem{}:",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in &problems {
            eprintln!("  - {p}");
        }
        EXIT_CONFIG
    }
}

/// Secret and CA files that cannot be read, and state directories that cannot be written.
fn file_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, t) in &config.tokens {
        let mut files: Vec<(&str, &Path)> = Vec::new();
        if let Some(p) = &t.client_id_file {
            files.push(("client_id_file", p));
        }
        if let Some(p) = &t.client_secret_file {
            files.push(("client_secret_file", p));
        }
        if t.grant_type == GrantType::RefreshToken
            && let Some(p) = &t.refresh_token_file
        {
            files.push(("refresh_token_file", p));
        }
        for (key, p) in files {
            if let Err(e) = std::fs::read(p) {
                problems.push(format!(
                    "tokens.{name}.{key}: cannot read {}: {e}",
                    p.display()
                ));
            }
        }
        if let Some(ca) = &t.ca_file
            && let Err(e) = crate::tls::root_store(Some(ca))
        {
            problems.push(format!("tokens.{name}.ca_file: {e}"));
        }
        if let Some(dir) = &t.state_dir {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() && !m.permissions().readonly() => {}
                Ok(_) => problems.push(format!(
                    "tokens.{name}.state_dir: {} is not a writable directory",
                    dir.display()
                )),
                Err(e) => problems.push(format!("tokens.{name}.state_dir: {}: {e}", dir.display())),
            }
        }
    }
    problems
}

/// A short description of the configuration; it names secret files, never their contents.
fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let p = &config.proxy;
    let _ = writeln!(
        s,
        "proxy  listen {} (unmatched: {:?}, connect: {:?})",
        p.listen,
        p.unmatched(),
        p.connect()
    );
    let _ = writeln!(s, "admin  listen {}", config.admin.listen);
    for (name, t) in &config.tokens {
        let secret = match (&t.client_secret, &t.client_secret_file) {
            (_, Some(f)) => format!("secret from {}", f.display()),
            (Some(_), None) => "secret inline".to_owned(),
            (None, None) => "no secret".to_owned(),
        };
        let _ = writeln!(
            s,
            "token  {name}: {} at {} ({:?} auth, {:?} body, {secret})",
            t.grant_type.as_str(),
            t.token_url,
            t.client_auth,
            t.encoding
        );
    }
    for r in &config.routes {
        let host = match r.port {
            Some(port) => format!("{}:{port}", r.host),
            None => r.host.clone(),
        };
        let upstream = r
            .upstream
            .clone()
            .unwrap_or_else(|| format!("https://{}", r.host));
        let _ = writeln!(
            s,
            "route  {}: {host}{} -> {upstream} with token {}",
            r.label(),
            r.path_prefix.as_deref().unwrap_or(""),
            r.token
        );
    }
    s
}

fn token(path: Option<&Path>, name: Option<&str>) -> u8 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let name = match (name, config.tokens.len()) {
        (Some(n), _) => n.to_owned(),
        (None, 1) => config.tokens.keys().next().cloned().unwrap_or_default(),
        (None, _) => {
            eprintln!(
                "bearer-proxy: name the token: one of {}",
                config.tokens.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            return EXIT_CONFIG;
        }
    };
    let Some(cfg) = config.tokens.get(&name).cloned() else {
        eprintln!("bearer-proxy: no [tokens.{name}] in the configuration");
        return EXIT_CONFIG;
    };
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bearer-proxy: cannot start the runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        let cell = TokenCell::new(name.as_str(), cfg.forced_refresh_interval);
        let metrics = Metrics::new();
        let mut refresher = match Refresher::new(cfg, cell, metrics.token(&name)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bearer-proxy: tokens.{name}: {e}");
                return EXIT_FAILURE;
            }
        };
        match refresher.refresh().await {
            Ok(f) => {
                println!("token        {name}");
                println!(
                    "type         {}",
                    f.token_type
                        .as_deref()
                        .unwrap_or("(not sent; Bearer assumed)")
                );
                println!(
                    "lifetime     {}s (from {:?})",
                    f.lifetime.as_secs(),
                    f.lifetime_source
                );
                println!("expires      {}", rfc3339(f.expires_wall));
                println!(
                    "scope        {}",
                    f.scope.as_deref().unwrap_or("(not sent)")
                );
                if f.refresh_token_rotated {
                    println!("refresh      the server sent a new refresh token (persisted)");
                }
                if let Some(claims) = f.claims {
                    for (k, v) in claims {
                        let shown = match (k.as_str(), v.as_u64()) {
                            ("exp" | "iat", Some(secs)) => format!(
                                "{} ({})",
                                secs,
                                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                            ),
                            _ => v.to_string(),
                        };
                        println!("claim {k:<7}{shown}");
                    }
                }
                EXIT_OK
            }
            Err(e) => {
                eprintln!("bearer-proxy: token {name}: {e}");
                if let Some(o) = e.oauth() {
                    eprintln!("  error:             {}", o.code);
                    if let Some(d) = &o.description {
                        eprintln!("  error_description: {d}");
                    }
                }
                EXIT_FAILURE
            }
        }
    })
}

fn dev_issuer(args: DevIssuerArgs) -> u8 {
    let text_logs = crate::config::LogConfig {
        format: crate::config::LogFormat::Text,
        ..Default::default()
    };
    if let Err(e) = crate::logging::init(&text_logs) {
        eprintln!("bearer-proxy: logging: {e}");
    }
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bearer-proxy: cannot start the runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let defaults = crate::issuer::IssuerOptions::default();
    let opts = crate::issuer::IssuerOptions {
        lifetime: Duration::from_secs(args.lifetime),
        clients: vec![(args.client_id, args.client_secret)],
        codes: if args.codes.is_empty() {
            defaults.codes
        } else {
            args.codes
        },
        refresh_tokens: if args.refresh_tokens.is_empty() {
            defaults.refresh_tokens
        } else {
            args.refresh_tokens
        },
        rotate_refresh_tokens: args.rotate_refresh_tokens,
        fixed_token: args.fixed_token,
        ..defaults
    };
    rt.block_on(async {
        let issuer = match crate::issuer::DevIssuer::bind(args.listen, opts).await {
            Ok(i) => i,
            Err(e) => {
                eprintln!(
                    "bearer-proxy: dev-issuer: cannot listen on {}: {e}",
                    args.listen
                );
                return EXIT_FAILURE;
            }
        };
        println!("dev issuer: token endpoint {}", issuer.token_url());
        let mut signals = match os_signals() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bearer-proxy: cannot install signal handlers: {e}");
                return EXIT_FAILURE;
            }
        };
        issuer
            .serve(async move {
                signals.recv().await;
            })
            .await;
        EXIT_OK
    })
}

/// RFC 3339 (UTC, seconds) for humans and the status page.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
