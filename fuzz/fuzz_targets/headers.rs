//! Fuzzes the hop-by-hop header sanitiser (`strip_hop_by_hop`, used on every forwarded request
//! and response) and the token injection that follows it on a routed request:
//! - no hop-by-hop header survives, nor any header a `Connection` value names;
//! - every other header survives with its values, in order;
//! - after the routed-request steps (strip, remove the app's `Authorization`, insert the token)
//!   there is exactly one `Authorization`, the token, whatever the app sent.
#![no_main]

use std::collections::BTreeMap;

use bearer_proxy::proxy::fuzzing::strip_hop_by_hop;
use http::header::{AUTHORIZATION, CONNECTION, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    // Names a Connection value lists, as RFC 9110 reads them (tokens between commas).
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    let removed = |n: &HeaderName| HOP_BY_HOP.contains(&n.as_str()) || named.contains(n);
    let mut expected: BTreeMap<String, Vec<HeaderValue>> = BTreeMap::new();
    for (n, v) in &headers {
        if !removed(n) {
            expected.entry(n.to_string()).or_default().push(v.clone());
        }
    }

    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped);
    let mut got: BTreeMap<String, Vec<HeaderValue>> = BTreeMap::new();
    for (n, v) in &stripped {
        got.entry(n.to_string()).or_default().push(v.clone());
    }
    assert_eq!(got, expected);

    // The routed request's last steps (forward.rs): the token is the one Authorization.
    let token = HeaderValue::from_static("Bearer fuzz-token");
    stripped.remove(AUTHORIZATION);
    stripped.insert(AUTHORIZATION, token.clone());
    let all: Vec<_> = stripped.get_all(AUTHORIZATION).iter().collect();
    assert_eq!(all, [&token]);
});
