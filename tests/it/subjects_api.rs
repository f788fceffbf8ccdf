//! The subjects API (issue #12) over real sockets, against the real dev issuer: enrolment with
//! a code (spent once, across a restart too), OAuth rejections, an unreachable or slow token
//! endpoint, import, show/list/pagination/state filter, delete and revoke, caller
//! authentication, what the other ports refuse, canary secrets in every answer, the metric,
//! and the `bearer-proxy subjects` CLI against a running server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bearer_proxy::issuer::{Fault, IssuerControl, IssuerOptions};
use bearer_proxy::{Server, Signal};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{
    PATIENCE, Reply, Upstream, admin_get, closed_port, config, get, issuer, metric, never_log,
    scrape,
};

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");
const SECRET: &str = "canary-subjects-client-secret";
const IMPORT_RT: &str = "canary-import-refresh-token";
const API_TOKEN: &str = "canary-subjects-api-token";

/// Codes the issuer accepts: `canary-code-<n>`.
fn code(n: u32) -> String {
    format!("canary-code-{n}")
}

fn issuer_options() -> IssuerOptions {
    IssuerOptions {
        clients: vec![("demo-client".into(), SECRET.into())],
        codes: (1..=20).map(code).collect(),
        refresh_tokens: vec![IMPORT_RT.into()],
        ..Default::default()
    }
}

/// A state directory with a key file, kept across restarts.
struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key: [u8; 32] = rand::random();
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        never_log(&text);
        std::fs::write(dir.path().join("key"), text).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The configuration text: one per-subject token `fdx` at `token_url`.
fn toml(state: &State, token_url: &str, token_extra: &str, subjects_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
drain_delay = "10ms"
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:0"

[tokens.flinks]
token_url = "https://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "test-client"
client_secret = "test-secret"

[tokens.fdx]
token_url = "{token_url}"
grant_type = "authorization_code"
client_id = "demo-client"
client_secret = "{SECRET}"
per_subject = true
timeout = "1s"
{token_extra}

[subjects]
listen = "127.0.0.1:0"
state_dir = "{dir}"
encryption_key_file = "{dir}/key"
{subjects_extra}
"#,
        dir = state.path().display()
    )
}

/// A running server and what the tests talk to.
struct Running {
    api: SocketAddr,
    proxy: SocketAddr,
    admin: SocketAddr,
    stop: mpsc::Sender<Signal>,
    task: JoinHandle<()>,
}

impl Running {
    async fn start(text: &str) -> Self {
        for s in [SECRET, IMPORT_RT, API_TOKEN] {
            never_log(s);
        }
        let server = Server::start(config(text)).await.unwrap();
        let api = server.subjects_addr().expect("a subjects API");
        let (proxy, admin) = (server.proxy_addr(), server.admin_addr());
        let (stop, rx) = mpsc::channel(2);
        let task = tokio::spawn(server.run(rx));
        Self {
            api,
            proxy,
            admin,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(Signal::Terminate).await.unwrap();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server did not stop")
            .unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/tokens/{path}", self.api)
    }
}

/// One API answer.
struct Answer {
    status: u16,
    error_header: Option<String>,
    headers: http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// Checks the failure shape and returns the code.
    fn error(&self) -> String {
        let v = self.json();
        let code = v["error"].as_str().unwrap().to_owned();
        assert!(v["message"].is_string(), "{}", self.text);
        assert_eq!(self.error_header.as_deref(), Some(code.as_str()));
        code
    }
}

async fn call(method: &str, url: &str, body: Option<Value>, bearer: Option<&str>) -> Answer {
    // Plain HTTP only; reqwest needs a TLS configuration anyway (no default provider).
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .build()
        .unwrap();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = tokio::time::timeout(PATIENCE, req.send())
        .await
        .expect("API did not answer")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let error_header = headers
        .get("x-bearer-proxy-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let answer = Answer {
        status,
        error_header,
        headers,
        text,
    };
    assert_no_secret(&answer.text, &[]);
    answer
}

/// No code, refresh token, client secret or JWT-shaped access token in `text` (`more`: tokens
/// the issuer handed out).
fn assert_no_secret(text: &str, more: &[String]) {
    assert!(!text.contains("canary"), "a canary secret leaked: {text}");
    assert!(!text.contains("eyJ"), "a JWT leaked: {text}");
    for s in more {
        assert!(!text.contains(s.as_str()), "a token leaked: {text}");
    }
}

/// Every access and refresh token the issuer handed out or received.
fn issued(control: &IssuerControl) -> Vec<String> {
    let mut all: Vec<String> = control
        .issued_tokens()
        .iter()
        .map(|t| t.access_token.expose().to_owned())
        .collect();
    all.extend(
        control
            .requests()
            .iter()
            .filter_map(|r| r.refresh_token.as_ref().map(|t| t.expose().to_owned())),
    );
    all
}

async fn enrol(r: &Running, subject: &str, n: u32) -> Answer {
    call(
        "POST",
        &r.url(&format!("fdx/subjects/{subject}/code")),
        Some(json!({ "code": code(n) })),
        None,
    )
    .await
}

#[tokio::test]
async fn enrolment_writes_the_record_primes_the_cache_and_spends_the_code_once() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    let a = enrol(&r, "cust-1", 1).await;
    assert_eq!(a.status, 201, "{}", a.text);
    let v = a.json();
    assert_eq!(v["subject"], "cust-1");
    assert_eq!(v["token"], "fdx");
    assert_eq!(v["state"], "active");
    assert!(v["enrolled_at"].is_string());
    // The first access token is in the cache: no refresh needed for the first request.
    assert!(v["access_token_expires_at"].is_string(), "{v}");
    assert_eq!(control.request_count_for("authorization_code"), 1);
    assert_eq!(control.request_count_for("refresh_token"), 0);
    // The same code again, for this or another subject: 409, and the issuer never sees it.
    for subject in ["cust-1", "cust-2"] {
        let again = enrol(&r, subject, 1).await;
        assert_eq!(again.status, 409, "{}", again.text);
        assert_eq!(again.error(), "code_already_used");
    }
    assert_eq!(control.request_count_for("authorization_code"), 1);
    // A new code for the same subject replaces its record.
    assert_eq!(enrol(&r, "cust-1", 2).await.status, 201);
    let shown = call("GET", &r.url("fdx/subjects/cust-1"), None, None).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.json()["state"], "active");
    assert_no_secret(&shown.text, &issued(&control));
    // The store holds no plaintext code or refresh token.
    let mut secrets = issued(&control);
    secrets.extend([code(1), code(2)]);
    assert_no_plaintext(state.path(), &secrets);
    let text = scrape(r.admin).await;
    let series = |result: &str| {
        metric("bearer_proxy_subject_enrolments_total")
            .label("token", "fdx")
            .label("result", result)
    };
    assert_eq!(series("ok").value_in(&text), Some(2.0));
    assert_eq!(series("code_already_used").value_in(&text), Some(2.0));
    assert_eq!(series("rejected").value_in(&text), Some(0.0));
    r.stop().await;
}

/// Fails if any file under `dir` holds one of `secrets`.
fn assert_no_plaintext(dir: &Path, secrets: &[String]) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for s in secrets {
            assert!(
                !text.contains(s.as_str()),
                "{} holds a secret",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_spent_code_stays_spent_across_a_restart() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let text = toml(&state, &url, "", "");
    let r = Running::start(&text).await;
    // Spent even though the exchange failed: the issuer may have consumed it.
    control.fail_next(1, Fault::ServerError);
    assert_eq!(enrol(&r, "c1", 3).await.status, 502);
    assert_eq!(enrol(&r, "c1", 4).await.status, 201);
    r.stop().await;
    let seen = control.request_count_for("authorization_code");
    assert_eq!(seen, 2);
    let r = Running::start(&text).await;
    for n in [3, 4] {
        let a = enrol(&r, "c1", n).await;
        assert_eq!(a.status, 409, "{}", a.text);
        assert_eq!(a.error(), "code_already_used");
    }
    assert_eq!(control.request_count_for("authorization_code"), seen);
    // The subject enrolled before the restart is still there.
    let shown = call("GET", &r.url("fdx/subjects/c1"), None, None).await;
    assert_eq!(shown.json()["state"], "active");
    r.stop().await;
}

#[tokio::test]
async fn oauth_rejections_are_422_with_the_oauth_error() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    // A code the issuer does not know: invalid_grant.
    let a = call(
        "POST",
        &r.url("fdx/subjects/c1/code"),
        Some(json!({"code": "canary-unknown-code"})),
        None,
    )
    .await;
    assert_eq!(a.status, 422, "{}", a.text);
    assert_eq!(a.error(), "token_endpoint_rejected");
    assert_eq!(a.json()["oauth_error"], "invalid_grant");
    control.fail_next(1, Fault::OAuthError("access_denied".into()));
    let a = enrol(&r, "c1", 5).await;
    assert_eq!(a.status, 422);
    assert_eq!(a.json()["oauth_error"], "access_denied");
    // Nothing was enrolled.
    let shown = call("GET", &r.url("fdx/subjects/c1"), None, None).await;
    assert_eq!(shown.status, 404);
    assert_eq!(shown.error(), "unknown_subject");
    r.stop().await;
}

#[tokio::test]
async fn a_redirect_uri_in_the_body_replaces_the_configured_one() {
    let (url, control) = issuer(IssuerOptions {
        redirect_uri: Some("https://app.example/callback".into()),
        ..issuer_options()
    })
    .await;
    let state = State::new();
    let extra = "redirect_uri = \"https://app.example/other\"";
    let r = Running::start(&toml(&state, &url, extra, "")).await;
    let a = enrol(&r, "c1", 6).await;
    assert_eq!(a.status, 422, "{}", a.text);
    let a = call(
        "POST",
        &r.url("fdx/subjects/c1/code"),
        Some(json!({"code": code(7), "redirect_uri": "https://app.example/callback"})),
        None,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let sent: Vec<Option<String>> = control
        .requests()
        .iter()
        .map(|r| r.redirect_uri.clone())
        .collect();
    assert_eq!(
        sent,
        [
            Some("https://app.example/other".to_owned()),
            Some("https://app.example/callback".to_owned())
        ]
    );
    r.stop().await;
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_502_and_a_slow_one_504() {
    let state = State::new();
    let dead = format!("http://127.0.0.1:{}/api/v1/token", closed_port());
    let r = Running::start(&toml(&state, &dead, "", "")).await;
    let a = enrol(&r, "c1", 1).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.error(), "token_endpoint_unavailable");
    r.stop().await;

    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    control.set_delay(Duration::from_secs(3));
    let a = enrol(&r, "c1", 1).await;
    assert_eq!(a.status, 504, "{}", a.text);
    assert_eq!(a.error(), "token_endpoint_timeout");
    let text = scrape(r.admin).await;
    let timeouts = metric("bearer_proxy_subject_enrolments_total")
        .label("token", "fdx")
        .label("result", "timeout");
    assert_eq!(timeouts.value_in(&text), Some(1.0));
    r.stop().await;
}

#[tokio::test]
async fn import_validates_with_one_refresh_and_replaces_on_repeat() {
    let (url, control) = issuer(IssuerOptions {
        rotate_refresh_tokens: true,
        ..issuer_options()
    })
    .await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    let put_url = r.url("fdx/subjects/imp-1");
    let put = |rt: &'static str| call("PUT", &put_url, Some(json!({ "refresh_token": rt })), None);
    let a = put(IMPORT_RT).await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.json()["state"], "active");
    assert_eq!(control.request_count_for("refresh_token"), 1);
    // The issuer rotated it: the imported token is dead, the stored one is the new one, which
    // a forced refresh uses successfully.
    let again = put(IMPORT_RT).await;
    assert_eq!(again.status, 422, "{}", again.text);
    assert_eq!(again.json()["oauth_error"], "invalid_grant");
    let refreshed = call("POST", &r.url("fdx/subjects/imp-1/refresh"), None, None).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    assert_eq!(refreshed.json()["state"], "active");
    assert_eq!(control.request_count_for("refresh_token"), 3);
    assert_no_plaintext(state.path(), &issued(&control));
    r.stop().await;
}

#[tokio::test]
async fn show_list_paginate_filter_and_refresh() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    for (i, s) in ["a1", "a2", "a3"].iter().enumerate() {
        assert_eq!(enrol(&r, s, 10 + i as u32).await.status, 201);
    }
    // a2's refresh token is refused: a forced refresh makes it needs_reauth.
    control.fail_next(1, Fault::OAuthError("invalid_grant".into()));
    let a = call("POST", &r.url("fdx/subjects/a2/refresh"), None, None).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.error(), "reauth_required");
    let shown = call("GET", &r.url("fdx/subjects/a2"), None, None)
        .await
        .json();
    assert_eq!(shown["state"], "needs_reauth");
    assert_eq!(shown["last_error"], "invalid_grant");
    // Pages of two, then one.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut u = r.url("fdx/subjects?limit=2");
        if let Some(c) = &cursor {
            u.push_str("&cursor=");
            u.push_str(&url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>());
        }
        let page = call("GET", &u, None, None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let v = page.json();
        let subjects = v["subjects"].as_array().unwrap();
        assert!(subjects.len() <= 2);
        seen.extend(
            subjects
                .iter()
                .map(|s| s["subject"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 5, "pagination does not end");
    }
    seen.sort();
    assert_eq!(seen, ["a1", "a2", "a3"]);
    assert!(pages >= 2);
    let filtered = call("GET", &r.url("fdx/subjects?state=needs_reauth"), None, None)
        .await
        .json();
    let names: Vec<&str> = filtered["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subject"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a2"]);
    // Bad listing queries.
    for q in ["state=gone", "limit=0", "cursor=not-a-cursor", "colour=red"] {
        let a = call("GET", &r.url(&format!("fdx/subjects?{q}")), None, None).await;
        assert_eq!(a.status, 400, "{q}: {}", a.text);
    }
    // A new code makes a needs_reauth subject active again.
    assert_eq!(enrol(&r, "a2", 15).await.status, 201);
    let shown = call("GET", &r.url("fdx/subjects/a2"), None, None)
        .await
        .json();
    assert_eq!(shown["state"], "active");
    assert!(shown["last_error"].is_null());
    r.stop().await;
}

#[tokio::test]
async fn delete_forgets_and_revoke_calls_revoke_url_first() {
    let (url, control) = issuer(issuer_options()).await;
    let revoke = Upstream::plain(|req, _| match req.target.as_str() {
        "/api/v1/revoke" => Reply::status(204),
        _ => Reply::status(500),
    })
    .await;
    let failing = Upstream::plain(|_, _| Reply::status(500)).await;
    let state = State::new();
    let extra = format!("revoke_url = \"{}/api/v1/revoke\"", revoke.url(false));
    let r = Running::start(&toml(&state, &url, &extra, "")).await;
    assert_eq!(enrol(&r, "d1", 1).await.status, 201);
    assert_eq!(enrol(&r, "d2", 2).await.status, 201);
    let active = |text: &str| {
        metric("bearer_proxy_subjects")
            .label("token", "fdx")
            .label("state", "active")
            .value_in(text)
    };
    // The gauge follows enrolments and deletions made through the API.
    assert_eq!(active(&scrape(r.admin).await), Some(2.0));
    // Plain delete: no revocation.
    let a = call("DELETE", &r.url("fdx/subjects/d1"), None, None).await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(
        call("GET", &r.url("fdx/subjects/d1"), None, None)
            .await
            .status,
        404
    );
    assert_eq!(
        call("DELETE", &r.url("fdx/subjects/d1"), None, None)
            .await
            .status,
        404
    );
    assert!(revoke.requests().is_empty());
    assert_eq!(active(&scrape(r.admin).await), Some(1.0));
    // With revoke: DELETE revoke_url with the subject's own access token, then forget.
    let a = call("DELETE", &r.url("fdx/subjects/d2?revoke=true"), None, None).await;
    assert_eq!(a.status, 204, "{}", a.text);
    let got = revoke.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "DELETE");
    let bearer = got[0].one("authorization").unwrap();
    let token = bearer.strip_prefix("Bearer ").unwrap();
    assert!(control.is_valid_token(token));
    // It is d2's token: the second one issued (d1's was the first).
    let tokens = control.issued_tokens();
    assert_eq!(tokens[1].access_token.expose(), token);
    assert_eq!(
        call("GET", &r.url("fdx/subjects/d2"), None, None)
            .await
            .status,
        404
    );
    r.stop().await;

    // A failing revoke endpoint keeps the subject; revoke without revoke_url is refused.
    let state = State::new();
    let extra = format!("revoke_url = \"{}/api/v1/revoke\"", failing.url(false));
    let r = Running::start(&toml(&state, &url, &extra, "")).await;
    assert_eq!(enrol(&r, "d3", 3).await.status, 201);
    let a = call("DELETE", &r.url("fdx/subjects/d3?revoke=true"), None, None).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.error(), "revoke_failed");
    assert_eq!(failing.requests().len(), 1);
    assert_eq!(
        call("GET", &r.url("fdx/subjects/d3"), None, None)
            .await
            .status,
        200
    );
    let a = call("DELETE", &r.url("fdx/subjects/d3?revoke=maybe"), None, None).await;
    assert_eq!(a.status, 400);
    r.stop().await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    assert_eq!(enrol(&r, "d4", 4).await.status, 201);
    let a = call("DELETE", &r.url("fdx/subjects/d4?revoke=true"), None, None).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.error(), "revoke_not_configured");
    r.stop().await;
}

#[tokio::test]
async fn requests_are_checked_before_anything_is_done() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let r = Running::start(&toml(&state, &url, "", "")).await;
    let cases: &[(&str, String, Option<Value>, u16, &str)] = &[
        (
            "GET",
            r.url("fdx/subjects/a%2Fb"),
            None,
            400,
            "invalid_subject",
        ),
        (
            "GET",
            r.url(&format!("fdx/subjects/{}", "x".repeat(129))),
            None,
            400,
            "invalid_subject",
        ),
        (
            "GET",
            r.url("fdx/subjects/a b"),
            None,
            400,
            "invalid_subject",
        ),
        ("GET", r.url("nope/subjects/c1"), None, 404, "unknown_token"),
        // A named token is not a per-subject token.
        ("GET", r.url("flinks/subjects"), None, 404, "unknown_token"),
        (
            "GET",
            r.url("fdx/subjects/c1"),
            None,
            404,
            "unknown_subject",
        ),
        ("GET", r.url("fdx/other"), None, 404, "not_found"),
        (
            "POST",
            r.url("fdx/subjects"),
            None,
            405,
            "method_not_allowed",
        ),
        (
            "GET",
            r.url("fdx/subjects/c1/code"),
            None,
            405,
            "method_not_allowed",
        ),
        (
            "PATCH",
            r.url("fdx/subjects/c1"),
            None,
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            r.url("fdx/subjects/c1/code"),
            Some(json!({"code": ""})),
            400,
            "bad_request",
        ),
        (
            "POST",
            r.url("fdx/subjects/c1/code"),
            Some(json!({"code": 1})),
            400,
            "bad_request",
        ),
        (
            "POST",
            r.url("fdx/subjects/c1/code"),
            Some(json!({"code": "canary-x", "extra": "canary-y"})),
            400,
            "bad_request",
        ),
        (
            "POST",
            r.url("fdx/subjects/c1/code"),
            Some(json!({"code": "canary-z", "redirect_uri": "not a url"})),
            400,
            "bad_request",
        ),
        (
            "POST",
            r.url("fdx/subjects/c1/code"),
            Some(json!({"code": "x".repeat(20_000)})),
            413,
            "body_too_large",
        ),
        (
            "PUT",
            r.url("fdx/subjects/c1"),
            Some(json!({"token": "canary-w"})),
            400,
            "bad_request",
        ),
    ];
    for (method, u, body, status, code) in cases {
        let a = call(method, u, body.clone(), None).await;
        assert_eq!(a.status, *status, "{method} {u}: {}", a.text);
        assert_eq!(a.error(), *code, "{method} {u}");
    }
    let a = call("POST", &r.url("fdx/subjects"), None, None).await;
    assert_eq!(a.headers.get("allow").unwrap(), "GET");
    // None of these reached the token endpoint.
    assert_eq!(control.request_count(), 0);
    // The proxy and admin ports do not serve the API.
    let admin = admin_get(r.admin, "/v1/tokens/fdx/subjects").await;
    assert_eq!(admin.status, 404);
    let target = format!("http://127.0.0.1:{}/v1/tokens/fdx/subjects", closed_port());
    let proxied = get(r.proxy, &target, &[]).await;
    assert_ne!(proxied.status, 200);
    assert!(!proxied.text().contains("subjects\""), "{}", proxied.text());
    r.stop().await;
}

#[tokio::test]
async fn with_an_api_token_file_every_request_needs_the_bearer_token() {
    let (url, _control) = issuer(issuer_options()).await;
    let state = State::new();
    let token_file = state.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    let extra = format!("api_token_file = \"{}\"", token_file.display());
    let r = Running::start(&toml(&state, &url, "", &extra)).await;
    let list = r.url("fdx/subjects");
    for bearer in [
        None,
        Some("wrong"),
        Some(&API_TOKEN[..API_TOKEN.len() - 1]),
        Some(""),
    ] {
        let a = call("GET", &list, None, bearer).await;
        assert_eq!(a.status, 401, "{bearer:?}");
        assert_eq!(a.error(), "unauthorized");
        assert_eq!(a.headers.get("www-authenticate").unwrap(), "Bearer");
    }
    // Unauthenticated callers learn nothing, not even which tokens exist.
    let a = call("GET", &r.url("nope/subjects"), None, None).await;
    assert_eq!(a.status, 401);
    assert_eq!(call("GET", &list, None, Some(API_TOKEN)).await.status, 200);
    // A rotated file takes effect without a restart.
    let rotated = "canary-rotated-api-token-2";
    never_log(rotated);
    std::fs::write(&token_file, rotated).unwrap();
    assert_eq!(call("GET", &list, None, Some(API_TOKEN)).await.status, 401);
    assert_eq!(call("GET", &list, None, Some(rotated)).await.status, 200);
    // Unreadable: every request refused.
    std::fs::remove_file(&token_file).unwrap();
    let a = call("GET", &list, None, Some(rotated)).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.error(), "api_token_unavailable");
    r.stop().await;
    // A server whose API token file is missing or empty does not start.
    let e = Server::start(config(&toml(&state, &url, "", &extra)))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("subjects.api_token_file"),
        "{e:#}"
    );
    std::fs::write(&token_file, "\n").unwrap();
    let e = Server::start(config(&toml(&state, &url, "", &extra)))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("empty"), "{e:#}");
}

/// Runs `bearer-proxy subjects …` with `stdin` as its input.
async fn cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("subjects")
        .args(args)
        .env_remove("BEARER_PROXY_CONFIG")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("CLI timed out")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_no_secret(&stdout, &[]);
    assert_no_secret(&stderr, &[]);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[tokio::test]
async fn the_cli_manages_subjects_through_the_api() {
    let (url, control) = issuer(issuer_options()).await;
    let state = State::new();
    let token_file = state.path().join("api-token");
    std::fs::write(&token_file, API_TOKEN).unwrap();
    let extra = format!("api_token_file = \"{}\"", token_file.display());
    let r = Running::start(&toml(&state, &url, "", &extra)).await;
    let api = format!("http://{}", r.api);
    let tf = token_file.to_str().unwrap();
    let base = ["--api", api.as_str(), "--api-token-file", tf];
    let with = |more: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| (*s).to_owned())
            .chain(more.iter().map(|s| (*s).to_owned()))
            .collect()
    };
    let run = |args: Vec<String>, stdin: Option<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, stdin.as_deref()).await
    };
    // enrol: the code from stdin.
    let (code_, out, err) = run(with(&["enrol", "fdx", "cli-1"]), Some(code(7) + "\n")).await;
    assert_eq!(code_, 0, "{err}");
    assert!(out.contains("cli-1") && out.contains("active"), "{out}");
    assert_eq!(control.request_count_for("authorization_code"), 1);
    // The same code from a file: exit 1 with the API's message.
    let code_file = state.path().join("code");
    std::fs::write(&code_file, code(7)).unwrap();
    let (c, _, err) = run(
        with(&["enrol", "fdx", "cli-1", "--code-file"])
            .into_iter()
            .chain([code_file.display().to_string()])
            .collect(),
        None,
    )
    .await;
    assert_eq!(c, 1);
    assert!(err.contains("code_already_used"), "{err}");
    // import from stdin, show, list (human and JSON), refresh.
    let (c, _, err) = run(with(&["import", "fdx", "cli-2"]), Some(IMPORT_RT.into())).await;
    assert_eq!(c, 0, "{err}");
    let (c, out, _) = run(with(&["show", "fdx", "cli-2"]), None).await;
    assert_eq!(c, 0);
    assert!(out.contains("state") && out.contains("active"), "{out}");
    let (c, out, _) = run(with(&["--json", "list", "fdx"]), None).await;
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["subjects"].as_array().unwrap().len(), 2);
    let (c, out, _) = run(with(&["list", "fdx", "--limit", "1", "--all"]), None).await;
    assert_eq!(c, 0);
    assert!(out.contains("cli-1") && out.contains("cli-2"), "{out}");
    let (c, _, err) = run(with(&["refresh", "fdx", "cli-2"]), None).await;
    assert_eq!(c, 0, "{err}");
    // delete, then show: exit 1, unknown_subject.
    let (c, _, err) = run(with(&["delete", "fdx", "cli-2"]), None).await;
    assert_eq!(c, 0, "{err}");
    let (c, _, err) = run(with(&["show", "fdx", "cli-2"]), None).await;
    assert_eq!(c, 1);
    assert!(err.contains("unknown_subject"), "{err}");
    // Usage errors exit 2: an invalid subject id, an empty code, no such command.
    let (c, _, _) = run(with(&["show", "fdx", "a/b"]), None).await;
    assert_eq!(c, 2);
    let (c, _, _) = run(with(&["enrol", "fdx", "cli-3"]), Some(String::new())).await;
    assert_eq!(c, 2);
    let (c, _, _) = run(with(&["frobnicate"]), None).await;
    assert_eq!(c, 2);
    // Without the API token: exit 1, 401.
    let (c, _, err) = cli(&["--api", &api, "list", "fdx"], None).await;
    assert_eq!(c, 1);
    assert!(err.contains("unauthorized"), "{err}");
    // Nothing reachable: exit 1.
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let (c, _, _) = cli(&["--api", &dead, "list", "fdx"], None).await;
    assert_eq!(c, 1);
    r.stop().await;
}
