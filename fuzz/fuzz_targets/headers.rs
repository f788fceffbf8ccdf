//! Fuzzes the hop-by-hop header sanitiser (`strip_hop_by_hop`, used on every forwarded request
//! and response) and the whole header sequence of a routed request (`sanitise`, the function
//! the request path calls, token injection included):
//! - no hop-by-hop header survives, nor any header a `Connection` value names;
//! - every other header survives with its values, in order;
//! - after the routed-request sequence there is exactly one `Authorization`, the token, and
//!   exactly one `Host`, the upstream's, whatever the app sent; no hop-by-hop header is left;
//!   our `Via` is the last one; under `drop` no name with `_` is left.
#![no_main]

use std::collections::BTreeMap;

use bearer_proxy::config::UnderscoreHeaders;
use bearer_proxy::proxy::fuzzing::{sanitise, strip_hop_by_hop};
use http::header::{AUTHORIZATION, CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, VIA};
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

    // The routed request's whole sequence, as the request path runs it (the first byte picks
    // the underscore policy).
    let policy = match data.first().map(|b| b % 3) {
        Some(0) => UnderscoreHeaders::Drop,
        Some(1) => UnderscoreHeaders::Reject,
        _ => UnderscoreHeaders::Allow,
    };
    let token = HeaderValue::from_static("Bearer fuzz-token");
    let host = HeaderValue::from_static("upstream.example");
    let via = HeaderValue::from_static("1.1 bearer-proxy-fuzz");
    let mut statics = HeaderMap::new();
    statics.insert("x-static", HeaderValue::from_static("1"));
    let mut routed = headers.clone();
    if sanitise(&mut routed, policy, host.clone(), &via, &statics, &token).is_err() {
        // Refused: answered by the proxy, nothing is forwarded.
        return;
    }
    let all: Vec<_> = routed.get_all(AUTHORIZATION).iter().collect();
    assert_eq!(all, [&token]);
    let hosts: Vec<_> = routed.get_all(HOST).iter().collect();
    assert_eq!(hosts, [&host]);
    assert_eq!(routed.get_all(VIA).iter().last(), Some(&via));
    assert_eq!(routed.get_all("x-static").iter().count(), 1);
    for name in routed.keys() {
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name}");
        if policy == UnderscoreHeaders::Drop {
            assert!(!name.as_str().contains('_'), "{name}");
        }
    }
});
