//! Test helpers: a private CA, a recording upstream (TLS or plain), a raw HTTP/1 client, a
//! proxy started in-process on port 0, a dev issuer, a metrics matcher, and the suite-wide
//! secret-leak guard ([`guard_logs`]).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bearer_proxy::config::Config;
use bearer_proxy::metrics::Metrics;
use bearer_proxy::proxy::Proxy;
use bearer_proxy::shutdown::{Phase, ShutdownController};
use bearer_proxy::token::{AccessToken, TokenCell};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Secret-leak guard

/// Values that must never reach a log line: registered by the helpers that create tokens and
/// secrets, checked by the global subscriber against every formatted event.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static GUARD: std::sync::Once = std::sync::Once::new();

/// Registers a secret value that must never be logged, and makes sure the guard is installed.
pub fn never_log(secret: &str) {
    guard_logs();
    SECRETS.lock().unwrap().push(secret.to_owned());
}

/// Installs, once per test binary, a global `tracing` subscriber at TRACE for every crate
/// (bearer-proxy, hyper, h2, rustls, reqwest…). Each formatted event is checked for every
/// registered secret, for the word "canary" (the marker of test secrets), and for anything
/// shaped like a JWT; a hit aborts the whole test run, whichever test caused it. Every helper
/// that starts a part of the product calls this, so the whole suite's scenarios run under it.
pub fn guard_logs() {
    GUARD.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LeakCheck(Vec::new()))
            .try_init();
    });
}

/// Buffers one formatted event and checks it when dropped.
struct LeakCheck(Vec<u8>);

impl std::io::Write for LeakCheck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LeakCheck {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.0);
        let leaked = SECRETS
            .lock()
            .map(|s| s.iter().find(|v| line.contains(v.as_str())).cloned())
            .unwrap_or_default()
            .or_else(|| {
                line.to_ascii_lowercase()
                    .contains("canary")
                    .then(|| "canary".into())
            })
            .or_else(|| looks_like_jwt(&line).then(|| "a JWT".into()));
        if let Some(what) = leaked {
            eprintln!("SECRET LEAKED INTO A LOG LINE ({what}):\n{line}");
            std::process::abort();
        }
    }
}

/// `eyJ` (Base64 of `{"`) followed by a long Base64url run and a dot: a JWT header.
fn looks_like_jwt(line: &str) -> bool {
    line.match_indices("eyJ").any(|(i, _)| {
        let rest = &line[i..];
        let run = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        run >= 16 && rest.as_bytes().get(run) == Some(&b'.')
    })
}

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

/// Every socket wait in the tests is bounded by this, so a bug fails a test instead of hanging
/// the suite.
pub const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Certificates

/// A private CA that signs server certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    /// Holds the CA's PEM file.
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A fresh CA.
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bearer-proxy test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert,
            key,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The CA certificate as a PEM file (for `proxy.ca_file`).
    pub fn pem_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }

    /// A TLS server configuration for `names`, offering `alpn`.
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------------------------
// Recording upstream

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// The body, if it was at most [`KEEP_BODY`] bytes.
    pub body: Bytes,
    /// Body length.
    pub body_len: u64,
}

impl Recorded {
    /// Every value of a header, as strings.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The single value of a header.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} appears {} times", all.len());
        all.into_iter().next()
    }
}

/// Bodies up to this size are kept; larger ones are only counted.
pub const KEEP_BODY: u64 = 1 << 20;

/// What the upstream answers.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ReplyBody,
    /// Wait for this before answering.
    pub gate: Option<Arc<Gate>>,
}

/// The body of a reply.
pub enum ReplyBody {
    Bytes(Bytes),
    /// `len` bytes of zeros, generated as they are sent.
    Zeros(u64),
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: ReplyBody::Bytes(Bytes::new()),
            gate: None,
        }
    }

    pub fn ok(body: &str) -> Self {
        Self::status(200).body(body)
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = ReplyBody::Bytes(Bytes::from(body.to_owned()));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn gated(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }
}

/// A latch the test opens.
#[derive(Default)]
pub struct Gate {
    open: watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }

    async fn wait(&self) {
        let _ = self.open.subscribe().wait_for(|o| *o).await;
    }
}

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

/// An HTTP server that records every request and answers through a handler.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    count: watch::Sender<usize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// A plain-HTTP upstream.
    pub async fn plain(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start(None, Arc::new(handler)).await
    }

    /// A TLS upstream with `config`.
    pub async fn tls(
        config: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start(Some(config), Arc::new(handler)).await
    }

    async fn start(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, _) = watch::channel(0);
        let connections = Arc::new(AtomicUsize::new(0));
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let state = (requests.clone(), count.clone(), handler);
        let conns = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (requests, count, handler) = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        record_and_answer(req, requests.clone(), count.clone(), handler.clone())
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Room for the proxy's own headers on top of a client's 100 lines.
                    builder.http1().max_headers(200);
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            count,
            connections,
            task,
        }
    }

    /// Requests recorded so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests were recorded.
    pub async fn wait_requests(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n))
            .await
            .expect("upstream never saw the request")
            .unwrap();
    }

    /// `https://localhost:<port>` (or `http://127.0.0.1:<port>` for a plain one).
    pub fn url(&self, tls: bool) -> String {
        if tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}", self.addr.port())
        }
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn record_and_answer(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    count: watch::Sender<usize>,
    handler: Handler,
) -> Result<Response<TestBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if len <= KEEP_BODY {
                kept.extend_from_slice(&data);
            }
        }
    }
    let rec = Recorded {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.to_string()),
        version: parts.version,
        headers: parts.headers,
        body: if len <= KEEP_BODY {
            Bytes::from(kept)
        } else {
            Bytes::new()
        },
        body_len: len,
    };
    let index = {
        let mut all = requests.lock().unwrap();
        all.push(rec.clone());
        all.len() - 1
    };
    count.send_replace(index + 1);
    let reply = handler(&rec, index);
    if let Some(gate) = &reply.gate {
        gate.wait().await;
    }
    let mut resp = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
    for (n, v) in &reply.headers {
        resp = resp.header(n, v);
    }
    let body: TestBody = match reply.body {
        ReplyBody::Bytes(b) => http_body_util::Full::new(b)
            .map_err(|never| match never {})
            .boxed(),
        ReplyBody::Zeros(total) => {
            resp = resp.header("content-length", total.to_string());
            let chunk = Bytes::from(vec![0u8; 64 * 1024]);
            let frames = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(chunk.len() as u64);
                        (Ok(Frame::data(chunk.slice(..n as usize))), left - n)
                    })
                }
            });
            StreamBody::new(frames).boxed()
        }
    };
    Ok(resp.body(body).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Proxy under test

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
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics.encode(), series)
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

/// The value of `series` (`name{label="v",…}` with labels in alphabetical order, or a bare
/// name) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 client

/// A response read off a socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The proxy's `x-bearer-proxy-error` code, after checking the error body agrees.
    pub fn proxy_error(&self) -> Option<String> {
        let code = self.header("x-bearer-proxy-error")?.to_owned();
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json()["error"], code.as_str());
        Some(code)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to `addr`.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Sends `request` on a new connection and reads one response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = connect(addr).await;
    s.write_all(request).await.unwrap();
    read_response(&mut s).await.unwrap()
}

/// `GET <url>` through the proxy at `addr`, with extra header lines.
pub async fn get(addr: SocketAddr, url: &str, headers: &[&str]) -> RawResponse {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let mut req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes()).await
}

/// Reads one response (Content-Length, chunked or until EOF). Fails if the connection ends
/// before the body does. Bytes read beyond the response are dropped: for pipelined responses
/// Reads a response head only, byte by byte (a `100 Continue` or a CONNECT `200` has no body
/// framing to follow).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// use [`read_pipelined`].
pub async fn read_response(s: &mut TcpStream) -> std::io::Result<RawResponse> {
    read_pipelined(s, &mut Vec::new()).await
}

/// Reads one response, starting with the bytes in `carry` (left over from the previous
/// response on the connection) and leaving there whatever follows this one.
pub async fn read_pipelined(
    s: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> std::io::Result<RawResponse> {
    tokio::time::timeout(PATIENCE, read_response_inner(s, carry))
        .await
        .map_err(|_| std::io::Error::other("timed out reading a response"))?
}

async fn read_response_inner(
    s: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> std::io::Result<RawResponse> {
    let mut buf = std::mem::take(carry);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        *carry = rest.split_off(len);
        rest
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (body, left) = read_chunked(s, rest).await?;
        *carry = left;
        body
    } else {
        s.read_to_end(&mut rest).await?;
        rest
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// A chunked body and the bytes after it (trailers are not expected).
async fn read_chunked(s: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(s, &mut buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .map_err(|e| std::io::Error::other(format!("bad chunk size {size_text:?}: {e}")))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            while buf.len() < 2 {
                fill(s, &mut buf).await?;
            }
            buf.drain(..2);
            return Ok((body, buf));
        }
        while buf.len() < size + 2 {
            fill(s, &mut buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Waits for the peer to close `s` (reading and discarding anything before that). Returns
/// whether it closed within [`PATIENCE`].
pub async fn closed(s: &mut TcpStream) -> bool {
    let read_all = async {
        let mut sink = [0u8; 1024];
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.is_ok()
}

/// A TCP echo server; returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A plain-HTTP server that reads one request head per connection, writes `answer` and closes
/// (for answers hyper would not produce, such as a body cut short).
pub async fn raw_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
            });
        }
    });
    addr
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

// ---------------------------------------------------------------------------------------------
// Admin port, refresh attempts, ports

/// `GET path` on an admin port (one request per connection).
pub async fn admin_get(admin: SocketAddr, path: &str) -> RawResponse {
    raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// The admin port's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    let resp = admin_get(admin, "/metrics").await;
    assert_eq!(resp.status, 200);
    resp.text()
}

/// Scrapes `/metrics` until `series` has the value `want`; fails after [`PATIENCE`]. Each
/// scrape is a real request to the admin port, so this polls the server's own view (for
/// instance `bearer_proxy_open_connections` returning to 0 once connection tasks have ended).
pub async fn settle(admin: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = metric(&scrape(admin).await, series);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {got:?}, expected {want}"
        );
        tokio::task::yield_now().await;
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

/// A loopback port nothing listens on (a listener was bound there and dropped).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Copies bytes both ways between `client` and a new connection to `target` until either side
/// ends.
pub async fn relay(mut client: TcpStream, target: SocketAddr) {
    if let Ok(mut upstream) = TcpStream::connect(target).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Reads one request head (through the empty line) from `s`; `None` if the peer closed first.
pub async fn read_request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// Closes `s` with a TCP reset instead of a FIN.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Collects formatted log lines (install with `tracing::subscriber::set_default`; on a
/// current-thread test runtime every task of the test logs through it).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// A subscriber writing every event at `level` and above here, and the guard keeping it the
    /// default on this thread.
    pub fn install(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(level)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process

/// The proxy binary, with a configuration file, as a child process whose stderr is collected.
pub struct Child {
    pub child: tokio::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
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
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"message\":\"started\"")
                    && let Some(tx) = tx.take()
                {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    let _ = tx.send((addr("proxy"), addr("admin"))).await;
                }
                let mut logs = keep.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (proxy, admin) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("no \"started\" line")
            .expect("exited before starting");
        Self {
            child,
            proxy,
            admin,
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
