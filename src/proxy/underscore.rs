//! Request header names containing `_`: what `proxy.underscore_headers` does with them, and the
//! names refused whatever it says.
//!
//! CGI maps a header to an environment variable (`X-Foo` → `HTTP_X_FOO`), so CGI-style
//! upstreams, many WSGI and Rack servers and some gateways read `_` as `-`: to them
//! `Transfer_Encoding: chunked` is `Transfer-Encoding: chunked`, a framing the proxy never saw
//! (it re-frames the request by its own reading), and the upstream desynchronises. A name that
//! reads as a framing header, a hop-by-hop header, `Host` or `Authorization` once every `_` is
//! read as `-` is therefore always refused with 400, even under `allow`. Other names with `_`
//! are dropped (the default, as nginx does), refused, or forwarded, as configured.
//!
//! Cost: requests without such a name (nearly all) pay one scan of their header names for `_`
//! and allocate nothing; the rest take the out-of-line path.

use http::Response;
use http::header::{HeaderMap, HeaderName};

use super::Inner;
use super::body::ProxyBody;
use super::error::{ErrorCode, ProxyError};
use crate::config::UnderscoreHeaders;
use crate::metrics::UnderscoreAction;

/// The answer to a name that reads as a sensitive header once `_` is read as `-`. It closes the
/// connection: the client may have framed its body by the header we did not honour.
const SENSITIVE: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "a header name with '_' reads as Content-Length, Transfer-Encoding, Host, Authorization or a \
     hop-by-hop header once '_' is read as '-' (as CGI-style servers do); it is always refused",
)
.closing();

/// The answer under `underscore_headers = "reject"`.
const REJECTED: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "header names containing '_' are refused (proxy.underscore_headers = \"reject\"); use '-'",
);

/// Names that must not reach an upstream under another spelling: framing (RFC 9112 §6),
/// hop-by-hop (RFC 9110 §7.6.1, plus `Keep-Alive` and `Proxy-Connection`), and the two the
/// proxy sets itself. Lowercase, as `HeaderName` stores them. Any `proxy-*` name counts too
/// (see [`is_sensitive`]).
const SENSITIVE_NAMES: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "host",
    "authorization",
];

impl Inner {
    /// Applies `proxy.underscore_headers` to a request about to be forwarded and counts what it
    /// did; the proxy's answer if the request is refused.
    pub(super) fn underscore_names(&self, headers: &mut HeaderMap) -> Option<Response<ProxyBody>> {
        match apply(self.underscore_headers, headers) {
            Ok(dropped) => {
                self.underscore_dropped(dropped);
                None
            }
            Err(refusal) => Some(self.underscore_refused(refusal)),
        }
    }

    /// Counts header lines the policy dropped, if any.
    pub(super) fn underscore_dropped(&self, dropped: u64) {
        if dropped > 0 {
            self.metrics
                .underscore_headers(UnderscoreAction::Dropped, dropped);
        }
    }

    /// Counts a refused request's header lines and answers it.
    pub(super) fn underscore_refused(&self, refusal: Refusal) -> Response<ProxyBody> {
        self.metrics
            .underscore_headers(UnderscoreAction::Refused, refusal.headers);
        self.refuse(refusal.error)
    }
}

/// Why a request is refused: the answer, and how many of its header lines had `_` in the name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The answer.
    pub(crate) error: ProxyError,
    /// Header lines counted as refused.
    pub(crate) headers: u64,
}

/// Applies `policy` to the header names containing `_`. `Ok(n)`: the request may be forwarded
/// and `n` header lines were dropped.
pub(crate) fn apply(policy: UnderscoreHeaders, headers: &mut HeaderMap) -> Result<u64, Refusal> {
    if !headers.keys().any(has_underscore) {
        return Ok(0);
    }
    apply_present(policy, headers)
}

/// [`apply`] for a request that has at least one such name.
#[cold]
#[inline(never)]
fn apply_present(policy: UnderscoreHeaders, headers: &mut HeaderMap) -> Result<u64, Refusal> {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| has_underscore(n))
        .cloned()
        .collect();
    let lines: u64 = names
        .iter()
        .map(|n| headers.get_all(n).iter().count() as u64)
        .sum();
    let refuse = |error| {
        Err(Refusal {
            error,
            headers: lines,
        })
    };
    if names.iter().any(|n| is_sensitive(n.as_str())) {
        return refuse(SENSITIVE);
    }
    match policy {
        UnderscoreHeaders::Allow => Ok(0),
        UnderscoreHeaders::Reject => refuse(REJECTED),
        UnderscoreHeaders::Drop => {
            for name in &names {
                headers.remove(name);
            }
            Ok(lines)
        }
    }
}

fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().as_bytes().contains(&b'_')
}

/// Whether `name` is a sensitive name, or any `proxy-*` name, once every `_` is read as `-`
/// (ASCII case-insensitively). Compares in place: nothing is allocated.
fn is_sensitive(name: &str) -> bool {
    let folded_eq = |want: &str| {
        name.len() == want.len() && name.bytes().zip(want.bytes()).all(|(a, b)| fold(a) == b)
    };
    SENSITIVE_NAMES.iter().any(|s| folded_eq(s))
        || name
            .get(..6)
            .is_some_and(|head| head.bytes().map(fold).eq(*b"proxy-"))
}

/// One byte as an upstream that reads `_` as `-` compares it: lowercase, `_` as `-`.
fn fold(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        h
    }

    const ALL: [UnderscoreHeaders; 3] = [
        UnderscoreHeaders::Drop,
        UnderscoreHeaders::Reject,
        UnderscoreHeaders::Allow,
    ];

    #[test]
    fn underscore_spellings_of_sensitive_names_are_refused_under_every_policy() {
        for name in [
            "Transfer_Encoding",
            "transfer_encoding",
            "Content_Length",
            "CONTENT_LENGTH",
            "Keep_Alive",
            "Proxy_Authorization",
            "Proxy_Connection",
            "proxy_authenticate",
            "Proxy_Anything",
            "proxy-anything_else",
        ] {
            for policy in ALL {
                let mut h = headers(&[name, "accept"]);
                let got = apply(policy, &mut h);
                assert_eq!(
                    got,
                    Err(Refusal {
                        error: SENSITIVE,
                        headers: 1
                    }),
                    "{name} under {policy:?}"
                );
                assert!(got.unwrap_err().error.close);
                assert_eq!(h.len(), 2, "nothing is removed from a refused request");
            }
        }
    }

    #[test]
    fn only_an_exact_fold_is_sensitive() {
        // These read as other names than the sensitive ones, whatever `_` becomes.
        for name in [
            "host_",
            "x_host",
            "authori_zation",
            "authorization_",
            "content_length_x",
            "transfer_encodings",
            "proxy",
            "proxyx_y",
            "x_proxy_authorization",
        ] {
            assert!(!is_sensitive(name), "{name}");
        }
        for name in ["transfer_encoding", "TrAnSfEr_EnCoDiNg", "content_length"] {
            assert!(is_sensitive(name), "{name}");
        }
        // The plain spellings are sensitive too (they never get here: no `_`).
        assert!(is_sensitive("authorization") && is_sensitive("te"));
    }

    #[test]
    fn other_underscore_names_follow_the_policy() {
        let request = ["accept", "x_api_key", "X_Trace_Id", "x-ok"];
        let mut h = headers(&request);
        h.append("x_api_key", HeaderValue::from_static("second line"));

        let mut dropped = h.clone();
        assert_eq!(apply(UnderscoreHeaders::Drop, &mut dropped), Ok(3));
        let mut left: Vec<&str> = dropped.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-ok"]);

        let mut rejected = h.clone();
        let refusal = apply(UnderscoreHeaders::Reject, &mut rejected).unwrap_err();
        assert_eq!(
            refusal,
            Refusal {
                error: REJECTED,
                headers: 3
            }
        );
        // Nothing ambiguous about the framing: the connection may stay open.
        assert!(!refusal.error.close);

        let mut allowed = h.clone();
        assert_eq!(apply(UnderscoreHeaders::Allow, &mut allowed), Ok(0));
        assert_eq!(allowed, h);
    }

    #[test]
    fn requests_without_underscores_are_untouched() {
        for policy in ALL {
            let mut h = headers(&["accept", "x-request-id", "content-length"]);
            let before = h.clone();
            assert_eq!(apply(policy, &mut h), Ok(0));
            assert_eq!(h, before);
        }
    }
}
