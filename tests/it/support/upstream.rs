//! Origins the proxy forwards to: a recording HTTP upstream (plain or TLS) answering through
//! a handler, a TCP echo server, a raw server for answers hyper would not produce, and the
//! socket helpers a hostile origin needs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::PATIENCE;

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
