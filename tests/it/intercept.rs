//! HTTPS interception (`[proxy.intercept]`, issue #15) over real sockets: an operator CA made
//! by `bearer-proxy ca init`, clients that trust it through the bundle `ca bundle` prints
//! (curl, Python requests, Node, Java with a keytool truststore and with the PKCS#12 one
//! `ca bundle --pkcs12` writes, and a rustls client for what the others cannot show), a real
//! TLS upstream behind the route. Covers the token arriving once, keep-alive inside the
//! tunnel, large bodies both ways, 401 replay, requests for another host, SNI mismatch, an app
//! that does not trust the CA, and unrouted `CONNECT`s staying blind tunnels.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::*;

const HOST: &str = "api.intercept.test";
const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");

/// The operator CA, made by the binary as an operator would.
struct OperatorCa {
    dir: tempfile::TempDir,
}

impl OperatorCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["ca", "init", "--out"])
            .arg(dir.path().join("ca"))
            .args([
                "--name-constraint",
                HOST,
                "--name-constraint",
                "*.wild.test",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The leak guard: no line of the CA key may reach a log.
        let key = std::fs::read_to_string(dir.path().join("ca/ca.key")).unwrap();
        for line in key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        {
            never_log(line);
        }
        Self { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("ca/ca.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("ca/ca.key")
    }

    /// `bearer-proxy ca bundle --ca ca.crt > bundle.pem`.
    fn bundle(&self) -> PathBuf {
        let out = Command::new(BIN)
            .args(["ca", "bundle", "--ca"])
            .arg(self.cert())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let path = self.dir.path().join("bundle.pem");
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// The `[proxy.intercept]` table.
    fn toml(&self) -> String {
        format!(
            "[proxy.intercept]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n",
            self.cert().display(),
            self.key().display()
        )
    }
}

/// A proxy intercepting `HOST` (and `*.wild.test`) in front of a TLS upstream.
async fn intercepting(
    ca: &OperatorCa,
    handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
) -> ProxyFixture {
    let f = fixture(HOST)
        .also_route("wild", "*.wild.test")
        .proxy(&ca.toml())
        .in_process(handler)
        .await;
    f.proxy.publish("tok-1");
    f
}

/// A TCP connection through which `CONNECT authority` was answered 200.
async fn tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut s = connect(proxy).await;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// TLS over `s` for `name`, trusting only the certificates in `roots`.
async fn tls(s: TcpStream, roots: &Path, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    let pem = std::fs::read(roots).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        store.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(
        PATIENCE,
        TlsConnector::from(Arc::new(config)).connect(name, s),
    )
    .await
    .unwrap()
}

/// An HTTP/1.1 client over an intercepted connection.
async fn http(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn send(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (u16, http::HeaderMap, Bytes) {
    let resp = tokio::time::timeout(PATIENCE, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path)
        .header("host", host)
        .header("authorization", "Bearer the-apps-own")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Waits until `series` reaches `want` in the in-process proxy's metrics.
async fn metric_reaches(f: &ProxyFixture, series: Metric, want: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if f.proxy.metric(series.clone()) == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series:?} never reached {want}: {:?}",
            f.proxy.metric(series.clone())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a client program to completion within PATIENCE.
async fn run(cmd: &mut tokio::process::Command) -> std::process::Output {
    tokio::time::timeout(PATIENCE, cmd.kill_on_drop(true).output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn curl_with_the_printed_bundle_gets_the_token_exactly_once() {
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("hello over https")).await;
    let bundle = ca.bundle();
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        text.matches("BEGIN CERTIFICATE").count() > 1,
        "the system roots come with the CA"
    );
    // As the README prints it: CURL_CA_BUNDLE (curl's own; Debian's curl ignores
    // SSL_CERT_FILE because it is built with a fixed bundle path), and --cacert.
    for how in ["env", "cacert"] {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--proxy"])
            .arg(format!("http://{}", f.proxy.addr))
            .args(["-H", "Authorization: Bearer the-apps-own"])
            .arg(format!("https://{HOST}/accounts?x=1"));
        if how == "env" {
            cmd.env("CURL_CA_BUNDLE", &bundle);
        } else {
            cmd.arg("--cacert").arg(&bundle);
        }
        let out = run(&mut cmd).await;
        assert!(out.status.success(), "{how}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over https");
    }
    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
        assert_eq!(r.target, "/accounts?x=1");
    }
    metric_reaches(
        &f,
        metric("bearer_proxy_requests_total")
            .label("route", "fdx")
            .label("code", 200),
        2.0,
    )
    .await;
    metric_reaches(
        &f,
        metric("bearer_proxy_intercepted_connections_total"),
        2.0,
    )
    .await;
}

#[tokio::test]
async fn python_requests_with_https_proxy_and_requests_ca_bundle() {
    if Command::new("python3")
        .args(["-c", "import requests"])
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with requests is needed"
        );
        eprintln!("skipped: python3 with requests is not installed");
        return;
    }
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("py")).await;
    let script = format!(
        "import requests\n\
         s = requests.Session()\n\
         for i in range(3):\n    \
             r = s.get('https://{HOST}/py', headers={{'Authorization': 'Bearer mine'}}, timeout=10)\n    \
             r.raise_for_status()\n    \
             print(r.text)\n"
    );
    let out = run(tokio::process::Command::new("python3")
        .args(["-c", &script])
        .env("HTTPS_PROXY", format!("http://{}", f.proxy.addr))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("REQUESTS_CA_BUNDLE", ca.bundle()))
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "py\npy\npy\n");
    for r in f.upstream().requests() {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    }
    // A Session keeps the connection: three requests, one intercepted CONNECT.
    metric_reaches(
        &f,
        metric("bearer_proxy_intercepted_connections_total"),
        1.0,
    )
    .await;
}

#[tokio::test]
async fn node_with_node_extra_ca_certs() {
    if Command::new("node").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "node is needed");
        eprintln!("skipped: node is not installed");
        return;
    }
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("js")).await;
    let port = f.proxy.addr.port();
    // Node has no HTTPS_PROXY support of its own in every version: CONNECT by hand, then TLS
    // over the socket (what proxy agents do).
    let script = format!(
        "const http = require('http'), tls = require('tls');\n\
         const req = http.request({{host: '127.0.0.1', port: {port}, method: 'CONNECT', path: '{HOST}:443'}});\n\
         req.on('connect', (res, socket) => {{\n\
           const t = tls.connect({{socket, servername: '{HOST}'}}, () => {{\n\
             t.write('GET /js HTTP/1.1\\r\\nHost: {HOST}\\r\\nConnection: close\\r\\n\\r\\n');\n\
           }});\n\
           let out = ''; t.on('data', d => out += d);\n\
           t.on('end', () => {{ console.log(out.split('\\r\\n\\r\\n')[1]); }});\n\
           t.on('error', e => {{ console.error(e.message); process.exit(1); }});\n\
         }});\n\
         req.end();\n"
    );
    let out = run(tokio::process::Command::new("node")
        .args(["-e", &script])
        .env("NODE_EXTRA_CA_CERTS", ca.cert()))
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "js");
    assert_eq!(
        f.upstream().requests()[0].all("authorization"),
        ["Bearer tok-1"]
    );
}

#[tokio::test]
async fn keep_alive_and_large_bodies_both_ways_inside_one_intercepted_connection() {
    const BIG: u64 = 8 << 20;
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |r, _| {
        if r.target == "/download" {
            Reply {
                status: 200,
                headers: Vec::new(),
                body: ReplyBody::Zeros(BIG),
                gate: None,
            }
        } else {
            Reply::ok(&r.body_len.to_string())
        }
    })
    .await;
    let s = tunnel(f.proxy.addr, &format!("{HOST}:443")).await;
    let mut client = http(tls(s, &ca.cert(), HOST).await.unwrap()).await;
    let (status, _, body) = send(&mut client, get("/one", HOST)).await;
    assert_eq!((status, &body[..]), (200, &b"0"[..]));
    let upload = http::Request::post("/upload")
        .header("host", HOST)
        .body(Full::new(Bytes::from(vec![b'u'; BIG as usize])))
        .unwrap();
    let (status, _, body) = send(&mut client, upload).await;
    assert_eq!(status, 200);
    assert_eq!(body, BIG.to_string());
    let (status, _, body) = send(&mut client, get("/download", HOST)).await;
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, BIG);
    let reqs = f.upstream().requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    }
    assert_eq!(reqs[1].body_len, BIG);
    assert_eq!(
        f.proxy
            .metric(metric("bearer_proxy_intercepted_connections_total")),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_wildcard_route_gets_a_leaf_for_the_connect_host() {
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("w")).await;
    let s = tunnel(f.proxy.addr, "a.wild.test:443").await;
    let mut client = http(tls(s, &ca.cert(), "a.wild.test").await.unwrap()).await;
    let (status, _, body) = send(&mut client, get("/w", "a.wild.test")).await;
    assert_eq!((status, &body[..]), (200, &b"w"[..]));
    assert_eq!(
        f.upstream().requests()[0].all("authorization"),
        ["Bearer tok-1"]
    );
}

#[tokio::test]
async fn a_401_inside_the_tunnel_is_replayed_with_the_new_token() {
    let ca = OperatorCa::new();
    let cell = bearer_proxy::token::TokenCell::new("flinks", Duration::from_secs(5));
    cell.publish(token("tok-1"));
    let refresher = cell.clone();
    let f = fixture(HOST)
        .proxy(r#"token_wait = "300ms""#)
        .proxy(&ca.toml())
        .cell(cell)
        .in_process(move |_, i| {
            if i == 0 {
                refresher.publish(token("tok-2"));
                Reply::status(401)
            } else {
                Reply::ok("second")
            }
        })
        .await;
    let s = tunnel(f.proxy.addr, &format!("{HOST}:443")).await;
    let mut client = http(tls(s, &ca.cert(), HOST).await.unwrap()).await;
    let (status, _, body) = send(&mut client, get("/r", HOST)).await;
    assert_eq!((status, &body[..]), (200, &b"second"[..]));
    let reqs = f.upstream().requests();
    assert_eq!(reqs[0].all("authorization"), ["Bearer tok-1"]);
    assert_eq!(reqs[1].all("authorization"), ["Bearer tok-2"]);
    assert_eq!(
        f.proxy.metric(
            metric("bearer_proxy_replays_total")
                .label("result", "ok")
                .label("route", "fdx")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn requests_for_another_host_inside_the_tunnel_are_refused() {
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("no")).await;
    let s = tunnel(f.proxy.addr, &format!("{HOST}:443")).await;
    let mut client = http(tls(s, &ca.cert(), HOST).await.unwrap()).await;
    for (target, host) in [
        ("/x", "evil.test"),
        ("/x", "b.wild.test"),
        ("/x", "api.intercept.test:8443"),
        ("https://evil.test/x", HOST),
    ] {
        let (status, headers, body) = send(&mut client, get(target, host)).await;
        assert_eq!(status, 400, "{target} {host}");
        assert_eq!(headers["x-bearer-proxy-error"], "bad_request");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(json["message"].as_str().unwrap().contains("CONNECT"));
    }
    assert!(f.upstream().requests().is_empty());
}

#[tokio::test]
async fn a_client_hello_naming_another_host_gets_no_certificate() {
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("no")).await;
    // A leaf for b.wild.test would be signed by the CA and trusted: the proxy must refuse
    // rather than make one for a host the CONNECT did not name.
    let s = tunnel(f.proxy.addr, "a.wild.test:443").await;
    assert!(tls(s, &ca.cert(), "b.wild.test").await.is_err());
    let s = tunnel(f.proxy.addr, &format!("{HOST}:443")).await;
    assert!(tls(s, &ca.cert(), "a.wild.test").await.is_err());
    metric_reaches(
        &f,
        metric("bearer_proxy_tls_accept_errors_total").label("reason", "sni_mismatch"),
        2.0,
    )
    .await;
    assert!(f.upstream().requests().is_empty());
}

#[tokio::test]
async fn an_app_that_does_not_trust_the_ca_is_counted_and_told_in_words() {
    let logs = Captured::default();
    let _guard = logs.install(tracing::Level::INFO);
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("no")).await;
    // curl with only the system roots, as an app that was not given the bundle.
    let out = run(tokio::process::Command::new("curl")
        .args(["-sS", "--proxy"])
        .arg(format!("http://{}", f.proxy.addr))
        .arg(format!("https://{HOST}/x")))
    .await;
    assert!(!out.status.success(), "{out:?}");
    metric_reaches(
        &f,
        metric("bearer_proxy_tls_accept_errors_total").label("reason", "unknown_ca"),
        1.0,
    )
    .await;
    assert!(
        logs.text().contains("does not trust the operator CA"),
        "{}",
        logs.text()
    );
    assert!(f.upstream().requests().is_empty());
}

#[tokio::test]
async fn an_unrouted_connect_is_still_a_blind_tunnel_to_the_real_server() {
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("routed")).await;
    // Another TLS server, for localhost, signed by the fixture's test CA (not the operator
    // CA): a client trusting only the test CA completes the handshake, so it saw the real
    // server's certificate.
    let test_ca = TestCa::new();
    let other = Upstream::tls(
        test_ca.server_config(&["localhost"], &[b"http/1.1"]),
        |_, _| Reply::ok("real server"),
    )
    .await;
    let s = tunnel(f.proxy.addr, &format!("localhost:{}", other.addr.port())).await;
    let mut client = http(tls(s, &test_ca.pem_file(), "localhost").await.unwrap()).await;
    let (status, _, body) = send(&mut client, get("/", "localhost")).await;
    assert_eq!((status, &body[..]), (200, &b"real server"[..]));
    // The app's own header, untouched: no token went into the blind tunnel.
    assert_eq!(
        other.requests()[0].all("authorization"),
        ["Bearer the-apps-own"]
    );
    assert_eq!(
        f.proxy
            .metric(metric("bearer_proxy_intercepted_connections_total")),
        Some(0.0)
    );
}

#[test]
fn check_names_a_bad_ca_pair_and_exits_2() {
    let ca = OperatorCa::new();
    let other = OperatorCa::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, key: &Path| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[tokens.t]\ntoken_url = \"https://issuer.example/token\"\n\
                 grant_type = \"client_credentials\"\nclient_id = \"id\"\n\
                 client_secret = \"s\"\n\
                 [proxy.intercept]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n\
                 [[routes]]\nhost = \"{HOST}\"\ntoken = \"t\"\n",
                ca.cert().display(),
                key.display()
            ),
        )
        .unwrap();
        path
    };
    let good = write("good.toml", &ca.key());
    let out = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bad = write("bad.toml", &other.key());
    let out = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("proxy.intercept") && stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
    // The key's contents never appear.
    let key = std::fs::read_to_string(other.key()).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!stderr.contains(&body[..32]));
}

#[tokio::test]
async fn java_httpclient_with_a_truststore_made_by_keytool() {
    if !have_java() {
        return;
    }
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("java")).await;
    let dir = ca.dir.path();
    // As the README prints it: the JDK's cacerts plus the operator CA, via keytool.
    let java_home = String::from_utf8(
        Command::new("java")
            .args(["-XshowSettings:properties", "-version"])
            .output()
            .unwrap()
            .stderr,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.trim().strip_prefix("java.home = ").map(str::to_owned))
    .unwrap();
    let store = dir.join("truststore.p12");
    std::fs::copy(format!("{java_home}/lib/security/cacerts"), &store).unwrap();
    let out = Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "bearer-proxy",
            "-file",
        ])
        .arg(ca.cert())
        .arg("-keystore")
        .arg(&store)
        .args(["-storepass", "changeit"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = java_client(dir, f.proxy.addr, &store, Some("changeit"), None).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 java\n200 java\n");
    for r in f.upstream().requests() {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    }
}

/// Java's HttpClient, run from source, making two requests to `https://HOST/j` through the
/// proxy at `proxy` while trusting only the truststore `store`.
async fn java_client(
    dir: &Path,
    proxy: SocketAddr,
    store: &Path,
    password: Option<&str>,
    store_type: Option<&str>,
) -> std::process::Output {
    let source = dir.join("Main.java");
    std::fs::write(
        &source,
        format!(
            "import java.net.*; import java.net.http.*;\n\
             public class Main {{ public static void main(String[] a) throws Exception {{\n\
               HttpClient c = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)\n\
                 .proxy(ProxySelector.of(new InetSocketAddress(\"127.0.0.1\", {port}))).build();\n\
               for (int i = 0; i < 2; i++) {{\n\
                 HttpResponse<String> r = c.send(HttpRequest.newBuilder(URI.create(\"https://{HOST}/j\")).build(),\n\
                   HttpResponse.BodyHandlers.ofString());\n\
                 System.out.println(r.statusCode() + \" \" + r.body());\n\
               }} }} }}\n",
            port = proxy.port()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new("java");
    cmd.arg(format!("-Djavax.net.ssl.trustStore={}", store.display()));
    if let Some(p) = password {
        cmd.arg(format!("-Djavax.net.ssl.trustStorePassword={p}"));
    }
    if let Some(t) = store_type {
        cmd.arg(format!("-Djavax.net.ssl.trustStoreType={t}"));
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        cmd.arg(&source).kill_on_drop(true).output(),
    )
    .await
    .unwrap()
    .unwrap()
}

/// Whether `java` runs; in CI it must.
fn have_java() -> bool {
    if Command::new("java").arg("-version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "java is needed");
        eprintln!("skipped: java is not installed");
        return false;
    }
    true
}

#[tokio::test]
async fn java_httpclient_trusting_only_the_pkcs12_truststore_from_ca_bundle() {
    if !have_java() {
        return;
    }
    let ca = OperatorCa::new();
    let f = intercepting(&ca, |_, _| Reply::ok("java")).await;
    let dir = ca.dir.path();
    let store = dir.join("truststore.p12");
    let password_file = dir.join("truststore-password");
    let password = "pw-canary-61c4e";
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    // As the README prints it.
    let out = Command::new(BIN)
        .args(["ca", "bundle", "--ca"])
        .arg(ca.cert())
        .arg("--pkcs12")
        .arg(&store)
        .arg("--password-file")
        .arg(&password_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("bearer-proxy-operator-ca"), "{said}");
    assert!(!said.contains(password), "the password is never printed");

    // keytool sees the operator CA, and the system roots, as trusted entries, and checks the
    // file's integrity with the password.
    let list = |pw: &str| {
        Command::new("keytool")
            .args(["-list", "-storetype", "PKCS12", "-keystore"])
            .arg(&store)
            .args(["-storepass", pw])
            .output()
            .unwrap()
    };
    let out = list(password);
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("bearer-proxy-operator-ca,") && listing.contains("system-root-1,"),
        "{listing}"
    );
    assert_eq!(
        listing.matches("trustedCertEntry").count(),
        listing.matches("Certificate fingerprint").count(),
        "every entry is a trusted certificate: {listing}"
    );
    assert!(!list("not-the-password").status.success());

    let out = java_client(dir, f.proxy.addr, &store, Some(password), Some("PKCS12")).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 java\n200 java\n");
    // Without trustStorePassword (as deploy/'s JAVA_TOOL_OPTIONS, which the JVM echoes to
    // stderr): Java reads the trusted certificates without checking the MAC.
    let out = java_client(dir, f.proxy.addr, &store, None, Some("PKCS12")).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 java\n200 java\n");
    // A wrong one fails the integrity check: the MAC is real.
    let out = java_client(
        dir,
        f.proxy.addr,
        &store,
        Some("wrong-password"),
        Some("PKCS12"),
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    let requests = f.upstream().requests();
    assert_eq!(requests.len(), 4);
    for r in requests {
        assert_eq!(r.all("authorization"), ["Bearer tok-1"]);
    }
}

#[tokio::test]
async fn an_idle_intercepted_connection_closes_when_the_proxy_stops() {
    let ca = OperatorCa::new();
    let mut f = intercepting(&ca, |_, _| Reply::ok("x")).await;
    let s = tunnel(f.proxy.addr, &format!("{HOST}:443")).await;
    let mut client = http(tls(s, &ca.cert(), HOST).await.unwrap()).await;
    let (status, _, _) = send(&mut client, get("/x", HOST)).await;
    assert_eq!(status, 200);
    // Idle keep-alive inside the tunnel: `serve` returns (within PATIENCE, well before
    // idle_timeout) because the intercepted connection drains like any other.
    f.proxy.stop(bearer_proxy::shutdown::Phase::Stopping).await;
    let after = tokio::time::timeout(PATIENCE, client.send_request(get("/y", HOST)))
        .await
        .unwrap();
    assert!(after.is_err(), "the connection was closed: {after:?}");
}

/// Issue #14 closing a gap of #15: the operator CA is rotated in place (same files, new
/// contents, as a renewed Kubernetes Secret is) and the configuration reloaded; from then on
/// a client trusting only the new CA connects, and one trusting only the old no longer does.
#[tokio::test]
async fn after_a_ca_rotation_and_a_reload_a_client_trusting_only_the_new_ca_connects() {
    let (old, new) = (OperatorCa::new(), OperatorCa::new());
    let (url, _) = issuer(bearer_proxy::issuer::IssuerOptions::default()).await;
    never_log("demo-secret");
    let b = fixture(HOST)
        .proxy(&format!(
            "listen = \"127.0.0.1:0\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
            old.toml()
        ))
        .token(&format!(
            "token_url = \"{url}\"\nclient_secret = \"demo-secret\"\n"
        ));
    let upstream = b.tls_upstream(|_, _| Reply::ok("rotated")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, b.toml(&upstream.url(true))).unwrap();
    let config = bearer_proxy::config::load(&path).unwrap();
    let server = bearer_proxy::Server::start_from(config, &path)
        .await
        .unwrap();
    let proxy = server.proxy_addr();
    // Before the rotation a client trusting only the new CA is refused (so the check below
    // can fail).
    let s = tunnel(proxy, &format!("{HOST}:443")).await;
    assert!(tls(s, &new.cert(), HOST).await.is_err());

    // Rotate in place: the old CA's files now hold the new CA.
    let (old_cert, new_cert) = (old.cert(), new.cert());
    std::fs::copy(&old_cert, old_copy(&old)).unwrap();
    std::fs::copy(&new_cert, &old_cert).unwrap();
    std::fs::copy(new.key(), old.key()).unwrap();
    let outcome = server.reload().await;
    assert!(outcome.is_ok(), "{:?}", outcome.problems);

    let s = tunnel(proxy, &format!("{HOST}:443")).await;
    let mut client = http(tls(s, &new_cert, HOST).await.unwrap()).await;
    let (status, _, body) = send(&mut client, get("/x", HOST)).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"rotated");
    let s = tunnel(proxy, &format!("{HOST}:443")).await;
    // The old certificate is gone from disk; a client holding a copy of it is refused.
    assert!(tls(s, &old_copy(&old), HOST).await.is_err());
}

/// A copy of the CA certificate `ca` was made with, kept before a rotation overwrites it.
fn old_copy(ca: &OperatorCa) -> PathBuf {
    ca.dir.path().join("ca.crt.before-rotation")
}
