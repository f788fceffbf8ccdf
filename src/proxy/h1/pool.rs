//! The fast path's upstream connections: connecting (TCP, then TLS verified against the same
//! trust store and client certificates as the pooled hyper clients, all within
//! `connect_timeout`) and the idle connections between client connections.
//!
//! A client connection's task owns the upstream connection it uses and keeps it across its
//! requests, so a keep-alive client costs no pool operation per request; the pool is only
//! consulted when a client connection needs its first connection to a key, and takes it back
//! when the client connection ends.
//!
//! Connecting: the authority's host is resolved (`tokio::net::lookup_host`) and its addresses
//! are tried in order, each within an equal share of what is left of `connect_timeout` (as
//! hyper's connector does, so one unreachable address cannot use up the whole budget), with
//! `TCP_NODELAY`. TLS verifies the upstream's certificate against the authority's host, IP
//! literals included, exactly as the hyper clients do, and offers ALPN `h2, http/1.1` like
//! them: an upstream that picks h2 is reported as [`Connected::Http2`] and left to the hyper
//! clients. Failures carry the stage they happened in ([`ConnectFailure`]), as the hyper
//! clients' do.
//!
//! Idle connections: per key, oldest first, at most [`MAX_IDLE_PER_KEY`], each reused only
//! while younger than `POOL_IDLE_TIMEOUT` and only if a non-blocking look at it finds nothing to
//! read (an idle HTTP/1 connection has no answer due, so a byte, EOF or an error means the
//! upstream closed it or is out of step with it). Expired connections of a key are dropped when
//! that key is next taken from or given back; those of keys nobody asks for again are dropped
//! by a sweep over every key that a `put` runs at most once per `POOL_IDLE_TIMEOUT` (so an idle
//! connection outlives its expiry by at most that much while client connections keep ending;
//! with no traffic at all it stays until the next `put`). No lock is held across an await, and
//! connections are closed after the lock is released.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::uri::Authority;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::proxy::upstream::{ConnectError, ConnectFailure, POOL_IDLE_TIMEOUT};

/// The protocols offered in the TLS handshake, as the hyper clients offer them: an upstream
/// that prefers h2 still gets it (through hyper), and the fast path learns so.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Idle connections kept per key. Enough for what a burst of 64 concurrent client connections
/// (the benchmarks' load; more than a sidecar's app usually holds open to one origin) leaves
/// behind, so the next burst connects nothing; beyond that an idle connection is an open file
/// here and memory at the upstream for a burst that may not come back. The oldest go first:
/// they are the nearest to the upstream's own idle timeout.
const MAX_IDLE_PER_KEY: usize = 64;

/// An idle connection younger than this is taken without the readability probe (a system
/// call): upstreams close idle connections after seconds (nginx 75 s, ALBs 60 s), so one given
/// back this recently is open unless the upstream is closing it right now, a race the probe
/// could not close either (the retry of an idempotent request on a new connection covers it).
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// What an upstream connection is for: a connection carries one credential's requests to one
/// origin, never another's (see `upstream.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// The route's pool index (`Route::pool`): the credential and client certificate.
    pub(crate) pool: usize,
    /// `https` (TLS) or `http`.
    pub(crate) tls: bool,
    /// `host[:port]` connected to.
    pub(crate) authority: Authority,
}

/// A new or idle connection.
#[derive(Debug)]
pub(crate) enum Connected {
    /// An HTTP/1.1 connection.
    Http1(H1Conn),
    /// The upstream chose HTTP/2 in the TLS handshake: the fast path leaves this origin to
    /// the hyper clients (the connection is closed).
    Http2,
}

/// One upstream HTTP/1.1 connection.
pub(crate) struct H1Conn {
    io: Io,
    key: PoolKey,
    reused: bool,
}

/// The socket, with or without TLS.
enum Io {
    Plain(TcpStream),
    /// Boxed: a TLS session is over a kilobyte, and connections move in and out of the pool.
    Tls(Box<TlsStream<TcpStream>>),
}

impl H1Conn {
    /// Whether it came from the idle pool (and so may have been closed by the upstream
    /// meanwhile).
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Whether an idle connection still looks usable: nothing to read, no EOF, no error. TLS
    /// first lets rustls take what the socket has delivered (so a close_notify or buffered
    /// data counts), without a waker to call; then the socket itself is peeked with a system
    /// call, which sees what tokio's reactor may not have reported yet.
    fn looks_open(&mut self) -> bool {
        let tcp = match &mut self.io {
            Io::Plain(tcp) => &*tcp,
            Io::Tls(tls) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut byte = [0u8; 1];
                if Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut ReadBuf::new(&mut byte))
                    .is_ready()
                {
                    return false;
                }
                tls.get_ref().0
            }
        };
        let mut byte = [MaybeUninit::uninit(); 1];
        matches!(
            socket2::SockRef::from(tcp).peek(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

impl std::fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Conn")
            .field("key", &self.key)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for H1Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for H1Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

/// The idle map's hasher: FNV-1a over the key's bytes. Every exchange looks its key up
/// twice (take and give back), and SipHash of the authority was ≈10 % of a request's
/// instructions. Flooding resistance is not needed: keys come from the configured routes (and,
/// for wildcard routes, from hosts that matched them), and there are only as many as origins.
type KeyHash = std::hash::BuildHasherDefault<Fnv>;

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// What the idle pool had for a key.
enum Taken {
    Found(H1Conn),
    /// Nothing idle, and the key's upstream speaks HTTP/2.
    Http2,
    Nothing,
}

/// Idle connections, and how to make new ones.
pub(crate) struct H1Pool {
    /// The TLS settings of each pool index (`PoolKey::pool`).
    tls: Box<[TlsConnector]>,
    /// Over DNS, TCP and TLS together.
    connect_timeout: Duration,
    /// [`PROBE_AFTER`]; zero in the tests of the probe itself.
    probe_after: Duration,
    idle: Mutex<Idle>,
}

/// The idle connections.
#[derive(Default)]
struct Idle {
    /// Per key, with the time each was given back, oldest first. A key without connections
    /// has no entry.
    conns: HashMap<PoolKey, Vec<(H1Conn, Instant)>, KeyHash>,
    /// When a `put` next sweeps every key's expired connections (`None`: at the first).
    next_sweep: Option<Instant>,
    /// Keys whose upstream chose HTTP/2: the fast path leaves them to hyper without another
    /// handshake. Bounded by the routes' origins (wildcard routes: by the hosts the app calls).
    http2: HashSet<PoolKey, KeyHash>,
}

impl H1Pool {
    /// A pool whose connections for pool index `i` use `tls[i]` (from [`H1Pool::tls_config`]),
    /// each connect bounded by `connect_timeout`.
    pub(crate) fn new(tls: &[Arc<ClientConfig>], connect_timeout: Duration) -> Self {
        Self {
            tls: tls.iter().cloned().map(TlsConnector::from).collect(),
            connect_timeout,
            probe_after: PROBE_AFTER,
            idle: Mutex::default(),
        }
    }

    /// The fast path's copy of a hyper client's TLS settings `base` (same trust store, same
    /// client identity, same session cache), offering ALPN `h2, http/1.1`.
    pub(crate) fn tls_config(base: &ClientConfig) -> Arc<ClientConfig> {
        let mut config = base.clone();
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// An idle connection for `key` that still looks open, or a new one.
    pub(crate) async fn get(&self, key: &PoolKey) -> Result<Connected, ConnectError> {
        match self.take_idle(key) {
            Taken::Found(conn) => Ok(Connected::Http1(conn)),
            Taken::Http2 => Ok(Connected::Http2),
            // Boxed: a connect's future (DNS, TCP, TLS) is large, and every connection task
            // would otherwise carry its room while idle.
            Taken::Nothing => Box::pin(self.connect(key)).await,
        }
    }

    /// A new connection for `key`, never an idle one (for the retry after an idle one turned
    /// out to be closed).
    pub(crate) async fn connect(&self, key: &PoolKey) -> Result<Connected, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        match tokio::time::timeout_at(deadline, self.connect_by(key, deadline)).await {
            Ok(Ok(Connected::Http2)) => {
                self.lock().http2.insert(key.clone());
                Ok(Connected::Http2)
            }
            Ok(connected) => connected,
            Err(elapsed) => Err(ConnectError::new(ConnectFailure::Timeout, elapsed)),
        }
    }

    /// Takes back a connection that finished an exchange cleanly and may carry another.
    pub(crate) fn put(&self, mut conn: H1Conn) {
        conn.reused = true;
        let mut closed = Vec::new();
        {
            let mut idle = self.lock();
            // Read under the lock, so each key's list stays in order of time.
            let now = Instant::now();
            let expired = |(_, since): &(H1Conn, Instant)| now - *since >= POOL_IDLE_TIMEOUT;
            if idle.next_sweep.is_none_or(|at| now >= at) {
                idle.next_sweep = Some(now + POOL_IDLE_TIMEOUT);
                idle.conns.retain(|_, conns| {
                    let n = conns.partition_point(expired);
                    closed.extend(conns.drain(..n));
                    !conns.is_empty()
                });
            }
            let conns = idle.conns.entry(conn.key.clone()).or_default();
            conns.push((conn, now));
            let n = conns
                .partition_point(expired)
                .max(conns.len().saturating_sub(MAX_IDLE_PER_KEY));
            closed.extend(conns.drain(..n));
        }
        drop(closed);
    }

    /// The newest idle connection of `key` that is young enough and looks open (the ones
    /// found expired or closed on the way are dropped), or that `key` speaks HTTP/2.
    fn take_idle(&self, key: &PoolKey) -> Taken {
        let mut closed = Vec::new();
        let found = {
            let mut idle = self.lock();
            let now = Instant::now();
            let Some(conns) = idle.conns.get_mut(key) else {
                return if idle.http2.contains(key) {
                    Taken::Http2
                } else {
                    Taken::Nothing
                };
            };
            let found = loop {
                let Some((mut conn, since)) = conns.pop() else {
                    break Taken::Nothing;
                };
                let age = now - since;
                if age >= POOL_IDLE_TIMEOUT {
                    // The newest has expired, so have all the older ones.
                    closed.push((conn, since));
                    closed.append(conns);
                    break Taken::Nothing;
                }
                if age < self.probe_after || conn.looks_open() {
                    break Taken::Found(conn);
                }
                closed.push((conn, since));
            };
            if conns.is_empty() {
                idle.conns.remove(key);
            }
            found
        };
        drop(closed);
        found
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // Every change to the map is a single push, pop, drain or removal, so a holder that
        // panicked cannot have left it inconsistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`H1Pool::connect`] without the timeout, trying addresses until `deadline`.
    async fn connect_by(
        &self,
        key: &PoolKey,
        deadline: Instant,
    ) -> Result<Connected, ConnectError> {
        let host = key.authority.host();
        // An IPv6 literal is bracketed in an authority, bare in DNS and in certificates.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = key
            .authority
            .port_u16()
            .unwrap_or(if key.tls { 443 } else { 80 });
        let tls = match key.tls {
            // The name is checked before connecting, as hyper-rustls does.
            true => Some((
                self.tls_for(key.pool),
                ServerName::try_from(host.to_owned())
                    .map_err(|e| ConnectError::new(ConnectFailure::Tls, e))?,
            )),
            false => None,
        };
        let tcp = tcp_connect(host, port, deadline).await?;
        let io = match tls {
            None => Io::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnectError::new(ConnectFailure::Tls, e))?;
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    return Ok(Connected::Http2);
                }
                Io::Tls(Box::new(tls))
            }
        };
        Ok(Connected::Http1(H1Conn {
            io,
            key: key.clone(),
            reused: false,
        }))
    }

    fn tls_for(&self, pool: usize) -> &TlsConnector {
        // An invariant of `Upstreams::new`, which numbers these settings like the hyper
        // clients; another index's settings (another client certificate) must never be used.
        #[allow(clippy::expect_used)]
        self.tls
            .get(pool)
            .expect("a TLS key's pool is in range because routes and TLS settings are numbered from one token map")
    }
}

/// A TCP connection to `host:port`, trying its addresses in order until `deadline`.
async fn tcp_connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let tcp = |e: io::Error| ConnectError::new(ConnectFailure::Tcp, e);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(tcp)?
        .collect();
    let mut last = tcp(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{host} has no address"),
    ));
    let count = addrs.len();
    for (tried, addr) in addrs.into_iter().enumerate() {
        let share = deadline.saturating_duration_since(Instant::now()) / (count - tried) as u32;
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                stream.set_nodelay(true).map_err(tcp)?;
                return Ok(stream);
            }
            Ok(Err(e)) => last = tcp(io::Error::new(e.kind(), format!("{addr}: {e}"))),
            Err(elapsed) => last = ConnectError::new(ConnectFailure::Timeout, elapsed),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    /// Long enough never to fire on a loaded machine when a test does not mean it to.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A private CA, and the fast path's TLS settings trusting it the way the proxy does
    /// (`proxy.ca_file`).
    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
        client: Arc<ClientConfig>,
    }

    impl Ca {
        fn new() -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "h1 pool test CA");
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ca.pem");
            std::fs::write(&path, cert.pem()).unwrap();
            let base = crate::tls::client_config(Some(&path), &[], None).unwrap();
            Self {
                cert,
                key,
                client: H1Pool::tls_config(&base),
            }
        }

        /// A server's TLS settings: a certificate for `names` (DNS names or IP addresses)
        /// signed by this CA, offering `alpn`.
        fn acceptor(&self, names: &[&str], alpn: &[&[u8]]) -> TlsAcceptor {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &self.cert, &self.key)
                .unwrap();
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
            TlsAcceptor::from(Arc::new(config))
        }
    }

    /// A pool whose indices 0 and 1 both trust `ca` (so only the key tells them apart).
    /// A pool that probes every idle connection it hands out (the probe is what most tests
    /// here are about).
    fn pool(ca: &Ca, connect_timeout: Duration) -> H1Pool {
        let mut pool = H1Pool::new(&[ca.client.clone(), ca.client.clone()], connect_timeout);
        pool.probe_after = Duration::ZERO;
        pool
    }

    impl Taken {
        fn is_none(&self) -> bool {
            matches!(self, Taken::Nothing)
        }

        fn expect(self, why: &str) -> H1Conn {
            match self {
                Taken::Found(conn) => conn,
                _ => panic!("{why}"),
            }
        }
    }

    fn key(pool: usize, tls: bool, authority: &str) -> PoolKey {
        PoolKey {
            pool,
            tls,
            authority: authority.parse().unwrap(),
        }
    }

    /// The server side of a connection.
    trait Peer: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Peer for T {}

    /// A server on `bind` that accepts connections (through `tls`, if any) and hands them over
    /// in the order they were made; a failed handshake is dropped.
    async fn server(
        bind: &str,
        tls: Option<TlsAcceptor>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Box<dyn Peer>>) {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let peer: Box<dyn Peer> = match &tls {
                    None => Box::new(tcp),
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => Box::new(tls),
                        Err(_) => continue,
                    },
                };
                if tx.send(peer).is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    async fn next_peer(peers: &mut mpsc::UnboundedReceiver<Box<dyn Peer>>) -> Box<dyn Peer> {
        tokio::time::timeout(PATIENCE, peers.recv())
            .await
            .expect("the server accepted a connection")
            .unwrap()
    }

    fn http1(connected: Result<Connected, ConnectError>) -> H1Conn {
        match connected {
            Ok(Connected::Http1(conn)) => conn,
            other => panic!("expected an HTTP/1 connection, got {other:?}"),
        }
    }

    fn failure(connected: Result<Connected, ConnectError>) -> ConnectFailure {
        match connected {
            Err(e) => e.kind,
            Ok(other) => panic!("expected a failure, got {other:?}"),
        }
    }

    /// A request's worth of bytes written vectored through `conn`, read by `peer` and echoed
    /// back: both directions work, on this very pair of sockets.
    async fn echo(conn: &mut H1Conn, peer: &mut Box<dyn Peer>) {
        let exchange = async {
            let parts = [IoSlice::new(b"GET / HTTP/1.1\r\n"), IoSlice::new(b"\r\n")];
            assert_eq!(conn.write_vectored(&parts).await.unwrap(), 18);
            conn.flush().await.unwrap();
            let mut got = [0u8; 18];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
            peer.write_all(b"HTTP/1.1 204 \r\n\r\n").await.unwrap();
            peer.flush().await.unwrap();
            let mut back = [0u8; 17];
            conn.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"HTTP/1.1 204 \r\n\r\n");
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .expect("the exchange went through this connection");
    }

    /// Waits (bounded) until the upstream's close or bytes reach `conn`.
    async fn until_not_open(conn: &mut H1Conn) {
        tokio::time::timeout(PATIENCE, async {
            while conn.looks_open() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection saw the upstream's close or bytes");
    }

    fn nodelay(conn: &H1Conn) -> bool {
        match &conn.io {
            Io::Plain(tcp) => tcp.nodelay().unwrap(),
            Io::Tls(tls) => tls.get_ref().0.nodelay().unwrap(),
        }
    }

    /// Whether `peer` reads EOF (the pool closed the connection).
    async fn closed(peer: &mut Box<dyn Peer>) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(PATIENCE, peer.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn plain_and_tls_connections_carry_bytes() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);

        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, false, &addr.to_string());
        let mut conn = http1(pool.get(&k).await);
        assert!(!conn.reused());
        assert_eq!(conn.key, k);
        assert!(conn.is_write_vectored());
        assert!(nodelay(&conn));
        echo(&mut conn, &mut next_peer(&mut peers).await).await;

        // By name (resolved; `localhost` may list ::1 first, which refuses: the next address
        // is tried) and by IP literal, each verified against the certificate.
        let acceptor = ca.acceptor(&["localhost", "127.0.0.1"], &[b"http/1.1"]);
        let (addr, mut peers) = server("127.0.0.1:0", Some(acceptor)).await;
        for authority in [format!("localhost:{}", addr.port()), addr.to_string()] {
            let k = key(1, true, &authority);
            let mut conn = http1(pool.get(&k).await);
            assert!(!conn.reused());
            assert_eq!(conn.key, k);
            assert!(matches!(conn.io, Io::Tls(_)));
            assert!(nodelay(&conn));
            echo(&mut conn, &mut next_peer(&mut peers).await).await;
        }
    }

    #[tokio::test]
    async fn an_ipv6_literal_is_connected_and_verified_without_brackets() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let Ok(probe) = TcpListener::bind("[::1]:0").await else {
            // No IPv6 loopback here: nothing to connect to.
            return;
        };
        drop(probe);
        let (addr, mut peers) = server("[::1]:0", Some(ca.acceptor(&["::1"], &[]))).await;
        let mut conn = http1(pool.get(&key(0, true, &addr.to_string())).await);
        echo(&mut conn, &mut next_peer(&mut peers).await).await;
    }

    #[tokio::test]
    async fn an_upstream_choosing_h2_is_reported_and_others_are_http1() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (h2, _peers) = server("127.0.0.1:0", Some(ca.acceptor(&["localhost"], &[b"h2"]))).await;
        assert!(matches!(
            pool.get(&key(0, true, &format!("localhost:{}", h2.port())))
                .await,
            Ok(Connected::Http2)
        ));
        for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
            let (addr, _peers) =
                server("127.0.0.1:0", Some(ca.acceptor(&["localhost"], alpn))).await;
            http1(
                pool.get(&key(0, true, &format!("localhost:{}", addr.port())))
                    .await,
            );
        }
    }

    #[tokio::test]
    async fn certificates_are_verified_against_the_authority() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        // Signed by a CA the pool does not trust.
        let stranger = Ca::new();
        let (addr, _peers) =
            server("127.0.0.1:0", Some(stranger.acceptor(&["localhost"], &[]))).await;
        let k = key(0, true, &format!("localhost:{}", addr.port()));
        assert_eq!(failure(pool.get(&k).await), ConnectFailure::Tls);
        // Trusted, but for another name: the IP literal is not in it.
        let (addr, _peers) = server("127.0.0.1:0", Some(ca.acceptor(&["localhost"], &[]))).await;
        assert_eq!(
            failure(pool.get(&key(0, true, &addr.to_string())).await),
            ConnectFailure::Tls
        );
        // A plain server answering a TLS handshake with HTTP.
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, true, &addr.to_string());
        let (connected, ()) = tokio::join!(pool.get(&k), async {
            let mut peer = next_peer(&mut peers).await;
            let _ = peer.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        assert_eq!(failure(connected), ConnectFailure::Tls);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_tcp_failure() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        for tls in [false, true] {
            let e = pool.get(&key(0, tls, &addr.to_string())).await.unwrap_err();
            assert_eq!(e.kind, ConnectFailure::Tcp);
            assert!(e.to_string().contains(&addr.to_string()), "{e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_handshake_times_out() {
        let ca = Ca::new();
        let timeout = Duration::from_secs(30);
        let pool = pool(&ca, timeout);
        // The kernel completes TCP handshakes into the backlog; nobody ever answers TLS.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let start = Instant::now();
        let e = pool
            .get(&key(0, true, &addr.to_string()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ConnectFailure::Timeout);
        assert!(start.elapsed() >= timeout);
        drop(listener);
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_only_for_its_own_key() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, false, &addr.to_string());
        let mut conn = http1(pool.get(&k).await);
        let mut first = next_peer(&mut peers).await;
        echo(&mut conn, &mut first).await;
        pool.put(conn);

        // Another credential, another spelling of the origin, TLS: none takes it.
        for other in [
            key(1, false, &addr.to_string()),
            key(0, false, &format!("localhost:{}", addr.port())),
        ] {
            let mut conn = http1(pool.get(&other).await);
            assert!(!conn.reused());
            echo(&mut conn, &mut next_peer(&mut peers).await).await;
        }
        assert!(pool.take_idle(&key(0, true, &addr.to_string())).is_none());

        let mut again = http1(pool.get(&k).await);
        assert!(again.reused());
        assert_eq!(again.key, k);
        // The very connection: the first peer answers on it.
        echo(&mut again, &mut first).await;
        assert!(pool.take_idle(&k).is_none());
        assert!(peers.try_recv().is_err(), "no connection was made for it");
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_or_wrote_to_is_discarded() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let plain = server("127.0.0.1:0", None).await;
        let tls = server("127.0.0.1:0", Some(ca.acceptor(&["127.0.0.1"], &[]))).await;
        for ((addr, mut peers), tls) in [(plain, false), (tls, true)] {
            let k = key(0, tls, &addr.to_string());
            // Closed (TLS: with close_notify); an unsolicited response (a desync, or an
            // upstream's late answer); more than the response in the same write (TLS: read
            // into rustls' buffer with the response, so the socket itself has nothing left):
            // none is handed out again.
            for upstream in ["closes", "writes later", "sent more"] {
                let mut conn = http1(pool.get(&k).await);
                let mut peer = next_peer(&mut peers).await;
                match upstream {
                    "closes" => {
                        echo(&mut conn, &mut peer).await;
                        peer.shutdown().await.unwrap();
                        drop(peer);
                        until_not_open(&mut conn).await;
                    }
                    "writes later" => {
                        echo(&mut conn, &mut peer).await;
                        peer.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                        peer.flush().await.unwrap();
                        until_not_open(&mut conn).await;
                    }
                    _ => {
                        peer.write_all(b"HTTP/1.1 204 \r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
                            .await
                            .unwrap();
                        peer.flush().await.unwrap();
                        let mut response = [0u8; 17];
                        tokio::time::timeout(PATIENCE, conn.read_exact(&mut response))
                            .await
                            .unwrap()
                            .unwrap();
                    }
                }
                pool.put(conn);
                let fresh = http1(pool.get(&k).await);
                assert!(!fresh.reused(), "tls {tls}, the upstream {upstream}");
                next_peer(&mut peers).await;
                assert!(pool.take_idle(&k).is_none());
            }
        }
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, false, &addr.to_string());
        let mut conn = http1(pool.get(&k).await);
        let mut peer = next_peer(&mut peers).await;
        echo(&mut conn, &mut peer).await;
        pool.put(conn);

        tokio::time::pause();
        tokio::time::advance(POOL_IDLE_TIMEOUT - Duration::from_millis(1)).await;
        let conn = pool.take_idle(&k).expect("still young enough");
        // Given back, it is idle from now.
        pool.put(conn);
        tokio::time::advance(POOL_IDLE_TIMEOUT).await;
        assert!(pool.take_idle(&k).is_none());
        assert!(pool.lock().conns.is_empty());
        tokio::time::resume();
        assert!(closed(&mut peer).await);
    }

    #[tokio::test]
    async fn expired_connections_of_keys_nobody_asks_for_are_swept() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let (a, b) = (
            key(0, false, &addr.to_string()),
            key(1, false, &addr.to_string()),
        );
        let conn_a = http1(pool.get(&a).await);
        let mut peer_a = next_peer(&mut peers).await;
        let conn_b = http1(pool.get(&b).await);
        pool.put(conn_a);

        tokio::time::pause();
        tokio::time::advance(POOL_IDLE_TIMEOUT).await;
        pool.put(conn_b);
        assert_eq!(pool.lock().conns.keys().collect::<Vec<_>>(), [&b]);
        tokio::time::resume();
        assert!(closed(&mut peer_a).await);
    }

    #[tokio::test]
    async fn idle_connections_per_key_are_capped_oldest_first() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, false, &addr.to_string());
        let mut conns = Vec::new();
        let mut server_sides = Vec::new();
        for _ in 0..=MAX_IDLE_PER_KEY {
            conns.push(http1(pool.get(&k).await));
            server_sides.push(next_peer(&mut peers).await);
        }
        for conn in conns {
            pool.put(conn);
        }
        assert_eq!(pool.lock().conns[&k].len(), MAX_IDLE_PER_KEY);
        assert!(closed(&mut server_sides[0]).await, "the oldest was closed");
        // The newest comes out first.
        let mut newest = http1(pool.get(&k).await);
        assert!(newest.reused());
        echo(&mut newest, server_sides.last_mut().unwrap()).await;
        assert_eq!(pool.lock().conns[&k].len(), MAX_IDLE_PER_KEY - 1);
    }

    #[tokio::test]
    async fn a_connection_given_back_just_now_is_handed_out_without_a_probe() {
        let ca = Ca::new();
        let mut pool = pool(&ca, PATIENCE);
        pool.probe_after = PROBE_AFTER;
        let (addr, mut peers) = server("127.0.0.1:0", None).await;
        let k = key(0, false, &addr.to_string());
        let conn = http1(pool.get(&k).await);
        let peer = next_peer(&mut peers).await;
        // Closed by the upstream, but given back less than PROBE_AFTER ago: no system call
        // looks at it (the request's own retry covers this race).
        drop(peer);
        pool.put(conn);
        assert!(http1(pool.get(&k).await).reused());
    }

    #[tokio::test]
    async fn an_origin_that_chose_h2_is_not_handshaken_again() {
        let ca = Ca::new();
        let pool = pool(&ca, PATIENCE);
        let (h2, mut peers) =
            server("127.0.0.1:0", Some(ca.acceptor(&["localhost"], &[b"h2"]))).await;
        let k = key(0, true, &format!("localhost:{}", h2.port()));
        assert!(matches!(pool.get(&k).await, Ok(Connected::Http2)));
        next_peer(&mut peers).await;
        assert!(matches!(pool.get(&k).await, Ok(Connected::Http2)));
        assert!(matches!(pool.get(&k).await, Ok(Connected::Http2)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(peers.try_recv().is_err(), "a second handshake was made");
        // Another pool index of the same origin learns for itself.
        assert!(matches!(
            pool.get(&key(1, true, &format!("localhost:{}", h2.port())))
                .await,
            Ok(Connected::Http2)
        ));
    }
}
