//! Fuzzes the routing decision (host matcher, host normaliser, `Host` splitting, wildcard
//! upstreams) against the rules the README states, with the property that matters: the token
//! goes only where a route says. For any request target and `Host` header:
//! - a request routed by host names a host (and port) the route's pattern matches;
//! - a fixed upstream is exactly the configured one; a wildcard route's upstream is the
//!   request's host, normalised, and what a connector would connect to is a subdomain of the
//!   wildcard's suffix, on the route's port;
//! - an absolute-form request left unrouted matches no route, and one whose port is not a
//!   number is refused;
//! - the matcher agrees with a naive model of the rules.
#![no_main]

use std::sync::OnceLock;

use bearer_proxy::proxy::fuzzing::{Router, Routing, host_matches, normalise, split_host_port};
use http::{Request, Uri};
use libfuzzer_sys::fuzz_target;

/// (name, host pattern, port, fixed upstream authority, path_prefix)
const ROUTES: &[(&str, &str, Option<u16>, Option<&str>, Option<&str>)] = &[
    (
        "exact",
        "api.bank.test",
        None,
        Some("upstream.bank.test:8443"),
        None,
    ),
    (
        "port",
        "api.bank.test",
        Some(8443),
        Some("port.bank.test"),
        None,
    ),
    ("wild", "*.wild.test", None, None, None),
    ("wildport", "*.wp.test", Some(8443), None, None),
    (
        "deeper",
        "*.api.wild.test",
        None,
        Some("deeper.bank.test"),
        None,
    ),
    ("ip", "10.9.8.7", None, Some("ip.bank.test"), None),
    ("v6", "fd00::7", None, Some("v6.bank.test"), None),
    (
        "gw",
        "gw.bank.test",
        None,
        Some("gw.bank.test"),
        Some("/flinks"),
    ),
    ("gwwild", "*.pw.test", None, None, Some("/pw")),
];

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let mut text = String::from(
            "[tokens.t]\ntoken_url = \"https://issuer.example/token\"\n\
             grant_type = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        );
        for (name, host, port, fixed, prefix) in ROUTES {
            text.push_str(&format!(
                "[[routes]]\nname = \"{name}\"\nhost = \"{host}\"\ntoken = \"t\"\n"
            ));
            if let Some(p) = port {
                text.push_str(&format!("port = {p}\n"));
            }
            if let Some(f) = fixed {
                text.push_str(&format!("upstream = \"https://{f}\"\n"));
            }
            if let Some(p) = prefix {
                text.push_str(&format!("path_prefix = \"{p}\"\n"));
            }
        }
        let config = bearer_proxy::config::from_str(
            &text,
            config::FileFormat::Toml,
            Some(Default::default()),
        )
        .expect("the harness configuration is valid");
        Router::new(&config).expect("the harness routes build")
    })
}

/// The README's host rules, written independently: case-insensitive, one trailing dot and IPv6
/// brackets ignored; `*.suffix` matches subdomains only.
fn model_matches(pattern: &str, host: &str) -> bool {
    let lower = |s: &str| s.to_ascii_lowercase();
    let mut h = host;
    if h.len() >= 2 && h.starts_with('[') && h.ends_with(']') {
        h = &h[1..h.len() - 1];
    }
    let h = lower(h.strip_suffix('.').unwrap_or(h));
    let p = lower(pattern);
    match p.strip_prefix("*.") {
        Some(suffix) => h.len() > suffix.len() + 1 && h.ends_with(&format!(".{suffix}")),
        None => h == p,
    }
}

/// The README's port rule: a route without `port` takes the scheme's default ports only.
fn model_port(route_port: Option<u16>, port: Option<u16>, defaults: &[u16]) -> bool {
    match (route_port, port) {
        (None, None) => true,
        (None, Some(p)) => defaults.contains(&p),
        (Some(want), Some(p)) => want == p,
        (Some(want), None) => defaults.first() == Some(&want),
    }
}

fn check_request(uri: Uri, host_header: Option<&[u8]>) {
    let mut req = Request::new(());
    if let Some(h) = host_header
        && let Ok(v) = http::HeaderValue::from_bytes(h)
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    *req.uri_mut() = uri.clone();
    let routing = router().route(&req);
    // The host and port the request names, as the proxy reads them.
    let (host, port, defaults): (Option<String>, Option<u16>, &[u16]) = match uri.authority() {
        Some(a) => (
            Some(a.host().to_owned()),
            a.port_u16(),
            if uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                &[443]
            } else {
                &[80]
            },
        ),
        None => {
            let h = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(split_host_port);
            (h.map(|h| h.0.to_owned()), h.and_then(|h| h.1), &[80, 443])
        }
    };
    // An absolute-form port that is not a number names no route.
    if let Some(a) = uri.authority() {
        let after_host = a
            .as_str()
            .rfind(']')
            .map_or(a.as_str(), |i| &a.as_str()[i + 1..]);
        if a.port_u16().is_none()
            && after_host
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.is_empty())
        {
            assert!(
                matches!(routing, Routing::Refused(_)),
                "{uri}: an unparsable port was routed: {routing:?}"
            );
            return;
        }
    }
    match routing {
        Routing::Route {
            label,
            authority,
            strip,
        } => {
            let (_, pattern, rport, fixed, prefix) = *ROUTES
                .iter()
                .find(|r| r.0 == label)
                .expect("a configured route");
            let by_prefix = uri.authority().is_none()
                && prefix.is_some_and(|p| {
                    let path = uri.path();
                    path.strip_prefix(p)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                        && strip == p.len()
                });
            if !by_prefix || fixed.is_none() {
                let host = host.as_deref().expect("routed without a host");
                assert!(model_matches(pattern, host), "{label} routed {host:?}");
                if !by_prefix {
                    assert!(
                        model_port(rport, port, defaults),
                        "{label} routed port {port:?}"
                    );
                    assert_eq!(strip, 0);
                }
            }
            match fixed {
                Some(f) => assert_eq!(authority, f, "{label}"),
                None => {
                    let host = host.expect("a wildcard route needs the request host");
                    let suffix = pattern.trim_start_matches('*').to_ascii_lowercase();
                    let mut want = normalise(&host).to_ascii_lowercase();
                    if let Some(p) = rport.filter(|p| *p != 80 && *p != 443) {
                        want.push_str(&format!(":{p}"));
                    }
                    assert_eq!(authority, want);
                    // What a connector resolves and connects to.
                    let target: Uri = format!("https://{authority}/")
                        .parse()
                        .expect("the upstream URI parses");
                    let a = target.authority().expect("an authority");
                    assert!(!a.as_str().contains('@'), "userinfo in {a}");
                    let connect_host = a.host().to_ascii_lowercase();
                    assert!(
                        connect_host.len() > suffix.len() && connect_host.ends_with(&suffix),
                        "{label}: token would go to {connect_host:?}"
                    );
                    assert_eq!(a.port_u16(), rport.filter(|p| *p != 80 && *p != 443));
                }
            }
        }
        Routing::Unmatched => {
            // Only absolute-form requests are ever left to `unmatched`.
            assert!(uri.authority().is_some());
            let host = host.expect("an authority has a host");
            for (name, pattern, rport, _, _) in ROUTES {
                assert!(
                    !(model_matches(pattern, &host) && model_port(*rport, port, defaults)),
                    "{host:?}:{port:?} should have been routed to {name}"
                );
            }
        }
        Routing::Refused(code) => assert_eq!(code, "bad_request"),
    }
}

/// A host pattern configuration validation accepts (`config.rs`, `route_problems`).
fn valid_pattern(pattern: &str) -> bool {
    let host = pattern.strip_prefix("*.").unwrap_or(pattern);
    !host.is_empty()
        && !host.contains('*')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let first = parts.next().unwrap_or_default();
    let second = parts.next();
    // The matcher alone, against the model (patterns as configuration would spell them).
    if let (Ok(pattern), Some(Ok(host))) =
        (std::str::from_utf8(first), second.map(std::str::from_utf8))
        && valid_pattern(pattern)
    {
        assert_eq!(
            host_matches(pattern, host),
            model_matches(pattern.strip_suffix('.').unwrap_or(pattern), host),
            "{pattern:?} vs {host:?}"
        );
    }
    // The whole routing decision: first line the request target, second the Host header.
    if let Ok(uri) = Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(first)) {
        check_request(uri, second);
    }
});
