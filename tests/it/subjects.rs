//! Per-subject tokens (issue #12) through the whole server: the real dev issuer, a real TLS
//! upstream, `Server::start` in-process. Subjects are enrolled by writing records through the
//! public store and key-ring API, with refresh tokens the dev issuer handed out for codes (the
//! enrolment API is tested on its own).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bearer_proxy::config::Config;
use bearer_proxy::issuer::{IssuerControl, IssuerOptions};
use bearer_proxy::secret::Secret;
use bearer_proxy::subject::{Record, SubjectId, SubjectState, SubjectStore};
use bearer_proxy::{Server, Signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{
    LOAD_PATIENCE, PATIENCE, RawResponse, Recorded, Reply, TestCa, Upstream, admin_get, get,
    issuer, metric, never_log, raw, scrape,
};

/// The per-subject token entry and the host its route serves.
const TOKEN: &str = "fdx";
const FDX_HOST: &str = "ob.flinksapp.com";
/// A named-token route's host (client credentials from the same issuer).
const PARTNER_HOST: &str = "partner.flinksapp.com";
const HEADER: &str = "x-bearer-proxy-subject";

/// A state directory, a key file, an issuer, a TLS upstream and a plain one for unrouted
/// requests: what a server of these tests runs against, kept across restarts.
struct World {
    dir: tempfile::TempDir,
    key: PathBuf,
    issuer_url: String,
    control: IssuerControl,
    ca: TestCa,
    upstream: Upstream,
    plain: Upstream,
    /// Route `fdx` to the plain upstream (loopback `http`, which the configuration allows):
    /// for the load tests, whose subject is the token engine, not hundreds of TLS handshakes.
    fdx_plain: bool,
    /// `LOAD_PATIENCE` for the token endpoint (instead of 2 s), the requests waiting for a
    /// token (instead of the default `token_wait`, 5 s), upstream connects (instead of 20 s)
    /// and upstream answers (instead of the default `response_timeout`, 60 s): on a loaded
    /// two-core machine a thousand requests take longer than those to arrive and be sent on,
    /// and the load tests are about how many token requests they cause, not how fast they are.
    load_patience: bool,
}

/// What the upstream answers for a request: 401 with Flinks' consent error for paths saying
/// `consent-gone`, a plain 401 for a path saying `reject-once` when it is the first request
/// the upstream sees, 200 otherwise.
fn answer(r: &Recorded, n: usize) -> Reply {
    if r.target.contains("reject-once") && n == 0 {
        Reply::status(401).body(r#"{"code": 401, "message": "token expired"}"#)
    } else if r.target.contains("consent-gone") {
        Reply::status(401).body(r#"{"code": 602, "message": "consent revoked"}"#)
    } else {
        Reply::ok("{}")
    }
}

impl World {
    /// `codes` are the authorization codes the issuer accepts.
    async fn new(codes: &[String]) -> Self {
        for c in codes {
            never_log(c);
        }
        let (issuer_url, control) = issuer(IssuerOptions {
            codes: codes.to_vec(),
            ..IssuerOptions::default()
        })
        .await;
        // Memory-backed where there is one: ten thousand durable (fsynced) writes and their
        // removal cost the disk a minute, and what is tested is what the server does with
        // the records, not the disk.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let key = write_key(dir.path(), "key-1", [7u8; 32]);
        let ca = TestCa::new();
        let upstream =
            Upstream::tls(ca.server_config(&["localhost"], &[b"http/1.1"]), answer).await;
        let plain = Upstream::plain(|_, _| Reply::ok("plain")).await;
        Self {
            dir,
            key,
            issuer_url,
            control,
            ca,
            upstream,
            plain,
            fdx_plain: false,
            load_patience: false,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The configuration with `key` as the encryption key file.
    fn config_with_key(&self, key: &Path) -> Config {
        never_log("demo-secret");
        let patience = format!("{}s", LOAD_PATIENCE.as_secs());
        let text = format!(
            r#"
            [tokens.{TOKEN}]
            token_url = "{issuer}"
            grant_type = "authorization_code"
            per_subject = true
            client_id = "demo-client"
            client_secret = "demo-secret"
            timeout = "{token_timeout}"

            [tokens.partner]
            token_url = "{issuer}"
            grant_type = "client_credentials"
            client_id = "demo-client"
            client_secret = "demo-secret"
            backoff_initial = "50ms"
            backoff_max = "200ms"
            timeout = "2s"

            [subjects]
            listen = "127.0.0.1:0"
            state_dir = "{state}"
            encryption_key_file = "{key}"

            [proxy]
            listen = "127.0.0.1:0"
            drain_delay = "0s"
            ca_file = "{ca}"
            unmatched = "forward"
            # A thousand requests released at once by one token open a thousand upstream
            # connections; some wait for the kernel's SYN retry when the backlog overflows.
            connect_timeout = "{connect_timeout}"
            {load_patience}

            [admin]
            listen = "127.0.0.1:0"

            [[routes]]
            name = "fdx"
            host = "{FDX_HOST}"
            token = "{TOKEN}"
            upstream = "{fdx_upstream}"

            [[routes]]
            name = "partner"
            host = "{PARTNER_HOST}"
            token = "partner"
            upstream = "{upstream}"
            "#,
            issuer = self.issuer_url,
            state = self.state_dir().display(),
            key = key.display(),
            ca = self.ca.pem_file().display(),
            token_timeout = if self.load_patience { &patience } else { "2s" },
            connect_timeout = if self.load_patience { &patience } else { "20s" },
            load_patience = if self.load_patience {
                format!("token_wait = \"{patience}\"\nresponse_timeout = \"{patience}\"")
            } else {
                String::new()
            },
            upstream = self.upstream.url(true),
            fdx_upstream = if self.fdx_plain {
                self.plain.url(false)
            } else {
                self.upstream.url(true)
            },
        );
        bearer_proxy::config::from_str(&text, config::FileFormat::Toml, Some(Default::default()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn config(&self) -> Config {
        self.config_with_key(&self.key)
    }

    /// Exchanges `code` at the dev issuer, as the subjects API would: the refresh token.
    async fn exchange(&self, code: &str) -> String {
        let rest = self.issuer_url.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let addr: SocketAddr = authority.parse().unwrap();
        let body = serde_json::json!({
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "demo-client",
            "client_secret": "demo-secret",
        })
        .to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let resp = raw(addr, request.as_bytes()).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let json = resp.json();
        never_log(json["access_token"].as_str().unwrap());
        let rt = json["refresh_token"].as_str().unwrap().to_owned();
        never_log(&rt);
        rt
    }

    /// Writes an active record for `subject` holding `refresh_token`, sealed with the
    /// configured key, through the public store API.
    async fn enrol(&self, subjects: &[(String, String)]) {
        let config = self.config();
        let sc = config.subjects.as_ref().unwrap();
        let ring = Arc::new(sc.key_ring().await.unwrap());
        let store: Arc<dyn SubjectStore> = Arc::new(sc.open_store().await.unwrap());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let writes = subjects.iter().map(|(subject, rt)| {
            let (ring, store) = (ring.clone(), store.clone());
            let (subject, rt) = (SubjectId::parse(subject).unwrap(), Secret::new(rt.clone()));
            tokio::spawn(async move {
                let sealed = ring.seal(TOKEN, &subject, &rt).unwrap();
                store
                    .put(TOKEN, &Record::enrolled(subject, sealed, now), None)
                    .await
                    .unwrap();
            })
        });
        for w in futures_util::future::join_all(writes).await {
            w.unwrap();
        }
    }

    /// The stored record of `subject`.
    async fn record(&self, subject: &str) -> Record {
        let config = self.config();
        let store = config.subjects.unwrap().open_store().await.unwrap();
        store
            .get(TOKEN, &SubjectId::parse(subject).unwrap())
            .await
            .unwrap()
            .unwrap()
    }

    /// Refresh-grant requests the issuer received.
    fn refreshes(&self) -> u64 {
        self.control.request_count_for("refresh_token")
    }
}

/// Writes a key file of `bytes` (base64, as `openssl rand -base64 32` prints).
fn write_key(dir: &Path, name: &str, bytes: [u8; 32]) -> PathBuf {
    let path = dir.join(name);
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    never_log(&text);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path
}

/// A running server and how to stop it.
struct Running {
    proxy: SocketAddr,
    admin: SocketAddr,
    signals: mpsc::Sender<Signal>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn start(config: Config) -> Self {
        let server = Server::start(config).await.unwrap();
        let (signals, rx) = mpsc::channel(4);
        Self {
            proxy: server.proxy_addr(),
            admin: server.admin_addr(),
            signals,
            task: Some(tokio::spawn(server.run(rx))),
        }
    }

    /// `GET http://<host><path>` through the proxy with extra header lines.
    async fn get(&self, host: &str, path: &str, headers: &[&str]) -> RawResponse {
        get(self.proxy, &format!("http://{host}{path}"), headers).await
    }

    /// A request on the per-subject route for `subject`.
    async fn as_subject(&self, subject: &str, path: &str) -> RawResponse {
        self.get(FDX_HOST, path, &[&format!("{HEADER}: {subject}")])
            .await
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut m = metric(name);
        for (k, v) in labels {
            m = m.label(k, v);
        }
        m.value_in(&scrape(self.admin).await).unwrap_or(0.0)
    }

    async fn stop(mut self) {
        self.signals.send(Signal::Terminate).await.unwrap();
        tokio::time::timeout(PATIENCE, self.task.take().unwrap())
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// `n` subjects `c0…` with codes, exchanged for refresh tokens at the issuer.
async fn world_with(n: usize) -> (World, Vec<(String, String)>) {
    let codes: Vec<String> = (0..n).map(|i| format!("code-{i}")).collect();
    let world = World::new(&codes).await;
    let mut subjects = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        subjects.push((format!("c{i}"), world.exchange(code).await));
    }
    world.enrol(&subjects).await;
    (world, subjects)
}

fn bearer(r: &Recorded) -> String {
    let all = r.all("authorization");
    assert_eq!(all.len(), 1, "exactly one Authorization: {all:?}");
    all.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_get_their_own_token_under_concurrent_load_and_never_see_the_header() {
    let (mut world, _) = world_with(3).await;
    world.fdx_plain = true;
    let server = Running::start(world.config()).await;
    assert_eq!(
        world.refreshes(),
        0,
        "no token request before a request needs one"
    );
    let requests = (0..300).map(|i| {
        let proxy = server.proxy;
        tokio::spawn(async move {
            let who = format!("c{}", i % 3);
            let url = format!("http://{FDX_HOST}/api/fdx/5/accounts?who={who}&i={i}");
            let resp = get(proxy, &url, &[&format!("{HEADER}: {who}")]).await;
            assert_eq!(resp.status, 200, "{}", resp.text());
        })
    });
    for r in futures_util::future::join_all(requests).await {
        r.unwrap();
    }
    let mut token_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut subjects_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    for r in world.plain.requests() {
        assert!(
            r.all(HEADER).is_empty(),
            "subject header forwarded to {}",
            r.target
        );
        let who = r.target.split("who=").nth(1).unwrap()[..2].to_owned();
        let token = bearer(&r);
        token_of
            .entry(who.clone())
            .or_default()
            .insert(token.clone());
        subjects_of.entry(token).or_default().insert(who);
    }
    assert_eq!(token_of.len(), 3);
    for (who, tokens) in &token_of {
        assert_eq!(tokens.len(), 1, "{who} got several tokens");
    }
    for (_, subjects) in subjects_of {
        assert_eq!(
            subjects.len(),
            1,
            "one token served two subjects: {subjects:?}"
        );
    }
    // One refresh per subject, each with that subject's own refresh token.
    assert_eq!(world.refreshes(), 3);
    let sent: BTreeSet<String> = world
        .control
        .requests()
        .iter()
        .filter_map(|r| r.refresh_token.as_ref().map(|t| t.expose().to_owned()))
        .collect();
    assert_eq!(sent.len(), 3);
    // last_use is noted off the request path.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while world.record("c0").await.last_use.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "last_use never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server
            .metric(
                "bearer_proxy_subject_refreshes_total",
                &[("token", TOKEN), ("result", "ok")]
            )
            .await,
        3.0
    );
    server.stop().await;
}

#[tokio::test]
async fn refusals_name_the_problem_and_the_header_never_leaves_on_any_route() {
    let (world, _) = world_with(1).await;
    let server = Running::start(world.config()).await;
    let cases: [(&[&str], u16, &str, &str); 5] = [
        (&[], 400, "subject_required", "subject_required"),
        (
            &["x-bearer-proxy-subject: a/b"],
            400,
            "invalid_subject",
            "invalid_subject",
        ),
        (
            &["x-bearer-proxy-subject: c0", "X-Bearer-Proxy-Subject: c1"],
            400,
            "invalid_subject",
            "invalid_subject",
        ),
        (
            &["x-bearer-proxy-subject: "],
            400,
            "invalid_subject",
            "invalid_subject",
        ),
        (
            &["x-bearer-proxy-subject: nobody"],
            403,
            "unknown_subject",
            "unknown_subject",
        ),
    ];
    for (headers, status, code, _) in &cases {
        let resp = server.get(FDX_HOST, "/api/fdx/5/accounts", headers).await;
        assert_eq!(resp.status, *status, "{headers:?}: {}", resp.text());
        assert_eq!(resp.proxy_error().as_deref(), Some(*code), "{headers:?}");
        assert_eq!(resp.json()["error"], *code);
    }
    for (reason, n) in [
        ("subject_required", 1.0),
        ("invalid_subject", 3.0),
        ("unknown_subject", 1.0),
    ] {
        let labels = [("token", TOKEN), ("reason", reason)];
        assert_eq!(
            server
                .metric("bearer_proxy_subject_rejected_requests_total", &labels)
                .await,
            n,
            "{reason}"
        );
    }
    // Nothing reached the upstream, and no token was asked for.
    assert!(world.upstream.requests().is_empty());
    assert_eq!(world.refreshes(), 0);
    // A named-token route and an unrouted host: the header is removed, nothing else changes.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let resp = server
            .get(
                PARTNER_HOST,
                "/api/v1/providers",
                &["x-bearer-proxy-subject: c0"],
            )
            .await;
        if resp.status == 200 {
            break;
        }
        // The partner token's first refresh may still be on its way.
        assert_eq!(resp.proxy_error().as_deref(), Some("token_unavailable"));
        assert!(tokio::time::Instant::now() < deadline);
    }
    let partner = world.upstream.requests().pop().unwrap();
    assert!(
        partner.all(HEADER).is_empty(),
        "subject header on a named route"
    );
    bearer(&partner);
    let unrouted = get(
        server.proxy,
        &format!("{}/x", world.plain.url(false)),
        &["x-bearer-proxy-subject: c0", "x-other: kept"],
    )
    .await;
    assert_eq!(unrouted.status, 200);
    let seen = world.plain.requests().pop().unwrap();
    assert!(
        seen.all(HEADER).is_empty(),
        "subject header on an unrouted request"
    );
    assert_eq!(seen.one("x-other").as_deref(), Some("kept"));
    server.stop().await;
}

#[tokio::test]
async fn invalid_grant_makes_the_subject_needs_reauth_with_no_further_token_requests() {
    let (world, mut subjects) = world_with(1).await;
    // A refresh token the issuer no longer knows (a newer login replaced it).
    never_log("gone-refresh-token-1");
    subjects.push(("c-gone".into(), "gone-refresh-token-1".into()));
    world.enrol(&subjects[1..]).await;
    let server = Running::start(world.config()).await;
    let active = [("token", TOKEN), ("state", "active")];
    let reauth = [("token", TOKEN), ("state", "needs_reauth")];
    assert_eq!(server.metric("bearer_proxy_subjects", &active).await, 2.0);
    let resp = server.as_subject("c-gone", "/api/fdx/5/accounts").await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(resp.proxy_error().as_deref(), Some("reauth_required"));
    assert_eq!(world.refreshes(), 1);
    for _ in 0..20 {
        let resp = server.as_subject("c-gone", "/api/fdx/5/accounts").await;
        assert_eq!(resp.proxy_error().as_deref(), Some("reauth_required"));
    }
    assert_eq!(
        world.refreshes(),
        1,
        "a subject in needs_reauth caused token requests"
    );
    let record = world.record("c-gone").await;
    assert_eq!(record.state, SubjectState::NeedsReauth);
    assert_eq!(record.last_error.as_deref(), Some("invalid_grant"));
    assert_eq!(server.metric("bearer_proxy_subjects", &active).await, 1.0);
    assert_eq!(server.metric("bearer_proxy_subjects", &reauth).await, 1.0);
    let status = admin_get(server.admin, "/status").await.json();
    assert_eq!(status["subjects"][TOKEN]["subjects"]["needs_reauth"], 1);
    // Readiness does not depend on subjects.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while admin_get(server.admin, "/readyz").await.status != 200 {
        assert!(tokio::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other subject is unaffected.
    assert_eq!(
        server.as_subject("c0", "/api/fdx/5/accounts").await.status,
        200
    );
    assert!(
        world
            .upstream
            .requests()
            .iter()
            .all(|r| !r.target.contains("gone"))
    );
    server.stop().await;
}

#[tokio::test]
async fn consent_error_602_passes_the_answer_on_and_makes_the_subject_needs_reauth() {
    let (world, _) = world_with(2).await;
    let server = Running::start(world.config()).await;
    let resp = server.as_subject("c1", "/api/fdx/5/consent-gone").await;
    // The upstream's own answer goes back to the app.
    assert_eq!(resp.status, 401);
    assert_eq!(resp.proxy_error(), None);
    assert!(resp.text().contains("602"), "{}", resp.text());
    let refreshes = world.refreshes();
    assert_eq!(refreshes, 1, "no refresh for a 602");
    let resp = server.as_subject("c1", "/api/fdx/5/accounts").await;
    assert_eq!(resp.proxy_error().as_deref(), Some("reauth_required"));
    assert_eq!(world.upstream.requests().len(), 1);
    assert_eq!(world.record("c1").await.state, SubjectState::NeedsReauth);
    assert_eq!(world.refreshes(), refreshes);
    assert_eq!(
        server.as_subject("c0", "/api/fdx/5/accounts").await.status,
        200
    );
    server.stop().await;
}

/// The status of `GET http://<fdx>/…?i=<i>` as subject `c0`, with `LOAD_PATIENCE`: a
/// thousand connections through the proxy and on to the upstream at once take a while on a
/// loaded two-core machine, and that wait is not what the test is about.
async fn slow_get_status(proxy: SocketAddr, i: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let request = format!(
            "GET http://{FDX_HOST}/api/fdx/5/accounts?i={i} HTTP/1.1\r\nHost: {FDX_HOST}\r\n\
             {HEADER}: c0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        if status != 200 {
            eprintln!("request {i}: {}", text.lines().last().unwrap_or(""));
        }
        status
    };
    tokio::time::timeout(LOAD_PATIENCE, exchange)
        .await
        .expect("no answer within LOAD_PATIENCE")
}

#[tokio::test]
async fn an_upstream_401_refreshes_that_subject_and_replays_with_its_new_token() {
    let (world, _) = world_with(2).await;
    let server = Running::start(world.config()).await;
    let resp = server.as_subject("c0", "/api/fdx/5/reject-once").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = world.upstream.requests();
    assert_eq!(seen.len(), 2);
    let (first, second) = (bearer(&seen[0]), bearer(&seen[1]));
    assert_ne!(first, second, "replayed with the rejected token");
    assert_eq!(world.refreshes(), 2);
    assert_eq!(
        server
            .metric(
                "bearer_proxy_replays_total",
                &[("route", "fdx"), ("result", "ok")]
            )
            .await,
        1.0
    );
    // The other subject's first request gets its own token, not c0's new one.
    assert_eq!(
        server.as_subject("c1", "/api/fdx/5/accounts").await.status,
        200
    );
    let third = bearer(&world.upstream.requests()[2]);
    assert!(third != first && third != second);
    assert_eq!(world.record("c0").await.state, SubjectState::Active);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_for_one_subject_cause_one_token_request() {
    let (mut world, _) = world_with(1).await;
    world.fdx_plain = true;
    world.load_patience = true;
    // Slow enough that every request arrives while the refresh is out.
    world.control.set_delay(Duration::from_millis(500));
    let server = Running::start(world.config()).await;
    let requests = (0..1000).map(|i| {
        let proxy = server.proxy;
        tokio::spawn(async move { slow_get_status(proxy, i).await })
    });
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for r in futures_util::future::join_all(requests).await {
        *statuses.entry(r.unwrap()).or_default() += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(200, 1000)]));
    assert_eq!(world.refreshes(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_subjects_start_without_a_token_request_and_survive_a_restart() {
    let (world, mut subjects) = world_with(1).await;
    let extra: Vec<(String, String)> = (1..10_000)
        .map(|i| (format!("bulk-{i}"), format!("bulk-refresh-token-{i}")))
        .collect();
    world.enrol(&extra).await;
    subjects.extend(extra);
    let server = Running::start(world.config()).await;
    let active = [("token", TOKEN), ("state", "active")];
    assert_eq!(
        server.metric("bearer_proxy_subjects", &active).await,
        10_000.0
    );
    let status = admin_get(server.admin, "/status").await.json();
    assert_eq!(status["subjects"][TOKEN]["subjects"]["active"], 10_000);
    assert_eq!(status["subjects"][TOKEN]["cached_tokens"], 0);
    assert_eq!(world.refreshes(), 0);
    assert_eq!(
        server.as_subject("c0", "/api/fdx/5/accounts").await.status,
        200
    );
    server.stop().await;
    // Restart over the same state directory: every subject is still there.
    let server = Running::start(world.config()).await;
    assert_eq!(
        server.metric("bearer_proxy_subjects", &active).await,
        10_000.0
    );
    assert_eq!(
        server.as_subject("c0", "/api/fdx/5/accounts").await.status,
        200
    );
    assert_eq!(world.refreshes(), 2);
    server.stop().await;
    // No refresh token is readable in the state directory.
    let tokens: BTreeMap<&str, &str> = subjects
        .iter()
        .filter(|(s, _)| s == "c0" || s.ends_with("-77"))
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_no_plaintext(&world.state_dir(), &tokens);
}

/// Fails if any file under `dir` holds one of `tokens` (or its base64), or the word
/// "refresh_token" next to a readable value.
fn assert_no_plaintext(dir: &Path, tokens: &BTreeMap<&str, &str>) {
    let mut files = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        seen += 1;
        let bytes = std::fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for (subject, token) in tokens {
            let b64 = base64::engine::general_purpose::STANDARD.encode(token);
            assert!(
                !text.contains(token) && !text.contains(&b64),
                "{subject}'s refresh token in plaintext in {}",
                p.display()
            );
        }
    }
    assert!(seen > 1000, "only {seen} files under {}", dir.display());
}

#[tokio::test]
async fn a_wrong_key_refuses_to_start_naming_the_key_id() {
    let (world, _) = world_with(1).await;
    let right = world.config().subjects.unwrap().key_ring().await.unwrap();
    let wrong_key = write_key(world.dir.path(), "key-2", [9u8; 32]);
    let wrong = world.config_with_key(&wrong_key);
    let e = Server::start(wrong).await.unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains(right.newest_id()), "{text}");
    assert!(text.contains("1 subject"), "{text}");
}
