//! `bearer-proxy demo`: the whole mechanism on loopback, with no Flinks account. It starts the
//! dev issuer (short-lived tokens, so refreshes show within a minute), a small echo API that
//! shows the `Authorization` header it received, and the proxy with a generated configuration
//! routing `api.demo.test` to the echo API.

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

/// Where the demo listens.
#[derive(Clone, Copy, Debug)]
pub struct DemoAddrs {
    /// The proxy port.
    pub proxy: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
}

/// The configuration the demo runs with: the proxy routes [`DEMO_HOST`] to the echo API
/// with a token from the dev issuer.
pub fn config(
    addrs: DemoAddrs,
    token_url: &str,
    echo: SocketAddr,
) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    let text = format!(
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

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(addrs: DemoAddrs) -> Result<(), DemoError> {
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
    let config = config(addrs, &token_url, echo_addr)?;
    // Not fatal: the demo still works without logs.
    if let Err(e) = crate::logging::init(&config.log) {
        eprintln!("bearer-proxy demo: logging: {e}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut issuer_stop = stop_rx.clone();
    tokio::spawn(issuer.serve(async move {
        let _ = issuer_stop.wait_for(|s| *s).await;
    }));
    tokio::spawn(serve_echo(echo));
    let server = crate::Server::start(config)
        .await
        .context("cannot start the proxy (use --listen and --admin to pick other ports)")?;
    let proxy = server.proxy_addr();
    let admin = server.admin_addr();
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
    let signals = os_signals().context("cannot install signal handlers")?;
    server.run(signals).await;
    let _ = stop_tx.send(true);
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
