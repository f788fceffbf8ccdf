//! The header changes the proxy makes for safety, in one place. [`sanitise`] is the whole
//! security-critical sequence for a request sent on a route, in this order:
//! 1. header names containing `_`: dropped, refused or kept (`proxy.underscore_headers`,
//!    `underscore.rs`); a name that reads as a sensitive header is always refused;
//! 2. hop-by-hop headers removed, with every header a `Connection` value names;
//! 3. every `Authorization` the client sent removed;
//! 4. `Host` set to the upstream's;
//! 5. our `Via` entry appended;
//! 6. the route's static headers set;
//! 7. last, [`Sanitised::inject`] inserts the token's pre-built `Authorization` value, so that
//!    nothing (not even `Connection: Authorization`) can remove or duplicate it.
//!
//! Steps 1-6 run before the request waits for a token (a refused request never waits); step 7
//! needs the token, so it is a method of what [`sanitise`] returns. The `headers` fuzz target
//! calls exactly this pair. Responses and unrouted requests only get [`strip_hop_by_hop`].

use http::header::{
    AUTHORIZATION, CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};

use super::underscore::{self, Refusal};
use crate::config::UnderscoreHeaders;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy
/// credentials meant for us. (The fast path's codec, `h1/`, removes the same list.)
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_CONNECTION,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

/// Whether `name` (any letter case) is on the fixed hop-by-hop list: the byte-level test of
/// the fast path's codec, which has names as the client spelled them, not `HeaderName`s.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Steps 1-6 of the module documentation, in order, on the headers of a request sent on a
/// route. `Err` if the underscore policy refuses it (nothing else was changed then).
pub(crate) fn sanitise<'h>(
    headers: &'h mut HeaderMap,
    underscore_policy: UnderscoreHeaders,
    host: HeaderValue,
    via: &HeaderValue,
    statics: &HeaderMap,
) -> Result<Sanitised<'h>, Refusal> {
    let dropped = underscore::apply(underscore_policy, headers)?;
    strip_hop_by_hop(headers);
    headers.remove(AUTHORIZATION);
    headers.insert(HOST, host);
    headers.append(VIA, via.clone());
    for (name, value) in statics {
        headers.insert(name, value.clone());
    }
    Ok(Sanitised { headers, dropped })
}

/// A routed request's headers after steps 1-6, waiting for their token.
#[must_use = "a routed request is forwarded only with its token: call `inject`"]
pub(crate) struct Sanitised<'h> {
    headers: &'h mut HeaderMap,
    /// Header lines the underscore policy dropped (for the metric).
    pub(crate) dropped: u64,
}

impl Sanitised<'_> {
    /// Step 7: inserts `token` (the pre-built sensitive value, so this clones a reference) as
    /// the one `Authorization`.
    pub(crate) fn inject(self, token: &HeaderValue) {
        self.headers.insert(AUTHORIZATION, token.clone());
    }
}

/// Removes hop-by-hop headers: those `Connection` names, then the fixed list.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (comparing standard names is an integer compare) says
    // which of the nine are there; most messages carry none, and only those present cost a
    // hashed removal.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    match headers.get_all(CONNECTION).iter().take(2).count() {
        0 => {}
        1 => {
            if let Some(value) = headers.remove(CONNECTION) {
                remove_named(headers, &value);
            }
            present &= !1; // CONNECTION is HOP_BY_HOP[0]
        }
        _ => {
            let values: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
            for value in &values {
                remove_named(headers, value);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes every header a `Connection` value lists. Names on the fixed hop-by-hop list (such
/// as `keep-alive`) are skipped: [`strip_hop_by_hop`] removes those that are present anyway.
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    for token in connection.as_bytes().split(|&b| b == b',') {
        let name = token.trim_ascii();
        if name.is_empty()
            || HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
        {
            continue;
        }
        // `&str` names are looked up without allocating; invalid ones match nothing.
        if let Ok(name) = std::str::from_utf8(name) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret-Hop , close"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("accept", "application/json"),
            ("x-end-to-end", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-end-to-end"]);
    }

    #[test]
    fn connection_authorization_cannot_remove_the_injected_token() {
        let token = HeaderValue::from_static("Bearer injected");
        let mut h = headers(&[
            ("connection", "Authorization"),
            ("authorization", "Bearer from-the-app"),
            ("authorization", "Basic second"),
        ]);
        // The sequence forward_routed runs.
        sanitise(
            &mut h,
            UnderscoreHeaders::Drop,
            HeaderValue::from_static("up.example"),
            &HeaderValue::from_static("1.1 us"),
            &HeaderMap::new(),
        )
        .unwrap()
        .inject(&token);
        let all: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(all, [&token]);
    }

    #[test]
    fn invalid_names_in_connection_are_ignored() {
        let mut h = headers(&[("accept", "x")]);
        h.insert(
            CONNECTION,
            HeaderValue::from_bytes(b"bad name, , \xff\xfe, accept\xff").unwrap(),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_routed_request_leaves_with_our_host_via_statics_and_one_token() {
        let mut h = headers(&[
            ("connection", "host, x-static, via"),
            ("host", "attacker.example"),
            ("host", "second.example"),
            ("via", "1.0 earlier"),
            ("x-static", "from-the-app"),
            ("authorization", "Bearer from-the-app"),
            ("x_forwarded", "dropped"),
        ]);
        let token = HeaderValue::from_static("Bearer injected");
        let mut statics = HeaderMap::new();
        statics.insert("x-static", HeaderValue::from_static("route"));
        let sanitised = sanitise(
            &mut h,
            UnderscoreHeaders::Drop,
            HeaderValue::from_static("up.example"),
            &HeaderValue::from_static("1.1 us"),
            &statics,
        )
        .unwrap();
        assert_eq!(sanitised.dropped, 1);
        sanitised.inject(&token);
        let all = |n: &str| h.get_all(n).iter().cloned().collect::<Vec<_>>();
        assert_eq!(all("host"), ["up.example"]);
        assert_eq!(all("via"), ["1.1 us"]);
        assert_eq!(all("x-static"), ["route"]);
        assert_eq!(all("authorization"), [token]);
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn a_refused_request_is_not_changed_further() {
        let mut h = headers(&[("transfer_encoding", "chunked"), ("authorization", "x")]);
        let refused = sanitise(
            &mut h,
            UnderscoreHeaders::Allow,
            HeaderValue::from_static("up.example"),
            &HeaderValue::from_static("1.1 us"),
            &HeaderMap::new(),
        );
        assert!(refused.is_err());
        assert_eq!(h.len(), 2);
        assert!(h.get("host").is_none());
    }
}
