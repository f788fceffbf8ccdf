//! Issue #16 end to end over real TLS sockets with throwaway CAs: a token endpoint that requires a
//! client certificate (`tls_client_auth`), one that requires `private_key_jwt` assertions (each
//! algorithm, key rotation on disk), and `check` naming an expired or mismatched certificate.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bearer_proxy::config::{AssertionAlg, ClientAuth, Encoding, GrantType, TokenConfig};
use bearer_proxy::issuer::{AssertionKeySpec, ClientAuthOptions, IssuerControl, IssuerOptions};
use bearer_proxy::metrics::Metrics;
use bearer_proxy::token::client::FetchError;
use bearer_proxy::token::refresher::Refresher;
use bearer_proxy::token::{ErrorKind, TokenCell};
use ring::signature::KeyPair as _;

use crate::support::{TestCa, never_log_pem_key};

const RSA_KEY: &str = include_str!("../fixtures/throwaway-rsa-2048.pem");

/// A dev issuer with `client_auth`, its token URL on `localhost` (`https` when it serves TLS).
async fn issuer(client_auth: ClientAuthOptions) -> (String, IssuerControl) {
    crate::support::guard_logs();
    let issuer = bearer_proxy::issuer::DevIssuer::bind(
        "127.0.0.1:0".parse().unwrap(),
        IssuerOptions {
            clients: vec![],
            client_auth,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let url = issuer.token_url().replace("127.0.0.1", "localhost");
    let control = issuer.control();
    tokio::spawn(issuer.serve(std::future::pending()));
    (url, control)
}

fn config(url: &str, client_id: &str, client_auth: ClientAuth, encoding: Encoding) -> TokenConfig {
    let mut c: TokenConfig = serde_json::from_value(serde_json::json!({
        "token_url": url,
        "grant_type": GrantType::ClientCredentials.as_str(),
        "client_id": client_id,
        "timeout": "5s",
    }))
    .unwrap();
    c.name = "t".into();
    c.client_auth = client_auth;
    c.encoding = encoding;
    c
}

fn refresher(cfg: TokenConfig) -> Refresher {
    let cell = TokenCell::new("t", cfg.forced_refresh_interval);
    Refresher::new(cfg, cell, Metrics::new().token("t")).unwrap()
}

#[tokio::test]
async fn a_token_endpoint_requiring_a_client_certificate_gets_it_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let tls =
        server_ca.server_config_requiring_client_certs(&["localhost"], &[b"http/1.1"], &client_ca);
    // The client is known by its certificate only: no secret could authenticate it.
    let (url, control) = issuer(ClientAuthOptions {
        tls: Some(tls),
        tls_clients: vec!["mtls-client".into()],
        ..Default::default()
    })
    .await;
    assert!(url.starts_with("https://localhost:"), "{url}");
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ] {
        let (cert, key) = client_ca.client_cert_files("mtls-client", alg, dir.path());
        for encoding in [Encoding::Form, Encoding::Json] {
            let mut cfg = config(&url, "mtls-client", ClientAuth::TlsClientAuth, encoding);
            cfg.ca_file = Some(server_ca.pem_file());
            cfg.client_cert_file = Some(cert.clone());
            cfg.client_key_file = Some(key.clone());
            refresher(cfg)
                .refresh()
                .await
                .unwrap_or_else(|e| panic!("{alg:?} {encoding:?}: {e}"));
        }
    }
    let requests = control.requests();
    assert_eq!(requests.len(), 6);
    assert!(requests.iter().all(|r| !r.has_authorization));

    // Without a certificate the handshake fails: no request reaches the endpoint.
    let mut cfg = config(
        &url,
        "mtls-client",
        ClientAuth::TlsClientAuth,
        Encoding::Form,
    );
    cfg.ca_file = Some(server_ca.pem_file());
    let e = refresher(cfg).refresh().await.unwrap_err();
    assert!(matches!(e, FetchError::Connect(_)), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Transient);
    // A certificate from another CA fails the same way.
    let stranger = TestCa::new();
    let (cert, key) =
        stranger.client_cert_files("mtls-client", &rcgen::PKCS_ECDSA_P256_SHA256, dir.path());
    let mut cfg = config(
        &url,
        "mtls-client",
        ClientAuth::TlsClientAuth,
        Encoding::Form,
    );
    cfg.ca_file = Some(server_ca.pem_file());
    cfg.client_cert_file = Some(cert);
    cfg.client_key_file = Some(key);
    assert!(matches!(
        refresher(cfg).refresh().await.unwrap_err(),
        FetchError::Connect(_)
    ));
    assert_eq!(control.requests().len(), 6);
}

/// A signing key for `alg` as PEM, and the public key the issuer verifies with.
fn assertion_key(alg: AssertionAlg) -> (String, Vec<u8>) {
    let pem = match alg {
        AssertionAlg::RS256 | AssertionAlg::PS256 => RSA_KEY.to_owned(),
        AssertionAlg::ES256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem(),
    };
    never_log_pem_key(&pem);
    let der = rustls_pemfile::private_key(&mut pem.as_bytes())
        .unwrap()
        .unwrap();
    let pkcs8 = der.secret_der();
    let public = match alg {
        AssertionAlg::ES256 => ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec(),
        _ => ring::signature::RsaKeyPair::from_pkcs8(pkcs8)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec(),
    };
    (pem, public)
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn private_key_jwt_works_for_each_algorithm_and_each_encoding() {
    let dir = tempfile::tempdir().unwrap();
    for (alg, configured) in [
        (AssertionAlg::RS256, None),
        (AssertionAlg::PS256, Some(AssertionAlg::PS256)),
        (AssertionAlg::ES256, None),
    ] {
        let (pem, public) = assertion_key(alg);
        let key_file = write(dir.path(), "assertion.pem", &pem);
        let (url, control) = issuer(ClientAuthOptions {
            assertion_keys: vec![AssertionKeySpec {
                client_id: "jwt-client".into(),
                alg,
                public_key: public,
            }],
            assertion_audience: Some("https://as.example/".into()),
            ..Default::default()
        })
        .await;
        for encoding in [Encoding::Form, Encoding::Json] {
            let mut cfg = config(&url, "jwt-client", ClientAuth::PrivateKeyJwt, encoding);
            cfg.client_assertion_key_file = Some(key_file.clone());
            cfg.client_assertion_alg = configured;
            cfg.client_assertion_aud = Some("https://as.example/".into());
            let mut r = refresher(cfg.clone());
            // Twice: the second assertion has its own jti (a reused one is refused).
            r.refresh().await.unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            r.refresh()
                .await
                .unwrap_or_else(|e| panic!("{alg:?} again: {e}"));

            // The token URL as the audience is not what this server wants.
            cfg.client_assertion_aud = None;
            let e = refresher(cfg).refresh().await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Rejected, "{alg:?}: {e}");
            assert_eq!(e.oauth().unwrap().code, "invalid_client");
        }
        assert!(control.requests().iter().all(|r| !r.has_authorization));
    }
}

#[tokio::test]
async fn a_rotated_assertion_key_is_used_from_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old, _) = assertion_key(AssertionAlg::ES256);
    let (new, new_public) = assertion_key(AssertionAlg::ES256);
    let key_file = write(dir.path(), "assertion.pem", &old);
    let (url, _) = issuer(ClientAuthOptions {
        assertion_keys: vec![AssertionKeySpec {
            client_id: "jwt-client".into(),
            alg: AssertionAlg::ES256,
            public_key: new_public,
        }],
        assertion_audience: Some("https://as.example/".into()),
        ..Default::default()
    })
    .await;
    let mut cfg = config(
        &url,
        "jwt-client",
        ClientAuth::PrivateKeyJwt,
        Encoding::Form,
    );
    cfg.client_assertion_key_file = Some(key_file.clone());
    let mut r = refresher(cfg);
    // The issuer knows the new key only, and wants an audience this client does not send.
    let e = r.refresh().await.unwrap_err();
    assert_eq!(e.oauth().unwrap().code, "invalid_client");
    assert_eq!(
        e.oauth().unwrap().description.as_deref(),
        Some("bad assertion signature")
    );
    std::fs::write(&key_file, &new).unwrap();
    let e = r.refresh().await.unwrap_err();
    assert_eq!(
        e.oauth().unwrap().description.as_deref(),
        Some("wrong aud"),
        "the new key's signature verified; only the audience is left: {e}"
    );
}

#[tokio::test]
async fn the_audience_is_the_token_url_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = assertion_key(AssertionAlg::ES256);
    let key_file = write(dir.path(), "assertion.pem", &pem);
    // No audience configured on either side: the issuer expects the URL it was sent to.
    let (url, _) = issuer(ClientAuthOptions {
        assertion_keys: vec![AssertionKeySpec {
            client_id: "jwt-client".into(),
            alg: AssertionAlg::ES256,
            public_key: public,
        }],
        ..Default::default()
    })
    .await;
    let mut cfg = config(
        &url,
        "jwt-client",
        ClientAuth::PrivateKeyJwt,
        Encoding::Json,
    );
    cfg.client_assertion_key_file = Some(key_file);
    refresher(cfg).refresh().await.unwrap();
}

/// `bearer-proxy check` on a config whose client certificate is unusable.
async fn check(dir: &Path, cert: &Path, key: &Path) -> (i32, String) {
    let config = write(
        dir,
        "config.toml",
        &format!(
            r#"
[tokens.bank]
token_url = "https://as.example/token"
grant_type = "client_credentials"
client_id = "c"
client_auth = "tls_client_auth"
client_cert_file = "{cert}"
client_key_file = "{key}"

[[routes]]
host = "api.example"
token = "bank"
client_cert_file = "{cert}"
client_key_file = "{key}"
"#,
            cert = cert.display(),
            key = key.display()
        ),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn check_names_an_expired_or_mismatched_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.client_cert_files("good", &rcgen::PKCS_ECDSA_P256_SHA256, dir.path());
    let (code, text) = check(dir.path(), &cert, &key).await;
    assert_eq!(code, 0, "{text}");

    let (_, other_key) = ca.client_cert_files("other", &rcgen::PKCS_ECDSA_P256_SHA256, dir.path());
    let (code, text) = check(dir.path(), &cert, &other_key).await;
    assert_eq!(code, 2, "{text}");
    for want in [
        "tokens.bank.client_cert_file",
        "routes[0].client_cert_file",
        "other.key",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    // An expired certificate (self-signed is enough for `check`).
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired = write(
        dir.path(),
        "expired.crt",
        &params.self_signed(&key_pair).unwrap().pem(),
    );
    let expired_key = write(dir.path(), "expired.key", &key_pair.serialize_pem());
    never_log_pem_key(&key_pair.serialize_pem());
    let (code, text) = check(dir.path(), &expired, &expired_key).await;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("expired.crt: the certificate expired at 2021-01-01"),
        "{text}"
    );
}

/// A TLS upstream that requires a client certificate from `clients`, records the subject of
/// each connection's certificate, and answers every request with that subject: so a response
/// shows which certificate the connection that carried it was made with.
async fn mtls_upstream(
    server_ca: &TestCa,
    clients: &TestCa,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_ca.server_config_requiring_client_certs(
        &["localhost"],
        &[b"http/1.1"],
        clients,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let seen = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                let subject = bearer_proxy::identity::cert_info(&der).unwrap().subject;
                seen.lock().unwrap().push(subject.clone());
                let service = hyper::service::service_fn(move |_req| {
                    let body = subject.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test]
async fn routes_present_their_own_client_certificates_and_never_share_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let (addr, handshakes) = mtls_upstream(&server_ca, &client_ca).await;
    let (a_cert, a_key) =
        client_ca.client_cert_files("client-a", &rcgen::PKCS_ECDSA_P256_SHA256, dir.path());
    let (b_cert, b_key) = client_ca.client_cert_files("client-b", &rcgen::PKCS_ED25519, dir.path());
    let upstream = format!("https://localhost:{}", addr.port());
    let route = |name: &str, pair: Option<(&Path, &Path)>| {
        let files = pair.map_or(String::new(), |(c, k)| {
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                c.display(),
                k.display()
            )
        });
        format!(
            "[[routes]]\nname = \"{name}\"\nhost = \"{name}.test\"\ntoken = \"flinks\"\n\
             upstream = \"{upstream}\"\n{files}"
        )
    };
    let config = crate::support::config(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nca_file = \"{}\"\n{}{}{}{}",
        server_ca.pem_file().display(),
        route("a", Some((&a_cert, &a_key))),
        route("b", Some((&b_cert, &b_key))),
        // Same token and files as `a`: the same identity, so the same pool.
        route("a2", Some((&a_cert, &a_key))),
        route("none", None),
    ));
    let proxy = crate::support::TestProxy::start(&config).await;
    proxy.publish("tok-clientauth-1");
    for _ in 0..3 {
        for (host, want) in [("a", "client-a"), ("b", "client-b"), ("a2", "client-a")] {
            let r = crate::support::get(proxy.addr, &format!("http://{host}.test/x"), &[]).await;
            assert_eq!(r.status, 200, "{host}: {}", r.text());
            assert_eq!(
                r.text(),
                format!("CN={want}"),
                "{host}'s request rode another connection"
            );
        }
    }
    // A route without a certificate does not get one: the upstream refuses the connection. In
    // TLS 1.3 the server checks the client's certificate after the client considers the
    // handshake done, so the refusal arrives as an alert in place of the answer: a reset.
    let r = crate::support::get(proxy.addr, "http://none.test/x", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.proxy_error().as_deref(), Some("upstream_reset"));
    // Each route's certificate is on the status page and in the expiry gauge.
    let page = bearer_proxy::admin::Admin::new(
        &proxy.tokens,
        proxy.metrics.clone(),
        bearer_proxy::shutdown::ShutdownController::new().1,
    )
    .status();
    let certs = page["client_certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3, "{page}");
    assert!(
        certs
            .iter()
            .any(|c| c["kind"] == "route" && c["name"] == "b" && c["subject"] == "CN=client-b"),
        "{page}"
    );
    assert!(!page.to_string().contains("PRIVATE"), "{page}");
    let exposition = proxy.metrics.encode();
    assert!(
        exposition.contains(
            "bearer_proxy_client_certificate_expiry_timestamp_seconds{kind=\"route\",name=\"a2\"}"
        ),
        "{exposition}"
    );
    // Connections were pooled (not one per request), one identity each.
    let handshakes = handshakes.lock().unwrap().clone();
    assert!(handshakes.len() < 9, "{handshakes:?}");
    assert!(
        handshakes.contains(&"CN=client-a".to_owned()),
        "{handshakes:?}"
    );
    assert!(
        handshakes.contains(&"CN=client-b".to_owned()),
        "{handshakes:?}"
    );
}

#[test]
fn the_configuration_names_every_missing_or_misplaced_client_auth_key() {
    let errs = bearer_proxy::config::from_str(
        r#"
[tokens.mtls]
token_url = "https://as.example/token"
grant_type = "client_credentials"
client_id = "c"
client_secret = "not-sent"
client_auth = "tls_client_auth"

[tokens.jwt]
token_url = "https://as.example/token"
grant_type = "client_credentials"
client_id = "c"
client_auth = "private_key_jwt"
client_assertion_alg = "HS256"

[tokens.plain]
token_url = "https://as.example/token"
grant_type = "client_credentials"
client_id = "c"
client_secret = "s"
client_cert_file = "/c.pem"
client_assertion_kid = "k"

[[routes]]
host = "api.example"
token = "plain"
client_key_file = "/k.pem"
"#,
        config::FileFormat::Toml,
        Some(Default::default()),
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
    for want in [
        "tokens.mtls.client_secret",
        "tokens.mtls.client_cert_file",
        "tokens.jwt.client_assertion_alg",
        "tokens.plain.client_key_file",
        "tokens.plain.client_assertion_kid",
        "routes[0].client_cert_file",
    ] {
        assert!(keys.contains(&want), "{want} not in {keys:?}");
    }
    // With the type error fixed, the missing key file is named too.
    let errs = bearer_proxy::config::from_str(
        "[tokens.jwt]\ntoken_url = \"https://as.example/token\"\ngrant_type = \"client_credentials\"\n\
         client_id = \"c\"\nclient_auth = \"private_key_jwt\"\n",
        config::FileFormat::Toml,
        Some(Default::default()),
    )
    .unwrap_err();
    assert_eq!(
        errs.0[0].key, "tokens.jwt.client_assertion_key_file",
        "{errs}"
    );
}

#[tokio::test]
async fn the_server_gets_tokens_with_a_client_certificate_and_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let tls =
        server_ca.server_config_requiring_client_certs(&["localhost"], &[b"http/1.1"], &client_ca);
    let (url, _) = issuer(ClientAuthOptions {
        tls: Some(tls),
        tls_clients: vec!["mtls-client".into()],
        ..Default::default()
    })
    .await;
    let (cert, key) =
        client_ca.client_cert_files("mtls-client", &rcgen::PKCS_ECDSA_P384_SHA384, dir.path());
    let config = bearer_proxy::config::from_str(
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[tokens.bank]
token_url = "{url}"
grant_type = "client_credentials"
client_id = "mtls-client"
client_auth = "tls_client_auth"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
"#,
            ca = server_ca.pem_file().display(),
            cert = cert.display(),
            key = key.display()
        ),
        config::FileFormat::Toml,
        Some(Default::default()),
    )
    .unwrap();
    let server = bearer_proxy::Server::start(config).await.unwrap();
    server.tokens()["bank"]
        .wait_valid(crate::support::PATIENCE)
        .await
        .unwrap();
    let admin = server.admin_addr();
    let get = |path: &'static str| async move {
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        crate::support::raw(admin, request.as_bytes()).await.text()
    };
    let status: serde_json::Value = serde_json::from_str(&get("/status").await).unwrap();
    let certs = &status["client_certificates"];
    assert_eq!(certs[0]["kind"], "token", "{status}");
    assert_eq!(certs[0]["name"], "bank", "{status}");
    assert_eq!(certs[0]["subject"], "CN=mtls-client", "{status}");
    assert!(certs[0]["not_after"].is_string(), "{status}");
    let metrics = get("/metrics").await;
    let expiry = crate::support::metric("bearer_proxy_client_certificate_expiry_timestamp_seconds")
        .label("kind", "token")
        .label("name", "bank")
        .value_in(&metrics)
        .expect("the expiry gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "{expiry}");
}
