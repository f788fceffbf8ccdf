//! Criterion benchmarks of the request hot path: what every proxied request pays on top of the
//! network. Run with `cargo bench --bench hot_path`; the end-to-end numbers are in
//! BENCHMARKS.md (`benches/e2e.sh`).

// Set-up failures in a benchmark are programming errors; a panic reports them.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bearer_proxy::config::UnderscoreHeaders;
use bearer_proxy::metrics::Metrics;
use bearer_proxy::proxy::fuzzing::{
    Framer, H1Outgoing, Scan, h1_request, h1_response, strip_hop_by_hop, underscore_headers,
};
use bearer_proxy::proxy::hot_path::Routes;
use bearer_proxy::token::{AccessToken, TokenCell};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

fn token_cell() -> Arc<TokenCell> {
    let cell = TokenCell::new("bench", Duration::from_secs(5));
    // A Flinks-sized JWT (~800 bytes): the header value is built once, not per request.
    let raw = "e".repeat(800);
    let token = AccessToken::new(
        &raw,
        tokio::time::Instant::now(),
        SystemTime::now(),
        Duration::from_secs(3600),
        None,
    )
    .expect("valid token");
    cell.publish(token);
    cell
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
            HeaderValue::from_str(value).expect("valid value"),
        );
    }
    h
}

/// What a typical app request through HTTP_PROXY carries.
const APP_REQUEST: &[(&str, &str)] = &[
    ("host", "ob.flinksapp.com"),
    ("user-agent", "python-requests/2.31.0"),
    ("accept-encoding", "gzip, deflate"),
    ("accept", "application/json"),
    ("connection", "keep-alive"),
    ("proxy-connection", "keep-alive"),
    ("x-request-id", "4f1c2a9e-5b7d-4c1e-9a57-0c6f2b8e3d11"),
];

/// What a typical upstream answer carries.
const UPSTREAM_RESPONSE: &[(&str, &str)] = &[
    ("date", "Wed, 26 Nov 2026 02:19:27 GMT"),
    ("content-type", "application/json; charset=utf-8"),
    ("content-length", "1432"),
    ("cache-control", "no-store"),
    ("strict-transport-security", "max-age=31536000"),
    ("x-correlation-id", "0b0f6a52-8d1e-4e0b-a3f1-2c76a1d9e0aa"),
    ("vary", "Accept-Encoding"),
];

fn token_injection(c: &mut Criterion) {
    let cell = token_cell();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    c.bench_function("token lookup + header insert", |b| {
        b.iter(|| {
            let token = cell.current().expect("valid");
            headers.insert(AUTHORIZATION, token.header().clone());
            black_box(&headers);
        });
    });
}

fn sanitising(c: &mut Criterion) {
    let mut group = c.benchmark_group("strip hop-by-hop");
    for (name, pairs) in [
        ("app request (Connection, Proxy-Connection)", APP_REQUEST),
        ("upstream response (none present)", UPSTREAM_RESPONSE),
    ] {
        let template = headers(pairs);
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |h| strip_hop_by_hop(black_box(h)),
                BatchSize::SmallInput,
            );
        });
    }
    let mut listed = headers(APP_REQUEST);
    listed.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-hop-a, x-hop-b"),
    );
    listed.insert("x-hop-a", HeaderValue::from_static("1"));
    listed.insert("x-hop-b", HeaderValue::from_static("2"));
    group.bench_function("headers named by Connection", |b| {
        b.iter_batched_ref(
            || listed.clone(),
            |h| strip_hop_by_hop(black_box(h)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn underscores(c: &mut Criterion) {
    let mut group = c.benchmark_group("underscore headers");
    // What nearly every request pays: one scan of the names, nothing found.
    // Nothing is removed from it, so one map serves every iteration.
    let mut clean = headers(APP_REQUEST);
    group.bench_function("app request (none present)", |b| {
        b.iter(|| underscore_headers(UnderscoreHeaders::Drop, black_box(&mut clean)));
    });
    let mut with = headers(APP_REQUEST);
    with.insert("x_api_key", HeaderValue::from_static("k"));
    group.bench_function("one to drop", |b| {
        b.iter_batched_ref(
            || with.clone(),
            |h| underscore_headers(UnderscoreHeaders::Drop, black_box(h)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn route_table() -> Routes {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.toml");
    // A sidecar with a handful of routes: exact hosts, wildcards, a port, a gateway prefix.
    std::fs::write(
        &path,
        r#"
        [tokens.t]
        token_url = "https://issuer.example/token"
        grant_type = "client_credentials"
        client_id = "id"
        client_secret = "secret"

        [[routes]]
        host = "ob.flinksapp.com"
        token = "t"
        [[routes]]
        host = "api.partner.example"
        port = 8443
        token = "t"
        [[routes]]
        name = "sandbox"
        host = "sandbox.flinksapp.com"
        token = "t"
        [[routes]]
        name = "regional"
        host = "*.api.flinksapp.com"
        token = "t"
        [[routes]]
        name = "any-flinks"
        host = "*.flinksapp.com"
        token = "t"
        [[routes]]
        name = "gateway"
        host = "gateway.internal"
        path_prefix = "/flinks"
        token = "t"
        upstream = "https://ob.flinksapp.com"
        "#,
    )
    .expect("write config");
    let config = bearer_proxy::config::load(&path).expect("valid config");
    let mut tokens = BTreeMap::new();
    tokens.insert("t".to_owned(), token_cell());
    Routes::build(&config, &tokens, &Metrics::new()).expect("routes")
}

fn routing(c: &mut Criterion) {
    let routes = route_table();
    assert_eq!(
        routes.by_host("OB.FlinksApp.com.", None),
        Some("ob.flinksapp.com")
    );
    assert_eq!(
        routes.by_host("ca.api.flinksapp.com", None),
        Some("regional")
    );
    assert_eq!(routes.by_host("example.org", None), None);
    assert_eq!(
        routes.by_prefix("/flinks/api/fdx/5/accounts", None),
        Some("gateway")
    );
    let mut group = c.benchmark_group("route match");
    group.bench_function("exact host", |b| {
        b.iter(|| routes.by_host(black_box("ob.flinksapp.com"), black_box(None)));
    });
    group.bench_function("exact host, other case and trailing dot", |b| {
        b.iter(|| routes.by_host(black_box("OB.FlinksApp.com."), black_box(None)));
    });
    group.bench_function("wildcard host", |b| {
        b.iter(|| routes.by_host(black_box("ca.api.flinksapp.com"), black_box(None)));
    });
    group.bench_function("miss", |b| {
        b.iter(|| routes.by_host(black_box("telemetry.example.org"), black_box(None)));
    });
    group.bench_function("path prefix", |b| {
        b.iter(|| {
            routes.by_prefix(
                black_box("/flinks/api/fdx/5/accounts"),
                black_box(Some("gateway.internal")),
            )
        });
    });
    group.finish();
}

/// The wire guard's check of `bytes` (complete heads and bodies) on a fresh connection; true
/// when every byte is accepted.
fn wire_scan(bytes: &[u8], max_head: usize) -> bool {
    Framer::new(max_head).scan(bytes) == Scan::All
}

fn wire_guard(c: &mut Criterion) {
    // What python-requests sends through HTTP_PROXY (absolute-form), and a POST with a body.
    let get: &[u8] =
        b"GET http://ob.flinksapp.com/api/fdx/5/accounts?offset=0&limit=50 HTTP/1.1\r\n\
        Host: ob.flinksapp.com\r\nUser-Agent: python-requests/2.31.0\r\n\
        Accept-Encoding: gzip, deflate\r\nAccept: application/json\r\n\
        Connection: keep-alive\r\nProxy-Connection: keep-alive\r\n\
        X-Request-Id: 4f1c2a9e-5b7d-4c1e-9a57-0c6f2b8e3d11\r\n\r\n";
    let mut post = b"POST http://ob.flinksapp.com/api/fdx/5/payments HTTP/1.1\r\n\
        Host: ob.flinksapp.com\r\nUser-Agent: python-requests/2.31.0\r\n\
        Content-Type: application/json\r\nContent-Length: 256\r\n\r\n"
        .to_vec();
    post.extend(std::iter::repeat_n(b'x', 256));
    assert!(wire_scan(get, 65536));
    assert!(wire_scan(&post, 65536));
    let mut group = c.benchmark_group("wire guard scan");
    group.bench_function("absolute-form GET head, 7 headers", |b| {
        b.iter(|| wire_scan(black_box(get), 65536));
    });
    group.bench_function("POST head + 256-byte body", |b| {
        b.iter(|| wire_scan(black_box(&post), 65536));
    });
    group.finish();
}

/// The fast path's codec (`src/proxy/h1/`): a request head parsed in place and the upstream
/// head written as bytes, and a response head parsed and rewritten for the client; the
/// `HeaderMap` path's equivalents are the `strip hop-by-hop` and `underscore headers` groups
/// plus hyper's own parsing and encoding.
fn h1_codec(c: &mut Criterion) {
    let get: &[u8] =
        b"GET http://ob.flinksapp.com/api/fdx/5/accounts?offset=0&limit=50 HTTP/1.1\r\n\
        Host: ob.flinksapp.com\r\nUser-Agent: python-requests/2.31.0\r\n\
        Accept-Encoding: gzip, deflate\r\nAccept: application/json\r\n\
        Connection: keep-alive\r\nProxy-Connection: keep-alive\r\n\
        X-Request-Id: 4f1c2a9e-5b7d-4c1e-9a57-0c6f2b8e3d11\r\n\r\n";
    // A Flinks-sized JWT (~800 bytes), as the token cell holds it.
    let authorization = format!("Bearer {}", "e".repeat(800));
    let statics = HeaderMap::new();
    let outgoing = H1Outgoing {
        path_and_query: b"/api/fdx/5/accounts?offset=0&limit=50",
        host: b"ob.flinksapp.com",
        via: b"1.1 bearer-proxy-0123abcd",
        statics: &statics,
        remove: None,
        authorization: authorization.as_bytes(),
    };
    let mut out = Vec::with_capacity(4096);
    assert!(
        h1_request(&mut out, get, b"bearer-proxy-0123abcd", 1 << 20, &outgoing)
            .expect("eligible")
            .is_some()
    );
    let response: &[u8] = b"HTTP/1.1 200 OK\r\nDate: Wed, 26 Nov 2026 02:19:27 GMT\r\n\
        Content-Type: application/json; charset=utf-8\r\nContent-Length: 1432\r\n\
        Cache-Control: no-store\r\nStrict-Transport-Security: max-age=31536000\r\n\
        X-Correlation-Id: 0b0f6a52-8d1e-4e0b-a3f1-2c76a1d9e0aa\r\n\
        Vary: Accept-Encoding\r\nConnection: keep-alive\r\n\r\n";
    assert!(
        h1_response(&mut out, response, false, false)
            .expect("valid")
            .is_some()
    );
    c.bench_function(
        "h1_request_head (parse + write_upstream_head, 800-byte token)",
        |b| {
            b.iter(|| {
                out.clear();
                h1_request(
                    &mut out,
                    black_box(get),
                    b"bearer-proxy-0123abcd",
                    1 << 20,
                    black_box(&outgoing),
                )
                .map(|h| h.map(|h| h.len))
            });
        },
    );
    c.bench_function("h1_response_head (parse + write_client_head)", |b| {
        b.iter(|| {
            out.clear();
            h1_response(&mut out, black_box(response), false, false).map(|h| h.map(|h| h.len))
        });
    });
}

fn metric_recording(c: &mut Criterion) {
    let metrics = Metrics::new();
    let route = metrics.route("bench");
    route.request(200, 0.001);
    c.bench_function("record request metric", |b| {
        b.iter(|| route.request(black_box(200), black_box(0.000_42)));
    });
}

criterion_group!(
    benches,
    token_injection,
    sanitising,
    underscores,
    routing,
    wire_guard,
    h1_codec,
    metric_recording
);
criterion_main!(benches);
