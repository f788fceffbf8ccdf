//! The routing decision: where a request goes ([`Target`]), and the upstream origin a routed
//! request is sent to ([`Origin`]). Pure: it reads the request and the route table and has no
//! side effects, so the `route` fuzz target drives it directly.
//!
//! Absolute-form requests are routed by host and port; origin-form requests by `path_prefix`
//! (and `Host`), then by `Host` alone; an origin-form request no route claims is refused, never
//! sent anywhere else (in particular not back to this proxy).

use bytes::Bytes;
use http::Request;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, Scheme};

use super::Inner;
use super::error::{ErrorCode, ProxyError};
use super::route::{Route, Upstream, normalise, split_host_port};

const USERINFO: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "request URLs with user:password@ are refused: credentials in the URL would be sent to the \
     upstream; remove them",
);
const BAD_SCHEME: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "only http:// (and https://) request URLs can be proxied",
);
const NO_ROUTE: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "this is a forward proxy: send absolute-form requests (set HTTP_PROXY to this address and \
     call http://<host>/...) or configure a route whose path_prefix or host matches this \
     origin-form request",
);
pub(super) const BAD_TARGET: ProxyError = ProxyError::new(
    ErrorCode::BadRequest,
    "the request target cannot be forwarded",
);

/// Where a request goes.
pub(super) enum Target<'a> {
    /// A route's upstream.
    Routed {
        /// The route.
        route: &'a Route,
        /// Its upstream origin for this request.
        origin: Origin,
        /// Path bytes to strip (gateway mode).
        strip: usize,
    },
    /// No route: `proxy.unmatched` decides.
    Unmatched,
}

/// Scheme, authority and `Host` of an upstream request.
pub(super) struct Origin {
    /// `https` for a wildcard route; the route's own scheme otherwise.
    pub(super) scheme: Scheme,
    /// `host[:port]` connected to.
    pub(super) authority: Authority,
    /// The `Host` header sent.
    pub(super) host: HeaderValue,
    /// The route's base path, prepended to the request path.
    pub(super) base_path: Option<Box<str>>,
}

impl Origin {
    /// `host[:port]` the request is sent to.
    pub(super) fn authority(&self) -> &str {
        self.authority.as_str()
    }

    fn of(upstream: &Upstream, request_host: &str) -> Result<Self, ProxyError> {
        match upstream {
            Upstream::Fixed {
                scheme,
                authority,
                host,
                base_path,
            } => Ok(Self {
                scheme: scheme.clone(),
                authority: authority.clone(),
                host: host.clone(),
                base_path: base_path.clone(),
            }),
            Upstream::RequestHost { port } => {
                // The one allocation of a routed request: the wildcard's target host,
                // normalised (it matched the pattern, so it is a plain DNS name).
                let host = normalise(request_host);
                let mut s = String::with_capacity(host.len() + 6);
                s.extend(host.chars().map(|c| c.to_ascii_lowercase()));
                if let Some(p) = port {
                    s.push(':');
                    // `itoa` formats on the stack: no `format!`, no allocation.
                    s.push_str(itoa::Buffer::new().format(*p));
                }
                let bytes = Bytes::from(s);
                let authority =
                    Authority::from_maybe_shared(bytes.clone()).map_err(|_| BAD_TARGET)?;
                // What the connector will connect to must be exactly the host that matched the
                // wildcard, on the route's port: never another host an authority parser reads
                // out of it.
                if !authority.host().eq_ignore_ascii_case(host) || authority.port_u16() != *port {
                    return Err(BAD_TARGET);
                }
                Ok(Self {
                    scheme: Scheme::HTTPS,
                    authority,
                    host: HeaderValue::from_maybe_shared(bytes).map_err(|_| BAD_TARGET)?,
                    base_path: None,
                })
            }
        }
    }
}

impl Inner {
    /// Finds where `req` goes, without side effects.
    pub(super) fn target<'a, B>(&'a self, req: &Request<B>) -> Result<Target<'a>, ProxyError> {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
        self.target_of(req.uri(), host)
    }

    /// Finds where a request for `uri` with `Host` value `host` goes, without side effects
    /// (the fast path's entry, which has no `Request`).
    pub(super) fn target_of<'a>(
        &'a self,
        uri: &http::Uri,
        host: Option<&str>,
    ) -> Result<Target<'a>, ProxyError> {
        if let Some(authority) = uri.authority() {
            // Absolute-form: the URL names the host.
            if authority.as_str().contains('@') {
                return Err(USERINFO);
            }
            // Parsed once for both uses below.
            let port = authority.port_u16();
            // A port that is not a number (`:99999`) is not "no port": it names no route.
            if port.is_none() && names_a_port(authority) {
                return Err(BAD_TARGET);
            }
            let defaults: &[u16] = match uri.scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("http") => &[80],
                Some(s) if s.eq_ignore_ascii_case("https") => &[443],
                _ => return Err(BAD_SCHEME),
            };
            let host = authority.host();
            return match self.routes.by_host(host, port, defaults) {
                Some(route) => Ok(Target::Routed {
                    route,
                    origin: Origin::of(&route.upstream, host)?,
                    strip: 0,
                }),
                None => Ok(Target::Unmatched),
            };
        }
        // Origin-form: only routes can say where it goes; it is never sent anywhere else
        // (in particular not back to this proxy).
        if !uri.path().starts_with('/') {
            return Err(NO_ROUTE);
        }
        let host = host.and_then(split_host_port);
        if let Some(m) = self.routes.by_prefix(uri.path(), host.map(|h| h.0)) {
            return Ok(Target::Routed {
                route: m.route,
                origin: Origin::of(&m.route.upstream, host.map_or("", |h| h.0))?,
                strip: m.strip,
            });
        }
        if let Some((h, port)) = host
            && let Some(route) = self.routes.by_host(h, port, &[80, 443])
        {
            return Ok(Target::Routed {
                route,
                origin: Origin::of(&route.upstream, h)?,
                strip: 0,
            });
        }
        Err(NO_ROUTE)
    }
}

/// Whether `authority` has a non-empty port part (after the host, outside IPv6 brackets).
fn names_a_port(authority: &Authority) -> bool {
    let s = authority.as_str();
    let after_host = s.rfind(']').map_or(s, |i| &s[i + 1..]);
    after_host
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_origins_use_the_normalised_request_host() {
        let up = Upstream::RequestHost { port: Some(8443) };
        let o = Origin::of(&up, "API.Example.COM.").unwrap();
        assert_eq!(o.authority.as_str(), "api.example.com:8443");
        assert_eq!(o.host, "api.example.com:8443");
        assert_eq!(o.scheme, Scheme::HTTPS);
    }

    #[test]
    fn wildcard_origins_refuse_hosts_an_authority_parser_reads_differently() {
        for host in ["evil:.example.com", "evil.test:443", "a@b.example.com"] {
            assert!(
                Origin::of(&Upstream::RequestHost { port: None }, host).is_err(),
                "{host}"
            );
        }
        assert!(Origin::of(&Upstream::RequestHost { port: Some(8443) }, "a.example.com").is_ok());
    }

    #[test]
    fn unparsable_ports_are_named_ports() {
        for (a, named) in [
            ("a:99999", true),
            ("a:8o", true),
            ("a:80", true),
            ("a:", false),
            ("a", false),
            ("[::1]", false),
            ("[::1]:70000", true),
        ] {
            assert_eq!(names_a_port(&Authority::from_static(a)), named, "{a}");
        }
    }
}
