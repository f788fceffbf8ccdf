//! Entry points for the fuzz targets in `fuzz/`: the host matcher and normaliser, the routing
//! decision, the hop-by-hop header sanitiser, the whole routed-request header sequence, the
//! underscore header policy and the wire guard's
//! framer, each reachable without sockets. Not a supported API; hidden from the documentation.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request};

use super::route::HostPattern;
use super::target::Target;
use super::{Proxy, ProxyBuildError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::token::TokenCell;

pub use super::wire::Framing;

/// Whether the configured route host `pattern` matches `host` as a request spells it.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    HostPattern::parse(pattern).matches(host)
}

/// `host` without IPv6 brackets and one trailing dot, as the matcher compares it.
pub fn normalise(host: &str) -> &str {
    super::route::normalise(host)
}

/// `host[:port]` split as the proxy splits a `Host` header.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    super::route::split_host_port(authority)
}

/// Removes hop-by-hop headers, as on every forwarded request and response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    super::sanitise::strip_hop_by_hop(headers);
}

/// The header changes of a request sent on a route, as the request path makes them:
/// `sanitise` (underscore policy, hop-by-hop, the client's `Authorization`, `Host`, `Via`,
/// static headers), then the token. `Ok(n)` with `n` header lines dropped for `_`, or the
/// refusal's error code (then only the underscore policy has looked at the headers).
pub fn sanitise(
    headers: &mut HeaderMap,
    policy: crate::config::UnderscoreHeaders,
    host: HeaderValue,
    via: &HeaderValue,
    statics: &HeaderMap,
    token: &HeaderValue,
) -> Result<u64, &'static str> {
    let sanitised = super::sanitise::sanitise(headers, policy, host, via, statics)
        .map_err(|r| r.error.code.as_str())?;
    let dropped = sanitised.dropped;
    sanitised.inject(token);
    Ok(dropped)
}

/// Applies `proxy.underscore_headers` as on every forwarded request: `Ok(n)` with `n` header
/// lines dropped, or the refusal's error code.
pub fn underscore_headers(
    policy: crate::config::UnderscoreHeaders,
    headers: &mut HeaderMap,
) -> Result<u64, &'static str> {
    super::underscore::apply(policy, headers).map_err(|r| r.error.code.as_str())
}

/// The wire guard's framing state machine.
#[derive(Debug)]
pub struct Framer(super::wire::Framer);

/// What [`Framer::scan`] decided (see `wire/framer.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Every byte belongs to complete, accepted message parts.
    All,
    /// Bytes from this offset on are an incomplete head; pass them again with more.
    Partial(usize),
    /// The head at this offset is refused with this error code.
    Reject(usize, &'static str),
}

impl Framer {
    /// A framer for heads of at most `max_head` bytes.
    pub fn new(max_head: usize) -> Self {
        Self(super::wire::Framer::new(max_head))
    }

    /// Follows `data` (see `Framer::scan` in `wire/framer.rs` for the protocol).
    pub fn scan(&mut self, data: &[u8]) -> Scan {
        match self.0.scan(data) {
            super::wire::Scan::All => Scan::All,
            super::wire::Scan::Partial(k) => Scan::Partial(k),
            super::wire::Scan::Reject(k, e) => Scan::Reject(k, e.code.as_str()),
        }
    }

    /// What it expects next.
    pub fn framing(&self) -> Framing {
        self.0.framing()
    }
}

/// The length of the complete head at the start of `data`, as the framer finds it.
pub fn head_len(data: &[u8]) -> Option<usize> {
    super::wire::head_len(data)
}

/// The framer's verdict on one complete head: its body framing, or the refusal's code.
pub fn judge_head(head: &[u8]) -> Result<Framing, &'static str> {
    super::wire::judge_head(head).map_err(|c| c.as_str())
}

/// Where the proxy would send a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routing {
    /// To this route's upstream.
    Route {
        /// The route's name.
        label: String,
        /// `host[:port]` the request would be sent to (and connected to).
        authority: String,
        /// Bytes of the path a `path_prefix` strips.
        strip: usize,
    },
    /// No route: `proxy.unmatched` decides.
    Unmatched,
    /// Refused with this error code.
    Refused(&'static str),
}

/// The routing decision of a proxy built from a configuration.
#[derive(Debug)]
pub struct Router(Proxy);

impl Router {
    /// A router for `config` (token cells are created empty; routing never reads them).
    pub fn new(config: &Config) -> Result<Self, ProxyBuildError> {
        let tokens: BTreeMap<_, _> = config
            .tokens
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    TokenCell::new(n.as_str(), Duration::from_secs(5)),
                )
            })
            .collect();
        Proxy::new(config, &tokens, Metrics::new()).map(Self)
    }

    /// Where `req` would go.
    pub fn route<B>(&self, req: &Request<B>) -> Routing {
        match self.0.current.load().target(req) {
            Ok(Target::Routed {
                route,
                origin,
                strip,
            }) => Routing::Route {
                label: route.label.to_string(),
                authority: origin.authority().to_owned(),
                strip,
            },
            Ok(Target::Unmatched) => Routing::Unmatched,
            Err(e) => Routing::Refused(e.code.as_str()),
        }
    }
}
