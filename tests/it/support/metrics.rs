//! Metrics: reading a value from a Prometheus text exposition and polling the admin port
//! until a series settles.

use std::net::SocketAddr;

use tokio::time::Instant;

use super::{PATIENCE, admin_get};

/// The value of `series` (`name{label="v",…}` with labels in alphabetical order, or a bare
/// name) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The admin port's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    let resp = admin_get(admin, "/metrics").await;
    assert_eq!(resp.status, 200);
    resp.text()
}

/// Scrapes `/metrics` until `series` has the value `want`; fails after [`PATIENCE`]. Each
/// scrape is a real request to the admin port, so this polls the server's own view (for
/// instance `bearer_proxy_open_connections` returning to 0 once connection tasks have ended).
pub async fn settle(admin: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = metric(&scrape(admin).await, series);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {got:?}, expected {want}"
        );
        tokio::task::yield_now().await;
    }
}
