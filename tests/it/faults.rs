//! Fault injection against the whole server (`Server::start`: refresher, proxy, admin port).
//! The token endpoint, the upstream, the client and the process misbehave; each test states
//! what the proxy must do and checks it: the status and `x-bearer-proxy-error`, what the
//! upstream received (a valid token, or nothing), recovery without a restart, no panic, and no
//! connection left behind (`bearer_proxy_open_connections` back to 0 on the admin port).
//!
//! Cases already covered elsewhere are referenced rather than repeated. In `proxy.rs`: slowloris
//! (`slowloris_is_cut_by_header_read_timeout`), upstream refused and response timeout
//! (`upstream_failures_are_classified`), untrusted certificate
//! (`an_upstream_with_an_untrusted_certificate_gets_no_request`), an HTTP/1.1 body cut short
//! (`a_truncated_upstream_body_reaches_the_client_as_a_failure`), the token endpoint down past
//! expiry (`with_the_token_endpoint_down_past_expiry_requests_get_503`), graceful stop
//! (`graceful_stop_finishes_the_request_in_flight_and_closes_idle_connections`). In `token.rs`:
//! the refresh token file swap (`invalid_grant_recovers_after_the_refresh_token_file_is_swapped`),
//! a 5 MB token body (`a_five_megabyte_body_is_an_error_not_an_allocation`) and an unwritable
//! `state_dir` for a one-time code at the refresher level
//! (`an_unwritable_state_dir_keeps_the_code_unsent`).
//!
//! `RELIABILITY.md` lists every scenario with its expected and observed behaviour.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bearer_proxy::issuer::{DevIssuer, Fault, IssuerControl, IssuerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::support::*;

const HOST: &str = "api.bank.test";

// ---------------------------------------------------------------------------------------------
// The token endpoint and the upstream the server is put in front of

/// A dev issuer serving until the test ends.
struct Issuer {
    url: String,
    addr: SocketAddr,
    control: IssuerControl,
}

impl Issuer {
    async fn at(addr: &str, opts: IssuerOptions) -> Self {
        let issuer = DevIssuer::bind(addr.parse().unwrap(), opts).await.unwrap();
        let this = Self {
            url: issuer.token_url(),
            addr: issuer.local_addr(),
            control: issuer.control(),
        };
        tokio::spawn(issuer.serve(std::future::pending()));
        this
    }

    async fn start(opts: IssuerOptions) -> Self {
        Self::at("127.0.0.1:0", opts).await
    }

    /// `[tokens.flinks]` keys pointing at this issuer with the demo secret.
    fn toml(&self) -> String {
        format!(
            "token_url = \"{}\"\nclient_secret = \"demo-secret\"",
            self.url
        )
    }
}

/// `token_url` at `addr`, with the demo secret.
fn token_toml(addr: SocketAddr) -> String {
    format!("token_url = \"http://{addr}/api/v1/token\"\nclient_secret = \"demo-secret\"")
}

/// The bearer token a recorded request carried (exactly one `Authorization`).
fn bearer(r: &Recorded) -> String {
    let auth = r.all("authorization");
    assert_eq!(auth.len(), 1, "{auth:?}");
    auth[0]
        .strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_owned()
}

/// An upstream handler answering 200, and checking as each request arrives that it carries exactly
/// one token the issuer handed out and that has not expired. Returns the upstream and the
/// count of requests that did not.
fn checking(
    issuer: &IssuerControl,
) -> (
    impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    Arc<AtomicUsize>,
) {
    let bad = Arc::new(AtomicUsize::new(0));
    let count = bad.clone();
    let issuer = issuer.clone();
    let check = move |r: &Recorded, _| {
        let auth = r.all("authorization");
        let ok = auth.len() == 1
            && auth[0]
                .strip_prefix("Bearer ")
                .is_some_and(|t| issuer.is_valid_token(t));
        if !ok {
            count.fetch_add(1, Ordering::SeqCst);
        }
        Reply::ok("ok")
    };
    (check, bad)
}

/// 503 `token_unavailable` with `Retry-After`.
fn assert_token_unavailable(resp: &RawResponse) {
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.proxy_error().as_deref(), Some("token_unavailable"));
    assert!(resp.header("retry-after").is_some());
}

/// The arrival times of the token requests the issuer received.
fn arrivals(control: &IssuerControl) -> Vec<SystemTime> {
    control.requests().iter().map(|r| r.received_at).collect()
}

/// Gaps between consecutive arrivals.
fn gaps(times: &[SystemTime]) -> Vec<Duration> {
    times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .collect()
}

/// Requests sent in a loop until stopped: each on its own connection, each expected to be a
/// complete 200 from the upstream. Returns every status seen.
struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<u16>>,
}

impl Load {
    fn start(proxy: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut i = 0u32;
            while !flag.load(Ordering::SeqCst) {
                i += 1;
                statuses.push(
                    get(proxy, &format!("http://{HOST}/load/{i}"), &[])
                        .await
                        .status,
                );
            }
            statuses
        });
        Self { stop, task }
    }

    /// Stops the loop; every status it saw.
    async fn stop(self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("load did not stop")
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

/// Refused (nothing listens): requests get 503 `token_unavailable` and never reach the
/// upstream; the refresher counts `connect` errors and backs off. Once something listens there,
/// the next attempt succeeds and requests flow, without a restart.
#[tokio::test]
async fn token_endpoint_refused_then_listening_recovers() {
    let port = closed_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rig = fixture(HOST)
        .token(&token_toml(addr))
        .proxy(r#"token_wait = "100ms""#)
        .server(|_, _| Reply::ok("ok"))
        .await;
    attempts(&rig.cell, 2).await;
    assert_token_unavailable(&rig.get("/refused").await);
    assert!(rig.refresh_errors("connect").await >= 2.0);
    assert_eq!(rig.token_status().await["state"], "expired");
    assert_eq!(admin_get(rig.admin, "/readyz").await.status, 503);

    let issuer = Issuer::at(&addr.to_string(), IssuerOptions::default()).await;
    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    assert_eq!(rig.get("/after").await.status, 200);
    let reqs = rig.upstream().requests();
    assert_eq!(reqs.len(), 1, "nothing was sent without a token");
    assert!(issuer.control.is_valid_token(&bearer(&reqs[0])));
    assert_eq!(admin_get(rig.admin, "/readyz").await.status, 200);
    rig.settled().await;
    rig.terminate().await;
}

/// Blackholed (the endpoint's port accepts connections and never answers; here a listener that
/// never even calls accept): every attempt is cut by `timeout` and counted as `timeout`,
/// requests get 503. When the same listener starts answering, the refresher recovers.
#[tokio::test]
async fn token_endpoint_blackholed_times_out_then_recovers() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&format!(
            "{}\ntimeout = \"200ms\"",
            token_toml(hole.local_addr().unwrap())
        ))
        .proxy(r#"token_wait = "100ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 2).await;
    assert_token_unavailable(&rig.get("/blackholed").await);
    assert!(rig.refresh_errors("timeout").await >= 2.0);
    assert_eq!(issuer.control.request_count(), 0);

    // The endpoint comes back: the listener starts answering (relaying to the issuer).
    let real = issuer.addr;
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            tokio::spawn(relay(s, real));
        }
    });
    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    assert_eq!(rig.get("/after").await.status, 200);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    assert_eq!(rig.upstream().requests().len(), 1);
    rig.settled().await;
}

/// Slow (the endpoint answers after 20 s, far beyond `timeout`): each attempt is cut at
/// `timeout` and retried with backoff instead of hanging the refresher; once the endpoint is
/// fast again a token arrives.
#[tokio::test]
async fn token_endpoint_slow_is_cut_by_timeout_then_recovers() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    issuer.control.set_delay(Duration::from_secs(20));
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&format!("{}\ntimeout = \"200ms\"", issuer.toml()))
        .proxy(r#"token_wait = "100ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 2).await;
    assert_token_unavailable(&rig.get("/slow").await);
    assert!(rig.refresh_errors("timeout").await >= 2.0);
    assert!(
        issuer.control.issued_count() == 0 || rig.cell.current().is_none(),
        "a slow answer was used after its timeout"
    );

    issuer.control.set_delay(Duration::ZERO);
    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    assert_eq!(rig.get("/after").await.status, 200);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// 500 and 503 streaks: transient, retried with exponential backoff (never faster than
/// `backoff_initial`), requests get 503 while no token exists. While a valid token is held, a
/// streak changes nothing for requests: the current token keeps being served.
#[tokio::test]
async fn token_endpoint_5xx_streaks_back_off_and_recover() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    issuer.control.fail_next(1000, Fault::ServerError);
    let (check, bad) = checking(&issuer.control);
    // A 300 s token refreshed after ~1 s (the 1 s floor), so a streak meets a valid token.
    let rig = fixture(HOST)
        .token(&format!("{}\nrefresh_ratio = 0.003", issuer.toml()))
        .proxy(r#"token_wait = "50ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 3).await;
    assert_token_unavailable(&rig.get("/streak").await);
    assert!(rig.refresh_errors("http_5xx").await >= 3.0);
    let status = rig.token_status().await;
    assert_eq!(status["state"], "expired");
    assert_eq!(status["last_error"]["http_status"], 500);
    // The streak ends with two 503s; then the endpoint works again.
    issuer.control.clear_faults();
    issuer.control.fail_next(2, Fault::Unavailable);
    let first = rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    for gap in gaps(&arrivals(&issuer.control)) {
        assert!(gap >= Duration::from_millis(50), "retried after {gap:?}");
    }
    assert_eq!(rig.get("/recovered").await.status, 200);

    // A streak while the token is valid: requests keep getting the current token. The faults
    // are queued right after a scheduled refresh has finished (the next is a second away), so
    // the streak meets the following attempts and none before.
    let done = attempts_so_far(&rig.cell);
    attempts(&rig.cell, done + 1).await;
    issuer.control.fail_next(1000, Fault::Unavailable);
    let held = rig.cell.current().unwrap().generation();
    assert!(held >= first.generation());
    attempts(&rig.cell, done + 4).await;
    assert_eq!(rig.token_status().await["state"], "refreshing");
    for i in 0..3 {
        assert_eq!(rig.get(&format!("/during/{i}")).await.status, 200);
    }
    assert_eq!(rig.cell.current().unwrap().generation(), held);
    issuer.control.clear_faults();
    let seen = attempts_so_far(&rig.cell);
    attempts(&rig.cell, seen + 1).await;
    assert!(rig.cell.current().unwrap().generation() > held);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// 429 with `Retry-After: 2`: the next attempt waits at least that long, although the backoff
/// alone would retry after 50 ms; counted as `http_429`.
#[tokio::test]
async fn token_endpoint_429_retry_after_is_honoured() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    issuer.control.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 2,
        },
    );
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&issuer.toml())
        .proxy(r#"token_wait = "50ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 1).await;
    assert_token_unavailable(&rig.get("/limited").await);
    rig.cell
        .wait_valid(PATIENCE)
        .await
        .expect("token after the wait");
    let times = arrivals(&issuer.control);
    assert_eq!(times.len(), 2);
    assert!(
        gaps(&times)[0] >= Duration::from_secs(2),
        "Retry-After ignored: {:?}",
        gaps(&times)
    );
    assert_eq!(rig.refresh_errors("http_429").await, 1.0);
    assert_eq!(rig.get("/after").await.status, 200);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// 400 `invalid_client` and `invalid_grant`: rejections, retried slowly (every `backoff_max`,
/// re-reading the credentials), shown as `rejected` with the OAuth code on `/status`; requests
/// get 503. When the endpoint accepts again the refresher recovers by itself.
#[tokio::test]
async fn token_endpoint_rejections_retry_slowly_and_recover() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    issuer
        .control
        .fail_next(2, Fault::OAuthError("invalid_client".into()));
    issuer
        .control
        .fail_next(1, Fault::OAuthError("invalid_grant".into()));
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&format!("{}\nbackoff_max = \"400ms\"", issuer.toml()))
        .proxy(r#"token_wait = "50ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 1).await;
    let status = rig.token_status().await;
    assert_eq!(status["state"], "rejected");
    assert_eq!(status["last_error"]["oauth_error"], "invalid_client");
    assert_eq!(status["last_error"]["kind"], "rejected");
    assert_token_unavailable(&rig.get("/rejected").await);
    assert_eq!(admin_get(rig.admin, "/readyz").await.status, 503);

    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    let times = arrivals(&issuer.control);
    assert_eq!(times.len(), 4);
    for gap in gaps(&times) {
        assert!(gap >= Duration::from_millis(400), "retried after {gap:?}");
    }
    assert_eq!(rig.refresh_errors("invalid_client").await, 2.0);
    assert_eq!(rig.refresh_errors("invalid_grant").await, 1.0);
    assert_eq!(rig.token_status().await["state"], "fresh");
    assert_eq!(rig.get("/after").await.status, 200);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// A token endpoint that answers connection `i` with `script[i]` (then closes), and relays
/// later connections to `then`.
async fn scripted_endpoint(script: Vec<Vec<u8>>, then: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut script = script.into_iter();
        while let Ok((mut s, _)) = listener.accept().await {
            match script.next() {
                Some(answer) => {
                    tokio::spawn(async move {
                        let Some(head) = read_request_head(&mut s).await else {
                            return;
                        };
                        // Read the (small) body too, so closing does not reset the answer.
                        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0u8; len];
                        let _ = s.read_exact(&mut body).await;
                        let _ = s.write_all(&answer).await;
                        let _ = s.shutdown().await;
                    });
                }
                None => {
                    tokio::spawn(relay(s, then));
                }
            }
        }
    });
    addr
}

/// Malformed, oversized, truncated and hostile token answers: each is a transient failure
/// (nothing from it is ever used, in particular no header can be smuggled through a token),
/// then the refresher recovers from the same endpoint.
#[tokio::test]
async fn token_endpoint_malformed_and_oversized_answers_are_transient() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    let json = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let big = 1024 * 1024;
    let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    chunked.extend_from_slice(format!("{big:x}\r\n").as_bytes());
    chunked.extend(std::iter::repeat_n(b'a', big));
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let script = vec![
        // A captive portal's HTML.
        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 14\r\n\r\n<html></html>\n"
            .to_vec(),
        // JSON without a token.
        json(r#"{"token_type":"Bearer","expires_in":300}"#),
        // A token that would smuggle a header.
        json(r#"{"access_token":"abc\r\nx-evil: 1","token_type":"Bearer","expires_in":300}"#),
        // Declared larger than the 256 KiB bound.
        format!("HTTP/1.1 200 OK\r\ncontent-length: {big}\r\n\r\n").into_bytes(),
        // Streamed larger than the bound.
        chunked,
        // Cut short.
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"access_token\":".to_vec(),
    ];
    let n = script.len() as f64;
    let endpoint = scripted_endpoint(script, issuer.addr).await;
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&token_toml(endpoint))
        .proxy(r#"token_wait = "50ms""#)
        .server(check)
        .await;
    attempts(&rig.cell, 1).await;
    assert_token_unavailable(&rig.get("/malformed").await);
    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_token_refreshes_total")
                .label("result", "transient_error")
                .label("token", "flinks")
        )
        .await,
        n
    );
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_token_refreshes_total")
                .label("result", "rejected")
                .label("token", "flinks")
        )
        .await,
        0.0
    );
    assert!(rig.refresh_errors("malformed").await >= n - 1.0);
    assert_eq!(rig.get("/after").await.status, 200);
    let reqs = rig.upstream().requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].headers.get("x-evil").is_none());
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// A token endpoint that can be taken down (connections refused, open ones cut) and brought
/// back on the same port; while up it relays to `target`.
struct Flapper {
    addr: SocketAddr,
    target: SocketAddr,
    serving: Option<JoinHandle<()>>,
}

impl Flapper {
    async fn new(target: SocketAddr) -> Self {
        let addr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
        let mut this = Self {
            addr,
            target,
            serving: None,
        };
        this.up().await;
        this
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let target = self.target;
        self.serving = Some(tokio::spawn(async move {
            let mut relays = JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                relays.spawn(relay(s, target));
            }
        }));
    }

    /// Closes the listener and every relayed connection (the `JoinSet` aborts them).
    async fn down(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            let _ = serving.await;
        }
    }
}

/// Flapping (the endpoint alternately refuses connections and answers): every refused attempt
/// is retried with backoff, every answer is used; under steady load the token never lapses and
/// every request is a 200 with a valid token.
#[tokio::test]
async fn token_endpoint_flapping_never_disturbs_requests() {
    let issuer = Issuer::start(IssuerOptions {
        lifetime: Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    let mut endpoint = Flapper::new(issuer.addr).await;
    let (check, bad) = checking(&issuer.control);
    // Refresh about every second (the floor), so each cycle meets the next scheduled attempt.
    let rig = fixture(HOST)
        .token(&format!(
            "{}\nrefresh_ratio = 0.2",
            token_toml(endpoint.addr)
        ))
        .server(check)
        .await;
    rig.cell.wait_valid(PATIENCE).await.expect("first token");
    let load = Load::start(rig.proxy);
    for _ in 0..3 {
        endpoint.down().await;
        let failed = rig.cell.status().refreshes_failed;
        while rig.cell.status().refreshes_failed == failed {
            attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
        }
        endpoint.up().await;
        let ok = rig.cell.status().refreshes_ok;
        while rig.cell.status().refreshes_ok == ok {
            attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
        }
    }
    let statuses = load.stop().await;
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    assert!(rig.refresh_errors("connect").await >= 3.0);
    assert!(rig.cell.status().refreshes_ok >= 4);
    rig.settled().await;
    rig.terminate().await;
}

/// Short tokens (3 s) from a flapping endpoint: each is renewed before it stops being served,
/// none is sent after its expiry less the leeway (the upstream checks every token against the
/// issuer's own expiry as it arrives), and an outage longer than a token's life gives the
/// clients 503 `token_unavailable`, never the API's 401 for an expired token.
#[tokio::test]
async fn three_second_tokens_from_a_flapping_endpoint_never_reach_the_upstream_expired() {
    let issuer = Issuer::start(IssuerOptions {
        lifetime: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let mut endpoint = Flapper::new(issuer.addr).await;
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&token_toml(endpoint.addr))
        .proxy("token_wait = \"100ms\"")
        .server(check)
        .await;
    let first = rig.cell.wait_valid(PATIENCE).await.expect("first token");
    assert_eq!(first.lifetime(), Duration::from_secs(3), "not raised");
    let load = Load::start(rig.proxy);
    // Short outages: each refused attempt is retried and the token never lapses.
    for _ in 0..3 {
        endpoint.down().await;
        let failed = rig.cell.status().refreshes_failed;
        while rig.cell.status().refreshes_failed == failed {
            attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
        }
        endpoint.up().await;
        let ok = rig.cell.status().refreshes_ok;
        while rig.cell.status().refreshes_ok == ok {
            attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
        }
    }
    // An outage past the token's life: the proxy stops sending it and answers 503 itself.
    endpoint.down().await;
    let deadline = Instant::now() + PATIENCE;
    while rig.cell.current().is_some() {
        assert!(Instant::now() < deadline, "the token never lapsed");
        attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
    }
    let refused = rig.get("/during-the-outage").await;
    assert_token_unavailable(&refused);
    assert_eq!(rig.token_status().await["state"], "expired");
    endpoint.up().await;
    rig.cell
        .wait_valid(PATIENCE)
        .await
        .expect("token after the outage");
    assert_eq!(rig.get("/after").await.status, 200);
    let statuses = load.stop().await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200));
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "an expired (or unknown) token reached the upstream"
    );
    rig.settled().await;
    rig.terminate().await;
}

/// A token endpoint that echoes the client secret back (in `error_description`, in `error`,
/// URL-encoded): the status page and every log line, down to TRACE, show `[redacted]` instead.
#[tokio::test]
async fn secrets_echoed_by_the_token_endpoint_never_reach_status_or_logs() {
    let secret = "canary-echo/secret+1";
    never_log(secret);
    let issuer = Issuer::start(IssuerOptions {
        clients: vec![("demo-client".into(), secret.into())],
        ..Default::default()
    })
    .await;
    let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let echo = |status: u16, body: serde_json::Value| Fault::Raw {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string(),
    };
    issuer.control.fail_next(
        1,
        echo(
            401,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": format!("client_secret {secret} does not match"),
            }),
        ),
    );
    issuer.control.fail_next(
        1,
        echo(
            400,
            serde_json::json!({
                "error": format!("bad_{secret}"),
                "error_description": format!("body was client_secret={encoded}"),
            }),
        ),
    );
    let rig = fixture(HOST)
        .token(&format!(
            "token_url = \"{}\"\nclient_secret = \"{secret}\"\nbackoff_max = \"50ms\"",
            issuer.url
        ))
        .logs(tracing::Level::TRACE)
        .server(|_, _| Reply::ok("ok"))
        .await;
    // Look at the status page after each of the two echoing answers.
    let mut pages = Vec::new();
    for n in 1..=2 {
        attempts(&rig.cell, n).await;
        pages.push(admin_get(rig.admin, "/status").await.text());
    }
    rig.cell.wait_valid(PATIENCE).await.expect("token after");
    for page in &pages {
        assert!(page.contains("[redacted]"), "{page}");
        assert!(!page.contains("canary"), "{page}");
        assert!(!page.contains(&encoded), "{page}");
    }
    let logs = rig.logs.text();
    assert!(logs.contains("[redacted]"), "{logs}");
    assert!(!logs.contains("canary"), "{logs}");
    assert!(!logs.contains(&encoded), "{logs}");
    rig.terminate().await;
}

/// A wrong `token_url` (a redirect, a 404 page: no OAuth `error`) is a misconfiguration, said
/// so on the status page and in the logs, and retried with the normal backoff: not counted as
/// a rejection (which would page with the wrong advice) and not retried slowly.
#[tokio::test]
async fn a_wrong_token_url_is_misconfiguration_not_rejected_credentials() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    let raw = |status: u16, headers: Vec<(String, String)>| Fault::Raw {
        status,
        headers,
        body: "<html>Not here</html>".into(),
    };
    issuer.control.fail_next(
        1,
        raw(
            302,
            vec![("location".into(), "https://login.example/".into())],
        ),
    );
    issuer.control.fail_next(3, raw(404, vec![]));
    // A long backoff_max: a rejection would wait that long, the backoff starts at 50 ms.
    let rig = fixture(HOST)
        .token(&format!("{}\nbackoff_max = \"60s\"", issuer.toml()))
        .server(|_, _| Reply::ok("ok"))
        .await;
    attempts(&rig.cell, 1).await;
    let status = rig.token_status().await;
    let message = status["last_error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("HTTP 302"), "{status}");
    assert!(message.contains("token_url looks wrong"), "{status}");
    attempts(&rig.cell, 2).await;
    let status = rig.token_status().await;
    assert_eq!(status["last_error"]["kind"], "transient", "{status}");
    assert_eq!(status["last_error"]["reason"], "not_oauth", "{status}");
    assert_ne!(status["state"], "rejected", "{status}");
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP 404"), "{status}");
    assert!(message.contains("token_url looks wrong"), "{status}");
    // Four failures, then a token, well within the first minute of backoff.
    let started = Instant::now();
    rig.cell
        .wait_valid(Duration::from_secs(10))
        .await
        .expect("token");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_token_refreshes_total")
                .label("result", "rejected")
                .label("token", "flinks")
        )
        .await,
        0.0
    );
    assert_eq!(rig.refresh_errors("not_oauth").await, 4.0);
    let logs = rig.logs.text();
    assert!(logs.contains("check token_url"), "{logs}");
    rig.terminate().await;
}

// ---------------------------------------------------------------------------------------------
// Upstream

/// A server with a valid token (issuer in-process) in front of `upstream`.
async fn rig_with_token(setup: FixtureBuilder, upstream: &str) -> (ServerFixture, Issuer) {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    let rig = setup.token(&issuer.toml()).server_to(upstream).await;
    rig.cell.wait_valid(PATIENCE).await.expect("first token");
    (rig, issuer)
}

/// Refused, then listening on the same port: 502 `upstream_unreachable` (`kind="connect"`)
/// while nothing listens, 200 as soon as something does.
#[tokio::test]
async fn upstream_refused_then_listening_recovers() {
    let port = closed_port();
    let (rig, _issuer) = rig_with_token(fixture(HOST), &format!("http://127.0.0.1:{port}")).await;
    let resp = rig.get("/down").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_unreachable"));
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "connect")
                .label("route", "fdx")
        )
        .await,
        1.0
    );
    let real = Upstream::plain(|_, _| Reply::ok("back")).await;
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let target = real.addr;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(relay(s, target));
        }
    });
    let resp = rig.get("/up").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "back");
    assert_eq!(real.requests().len(), 1);
    rig.settled().await;
}

/// Blackholed: a TLS upstream whose port accepts connections but never answers is cut by
/// `connect_timeout` (502 `upstream_unreachable`, `kind="timeout"`); a plain upstream that
/// accepts and never reads is cut by `response_timeout` (504 `upstream_timeout`). Neither
/// leaves a connection behind, and the route works again as soon as the upstream answers.
#[tokio::test]
async fn upstream_blackholed_is_cut_by_the_timeouts() {
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (rig, _issuer) = rig_with_token(
        fixture(HOST).proxy("connect_timeout = \"200ms\"\nresponse_timeout = \"300ms\""),
        &format!("https://localhost:{}", hole.local_addr().unwrap().port()),
    )
    .await;
    let resp = rig.get("/tls-hole").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_unreachable"));
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "timeout")
                .label("route", "fdx")
        )
        .await,
        1.0
    );
    rig.settled().await;
    drop(rig);

    // Plain: accepts, never reads, never answers; later connections are served.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let real = Upstream::plain(|_, _| Reply::ok("served")).await;
    let target = real.addr;
    tokio::spawn(async move {
        let (first, _) = listener.accept().await.unwrap();
        let _held = first;
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(relay(s, target));
        }
        drop(_held);
    });
    let (rig, _issuer) = rig_with_token(
        fixture(HOST).proxy("response_timeout = \"300ms\""),
        &format!("http://{addr}"),
    )
    .await;
    let resp = rig.get("/plain-hole").await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_timeout"));
    let resp = rig.get("/next").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "served");
    rig.settled().await;
}

/// Slow headers: an upstream that sends its status line and then stalls gets 504
/// `upstream_timeout` at `response_timeout`; the route works on the next request.
#[tokio::test]
async fn upstream_stalling_mid_headers_gets_504() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(Mutex::new(Vec::new()));
    let keep = stalled.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            if n == 1 {
                read_request_head(&mut s).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nx-partial: ")
                    .await
                    .unwrap();
                keep.lock().unwrap().push(s);
            } else {
                tokio::spawn(async move {
                    while read_request_head(&mut s).await.is_some() {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfast")
                            .await
                            .unwrap();
                    }
                });
            }
        }
    });
    let (rig, _issuer) = rig_with_token(
        fixture(HOST).proxy("response_timeout = \"300ms\""),
        &format!("http://{addr}"),
    )
    .await;
    let resp = rig.get("/slow").await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_timeout"));
    let resp = rig.get("/fast").await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "fast"));
    rig.settled().await;
    drop(stalled);
}

/// A raw plain-HTTP upstream: connection `i` reads one request head and is handled by
/// `script[i]`; later connections answer `200 done`.
type Step = Box<dyn FnOnce(TcpStream) -> futures_util::future::BoxFuture<'static, ()> + Send>;

async fn scripted_upstream(script: Vec<Step>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut script = script.into_iter();
        while let Ok((mut s, _)) = listener.accept().await {
            let step = script.next();
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                match step {
                    Some(step) => step(s).await,
                    None => loop {
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
                            .await
                            .is_err()
                            || read_request_head(&mut s).await.is_none()
                        {
                            return;
                        }
                    },
                }
            });
        }
    });
    addr
}

fn step<F>(f: impl FnOnce(TcpStream) -> F + Send + 'static) -> Step
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    Box::new(move |s| Box::pin(f(s)))
}

/// A reset (RST) from the upstream: before any answer, a POST gets 502 `upstream_reset`
/// (it is not retried: it may have been processed); in the middle of a body, with a length or
/// chunked, the client's read fails: a cut body is never delivered as a complete one.
#[tokio::test]
async fn upstream_reset_before_and_during_the_answer() {
    let addr = scripted_upstream(vec![
        step(|s| async move { reset(s) }),
        step(|mut s| async move {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly the start")
                .await
                .unwrap();
            reset(s);
        }),
        step(|mut s| async move {
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            reset(s);
        }),
    ])
    .await;
    let (rig, _issuer) = rig_with_token(fixture(HOST), &format!("http://{addr}")).await;

    let resp = raw(
        rig.proxy,
        format!("POST http://{HOST}/pay HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n{{}}")
            .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_reset"));
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "reset")
                .label("route", "fdx")
        )
        .await,
        1.0
    );
    for path in ["/length", "/chunked"] {
        assert_cut_short(rig.proxy, HOST, path).await;
    }
    // Recovery: the next request is served.
    assert_eq!(rig.get("/next").await.text(), "done");
    rig.settled().await;
}

/// Stale pooled connections: the upstream closes a kept-alive connection just as the next
/// request arrives on it (its idle timeout racing ours), with a FIN or with a reset. An
/// idempotent request is retried once on a new connection, transparently; a POST is not (it
/// may have been processed) and gets 502 `upstream_reset`.
#[tokio::test]
async fn stale_pooled_upstream_connections_are_retried_transparently() {
    // Answers one request, then drops the connection when the next one arrives.
    fn stale(rst: bool) -> Step {
        step(move |mut s| async move {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
                .await
                .unwrap();
            if read_request_head(&mut s).await.is_some() {
                if rst { reset(s) } else { drop(s) }
            }
        })
    }
    let addr = scripted_upstream(vec![stale(false), stale(true), stale(true)]).await;
    let (rig, issuer) = rig_with_token(fixture(HOST), &format!("http://{addr}")).await;
    let mut s = connect(rig.proxy).await;
    let mut send = async |req: String| {
        s.write_all(req.as_bytes()).await.unwrap();
        read_response(&mut s).await.unwrap()
    };
    let get = |path: &str| format!("GET http://{HOST}{path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    assert_eq!(send(get("/a")).await.text(), "first");
    // Closed with a FIN under the request: retried on connection 2.
    let resp = send(get("/b")).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "first"));
    // Closed with a reset under the request: retried on connection 3 (HEAD and PUT too).
    let resp = send(format!(
        "PUT http://{HOST}/c HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nput"
    ))
    .await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "first"));
    // A POST on a stale connection is not retried.
    let resp = send(format!(
        "POST http://{HOST}/d HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n{{}}"
    ))
    .await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_reset"));
    assert_eq!(send(get("/e")).await.text(), "done");
    drop(s);
    assert_eq!(
        rig.metric(
            metric("bearer_proxy_upstream_errors_total")
                .label("kind", "reset")
                .label("route", "fdx")
        )
        .await,
        1.0,
        "only the POST failed"
    );
    assert!(issuer.control.issued_count() == 1);
    rig.settled().await;
}

/// An HTTP/1.0 client gets a body without length when the upstream's has none (chunked): the
/// end of the connection ends it. If the upstream's body is cut short, that end must not look
/// like a normal one: the proxy resets the connection, so the client sees an error instead of
/// a shorter "complete" body.
#[tokio::test]
async fn a_truncated_body_is_a_reset_for_an_http10_client() {
    let addr = scripted_upstream(vec![step(|mut s| async move {
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwor")
            .await
            .unwrap();
        drop(s);
    })])
    .await;
    let (rig, _issuer) = rig_with_token(fixture(HOST), &format!("http://{addr}")).await;
    let mut s = connect(rig.proxy).await;
    s.write_all(format!("GET http://{HOST}/cut HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut all))
        .await
        .expect("never ended");
    let err = read.expect_err(&format!(
        "a cut body ended like a complete one: {:?}",
        String::from_utf8_lossy(&all)
    ));
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    // A complete body to an HTTP/1.0 client still ends normally.
    let mut s = connect(rig.proxy).await;
    s.write_all(format!("GET http://{HOST}/ok HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    assert!(String::from_utf8_lossy(&all).ends_with("done"));
    rig.settled().await;
}

/// An upstream whose certificate names another host: 502 `upstream_tls`, the request (and so
/// the token) is never sent. (An untrusted CA: `proxy.rs`.)
#[tokio::test]
async fn upstream_certificate_for_another_host_gets_no_request() {
    let setup = fixture(HOST);
    let upstream = Upstream::tls(
        setup.ca().server_config(&["other.test"], &[b"http/1.1"]),
        |_, _| Reply::ok("must not happen"),
    )
    .await;
    let url = upstream.url(true);
    let (rig, _issuer) = rig_with_token(setup, &url).await;
    let resp = rig.get("/x").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.proxy_error().as_deref(), Some("upstream_tls"));
    assert!(upstream.requests().is_empty());
    rig.settled().await;
}

// ---------------------------------------------------------------------------------------------
// Client

/// An upstream recording, per request, how many body bytes arrived and whether the body ended
/// properly.
async fn body_recording_upstream() -> (SocketAddr, mpsc::Receiver<(u64, bool)>) {
    let (tx, rx) = mpsc::channel(16);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let mut body = req.into_body();
                            let mut len = 0u64;
                            let complete = loop {
                                match body.frame().await {
                                    None => break true,
                                    Some(Ok(f)) => {
                                        len += f.data_ref().map_or(0, |d| d.len() as u64);
                                    }
                                    Some(Err(_)) => break false,
                                }
                            };
                            let _ = tx.send((len, complete)).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"got it")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// The client goes away in the middle of its request body: a streamed body reaches the
/// upstream as incomplete (never as a shorter complete one); a small replayable body is never
/// forwarded at all. No connection is left behind.
#[tokio::test]
async fn client_disconnecting_mid_request_body() {
    let (addr, mut bodies) = body_recording_upstream().await;
    let (rig, _issuer) = rig_with_token(fixture(HOST), &format!("http://{addr}")).await;

    // Streamed (a POST is never buffered): 1 MiB announced, 100 KiB sent.
    let mut s = connect(rig.proxy).await;
    s.write_all(
        format!(
            "POST http://{HOST}/upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1048576\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&vec![b'x'; 100 * 1024]).await.unwrap();
    drop(s);
    let (len, complete) = tokio::time::timeout(PATIENCE, bodies.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!complete, "a cut body reached the upstream as complete");
    assert!(len < 1048576);

    // Small and idempotent (kept for replay, so read before sending): never forwarded.
    let mut s = connect(rig.proxy).await;
    s.write_all(
        format!("PUT http://{HOST}/small HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\nonly ten.")
            .as_bytes(),
    )
    .await
    .unwrap();
    drop(s);
    rig.settled().await;
    assert!(bodies.try_recv().is_err(), "the cut PUT was forwarded");
    // The route still works.
    let resp = raw(
        rig.proxy,
        format!("PUT http://{HOST}/ok HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\nok")
            .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(bodies.recv().await.unwrap(), (2, true));
    rig.settled().await;
}

/// The client goes away in the middle of a large response: the proxy stops, frees the
/// connection, and serves the next request normally.
#[tokio::test]
async fn client_disconnecting_mid_response() {
    let upstream = Upstream::plain(|r, _| {
        if r.target == "/big" {
            Reply {
                body: ReplyBody::Zeros(256 * 1024 * 1024),
                ..Reply::status(200)
            }
        } else {
            Reply::ok("small")
        }
    })
    .await;
    let (rig, _issuer) = rig_with_token(fixture(HOST), &upstream.url(false)).await;
    let mut s = connect(rig.proxy).await;
    s.write_all(format!("GET http://{HOST}/big HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 1024 * 1024 {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got += n;
    }
    reset(s);
    rig.settled().await;
    assert_eq!(rig.get("/small").await.text(), "small");
    rig.settled().await;
}

/// A client that stops sending its body, or stops reading a large response, is disconnected
/// after `idle_timeout`; the upstream never sees the stalled body as complete.
#[tokio::test]
async fn client_stalling_is_cut_by_idle_timeout() {
    let (addr, mut bodies) = body_recording_upstream().await;
    let big = Upstream::plain(|_, _| Reply {
        body: ReplyBody::Zeros(256 * 1024 * 1024),
        ..Reply::status(200)
    })
    .await;
    let (rig, _issuer) = rig_with_token(
        fixture(HOST).proxy(r#"idle_timeout = "300ms""#),
        &format!("http://{addr}"),
    )
    .await;
    let mut s = connect(rig.proxy).await;
    s.write_all(
        format!("POST http://{HOST}/stall HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert!(closed(&mut s).await, "a stalled body kept its connection");
    let (len, complete) = bodies.recv().await.unwrap();
    assert!(!complete && len < 1000, "{len} {complete}");
    rig.settled().await;
    drop(rig);

    // Not reading a 256 MiB answer: the proxy's writes block, then it gives up.
    let (rig, _issuer) = rig_with_token(
        fixture(HOST).proxy(r#"idle_timeout = "300ms""#),
        &big.url(false),
    )
    .await;
    let mut s = connect(rig.proxy).await;
    s.write_all(format!("GET http://{HOST}/big HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    big.wait_requests(1).await;
    rig.settled().await;
    drop(s);
}

/// Pipelined requests (several in one write, including a body) are answered in order, each
/// sent upstream once with the token.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = Upstream::plain(|r, _| Reply::ok(&format!("{} {}", r.method, r.target))).await;
    let (rig, issuer) = rig_with_token(fixture(HOST), &upstream.url(false)).await;
    let mut s = connect(rig.proxy).await;
    let mut batch = String::new();
    for i in 0..3 {
        batch.push_str(&format!(
            "GET http://{HOST}/p{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
        ));
    }
    batch.push_str(&format!(
        "POST http://{HOST}/post HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello"
    ));
    batch.push_str(&format!(
        "GET http://{HOST}/last HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    ));
    s.write_all(batch.as_bytes()).await.unwrap();
    let mut carry = Vec::new();
    for want in ["GET /p0", "GET /p1", "GET /p2", "POST /post", "GET /last"] {
        let resp = read_pipelined(&mut s, &mut carry).await.unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (200, want));
    }
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 5);
    for r in &reqs {
        assert!(issuer.control.is_valid_token(&bearer(r)));
    }
    assert_eq!(&reqs[3].body[..], b"hello");
    drop(s);
    rig.settled().await;
}

/// A valid request pipelined with a refused one (ambiguous framing): the first is forwarded
/// and answered, then the refusal is written and the connection closed. Nothing the client
/// sent before the bad request is lost.
#[tokio::test]
async fn a_refused_request_does_not_swallow_the_answer_before_it() {
    let upstream = Upstream::plain(|r, _| Reply::ok(&r.target)).await;
    let (rig, issuer) = rig_with_token(fixture(HOST), &upstream.url(false)).await;
    let mut s = connect(rig.proxy).await;
    s.write_all(
        format!(
            "GET http://{HOST}/first HTTP/1.1\r\nHost: {HOST}\r\n\r\n\
             POST http://{HOST}/smuggle HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut carry = Vec::new();
    let first = read_pipelined(&mut s, &mut carry)
        .await
        .expect("the first answer");
    assert_eq!((first.status, first.text().as_str()), (200, "/first"));
    let refusal = read_pipelined(&mut s, &mut carry)
        .await
        .expect("the refusal");
    assert_eq!(refusal.status, 400);
    assert_eq!(refusal.proxy_error().as_deref(), Some("bad_request"));
    assert!(closed(&mut s).await);
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1);
    assert!(issuer.control.is_valid_token(&bearer(&reqs[0])));
    rig.settled().await;
}

/// A client that sends its request and then shuts down its sending side (a half-close, as
/// some HTTP/1.0 tools do) still gets the answer, even when the upstream takes its time.
#[tokio::test]
async fn a_half_closed_client_still_gets_its_answer() {
    let gate = Gate::new();
    let held = gate.clone();
    let upstream = Upstream::plain(move |_, _| Reply::ok("answer").gated(held.clone())).await;
    let (rig, _issuer) = rig_with_token(fixture(HOST), &upstream.url(false)).await;
    let mut s = connect(rig.proxy).await;
    s.write_all(format!("GET http://{HOST}/h HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    upstream.wait_requests(1).await;
    gate.open();
    let resp = read_response(&mut s).await.expect("an answer");
    assert_eq!((resp.status, resp.text().as_str()), (200, "answer"));
    assert!(closed(&mut s).await);
    rig.settled().await;
}

// ---------------------------------------------------------------------------------------------
// Process

/// How one request of a load run ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A complete answer with this status.
    Status(u16),
    /// No connection (the listener had closed).
    Refused,
    /// Connected, but the connection ended before any byte of an answer.
    NotServed,
    /// The connection ended in the middle of an answer.
    Truncated,
}

/// One request on its own connection, classified.
async fn one_request(proxy: SocketAddr, path: &str) -> Outcome {
    let Ok(mut s) = TcpStream::connect(proxy).await else {
        return Outcome::Refused;
    };
    let req =
        format!("GET http://{HOST}{path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return Outcome::NotServed;
    }
    let mut all = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut all)).await;
    if all.is_empty() {
        return Outcome::NotServed;
    }
    let text = String::from_utf8_lossy(&all);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Outcome::Truncated;
    };
    let len: Option<usize> = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok());
    if len.is_some_and(|n| n != body.len()) {
        return Outcome::Truncated;
    }
    Outcome::Status(
        head.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    )
}

/// SIGTERM under load, to the real binary: readiness turns false at once; requests in flight
/// (held by the upstream) complete after the signal with full 200 answers; requests that keep
/// arriving are either answered completely or refused at connect, never cut; the process
/// exits 0 once the in-flight ones are done.
#[tokio::test]
async fn sigterm_under_load_finishes_in_flight_requests_and_exits_clean() {
    let issuer = Issuer::start(IssuerOptions::default()).await;
    let ca = TestCa::new();
    let gate = Gate::new();
    let held = gate.clone();
    let upstream = Upstream::tls(
        ca.server_config(&["localhost"], &[b"http/1.1"]),
        move |r, _| {
            if r.target.starts_with("/held") {
                Reply::ok("finished after SIGTERM").gated(held.clone())
            } else {
                Reply::ok("ok")
            }
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
ca_file = "{ca}"
drain_delay = "200ms"
shutdown_grace = "20s"
[admin]
listen = "127.0.0.1:0"
[tokens.flinks]
token_url = "{url}"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret = "demo-secret"
[[routes]]
name = "fdx"
host = "{HOST}"
token = "flinks"
upstream = "{upstream}"
"#,
            ca = ca.pem_file().display(),
            url = issuer.url,
            upstream = upstream.url(true),
        ),
    )
    .unwrap();
    let mut child = Child::spawn(&config).await;
    child.ready_is(200).await;

    let held: Vec<_> = (0..8)
        .map(|i| {
            let proxy = child.proxy;
            tokio::spawn(async move { one_request(proxy, &format!("/held/{i}")).await })
        })
        .collect();
    upstream.wait_requests(8).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (proxy, stop) = (child.proxy, stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let o = one_request(proxy, "/load").await;
                    let refused = o == Outcome::Refused;
                    outcomes.push(o);
                    if refused {
                        break;
                    }
                }
                outcomes
            })
        })
        .collect();

    child.signal("TERM");
    child.ready_is(503).await;
    // The listener closes after drain_delay; the held requests are still in flight.
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(child.proxy).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting after drain_delay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "exited with requests in flight"
    );
    gate.open();
    for h in held {
        assert_eq!(h.await.unwrap(), Outcome::Status(200));
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        for o in l.await.unwrap() {
            assert!(
                matches!(
                    o,
                    Outcome::Status(200) | Outcome::Refused | Outcome::NotServed
                ),
                "{o:?}"
            );
        }
    }
    let status = tokio::time::timeout(PATIENCE, child.child.wait())
        .await
        .expect("did not exit")
        .unwrap();
    let logs = child.logs().await;
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("stopped"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// A Kubernetes-style secret directory: `client_secret` → `..data/client_secret`, `..data` →
/// `..<version>`; [`SecretDir::rotate`] swaps `..data` atomically as the kubelet does.
struct SecretDir {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretDir {
    fn new(secret: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let this = Self { dir, version: 0 };
        this.write_version(0, secret);
        std::os::unix::fs::symlink("..v0", this.dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(
            "..data/client_secret",
            this.dir.path().join("client_secret"),
        )
        .unwrap();
        this
    }

    fn write_version(&self, v: u32, secret: &str) {
        let d = self.dir.path().join(format!("..v{v}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("client_secret"), format!("{secret}\n")).unwrap();
    }

    fn rotate(&mut self, secret: &str) {
        self.version += 1;
        self.write_version(self.version, secret);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("client_secret")
    }
}

/// Client secret rotation under load: the issuer starts refusing the old secret (the next
/// refresh is rejected, the current token keeps being served), the kubelet swaps `..data`, and
/// the next slow retry reads the new secret and succeeds — no restart, no failed request.
#[tokio::test]
async fn secret_rotation_under_load_recovers_without_a_failed_request() {
    let issuer = Issuer::start(IssuerOptions {
        lifetime: Duration::from_secs(5),
        clients: vec![("demo-client".into(), "secret-v0".into())],
        ..Default::default()
    })
    .await;
    let mut secrets = SecretDir::new("secret-v0");
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST).token(&format!(
            "token_url = \"{}\"\nclient_secret_file = \"{}\"\nrefresh_ratio = 0.2\nbackoff_max = \"300ms\"",
            issuer.url,
            secrets.path().display()
        )).server(check)
    .await;
    let first = rig.cell.wait_valid(PATIENCE).await.expect("first token");
    let load = Load::start(rig.proxy);

    issuer.control.set_client_secret("demo-client", "secret-v1");
    while rig.token_status().await["state"] != "rejected" {
        attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
    }
    assert_eq!(
        rig.token_status().await["last_error"]["oauth_error"],
        "invalid_client"
    );
    assert!(
        rig.cell.current().is_some(),
        "the old token is still served"
    );
    secrets.rotate("secret-v1");
    while rig.cell.current().unwrap().generation() == first.generation()
        || rig.token_status().await["state"] != "fresh"
    {
        attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
    }
    let statuses = load.stop().await;
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    assert!(rig.refresh_errors("invalid_client").await >= 1.0);
    rig.settled().await;
    rig.terminate().await;
}

/// `state_dir` not writable (missing here: as root, permissions do not stop writes). With an
/// authorization code the code is never sent unrecorded: the token is `rejected` with the
/// reason, requests get 503; once the directory exists the next retry exchanges the code, once.
#[tokio::test]
async fn unwritable_state_dir_holds_the_code_until_it_can_be_recorded() {
    let issuer = Issuer::start(IssuerOptions {
        codes: vec!["code-1".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("code"), "code-1\n").unwrap();
    let state = dir.path().join("state");
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST).token(&format!(
            "token_url = \"{}\"\ngrant_type = \"authorization_code\"\ncode_file = \"{}\"\nstate_dir = \"{}\"",
            issuer.url,
            dir.path().join("code").display(),
            state.display()
        )).proxy(r#"token_wait = "50ms""#).server(check)
    .await;
    attempts(&rig.cell, 2).await;
    let status = rig.token_status().await;
    assert_eq!(status["state"], "rejected");
    assert!(
        status["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot record it as spent"),
        "{status}"
    );
    assert_token_unavailable(&rig.get("/no-state").await);
    assert_eq!(
        issuer.control.request_count(),
        0,
        "the code was sent unrecorded"
    );

    std::fs::create_dir(&state).unwrap();
    rig.cell.wait_valid(PATIENCE).await.expect("recovered");
    assert_eq!(rig.get("/after").await.status, 200);
    assert_eq!(issuer.control.request_count_for("authorization_code"), 1);
    assert!(state.join("flinks.state.json").exists());
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}

/// `state_dir` not writable while the server rotates refresh tokens: the new refresh token
/// cannot be persisted (logged as an error), but it is kept in memory and used, so requests
/// keep flowing; the superseded refresh token is never sent again. `/status` and
/// `bearer_proxy_token_state_persisted` say the token lives only in memory, so an alert can
/// fire before a restart loses it.
#[tokio::test]
async fn unwritable_state_dir_keeps_a_rotated_refresh_token_in_memory() {
    let issuer = Issuer::start(IssuerOptions {
        lifetime: Duration::from_secs(5),
        refresh_tokens: vec!["rt-original".into()],
        rotate_refresh_tokens: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("refresh_token"), "rt-original\n").unwrap();
    let (check, bad) = checking(&issuer.control);
    let rig = fixture(HOST)
        .token(&format!(
            "token_url = \"{}\"\ngrant_type = \"refresh_token\"\nrefresh_token_file = \"{}\"\n\
             state_dir = \"{}\"\nrefresh_ratio = 0.2",
            issuer.url,
            dir.path().join("refresh_token").display(),
            dir.path().join("missing").display()
        ))
        .server(check)
        .await;
    rig.cell.wait_valid(PATIENCE).await.expect("first token");
    assert_eq!(rig.get("/one").await.status, 200);
    while rig.cell.status().refreshes_ok < 3 {
        attempts(&rig.cell, attempts_so_far(&rig.cell) + 1).await;
    }
    assert_eq!(rig.get("/three").await.status, 200);
    let sent: Vec<String> = issuer
        .control
        .requests()
        .iter()
        .filter_map(|r| r.refresh_token.as_ref().map(|t| t.expose().to_owned()))
        .collect();
    assert_eq!(sent[0], "rt-original");
    assert!(sent[1..].iter().all(|t| t != "rt-original"), "{sent:?}");
    assert!(
        rig.logs
            .text()
            .contains("cannot persist the new refresh token")
    );
    assert_eq!(rig.token_status().await["refresh_token_persisted"], false);
    assert_eq!(
        metric("bearer_proxy_token_state_persisted")
            .label("token", "flinks")
            .value_in(&scrape(rig.admin).await),
        Some(0.0)
    );
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    rig.settled().await;
}
