//! Entry points for the fuzz targets in `fuzz/`: the host matcher and normaliser, the routing
//! decision, the hop-by-hop header sanitiser, the whole routed-request header sequence, the
//! underscore header policy, the wire guard's framer and the HTTP/1 fast path's codec (request
//! and response heads, chunked scanner), each reachable without sockets. Not a supported API; hidden from the documentation.

use std::collections::BTreeMap;
use std::time::Duration;

use std::ops::Range;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};

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

/// What the fast path adds to a request head going upstream (see `h1/request.rs`,
/// `Outgoing`).
#[derive(Clone, Copy, Debug)]
pub struct H1Outgoing<'a> {
    /// Path and query of the request line.
    pub path_and_query: &'a [u8],
    /// The `Host` value.
    pub host: &'a [u8],
    /// Our `Via` entry.
    pub via: &'a [u8],
    /// The route's static headers.
    pub statics: &'a HeaderMap,
    /// The subject header, removed from every request.
    pub remove: Option<&'a HeaderName>,
    /// The one `Authorization` value.
    pub authorization: &'a [u8],
}

/// The fast path's reading of a request head it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H1Request {
    /// The method.
    pub method: Method,
    /// The head's length, through its empty line.
    pub len: usize,
    /// `Content-Length` (0 when absent).
    pub content_length: u64,
    /// `Connection: close`.
    pub close: bool,
    /// Where the `Authorization` value is in the written upstream head.
    pub authorization: Range<usize>,
}

/// The fast path on a client's request head: parsed (`RequestHead::parse`), then, if it takes
/// it, the upstream head appended to `out` (`write_upstream_head`). `Ok(None)`: incomplete;
/// `Err`: the reason it leaves the head to hyper (`Ineligible`, in lower case).
pub fn h1_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    pseudonym: &[u8],
    max_body: u64,
    outgoing: &H1Outgoing<'_>,
) -> Result<Option<H1Request>, &'static str> {
    use super::h1::request::{Ineligible, Outgoing, RequestHead, slots, write_upstream_head};
    let mut slots = slots();
    let head = RequestHead::parse(buf, &mut slots, pseudonym, max_body).map_err(|e| match e {
        Ineligible::Version => "version",
        Ineligible::Method => "method",
        Ineligible::Expect => "expect",
        Ineligible::TransferEncoding => "transfer-encoding",
        Ineligible::LargeBody => "large-body",
        Ineligible::Underscore => "underscore",
        Ineligible::Loop => "loop",
        Ineligible::Unusual => "unusual",
    })?;
    let Some(head) = head else {
        return Ok(None);
    };
    let authorization = write_upstream_head(
        out,
        &head,
        &Outgoing {
            path_and_query: outgoing.path_and_query,
            host: outgoing.host,
            via: outgoing.via,
            statics: outgoing.statics,
            remove: outgoing.remove,
            authorization: outgoing.authorization,
        },
    );
    Ok(Some(H1Request {
        method: head.method.clone(),
        len: head.len,
        content_length: head.content_length,
        close: head.close,
        authorization,
    }))
}

/// How the fast path delimits a response body (see `h1/response.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H1Framing {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// Chunked, passed through.
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// The fast path's reading of an upstream response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H1Response {
    /// The status code.
    pub status: u16,
    /// The head's length, through its empty line.
    pub len: usize,
    /// How its body is delimited.
    pub framing: H1Framing,
    /// Whether the upstream connection ends after it.
    pub close: bool,
}

/// The fast path on an upstream's response head (`ResponseHead::parse`), and the client's head
/// appended to `out` (`write_client_head`). `Ok(None)`: incomplete; `Err`: the refusal
/// (`malformed`, `too-large`, `framing`).
pub fn h1_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head_request: bool,
    close_client: bool,
) -> Result<Option<H1Response>, &'static str> {
    use super::h1::request::slots;
    use super::h1::response::{ResponseError, ResponseFraming, ResponseHead, write_client_head};
    let mut slots = slots();
    let head = ResponseHead::parse(buf, &mut slots, head_request).map_err(|e| match e {
        ResponseError::Malformed => "malformed",
        ResponseError::TooLarge => "too-large",
        ResponseError::Framing => "framing",
    })?;
    let Some(head) = head else {
        return Ok(None);
    };
    write_client_head(out, &head, close_client);
    Ok(Some(H1Response {
        status: head.status,
        len: head.len,
        framing: match head.framing {
            ResponseFraming::Empty => H1Framing::Empty,
            ResponseFraming::Length(n) => H1Framing::Length(n),
            ResponseFraming::Chunked => H1Framing::Chunked,
            ResponseFraming::Close => H1Framing::Close,
        },
        close: head.close,
    }))
}

/// The hyper path's check of an upstream response's framing (`forward.rs`): `false` if the
/// response is refused; a `Content-Length` beside `chunked` is removed.
pub fn check_response_framing(headers: &mut HeaderMap) -> bool {
    super::forward::check_response_framing(headers).is_ok()
}

/// The fast path's chunked body scanner (`h1/chunked.rs`).
#[derive(Debug, Default)]
pub struct ChunkedScanner(super::h1::chunked::ChunkedScanner);

impl ChunkedScanner {
    /// At the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans the next bytes, calling `data` with the chunk data: `Ok(Some(n))` when the body
    /// ended after `n` bytes of `input`, `Ok(None)` when it goes on, `Err` (the error's text)
    /// when its framing is refused.
    pub fn scan(
        &mut self,
        input: &[u8],
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<usize>, &'static str> {
        use super::h1::chunked::ChunkStep;
        match self.0.scan(input, data) {
            Ok(ChunkStep::More) => Ok(None),
            Ok(ChunkStep::End(n)) => Ok(Some(n)),
            Err(_) => Err("malformed chunked body"),
        }
    }
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
