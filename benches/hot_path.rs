//! Criterion benchmarks of the request hot path: what every proxied request pays on top of the
//! network. Run with `cargo bench --bench hot_path`.

// Set-up failures in a benchmark are programming errors; a panic reports them.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bearer_proxy::metrics::Metrics;
use bearer_proxy::token::{AccessToken, TokenCell};
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::AUTHORIZATION;

fn token_cell() -> std::sync::Arc<TokenCell> {
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

fn token_injection(c: &mut Criterion) {
    let cell = token_cell();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json"),
    );
    c.bench_function("token lookup + header insert", |b| {
        b.iter(|| {
            let token = cell.current().expect("valid");
            headers.insert(AUTHORIZATION, token.header().clone());
            black_box(&headers);
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

criterion_group!(benches, token_injection, metric_recording);
criterion_main!(benches);
