//! `bearer-proxy demo`: the whole mechanism on loopback, with no Flinks account. It starts the
//! dev issuer (short-lived tokens, so refreshes show within a minute), a small echo API that
//! shows the `Authorization` header it received, and the proxy with a generated configuration
//! routing `api.demo.test` to the echo API.
//!
//! When it can write a scratch directory (`$TMPDIR`), it also shows per-subject tokens, the
//! Flinks Data Recipient flow: a per-subject token `fdx` routes `fdx.demo.test` to the dev
//! issuer's FDX stand-in (which answers with the user whose token it received), two customers
//! are enrolled through the subjects API with codes from the dev issuer's authorize step, and
//! the app names the customer with `X-Bearer-Proxy-Subject`. The directory (its encrypted
//! records and a throwaway key) is removed when the demo stops. In a read-only container the
//! demo runs without that part and says so.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::issuer::{DevIssuer, IssuerOptions};
use crate::listener::accept;
use crate::shutdown::os_signals;

/// The host the demo routes; `.test` is reserved (RFC 2606) and never resolves.
pub const DEMO_HOST: &str = "api.demo.test";
/// Demo tokens live this long, so a newcomer sees a refresh (at ~3/4 of it) within a minute.
pub const DEMO_LIFETIME: Duration = Duration::from_secs(40);
/// How much of the received token the echo API shows: enough to see it change on refresh.
const TOKEN_PREVIEW_CHARS: usize = 16;

/// The host of the per-subject part: routed to the dev issuer's FDX stand-in.
pub const DEMO_FDX_HOST: &str = "fdx.demo.test";
/// The redirect URI the demo's per-subject token sends with each code (the dev issuer binds a
/// code from its authorize step to the redirect URI it was asked for).
pub const DEMO_REDIRECT_URI: &str = "http://localhost/demo/callback";
/// The two customers the demo enrols (subject id = the dev issuer's user id).
pub const DEMO_CUSTOMERS: [&str; 2] = ["customer-alice", "customer-bob"];

/// Where the demo listens.
#[derive(Clone, Copy, Debug)]
pub struct DemoAddrs {
    /// The proxy port.
    pub proxy: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The subjects API (per-subject part only).
    pub subjects: SocketAddr,
}

/// The per-subject part's scratch directory and the dev issuer's base URL.
struct PerSubject<'a> {
    dir: &'a std::path::Path,
    issuer: &'a str,
}

/// The configuration the demo runs with: the proxy routes [`DEMO_HOST`] to the echo API
/// with a token from the dev issuer.
fn config(
    addrs: DemoAddrs,
    token_url: &str,
    echo: SocketAddr,
    per_subject: Option<PerSubject<'_>>,
) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    let mut text = format!(
        r#"
[proxy]
listen = "{proxy}"
# Nothing to drain in a demo: Ctrl-C stops at once.
drain_delay = "0s"
shutdown_grace = "2s"

[admin]
listen = "{admin}"

[log]
format = "text"
level = "info"
access = true

[tokens.demo]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret = "demo-secret"
scope = "client:admin"
# The default 30s margin is most of a 40s demo token; this keeps the usual 3/4 schedule.
refresh_margin = "5s"

[[routes]]
name = "demo-api"
host = "{DEMO_HOST}"
token = "demo"
upstream = "http://{echo}"
"#,
        proxy = addrs.proxy,
        admin = addrs.admin,
    );
    if let Some(ps) = per_subject {
        text.push_str(&format!(
            r#"
[tokens.fdx]
token_url = "{token_url}"
grant_type = "authorization_code"
per_subject = true
client_id = "demo-client"
client_secret = "demo-secret"
revoke_url = "{issuer}/api/v1/revoke"
# The app's redirect URI; codes from the authorize step are bound to it.
redirect_uri = "{DEMO_REDIRECT_URI}"
refresh_margin = "5s"

[subjects]
listen = "{subjects}"
state_dir = "{dir}"
encryption_key_file = "{dir}/key"

[[routes]]
name = "demo-fdx"
host = "{DEMO_FDX_HOST}"
token = "fdx"
upstream = "{issuer}"
"#,
            issuer = ps.issuer,
            subjects = addrs.subjects,
            dir = ps.dir.display(),
        ));
    }
    crate::config::from_str(&text, config::FileFormat::Toml, Some(HashMap::new()))
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The generated configuration was refused (a bug, or addresses the proxy cannot use).
    #[error("the generated configuration is invalid: {0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// A part could not start.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Runs the demo until Ctrl-C or SIGTERM. `scratch` is the per-subject part's directory (see
/// [`scratch_dir`]); the caller removes it once the runtime, and with it every task that
/// might still write a record, is gone.
pub async fn run(addrs: DemoAddrs, scratch: &anyhow::Result<Scratch>) -> Result<(), DemoError> {
    let issuer = DevIssuer::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        IssuerOptions {
            lifetime: DEMO_LIFETIME,
            ..Default::default()
        },
    )
    .await
    .context("cannot start the dev issuer")?;
    let token_url = issuer.token_url();
    let echo = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("cannot start the echo API")?;
    let echo_addr = echo.local_addr().context("the echo API's address")?;
    let base_url = issuer.base_url();
    let per_subject = match scratch {
        Ok(dir) => Some(PerSubject {
            dir: &dir.0,
            issuer: &base_url,
        }),
        Err(e) => {
            eprintln!(
                "bearer-proxy demo: per-subject part skipped: {e:#} (set TMPDIR to a writable \
                 directory to see it)"
            );
            None
        }
    };
    let with_subjects = per_subject.is_some();
    let config = config(addrs, &token_url, echo_addr, per_subject)?;
    // Not fatal: the demo still works without logs.
    if let Err(e) = crate::logging::init(&config.log) {
        eprintln!("bearer-proxy demo: logging: {e}");
    }
    let issuer_control = issuer.control();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut issuer_stop = stop_rx.clone();
    tokio::spawn(issuer.serve(async move {
        let _ = issuer_stop.wait_for(|s| *s).await;
    }));
    tokio::spawn(serve_echo(echo));
    let control = issuer_control;
    let server = crate::Server::start(config).await.context(
        "cannot start the proxy (use --listen, --admin and --subjects to pick other ports)",
    )?;
    let proxy = server.proxy_addr();
    let admin = server.admin_addr();
    let subjects = match (with_subjects, server.subjects_addr()) {
        (true, Some(api)) => {
            for customer in DEMO_CUSTOMERS {
                enrol(api, customer, &control.code_for(customer))
                    .await
                    .with_context(|| format!("enrolling {customer}"))?;
            }
            Some(api)
        }
        _ => None,
    };
    println!(
        "\nbearer-proxy demo: everything runs on loopback; no Flinks account needed.\n\
         \n  token endpoint (dev issuer)  {token_url}   (tokens live {}s)\
         \n  demo API                     http://{echo_addr}   (shows the Authorization header it receives)\
         \n  proxy                        http://{proxy}   (routes {DEMO_HOST} to the demo API, adding the token)\
         \n  admin                        http://{admin}\
         \n\nTry, in another terminal:\
         \n  curl -x http://{proxy} http://{DEMO_HOST}/api/fdx/5/accounts\
         \n  http_proxy=http://{proxy} curl -s http://{DEMO_HOST}/hello\
         \n  curl -s http://{admin}/status\
         \n  curl -s http://{admin}/metrics | grep bearer_proxy_token\
         \n\nWatch the log below: the token is refreshed every {}-{}s. Ctrl-C stops everything.\n",
        DEMO_LIFETIME.as_secs(),
        DEMO_LIFETIME.as_secs() * 3 / 4 * 85 / 100,
        DEMO_LIFETIME.as_secs() * 3 / 4,
    );
    if let Some(api) = subjects {
        let [a, b] = DEMO_CUSTOMERS;
        println!(
            "Per-subject tokens (the Flinks Data Recipient flow): {a} and {b} were enrolled\
             \nwith their own authorization codes through the subjects API (http://{api}).\
             \nThe FDX stand-in at {DEMO_FDX_HOST} answers with the user whose token it received:\
             \n  curl -x http://{proxy} -H 'X-Bearer-Proxy-Subject: {a}' http://{DEMO_FDX_HOST}/api/fdx/5/accounts\
             \n  curl -x http://{proxy} -H 'X-Bearer-Proxy-Subject: {b}' http://{DEMO_FDX_HOST}/api/fdx/5/accounts\
             \n  curl -x http://{proxy} http://{DEMO_FDX_HOST}/api/fdx/5/accounts      (400 subject_required)\
             \n  bearer-proxy subjects list --api http://{api} fdx\
             \nEnrol a third customer with a code from the dev issuer's authorize step:\
             \n  code=$(curl -s -o /dev/null -w '%{{redirect_url}}' '{base_url}/api/v1/authorize?client_id=demo-client&redirect_uri={DEMO_REDIRECT_URI}&state=x&user=carol' | sed 's/.*code=\\([^&]*\\).*/\\1/')\
             \n  echo \"$code\" | bearer-proxy subjects enrol --api http://{api} fdx carol\
             \nEnd {b}'s consent at the bank; the next call marks {b} needs_reauth:\
             \n  curl -s -X POST '{base_url}/control/revoke_consent?user={b}'\n"
        );
    }
    let signals = os_signals().context("cannot install signal handlers")?;
    server.run(signals).await;
    let _ = stop_tx.send(true);
    Ok(())
}

/// The per-subject part's directory, removed on drop.
#[derive(Debug)]
pub struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover directory holds only records sealed with a key in it.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory under `$TMPDIR` with a throwaway encryption key (mode 0600).
pub fn scratch_dir() -> anyhow::Result<Scratch> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::env::temp_dir().join(format!("bearer-proxy-demo-{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(scratch.0.join("key"))
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .context("cannot write the demo's encryption key")?;
    Ok(scratch)
}

/// Enrols `customer` through the subjects API, as an app hands over a code.
async fn enrol(
    api: SocketAddr,
    customer: &str,
    code: &crate::secret::Secret,
) -> anyhow::Result<()> {
    let url = format!("http://{api}/v1/tokens/fdx/subjects/{customer}/code");
    // Plain http on loopback; the TLS settings only satisfy the builder (as everywhere here,
    // no process-wide crypto provider is assumed).
    let tls = crate::tls::client_config(None, &[b"http/1.1"], None)?;
    let answer = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?
        .post(url)
        .json(&json!({ "code": code.expose() }))
        .send()
        .await?;
    let status = answer.status();
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "the subjects API answered {status}: {}",
        answer.text().await.unwrap_or_default()
    );
    Ok(())
}

/// The echo API: answers every request with what it received, the token shortened.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let stream = accept(&listener, "demo API").await;
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (shown, claims) = match auth.and_then(|a| a.strip_prefix("Bearer ")) {
        Some(token) => (
            json!(format!(
                "Bearer {}… ({} characters)",
                token.chars().take(TOKEN_PREVIEW_CHARS).collect::<String>(),
                token.len()
            )),
            crate::token::client::jwt_claims(token).map_or(serde_json::Value::Null, |mut c| {
                c.retain(|k, _| ["sub", "client_id", "exp", "jti"].contains(&k.as_str()));
                serde_json::Value::Object(c)
            }),
        ),
        None => (json!(auth), serde_json::Value::Null),
    };
    let body = json!({
        "you_called": format!("{} {}", req.method(), req.uri()),
        "host": req.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()),
        "authorization_received": shown,
        "token_claims": claims,
        "note": "this demo API saw the bearer token that bearer-proxy added; your client sent none",
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    *resp.status_mut() = if auth.is_some() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
