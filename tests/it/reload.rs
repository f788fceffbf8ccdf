//! Configuration reload (issue #14) over real sockets: a steady load of requests while routes,
//! headers, tokens and the log level change; an invalid file; the admin trigger on and off; a
//! Kubernetes-style `..data` symlink swap under the watch; SIGHUP to the real binary, also
//! while it shuts down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bearer_proxy::Server;
use bearer_proxy::issuer::{IssuerControl, IssuerOptions};
use tokio::time::Instant;

use crate::support::{
    Child, PATIENCE, RawResponse, Reply, TestCa, Upstream, admin_get, get, guard_logs, issuer,
    metric, never_log, raw, scrape,
};

/// Two clients at the issuer, so a changed `client_id` is visible in its request log.
async fn two_client_issuer() -> (String, IssuerControl) {
    never_log("demo-secret");
    issuer(IssuerOptions {
        clients: vec![
            ("demo-client".into(), "demo-secret".into()),
            ("other-client".into(), "demo-secret".into()),
        ],
        ..Default::default()
    })
    .await
}

/// Token requests the issuer received from `client_id`.
fn token_requests(control: &IssuerControl, client_id: &str) -> usize {
    control
        .requests()
        .iter()
        .filter(|r| r.client_id.as_deref() == Some(client_id))
        .count()
}

/// A TLS upstream named `name` that answers `<name>:<x-config header>`, so a client sees
/// which upstream got which version of the route's static header.
async fn upstream(ca: &TestCa, name: &'static str) -> Upstream {
    Upstream::tls(
        ca.server_config(&["localhost"], &[b"http/1.1"]),
        move |r, _| Reply::ok(&format!("{name}:{}", r.one("x-config").unwrap_or_default())),
    )
    .await
}

/// A `[tokens.<name>]` table for the dev issuer.
fn token(name: &str, url: &str, client_id: &str) -> String {
    format!(
        "[tokens.{name}]\ntoken_url = \"{url}\"\ngrant_type = \"client_credentials\"\n\
         client_id = \"{client_id}\"\nclient_secret = \"demo-secret\"\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n"
    )
}

/// A route table.
fn route(name: &str, host: &str, token: &str, upstream: &str, version: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nhost = \"{host}\"\ntoken = \"{token}\"\n\
         upstream = \"{upstream}\"\nheaders = {{ \"x-config\" = \"{version}\" }}\n"
    )
}

/// The fixed part of every file: loopback listeners, the test CA, `deny` for unrouted hosts
/// (so a removed route is visible), the admin trigger on.
fn head(ca: &TestCa, admin_reload: bool, level: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nunmatched = \"deny\"\n\
         ca_file = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\nreload = {admin_reload}\n\
         [log]\nlevel = \"{level}\"\n",
        ca.pem_file().display()
    )
}

/// Writes `text` to `path` the way an editor or `kubectl cp` would not: atomically, so the
/// reload never reads half a file (what the watch test checks is the symlink swap instead).
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start(path: &Path) -> Server {
    let config = bearer_proxy::config::load(path).unwrap();
    Server::start_from(config, path).await.unwrap()
}

/// `POST /-/reload` on the admin port.
async fn post_reload(admin: std::net::SocketAddr) -> RawResponse {
    raw(
        admin,
        b"POST /-/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// Polls `check` until it holds, within [`PATIENCE`].
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_steady_load_never_fail_a_request_or_mix_configurations() {
    guard_logs();
    let (url, control) = two_client_issuer().await;
    let ca = TestCa::new();
    let (a, b) = (upstream(&ca, "A").await, upstream(&ca, "B").await);
    let (ua, ub) = (a.url(true), b.url(true));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let flinks = token("flinks", &url, "demo-client");
    write(
        &path,
        &format!(
            "{}{flinks}{}",
            head(&ca, true, "info"),
            route("fdx", "api.test", "flinks", &ua, "v1")
        ),
    );
    let server = start(&path).await;
    let (proxy, admin) = (server.proxy_addr(), server.admin_addr());
    server.tokens()["flinks"]
        .wait_valid(PATIENCE)
        .await
        .unwrap();
    let flinks_cell = server.tokens()["flinks"].clone();
    let demo_before = token_requests(&control, "demo-client");
    assert_eq!(demo_before, 1);

    // Which upstream each version of the static header belongs with: an answer pairing a
    // version with another upstream is a request that saw half of each configuration.
    let consistent = |body: &str| {
        matches!(
            body,
            "A:v1" | "B:v2" | "B:v3" | "B:v4" | "B:v5" | "B:v6" | "A:v7"
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = get(proxy, "http://api.test/x", &[]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                seen.push(r.text());
            }
            seen
        }));
    }
    // 1. A route's upstream and its static header change (POST /-/reload); so does the
    // listen address, which needs a restart: reported, and the rest still applies.
    write(
        &path,
        &format!(
            "{}{flinks}{}",
            head(&ca, true, "info").replace("127.0.0.1:0\"\ndrain", "127.0.0.1:1\"\ndrain"),
            route("fdx", "api.test", "flinks", &ub, "v2")
        ),
    );
    let r = post_reload(admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["result"], "ok");
    assert_eq!(doc["tokens"]["kept"], serde_json::json!(["flinks"]));
    assert_eq!(doc["restart_needed"], serde_json::json!(["proxy.listen"]));
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.text(), "B:v2");

    // 2. A route is added.
    let extra_v3 = route("extra", "extra.test", "flinks", &ua, "v3");
    write(
        &path,
        &format!(
            "{}{flinks}{}{extra_v3}",
            head(&ca, true, "info"),
            route("fdx", "api.test", "flinks", &ub, "v3")
        ),
    );
    let o = server.reload().await;
    assert!(o.is_ok(), "{:?}", o.problems);
    assert_eq!(get(proxy, "http://extra.test/x", &[]).await.text(), "A:v3");

    // 3. The log level changes (in-process the subscriber is the test's: reported, applied
    // nowhere; the binary test below sees it take effect).
    write(
        &path,
        &format!(
            "{}{flinks}{}{extra_v3}",
            head(&ca, true, "debug"),
            route("fdx", "api.test", "flinks", &ub, "v4")
        ),
    );
    let o = server.reload().await;
    assert!(o.is_ok(), "{:?}", o.problems);
    assert_eq!(o.log_level, "not ours");

    // 4. A token is added, used by the new route.
    let second = token("second", &url, "other-client");
    write(
        &path,
        &format!(
            "{}{flinks}{second}{}{}",
            head(&ca, true, "debug"),
            route("fdx", "api.test", "flinks", &ub, "v5"),
            route("extra", "extra.test", "second", &ua, "v5"),
        ),
    );
    let o = server.reload().await;
    assert!(o.is_ok(), "{:?}", o.problems);
    assert_eq!(o.tokens_started, ["second"]);
    assert_eq!(o.tokens_kept, ["flinks"]);
    assert_eq!(token_requests(&control, "other-client"), 1);
    assert_eq!(get(proxy, "http://extra.test/x", &[]).await.status, 200);

    // 5. An invalid file: everything keeps running, the problems name their keys.
    write(
        &path,
        &format!(
            "{}{flinks}{}{}",
            head(&ca, true, "debug"),
            route("fdx", "api.test", "nope", &ub, "v9"),
            "[proxy.bogus]\n",
        ),
    );
    let r = post_reload(admin).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["result"], "invalid");
    let problems = doc["problems"].to_string();
    assert!(problems.contains("routes[0].token"), "{problems}");
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.text(), "B:v5");
    let text = scrape(admin).await;
    assert_eq!(
        metric("bearer_proxy_config_reloads_total")
            .label("result", "invalid")
            .value_in(&text),
        Some(1.0)
    );
    let status = admin_get(admin, "/status").await.json();
    assert_eq!(
        status["config"]["last_reload"]["outcome"]["result"],
        "invalid"
    );

    // 6. A route is removed (and the token only it used).
    write(
        &path,
        &format!(
            "{}{flinks}{}",
            head(&ca, true, "debug"),
            route("fdx", "api.test", "flinks", &ub, "v6"),
        ),
    );
    let o = server.reload().await;
    assert!(o.is_ok(), "{:?}", o.problems);
    assert_eq!(o.tokens_stopped, ["second"]);
    let gone = get(proxy, "http://extra.test/x", &[]).await;
    assert_eq!(gone.status, 403);
    assert_eq!(gone.proxy_error().as_deref(), Some("denied"));
    // No token request for the unchanged token through five reloads.
    assert_eq!(token_requests(&control, "demo-client"), demo_before);
    assert!(Arc::ptr_eq(
        &server.reloader().tokens().await["flinks"],
        &flinks_cell
    ));

    // 7. The token's client_id changes: a new refresher (one token request as the new
    // client) takes over; the route goes back to upstream A.
    let flinks_other = token("flinks", &url, "other-client");
    write(
        &path,
        &format!(
            "{}{flinks_other}{}",
            head(&ca, true, "debug"),
            route("fdx", "api.test", "flinks", &ua, "v7"),
        ),
    );
    let o = server.reload().await;
    assert!(o.is_ok(), "{:?}", o.problems);
    assert_eq!(o.tokens_started, ["flinks"]);
    assert_eq!(o.tokens_stopped, ["flinks"]);
    assert_eq!(token_requests(&control, "other-client"), 2);
    assert!(!Arc::ptr_eq(
        &server.reloader().tokens().await["flinks"],
        &flinks_cell
    ));
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.text(), "A:v7");

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let seen = task.await.unwrap();
        total += seen.len();
        for body in &seen {
            assert!(
                consistent(body),
                "a request saw a mixed configuration: {body}"
            );
        }
    }
    assert!(
        total > 20,
        "too little load to mean anything: {total} requests"
    );
    let text = scrape(admin).await;
    assert_eq!(
        metric("bearer_proxy_config_reloads_total")
            .label("result", "ok")
            .value_in(&text),
        Some(6.0)
    );
    let status = admin_get(admin, "/status").await.json();
    assert_eq!(status["config"]["hash"], o.hash.clone().unwrap().as_str());
    assert_eq!(
        metric("bearer_proxy_config_info")
            .label("hash", o.hash.unwrap())
            .value_in(&text),
        Some(1.0)
    );
    assert!(
        metric("bearer_proxy_config_last_reload_success_timestamp_seconds")
            .value_in(&text)
            .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn post_reload_is_refused_unless_the_admin_trigger_is_on() {
    guard_logs();
    let (url, _) = two_client_issuer().await;
    let ca = TestCa::new();
    let a = upstream(&ca, "A").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let flinks = token("flinks", &url, "demo-client");
    let fdx = route("fdx", "api.test", "flinks", &a.url(true), "v1");
    write(&path, &format!("{}{flinks}{fdx}", head(&ca, false, "info")));
    let server = start(&path).await;
    // The file now asks for something else; a refused POST must not apply it.
    let fdx2 = route("fdx", "api.test", "flinks", &a.url(true), "v2");
    write(
        &path,
        &format!("{}{flinks}{fdx2}", head(&ca, false, "info")),
    );
    let r = post_reload(server.admin_addr()).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "reload_disabled");
    server.tokens()["flinks"]
        .wait_valid(PATIENCE)
        .await
        .unwrap();
    assert_eq!(
        get(server.proxy_addr(), "http://api.test/x", &[])
            .await
            .text(),
        "A:v1"
    );
    // GET is not a reload either, even when enabled.
    write(&path, &format!("{}{flinks}{fdx2}", head(&ca, true, "info")));
    assert!(server.reload().await.is_ok());
    assert_eq!(
        admin_get(server.admin_addr(), "/-/reload").await.status,
        405
    );
    let r = post_reload(server.admin_addr()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Turning it off again takes effect at once.
    write(
        &path,
        &format!("{}{flinks}{fdx2}", head(&ca, false, "info")),
    );
    assert_eq!(post_reload(server.admin_addr()).await.status, 200);
    assert_eq!(post_reload(server.admin_addr()).await.status, 403);
}

/// How Kubernetes updates a mounted ConfigMap: the files live in a timestamped directory,
/// `..data` is a symlink to it, and `config.toml` is a symlink to `..data/config.toml`; an
/// update writes a new directory and renames a new symlink over `..data`.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ConfigMapDir {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut me = Self { dir, generation: 0 };
        me.update(text);
        std::os::unix::fs::symlink("..data/config.toml", me.path()).unwrap();
        me
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn update(&mut self, text: &str) {
        self.generation += 1;
        let name = format!("..2026_11_27_{:02}", self.generation);
        let data = self.dir.path().join(&name);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("config.toml"), text).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_data_symlink_swap_triggers_a_watch_reload() {
    guard_logs();
    let (url, control) = two_client_issuer().await;
    let ca = TestCa::new();
    let a = upstream(&ca, "A").await;
    let flinks = token("flinks", &url, "demo-client");
    let watch = "[reload]\nwatch = true\ndebounce = \"50ms\"\n";
    let text = |v: &str| {
        format!(
            "{}{flinks}{watch}{}",
            head(&ca, false, "info"),
            route("fdx", "api.test", "flinks", &a.url(true), v)
        )
    };
    let mut cm = ConfigMapDir::new(&text("v1"));
    let server = start(&cm.path()).await;
    server.tokens()["flinks"]
        .wait_valid(PATIENCE)
        .await
        .unwrap();
    let proxy = server.proxy_addr();
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.text(), "A:v1");
    cm.update(&text("v2"));
    eventually("the watch applies the new ConfigMap", || async {
        get(proxy, "http://api.test/x", &[]).await.text() == "A:v2"
    })
    .await;
    // An update that leaves the file as it was is no reload.
    cm.update(&text("v2"));
    cm.update(&text("v3"));
    eventually("the second update is applied", || async {
        get(proxy, "http://api.test/x", &[]).await.text() == "A:v3"
    })
    .await;
    let ok = metric("bearer_proxy_config_reloads_total").label("result", "ok");
    assert_eq!(ok.value_in(&scrape(server.admin_addr()).await), Some(2.0));
    assert_eq!(token_requests(&control, "demo-client"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_is_harmless_while_it_shuts_down() {
    guard_logs();
    let (url, control) = two_client_issuer().await;
    let ca = TestCa::new();
    let a = upstream(&ca, "A").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let flinks = token("flinks", &url, "demo-client");
    // The access log is on; the reload turns its target off through the level alone.
    let text = |v: &str, level: &str, drain: &str| {
        format!(
            "{}{flinks}{}",
            head(&ca, false, level)
                .replace(
                    "drain_delay = \"0s\"",
                    &format!("drain_delay = \"{drain}\"")
                )
                .replace("[log]\n", "[log]\naccess = true\n"),
            route("fdx", "api.test", "flinks", &a.url(true), v)
        )
    };
    write(&path, &text("v1", "info", "0s"));
    let mut child = Child::spawn(&path).await;
    child.ready_is(200).await;
    let proxy = child.proxy;
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.text(), "A:v1");
    // The access line of that request is written.
    eventually("an access log line", || {
        let logs = child.logs_so_far();
        async move { logs.contains("bearer_proxy::access") }
    })
    .await;

    write(&path, &text("v2", "info,bearer_proxy::access=off", "2s"));
    child.signal("HUP");
    eventually("SIGHUP applies the new file", || async {
        get(proxy, "http://api.test/x", &[]).await.text() == "A:v2"
    })
    .await;
    let before = child.logs_so_far().matches("bearer_proxy::access").count();
    for _ in 0..3 {
        assert_eq!(get(proxy, "http://api.test/x", &[]).await.status, 200);
    }
    assert_eq!(token_requests(&control, "demo-client"), 1);

    // Shutting down (draining for the reloaded 2s): SIGHUP changes nothing and stops nothing.
    child.signal("TERM");
    child.ready_is(503).await;
    child.signal("HUP");
    assert_eq!(get(proxy, "http://api.test/x", &[]).await.status, 200);
    let status = tokio::time::timeout(PATIENCE, child.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let logs = child.logs().await;
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(logs.contains("reload ignored"), "{logs}");
    assert_eq!(
        logs.matches("bearer_proxy::access").count(),
        before,
        "the reloaded level still let access lines through: {logs}"
    );
}

/// A token removed by a reload stops refreshing (its refresher ends), and a token whose
/// `client_id` changed is refreshed under the new one only: with 2 s tokens (refreshed every
/// ~1.5 s), the issuer's log shows no request for the removed or replaced client once the
/// old configuration's requests are over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_and_replaced_tokens_stop_refreshing() {
    guard_logs();
    never_log("demo-secret");
    let (url, control) = issuer(IssuerOptions {
        clients: vec![
            ("demo-client".into(), "demo-secret".into()),
            ("other-client".into(), "demo-secret".into()),
            ("third-client".into(), "demo-secret".into()),
        ],
        lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let ca = TestCa::new();
    let up = upstream(&ca, "A").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bearer-proxy.toml");
    let up_url = format!("https://localhost:{}", up.addr.port());
    let text = |tokens: &str, routes: &str| format!("{}{tokens}{routes}", head(&ca, true, "info"));
    write(
        &path,
        &text(
            &(token("keep", &url, "demo-client") + &token("gone", &url, "other-client")),
            &(route("a", "a.test", "keep", &up_url, "v1")
                + &route("b", "b.test", "gone", &up_url, "v1")),
        ),
    );
    let server = start(&path).await;
    let admin = server.admin_addr();
    // Both refresh: a second request from each client shows the refreshers running.
    eventually("both tokens refreshed at least once", || async {
        token_requests(&control, "demo-client") >= 2
            && token_requests(&control, "other-client") >= 2
    })
    .await;

    // Remove `gone`, and move `keep` to another client_id.
    write(
        &path,
        &text(
            &token("keep", &url, "third-client"),
            &route("a", "a.test", "keep", &up_url, "v2"),
        ),
    );
    assert_eq!(post_reload(admin).await.status, 200);
    assert_eq!(
        get(server.proxy_addr(), "http://a.test/x", &[])
            .await
            .text(),
        "A:v2"
    );
    // The old refreshers end once the old configuration's requests are over (none here): give
    // them a moment, then two token lifetimes in which a running one would refresh at least once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (old, gone) = (
        token_requests(&control, "demo-client"),
        token_requests(&control, "other-client"),
    );
    let third = token_requests(&control, "third-client");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        token_requests(&control, "other-client"),
        gone,
        "the removed token kept refreshing"
    );
    assert_eq!(
        token_requests(&control, "demo-client"),
        old,
        "the replaced token's old refresher kept refreshing"
    );
    assert!(
        token_requests(&control, "third-client") > third,
        "the new refresher refreshes"
    );
}
