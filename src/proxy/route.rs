//! Which configured route a request belongs to, and where that route forwards.
//!
//! Everything a route needs on the request path is resolved once at start-up: its token cell,
//! its upstream (scheme, authority, `Host` value, base path), its static headers as a
//! `HeaderMap`, its replay statuses and its metric handles. Matching compares host names
//! case-insensitively in place (ignoring one trailing dot and IPv6 brackets) rather than
//! building a lowercased copy, so routing a request allocates nothing.
//!
//! Host patterns are either exact (`ob.flinksapp.com`) or `*.suffix`, which matches any name
//! ending in `.suffix` with at least one label before it: not the apex, and not `evilsuffix`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use super::ProxyBuildError;
use crate::config::{Config, RouteConfig, check_endpoint_url};
use crate::metrics::{Metrics, RouteMetrics};
use crate::subject::Subjects;
use crate::subject::tokens::SubjectTokens;
use crate::token::TokenCell;
use crate::token::client::TokenClient;

/// The host part of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// One name, lowercased, without a trailing dot.
    Exact(Box<str>),
    /// `*.example.com`, stored as `.example.com`, lowercased.
    Suffix(Box<str>),
}

impl HostPattern {
    /// Parses a configured host, normalising it.
    pub(crate) fn parse(host: &str) -> Self {
        let lower = host.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let lower = lower.trim_start_matches('[').trim_end_matches(']');
        match lower.strip_prefix('*') {
            Some(suffix) => Self::Suffix(suffix.into()),
            None => Self::Exact(lower.into()),
        }
    }

    /// Whether `host` (as the request spelled it) matches.
    pub(crate) fn matches(&self, host: &str) -> bool {
        let host = normalise(host).as_bytes();
        match self {
            Self::Exact(name) => host.eq_ignore_ascii_case(name.as_bytes()),
            Self::Suffix(suffix) => {
                let suffix = suffix.as_bytes();
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }

    fn is_wildcard(&self) -> bool {
        matches!(self, Self::Suffix(_))
    }
}

/// `host` without IPv6 brackets and without one trailing dot. Borrowed: no allocation.
pub(crate) fn normalise(host: &str) -> &str {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// Splits `host[:port]` (a `Host` header or an authority without userinfo). `None` if the port
/// is not a number.
pub(crate) fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        // IPv6 literal: the port, if any, follows the closing bracket.
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if rest.is_empty() => (host, None),
            None => return None,
        }
    } else {
        // A host that is not an IPv6 literal has no colon: `evil:.example.com:443` is not the
        // host `evil:.example.com` on port 443 (an authority parser reads the host `evil`).
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The token a route injects, resolved once at start-up.
pub(crate) enum RouteToken {
    /// One token for every request: the cell its refresher keeps fresh.
    Named(Arc<TokenCell>),
    /// `per_subject = true`: the token of the subject the request names.
    PerSubject(Arc<SubjectTokens<TokenClient>>),
}

/// Where a route forwards to.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// A fixed origin: the route's host, or its `upstream` override.
    Fixed {
        /// `https`, or `http` for a loopback override.
        scheme: Scheme,
        /// `host[:port]`.
        authority: Authority,
        /// The same, as the `Host` header value.
        host: HeaderValue,
        /// Path the request path is appended to, without trailing `/`; `None` for the root.
        base_path: Option<Box<str>>,
    },
    /// A wildcard route without override: `https://<request host>[:port]`.
    RequestHost {
        /// Port to connect to when it is not 443.
        port: Option<u16>,
    },
}

/// One configured route, resolved.
pub(crate) struct Route {
    /// Metric and log label.
    pub(crate) label: Box<str>,
    /// Which hosts it matches.
    pub(crate) pattern: HostPattern,
    /// Which port it matches; `None` matches the request's default port.
    port: Option<u16>,
    /// Origin-form prefix (gateway mode).
    prefix: Option<Box<str>>,
    /// The token injected.
    pub(crate) token: RouteToken,
    /// The index of the pooled client the route's requests use (one per credential, see
    /// `upstream.rs`): its token's position in the token map, or for a per-subject token the
    /// number of named tokens plus its position among the per-subject ones (one pool per
    /// per-subject entry, shared by its subjects).
    pub(crate) pool: usize,
    /// Where requests go.
    pub(crate) upstream: Upstream,
    /// Static headers set on every upstream request.
    pub(crate) headers: HeaderMap,
    /// Upstream statuses meaning "token rejected".
    pub(crate) replay_statuses: Box<[u16]>,
    /// Metric handles.
    pub(crate) metrics: RouteMetrics,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("label", &self.label)
            .field("pattern", &self.pattern)
            .field("port", &self.port)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Route {
    fn build(
        index: usize,
        rc: &RouteConfig,
        tokens: &BTreeMap<String, Arc<TokenCell>>,
        subjects: Option<&Subjects>,
        metrics: &Metrics,
    ) -> Result<Self, ProxyBuildError> {
        let fail = |reason: String| ProxyBuildError::Route {
            index,
            route: rc.label().to_owned(),
            reason,
        };
        // A per-subject entry first: a token that is per-subject must never be served from
        // a shared cell, whatever cells the caller passed.
        let per_subject = subjects.and_then(|s| {
            s.token_names()
                .position(|name| name == rc.token)
                .zip(s.entry(&rc.token))
                .map(|(i, entry)| (tokens.len() + i, RouteToken::PerSubject(entry.clone())))
        });
        let named = || {
            tokens.iter().enumerate().find_map(|(i, (name, cell))| {
                (*name == rc.token).then(|| (i, RouteToken::Named(cell.clone())))
            })
        };
        let (pool, token) =
            per_subject
                .or_else(named)
                .ok_or_else(|| ProxyBuildError::MissingToken {
                    index,
                    route: rc.label().to_owned(),
                    token: rc.token.clone(),
                })?;
        let pattern = HostPattern::parse(&rc.host);
        let upstream = match &rc.upstream {
            Some(url) => fixed_from_url(url).map_err(fail)?,
            None => match &pattern {
                HostPattern::Exact(host) => {
                    // A non-default port carries over: the app said `http://host:8443/`
                    // because the service listens there.
                    let authority = match rc.port {
                        Some(p) if p != 80 && p != 443 => bracketed(host, Some(p)),
                        _ => bracketed(host, None),
                    };
                    fixed(Scheme::HTTPS, &authority, None).map_err(fail)?
                }
                HostPattern::Suffix(_) => Upstream::RequestHost {
                    port: rc.port.filter(|p| *p != 80 && *p != 443),
                },
            },
        };
        let mut headers = HeaderMap::with_capacity(rc.headers.len());
        for (name, value) in &rc.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| fail(format!("header {name:?}: {e}")))?;
            let value =
                HeaderValue::from_str(value).map_err(|e| fail(format!("header {name}: {e}")))?;
            headers.insert(name, value);
        }
        Ok(Self {
            label: rc.label().into(),
            pattern,
            port: rc.port,
            prefix: rc
                .path_prefix
                .as_deref()
                .map(|p| p.strip_suffix('/').unwrap_or(p).into()),
            token,
            pool,
            upstream,
            headers,
            replay_statuses: rc.replay_statuses.clone().into_boxed_slice(),
            metrics: metrics.route(rc.label()),
        })
    }

    /// Whether the upstream's answer `status` means the token was rejected.
    pub(crate) fn is_replay_status(&self, status: u16) -> bool {
        self.replay_statuses.contains(&status)
    }

    /// Whether the route matches `port` given the request's default ports (the first is the
    /// scheme's own default).
    fn port_matches(&self, port: Option<u16>, defaults: &[u16]) -> bool {
        match (self.port, port) {
            (None, None) => true,
            (None, Some(p)) => defaults.contains(&p),
            (Some(want), Some(p)) => want == p,
            (Some(want), None) => defaults.first() == Some(&want),
        }
    }
}

fn bracketed(host: &str, port: Option<u16>) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

fn fixed(scheme: Scheme, authority: &str, base_path: Option<Box<str>>) -> Result<Upstream, String> {
    let bytes = Bytes::from(authority.to_owned());
    let parsed = Authority::from_maybe_shared(bytes.clone())
        .map_err(|e| format!("{authority:?} is not a valid authority: {e}"))?;
    let host = HeaderValue::from_maybe_shared(bytes)
        .map_err(|e| format!("{authority:?} is not a valid Host header: {e}"))?;
    Ok(Upstream::Fixed {
        scheme,
        authority: parsed,
        host,
        base_path,
    })
}

fn fixed_from_url(raw: &str) -> Result<Upstream, String> {
    // Validated by the configuration already (https, or http to loopback); checked again so a
    // hand-built Config cannot slip a plain-http remote upstream past us.
    let url = check_endpoint_url(raw)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "upstream {raw:?} must not have a query or fragment"
        ));
    }
    let scheme = if url.scheme() == "https" {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    // `check_endpoint_url` refuses a URL without a host; said again here rather than assumed.
    let Some(host) = url.host_str() else {
        return Err(format!("upstream {raw:?} has no host"));
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = url.path().trim_end_matches('/');
    let base = (!path.is_empty()).then(|| path.into());
    fixed(scheme, &authority, base)
}

/// Every route, with lookup orders computed once.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: Box<[Route]>,
    /// Indices in host-matching order: exact before wildcard (longer suffix first), a route
    /// with a port before one without, one without `path_prefix` before one with, then
    /// configuration order.
    by_host: Box<[usize]>,
    /// Indices of routes with a `path_prefix`, longest prefix first.
    by_prefix: Box<[usize]>,
}

/// A route chosen by its path prefix.
#[derive(Debug)]
pub(crate) struct PrefixMatch<'a> {
    /// The route.
    pub(crate) route: &'a Route,
    /// Bytes of the path that the prefix covers (to strip).
    pub(crate) strip: usize,
}

impl RouteTable {
    /// Resolves every route of `config`.
    pub(crate) fn build(
        config: &Config,
        tokens: &BTreeMap<String, Arc<TokenCell>>,
        subjects: Option<&Subjects>,
        metrics: &Metrics,
    ) -> Result<Self, ProxyBuildError> {
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, rc)| Route::build(i, rc, tokens, subjects, metrics))
            .collect::<Result<Vec<_>, _>>()?;
        let mut by_host: Vec<usize> = (0..routes.len()).collect();
        by_host.sort_by_key(|&i| {
            let r = &routes[i];
            let suffix_len = match &r.pattern {
                HostPattern::Suffix(s) => s.len(),
                HostPattern::Exact(_) => 0,
            };
            (
                r.pattern.is_wildcard(),
                std::cmp::Reverse(suffix_len),
                r.port.is_none(),
                r.prefix.is_some(),
                i,
            )
        });
        let mut by_prefix: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i].prefix.is_some())
            .collect();
        by_prefix.sort_by_key(|&i| {
            (
                std::cmp::Reverse(routes[i].prefix.as_ref().map_or(0, |p| p.len())),
                i,
            )
        });
        Ok(Self {
            routes: routes.into_boxed_slice(),
            by_host: by_host.into_boxed_slice(),
            by_prefix: by_prefix.into_boxed_slice(),
        })
    }

    /// Points the route at position `index` in `[[routes]]` at the pooled client `pool` (one
    /// that presents the route's client certificate, see `upstream.rs`).
    pub(crate) fn set_pool(&mut self, index: usize, pool: usize) {
        if let Some(route) = self.routes.get_mut(index) {
            route.pool = pool;
        }
    }

    /// The route for `host` and `port`; `defaults` are the ports the request's scheme implies,
    /// its own default first (`[80]` for `http://`, `[443]` for `https://`).
    pub(crate) fn by_host(
        &self,
        host: &str,
        port: Option<u16>,
        defaults: &[u16],
    ) -> Option<&Route> {
        self.by_host
            .iter()
            .map(|&i| &self.routes[i])
            .find(|r| r.pattern.matches(host) && r.port_matches(port, defaults))
    }

    /// The route whose `path_prefix` covers `path` (longest first). A prefix covers the path
    /// when the path equals it or continues with `/`; `/flinks` does not cover `/flinksx`.
    ///
    /// A wildcard route without an `upstream` forwards to the request's host, so it is chosen
    /// by prefix only if `host` also matches its pattern: otherwise any `Host` would receive
    /// the token.
    pub(crate) fn by_prefix(&self, path: &str, host: Option<&str>) -> Option<PrefixMatch<'_>> {
        self.by_prefix.iter().find_map(|&i| {
            let route = &self.routes[i];
            let prefix = route.prefix.as_deref()?;
            let rest = path.strip_prefix(prefix)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            if matches!(route.upstream, Upstream::RequestHost { .. })
                && !host.is_some_and(|h| route.pattern.matches(h))
            {
                return None;
            }
            Some(PrefixMatch {
                route,
                strip: prefix.len(),
            })
        })
    }

    /// Whether any route matches `host`, whatever its port (for `CONNECT`).
    pub(crate) fn is_routed_host(&self, host: &str) -> bool {
        self.routes.iter().any(|r| r.pattern.matches(host))
    }

    /// Every route.
    #[cfg(test)]
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(routes: &str) -> Config {
        let text = format!(
            r#"
            [tokens.t]
            token_url = "https://issuer.example/token"
            grant_type = "client_credentials"
            client_id = "id"
            client_secret = "secret"
            {routes}
            "#
        );
        crate::config::from_str(&text, config::FileFormat::Toml, Some(Default::default())).unwrap()
    }

    fn table(routes: &str) -> RouteTable {
        let c = cfg(routes);
        let mut tokens = BTreeMap::new();
        tokens.insert("t".to_owned(), TokenCell::new("t", Duration::from_secs(5)));
        RouteTable::build(&c, &tokens, None, &Metrics::new()).unwrap()
    }

    fn label(r: Option<&Route>) -> Option<&str> {
        r.map(|r| &*r.label)
    }

    #[test]
    fn exact_hosts_match_case_insensitively_and_ignore_a_trailing_dot() {
        let t = table(
            r#"
            [[routes]]
            host = "OB.FlinksApp.com."
            token = "t"
            "#,
        );
        for host in ["ob.flinksapp.com", "OB.FLINKSAPP.COM", "ob.flinksapp.com."] {
            assert!(t.by_host(host, None, &[80]).is_some(), "{host}");
        }
        for host in [
            "ob.flinksapp.com.evil",
            "evil.ob.flinksapp.com",
            "ob.flinksapp.co",
            "xob.flinksapp.com",
            "ob.flinksapp.com..",
        ] {
            assert!(t.by_host(host, None, &[80]).is_none(), "{host}");
        }
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let t = table(
            r#"
            [[routes]]
            host = "*.Example.com"
            token = "t"
            "#,
        );
        assert!(t.by_host("api.example.com", None, &[80]).is_some());
        assert!(t.by_host("a.b.EXAMPLE.com.", None, &[80]).is_some());
        assert!(t.by_host("example.com", None, &[80]).is_none(), "apex");
        assert!(t.by_host("evilexample.com", None, &[80]).is_none());
        assert!(t.by_host(".example.com", None, &[80]).is_none());
        assert!(t.by_host("example.com.evil", None, &[80]).is_none());
    }

    #[test]
    fn ports_must_match_or_be_the_default() {
        let t = table(
            r#"
            [[routes]]
            name = "any"
            host = "allowed"
            token = "t"
            [[routes]]
            name = "p8443"
            host = "special"
            port = 8443
            token = "t"
            "#,
        );
        assert_eq!(label(t.by_host("allowed", None, &[80])), Some("any"));
        assert_eq!(label(t.by_host("allowed", Some(80), &[80])), Some("any"));
        assert!(t.by_host("allowed", Some(8443), &[80]).is_none());
        assert!(t.by_host("allowed", Some(443), &[80]).is_none());
        assert_eq!(
            label(t.by_host("special", Some(8443), &[80])),
            Some("p8443")
        );
        assert!(t.by_host("special", None, &[80]).is_none());
        assert!(t.by_host("special", Some(80), &[80]).is_none());
    }

    #[test]
    fn specific_routes_win_over_general_ones() {
        let t = table(
            r#"
            [[routes]]
            name = "wild"
            host = "*.example.com"
            token = "t"
            [[routes]]
            name = "deeper"
            host = "*.api.example.com"
            token = "t"
            [[routes]]
            name = "exact"
            host = "api.example.com"
            token = "t"
            "#,
        );
        assert_eq!(
            label(t.by_host("api.example.com", None, &[80])),
            Some("exact")
        );
        assert_eq!(
            label(t.by_host("v1.api.example.com", None, &[80])),
            Some("deeper")
        );
        assert_eq!(
            label(t.by_host("www.example.com", None, &[80])),
            Some("wild")
        );
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = table(
            r#"
            [[routes]]
            name = "short"
            host = "a.example"
            path_prefix = "/f"
            token = "t"
            [[routes]]
            name = "long"
            host = "b.example"
            path_prefix = "/f/api/"
            token = "t"
            "#,
        );
        let m = t.by_prefix("/f/api/accounts", None).unwrap();
        assert_eq!((&*m.route.label, m.strip), ("long", 6));
        let m = t.by_prefix("/f/x", None).unwrap();
        assert_eq!((&*m.route.label, m.strip), ("short", 2));
        assert_eq!(&*t.by_prefix("/f", None).unwrap().route.label, "short");
        assert!(t.by_prefix("/fx", None).is_none());
        assert!(t.by_prefix("/", None).is_none());
    }

    #[test]
    fn wildcard_prefix_routes_need_a_matching_host() {
        let t = table(
            r#"
            [[routes]]
            host = "*.example.com"
            path_prefix = "/w"
            token = "t"
            "#,
        );
        assert!(t.by_prefix("/w/x", Some("evil.com")).is_none());
        assert!(t.by_prefix("/w/x", None).is_none());
        assert!(t.by_prefix("/w/x", Some("api.example.com")).is_some());
    }

    #[test]
    fn upstreams_are_precomputed() {
        let t = table(
            r#"
            [[routes]]
            name = "plain"
            host = "ob.flinksapp.com"
            token = "t"
            [[routes]]
            name = "port"
            host = "ob.flinksapp.com"
            port = 8443
            token = "t"
            [[routes]]
            name = "override"
            host = "x.example"
            upstream = "http://127.0.0.1:9000/base/"
            token = "t"
            headers = { "X-Client" = "legacy" }
            [[routes]]
            name = "wild"
            host = "*.example.org"
            token = "t"
            "#,
        );
        let by = |name: &str| t.routes().iter().find(|r| &*r.label == name).unwrap();
        let fixed = |r: &Route| match &r.upstream {
            Upstream::Fixed {
                scheme,
                authority,
                host,
                base_path,
            } => (
                scheme.to_string(),
                authority.to_string(),
                host.to_str().unwrap().to_owned(),
                base_path.as_deref().map(str::to_owned),
            ),
            Upstream::RequestHost { .. } => panic!("not fixed"),
        };
        assert_eq!(
            fixed(by("plain")),
            (
                "https".into(),
                "ob.flinksapp.com".into(),
                "ob.flinksapp.com".into(),
                None
            )
        );
        assert_eq!(fixed(by("port")).1, "ob.flinksapp.com:8443");
        assert_eq!(
            fixed(by("override")),
            (
                "http".into(),
                "127.0.0.1:9000".into(),
                "127.0.0.1:9000".into(),
                Some("/base".into())
            )
        );
        assert_eq!(by("override").headers["x-client"], "legacy");
        assert!(matches!(
            by("wild").upstream,
            Upstream::RequestHost { port: None }
        ));
        assert_eq!(&by("plain").replay_statuses[..], &[401]);
    }

    #[test]
    fn connect_checks_every_route_whatever_the_port() {
        let t = table(
            r#"
            [[routes]]
            host = "special"
            port = 8443
            token = "t"
            "#,
        );
        assert!(t.is_routed_host("special"));
        assert!(t.is_routed_host("SPECIAL."));
        assert!(!t.is_routed_host("other"));
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("a.example"), Some(("a.example", None)));
        assert_eq!(
            split_host_port("a.example:8080"),
            Some(("a.example", Some(8080)))
        );
        assert_eq!(split_host_port("[::1]:443"), Some(("[::1]", Some(443))));
        assert_eq!(split_host_port("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_host_port("a:b"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("[::1]x"), None);
        assert_eq!(split_host_port("evil:.a.example:443"), None);
        assert_eq!(split_host_port("a.example:443:80"), None);
        assert_eq!(normalise("[::1]"), "::1");
        assert_eq!(normalise("a.example."), "a.example");
    }

    #[test]
    fn missing_token_cell_is_a_build_error() {
        let c = cfg(r#"
            [[routes]]
            host = "a"
            token = "t"
            "#);
        let err = RouteTable::build(&c, &BTreeMap::new(), None, &Metrics::new()).unwrap_err();
        assert!(matches!(err, ProxyBuildError::MissingToken { .. }), "{err}");
    }
}
