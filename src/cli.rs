//! The command line: `run` (the default), `check`, `token`, `subjects` (the subjects API's
//! client, in `cli/subjects.rs`), `ca init|bundle`, and, in a build with the default
//! `dev-tools` feature, `dev-issuer` and `demo`. `main.rs` calls [`run`] and, if it fails,
//! prints the [`Failure`] once and exits with its code.
//!
//! Exit codes: 0 success; 1 a runtime failure (a listener could not be bound, a token could not
//! be obtained); 2 invalid configuration or command line (nothing was started). clap exits 2 on
//! its own for a command line it cannot parse.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::shutdown::os_signals;
use crate::time::{from_unix_secs, rfc3339};
use crate::token::TokenCell;
use crate::token::refresher::Refresher;

mod subjects;

/// Exit code of a runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Exit code of an invalid configuration or command line; nothing was started.
const EXIT_CONFIG: u8 = 2;

/// Why a command failed, and the exit code that tells a supervisor which kind of failure it was.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// Invalid configuration or command line (exit 2): fixing the input is the cure.
    fn config(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_CONFIG,
            error,
        }
    }

    /// The exit code to end the process with.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }

    /// What went wrong; print it with `{:#}` to include every cause.
    pub fn error(&self) -> &anyhow::Error {
        &self.error
    }
}

impl From<anyhow::Error> for Failure {
    /// Anything not known to be the input's fault is a runtime failure (exit 1).
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_FAILURE,
            error,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

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
    /// Manage the subjects of per-subject tokens through the subjects API (enrol a code,
    /// import a refresh token, list, show, delete, refresh).
    Subjects(subjects::SubjectsArgs),
    /// The operator CA of HTTPS interception (`[proxy.intercept]`).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a local token endpoint implementing Flinks' `/api/v1/token` contract, for demos,
    /// tests and benchmarks. Its failure switches are under `POST /control/...`.
    #[cfg(feature = "dev-tools")]
    DevIssuer(DevIssuerArgs),
    /// Run the whole mechanism on loopback: dev issuer, an echo API and the proxy.
    #[cfg(feature = "dev-tools")]
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:3128")]
        listen: std::net::SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        /// Subjects API address (the per-subject part of the demo).
        #[arg(long, default_value = "127.0.0.1:9902")]
        subjects: std::net::SocketAddr,
    },
}

/// `bearer-proxy ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create DIR/ca.crt and DIR/ca.key (mode 0600): an ECDSA P-256 CA for [proxy.intercept].
    Init {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Limit the CA to these DNS names and their subdomains (repeat; `*.example.com` means
        /// example.com and below), so a leaked key cannot sign for other domains.
        #[arg(long = "name-constraint", value_name = "HOST")]
        name_constraints: Vec<String>,
    },
    /// Print the system's root certificates followed by the operator CA as one PEM bundle,
    /// for SSL_CERT_FILE, REQUESTS_CA_BUNDLE and similar (which replace the trust store); with
    /// --pkcs12, write them as a PKCS#12 truststore for Java instead.
    Bundle {
        /// The operator CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Write a PKCS#12 truststore (system roots and the operator CA as trusted entries) to
        /// OUT for Java's -Djavax.net.ssl.trustStore, replacing OUT; needs a password.
        #[arg(long, value_name = "OUT", requires = "truststore_password")]
        pkcs12: Option<PathBuf>,
        /// The truststore password (Java's -Djavax.net.ssl.trustStorePassword). It protects
        /// only the file's integrity; prefer --password-file, as argv is visible to `ps`.
        #[arg(
            long,
            value_name = "PW",
            group = "truststore_password",
            requires = "pkcs12",
            value_parser = secret_arg
        )]
        password: Option<crate::secret::Secret>,
        /// A file holding the truststore password (surrounding whitespace dropped).
        #[arg(
            long,
            value_name = "FILE",
            group = "truststore_password",
            requires = "pkcs12"
        )]
        password_file: Option<PathBuf>,
    },
}

/// Wraps a secret given on the command line at once, so no `Debug` of the parsed command
/// can show it.
fn secret_arg(value: &str) -> Result<crate::secret::Secret, std::convert::Infallible> {
    Ok(crate::secret::Secret::new(value))
}

/// Options of `bearer-proxy dev-issuer`.
#[cfg(feature = "dev-tools")]
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

/// Parses the command line and runs the command. Errors are returned, not printed: `main.rs`
/// prints them once.
pub fn run() -> Result<(), Failure> {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run_proxy(path),
        Command::Check => check(path),
        Command::Token { name } => token(path, name.as_deref()),
        Command::Subjects(args) => subjects::run(path, args),
        Command::Ca(c) => ca(c),
        #[cfg(feature = "dev-tools")]
        Command::DevIssuer(args) => dev_issuer(args),
        #[cfg(feature = "dev-tools")]
        Command::Demo {
            listen,
            admin,
            subjects,
        } => demo(listen, admin, subjects),
    }
}

/// What to say when no configuration was given.
#[cfg(feature = "dev-tools")]
const NO_CONFIG: &str = "no configuration: pass --config PATH or set BEARER_PROXY_CONFIG \
                         (try `bearer-proxy demo` for a local demo)";
/// What to say when no configuration was given (this build has no `demo` to suggest).
#[cfg(not(feature = "dev-tools"))]
const NO_CONFIG: &str = "no configuration: pass --config PATH or set BEARER_PROXY_CONFIG";

fn load(path: Option<&Path>) -> Result<Config, Failure> {
    let path = path.ok_or_else(|| Failure::config(anyhow!(NO_CONFIG)))?;
    config::load(path).map_err(|e| Failure::config(anyhow!("{}: {e}", path.display())))
}

/// Runs `work` to completion on a new runtime with `workers` threads (1: the current thread
/// only; 0: one per core).
fn block_on<T>(workers: usize, work: impl Future<Output = T>) -> Result<T, Failure> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    let rt = b.enable_all().build().context("cannot start the runtime")?;
    Ok(rt.block_on(work))
}

fn run_proxy(path: Option<&Path>) -> Result<(), Failure> {
    let config = load(path)?;
    // `load` succeeded, so there was a path; SIGHUP and `[reload] watch` read it again.
    let path = path.map(Path::to_path_buf).unwrap_or_default();
    crate::logging::init(&config.log).map_err(|e| Failure::config(anyhow!("logging: {e}")))?;
    block_on(config.proxy.workers, async {
        let server = crate::Server::start_from(config, &path)
            .await
            .inspect_err(|e| tracing::error!(error = format!("{e:#}"), "cannot start"))?;
        let signals = os_signals().context("cannot install signal handlers")?;
        server.run(signals).await;
        Ok(())
    })?
}

fn check(path: Option<&Path>) -> Result<(), Failure> {
    let config = load(path)?;
    let problems = block_on(1, async {
        let mut problems = crate::check::file_problems(&config).await;
        problems.extend(crate::check::redis_problems(&config).await);
        problems
    })?;
    print!("{}", summary(&config));
    if problems.is_empty() {
        println!("configuration OK");
        return Ok(());
    }
    let mut message = format!(
        "{} problem{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in &problems {
        message.push_str("\n  - ");
        message.push_str(p);
    }
    Err(Failure::config(anyhow::Error::msg(message)))
}

/// `ca init` and `ca bundle`. A CA that cannot be made or read is the input's fault (exit 2).
fn ca(command: CaCommand) -> Result<(), Failure> {
    match command {
        CaCommand::Init {
            out,
            name_constraints,
        } => {
            let (cert, key) = crate::ca::init(&out, &name_constraints)
                .map_err(|e| Failure::config(anyhow!("ca init: {e}")))?;
            println!("wrote {} and {} (mode 0600)", cert.display(), key.display());
            Ok(())
        }
        CaCommand::Bundle {
            ca, pkcs12: None, ..
        } => {
            let pem =
                crate::ca::bundle(&ca).map_err(|e| Failure::config(anyhow!("ca bundle: {e}")))?;
            print!("{pem}");
            Ok(())
        }
        CaCommand::Bundle {
            ca,
            pkcs12: Some(out),
            password,
            password_file,
        } => {
            let password = match (password, password_file) {
                (Some(p), _) => p,
                (None, Some(file)) => {
                    block_on(1, crate::secret::read_file(&file, "truststore password"))?
                        .map_err(|e| Failure::config(anyhow!("ca bundle: {e}")))?
                }
                // clap requires one of the two with --pkcs12.
                (None, None) => {
                    return Err(Failure::config(anyhow!(
                        "ca bundle: --pkcs12 needs --password-file or --password"
                    )));
                }
            };
            let written = crate::ca::bundle_pkcs12(&ca, &out, &password)
                .map_err(|e| Failure::config(anyhow!("ca bundle: {e}")))?;
            println!(
                "wrote {}: a PKCS#12 truststore of {} system root certificates and {} operator \
                 CA certificate(s) (alias {}) as trusted entries",
                out.display(),
                written.system_roots,
                written.operator,
                crate::ca::TRUSTSTORE_CA_ALIAS
            );
            Ok(())
        }
    }
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
            "token  {name}: {}{} at {} ({:?} auth, {:?} body, {secret})",
            t.grant_type.as_str(),
            if t.per_subject {
                " per subject"
            } else if t.shared {
                " shared through redis"
            } else {
                ""
            },
            t.token_url,
            t.client_auth,
            t.encoding
        );
    }
    if let Some(sc) = &config.subjects {
        let keys: Vec<String> = sc
            .key_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = writeln!(
            s,
            "subjects  API listen {} (header {}, {:?} store, keys from {})",
            sc.listen,
            sc.header,
            sc.store,
            keys.join(", ")
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

fn token(path: Option<&Path>, name: Option<&str>) -> Result<(), Failure> {
    let config = load(path)?;
    let name = match (name, config.tokens.len()) {
        (Some(n), _) => n.to_owned(),
        (None, 1) => config.tokens.keys().next().cloned().unwrap_or_default(),
        (None, _) => {
            return Err(Failure::config(anyhow!(
                "name the token: one of {}",
                config.tokens.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let Some(cfg) = config.tokens.get(&name).cloned() else {
        return Err(Failure::config(anyhow!(
            "no [tokens.{name}] in the configuration"
        )));
    };
    if cfg.per_subject {
        // A per-subject token has no token of its own to fetch: each subject's comes from
        // that subject's refresh token, which lives in the store the running proxy owns.
        return Err(Failure::config(anyhow!(
            "tokens.{name} has per_subject = true: there is no single token to fetch; use \
             `bearer-proxy subjects refresh <subject>` against the running proxy"
        )));
    }
    block_on(1, async {
        let cell = TokenCell::new(name.as_str(), cfg.forced_refresh_interval);
        let metrics = Metrics::new();
        let mut refresher = Refresher::new(cfg, cell, metrics.token(&name))
            .map_err(|e| anyhow!("tokens.{name}: {e}"))?;
        let f = refresher.refresh().await.map_err(|e| {
            let mut message = format!("token {name}: {e}");
            if let Some(o) = e.oauth() {
                message.push_str(&format!("\n  error:             {}", o.code));
                if let Some(d) = &o.description {
                    message.push_str(&format!("\n  error_description: {d}"));
                }
            }
            anyhow::Error::msg(message)
        })?;
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
                    ("exp" | "iat", Some(secs)) => {
                        format!("{} ({})", secs, rfc3339(from_unix_secs(secs)))
                    }
                    _ => v.to_string(),
                };
                println!("claim {k:<7}{shown}");
            }
        }
        Ok(())
    })?
}

#[cfg(feature = "dev-tools")]
fn dev_issuer(args: DevIssuerArgs) -> Result<(), Failure> {
    let text_logs = crate::config::LogConfig {
        format: crate::config::LogFormat::Text,
        ..Default::default()
    };
    // Not fatal: the dev issuer works without logs (a subscriber may already be installed).
    if let Err(e) = crate::logging::init(&text_logs) {
        eprintln!("bearer-proxy: logging: {e}");
    }
    let defaults = crate::issuer::IssuerOptions::default();
    let opts = crate::issuer::IssuerOptions {
        lifetime: std::time::Duration::from_secs(args.lifetime),
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
    block_on(1, async {
        let issuer = crate::issuer::DevIssuer::bind(args.listen, opts)
            .await
            .with_context(|| format!("dev-issuer: cannot listen on {}", args.listen))?;
        println!("dev issuer: token endpoint {}", issuer.token_url());
        println!(
            "dev issuer: end users: GET {} (client_id, redirect_uri, state, user), DELETE {}, \
             any request under {}/api/fdx/",
            issuer.authorize_url(),
            issuer.revoke_url(),
            issuer.base_url()
        );
        let mut signals = os_signals().context("cannot install signal handlers")?;
        issuer
            .serve(async move {
                // SIGHUP has nothing to reload here; only a stop signal ends the issuer.
                while let Some(s) = signals.recv().await {
                    if s.stops() {
                        break;
                    }
                }
            })
            .await;
        Ok(())
    })?
}

#[cfg(feature = "dev-tools")]
fn demo(
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    subjects: std::net::SocketAddr,
) -> Result<(), Failure> {
    use crate::demo::{DemoAddrs, DemoError};
    // Made before the runtime and removed after it (at the end of this function), so no task
    // still writing a subject record can race the removal.
    let scratch = crate::demo::scratch_dir();
    block_on(
        1,
        crate::demo::run(
            DemoAddrs {
                proxy,
                admin,
                subjects,
            },
            &scratch,
        ),
    )?
    .map_err(|e| match e {
        DemoError::Config(e) => Failure::config(anyhow!("demo: {e}")),
        DemoError::Failed(e) => Failure::from(e.context("demo")),
    })
}
