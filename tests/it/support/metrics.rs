//! Metrics: a series matched by name and label set in any order ([`metric`]), read from a
//! Prometheus text exposition, and polling the admin port until a series settles.

use std::fmt;
use std::net::SocketAddr;

use tokio::time::Instant;

use super::{PATIENCE, admin_get};

/// One series to look for: a metric name and its complete set of labels. Label order does not
/// matter; a sample with a label more or less is a different series and does not match.
#[derive(Clone, Debug)]
pub struct Metric {
    name: String,
    labels: Labels,
}

/// The series `name` with no labels yet; add them with [`Metric::label`].
pub fn metric(name: &str) -> Metric {
    Metric {
        name: name.to_owned(),
        labels: Vec::new(),
    }
}

impl Metric {
    /// The same series with one more label.
    pub fn label(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.labels.push((key.to_owned(), value.to_string()));
        self
    }

    /// This series' value in a text exposition, `None` if no sample matches.
    pub fn value_in(&self, text: &str) -> Option<f64> {
        let mut want = self.labels.clone();
        want.sort();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .find_map(|l| {
                let (name, mut labels, value) = sample(l)?;
                labels.sort();
                (name == self.name && labels == want).then_some(value)
            })
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// A sample's labels, unescaped, in the order written.
type Labels = Vec<(String, String)>;

/// Splits one sample line into name, labels (unescaped) and value; `None` if it is not one.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
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
pub async fn settle(admin: SocketAddr, series: Metric, want: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = series.value_in(&scrape(admin).await);
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

#[test]
fn a_series_matches_by_name_and_label_set_in_any_order() {
    let text = "# HELP x y\nreqs{route=\"a\",code=\"200\"} 3\nreqs{code=\"200\"} 4\n\
                reqs_total 5\nq{v=\"a,\\\"b\\\"\"} 6\n";
    let reqs = || metric("reqs").label("code", 200);
    assert_eq!(reqs().label("route", "a").value_in(text), Some(3.0));
    assert_eq!(
        metric("reqs")
            .label("route", "a")
            .label("code", 200)
            .value_in(text),
        Some(3.0)
    );
    assert_eq!(
        reqs().value_in(text),
        Some(4.0),
        "a label fewer is another series"
    );
    assert_eq!(reqs().label("route", "b").value_in(text), None);
    assert_eq!(
        metric("reqs").value_in(text),
        None,
        "a prefix is not a name"
    );
    assert_eq!(metric("q").label("v", "a,\"b\"").value_in(text), Some(6.0));
}
