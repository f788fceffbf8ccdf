//! Answers the proxy writes itself instead of forwarding: the codes, their statuses and
//! messages, the JSON body, and the metric each one counts under.
//!
//! Every such answer has `content-type: application/json`, a body
//! `{"error": "<code>", "message": "…"}` and an `x-bearer-proxy-error: <code>` header, so an app
//! (or the engineer reading its logs) can tell a proxy refusal from an upstream's own error at a
//! glance. Messages are static text: nothing from the request is echoed back.

use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use crate::metrics::RejectReason;

/// Header naming the error code on every answer the proxy generates.
pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("x-bearer-proxy-error");

/// `Retry-After` on 503 `token_unavailable`, in seconds. The refresher's first retry comes after
/// `backoff_initial` (1s by default), so a couple of seconds lets an app's retry see its result
/// without hammering the proxy while the token endpoint is down.
const TOKEN_RETRY_AFTER: HeaderValue = HeaderValue::from_static("2");

/// What went wrong, as a stable code (the `error` field and the header value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// 400: malformed or ambiguous request, or one the proxy cannot route.
    BadRequest,
    /// 403: refused by policy (`unmatched = "deny"`, `connect = "deny"`).
    Denied,
    /// 403: `CONNECT` to a host that has a route.
    ConnectToRoutedHost,
    /// 405: `TRACE`.
    MethodNotAllowed,
    /// 431: header section over `max_header_bytes` (or too many header lines).
    HeaderTooLarge,
    /// 502: the upstream could not be connected to (refused, unresolvable, connect timeout).
    UpstreamUnreachable,
    /// 502: the TLS handshake with the upstream failed (certificate not trusted, …).
    UpstreamTls,
    /// 502: the upstream broke the exchange before sending response headers.
    UpstreamReset,
    /// 503: no valid token within `token_wait`.
    TokenUnavailable,
    /// 504: no response headers within `response_timeout`.
    UpstreamTimeout,
    /// 508: the request already went through this proxy.
    Loop,
    /// 400: a per-subject route and no subject header.
    SubjectRequired,
    /// 400: the subject header is not one valid subject id (bad characters, or repeated).
    InvalidSubject,
    /// 403: the subject is not enrolled.
    UnknownSubject,
    /// 401: the subject must consent again (`needs_reauth`).
    ReauthRequired,
}

impl ErrorCode {
    /// The HTTP status.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Denied | Self::ConnectToRoutedHost => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamUnreachable | Self::UpstreamTls | Self::UpstreamReset => {
                StatusCode::BAD_GATEWAY
            }
            Self::TokenUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Loop => StatusCode::LOOP_DETECTED,
            Self::SubjectRequired | Self::InvalidSubject => StatusCode::BAD_REQUEST,
            Self::UnknownSubject => StatusCode::FORBIDDEN,
            Self::ReauthRequired => StatusCode::UNAUTHORIZED,
        }
    }

    /// The wire name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Denied => "denied",
            Self::ConnectToRoutedHost => "connect_to_routed_host",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::HeaderTooLarge => "header_too_large",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTls => "upstream_tls",
            Self::UpstreamReset => "upstream_reset",
            Self::TokenUnavailable => "token_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Loop => "loop",
            Self::SubjectRequired => "subject_required",
            Self::InvalidSubject => "invalid_subject",
            Self::UnknownSubject => "unknown_subject",
            Self::ReauthRequired => "reauth_required",
        }
    }

    /// The `bearer_proxy_rejected_requests_total` reason, for refusals the proxy decided on.
    /// Upstream failures are counted by `bearer_proxy_upstream_errors_total` instead.
    pub(crate) fn reject_reason(self) -> Option<RejectReason> {
        match self {
            Self::BadRequest => Some(RejectReason::BadRequest),
            Self::Denied | Self::ConnectToRoutedHost => Some(RejectReason::Denied),
            Self::MethodNotAllowed => Some(RejectReason::MethodNotAllowed),
            Self::HeaderTooLarge => Some(RejectReason::HeaderTooLarge),
            Self::TokenUnavailable => Some(RejectReason::TokenUnavailable),
            Self::Loop => Some(RejectReason::Loop),
            Self::SubjectRequired => Some(RejectReason::SubjectRequired),
            Self::InvalidSubject => Some(RejectReason::InvalidSubject),
            Self::UnknownSubject => Some(RejectReason::UnknownSubject),
            Self::ReauthRequired => Some(RejectReason::ReauthRequired),
            Self::UpstreamUnreachable
            | Self::UpstreamTls
            | Self::UpstreamReset
            | Self::UpstreamTimeout => None,
        }
    }
}

/// One answer the proxy generates: a code and a fixed explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProxyError {
    /// The code.
    pub(crate) code: ErrorCode,
    /// What the app's developer should know; static, never built from request data.
    pub(crate) message: &'static str,
    /// Whether the connection must close after the answer (the request's framing or the
    /// bytes that follow it cannot be trusted).
    pub(crate) close: bool,
}

impl ProxyError {
    /// An answer that keeps the connection open.
    pub(crate) const fn new(code: ErrorCode, message: &'static str) -> Self {
        Self {
            code,
            message,
            close: false,
        }
    }

    /// The same answer, closing the connection afterwards.
    pub(crate) const fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        #[allow(clippy::expect_used)] // an invariant, see the message
        serde_json::to_vec(&Body {
            error: self.code.as_str(),
            message: self.message,
        })
        .expect("two strings serialize because serde_json fails only on non-string map keys")
    }

    /// The answer as a response for hyper to send.
    pub(crate) fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(self.body().into()));
        *resp.status_mut() = self.code.status();
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code.as_str()));
        if self.code == ErrorCode::TokenUnavailable {
            headers.insert(RETRY_AFTER, TOKEN_RETRY_AFTER);
        }
        if self.close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The answer as raw HTTP/1.1 bytes, for refusals made before hyper sees the request
    /// (see `wire/guard.rs`). Always closes the connection.
    pub(crate) fn http1_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_http1(&mut out, true);
        out
    }

    /// Appends the answer as raw HTTP/1.1 bytes to `out`, with the headers of
    /// [`ProxyError::response`]; `close` (or an answer that always closes) adds
    /// `connection: close`.
    pub(crate) fn write_http1(&self, out: &mut Vec<u8>, close: bool) {
        let body = self.body();
        let status = self.code.status();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
        out.extend_from_slice(ERROR_HEADER.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(self.code.as_str().as_bytes());
        if self.code == ErrorCode::TokenUnavailable {
            out.extend_from_slice(b"\r\nretry-after: ");
            out.extend_from_slice(TOKEN_RETRY_AFTER.as_bytes());
        }
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        if close || self.close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorCode; 15] = [
        ErrorCode::BadRequest,
        ErrorCode::Denied,
        ErrorCode::ConnectToRoutedHost,
        ErrorCode::MethodNotAllowed,
        ErrorCode::HeaderTooLarge,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTls,
        ErrorCode::UpstreamReset,
        ErrorCode::TokenUnavailable,
        ErrorCode::UpstreamTimeout,
        ErrorCode::Loop,
        ErrorCode::SubjectRequired,
        ErrorCode::InvalidSubject,
        ErrorCode::UnknownSubject,
        ErrorCode::ReauthRequired,
    ];

    #[test]
    fn statuses_match_the_documented_table() {
        let table: Vec<(u16, &str)> = ALL
            .iter()
            .map(|c| (c.status().as_u16(), c.as_str()))
            .collect();
        assert_eq!(
            table,
            [
                (400, "bad_request"),
                (403, "denied"),
                (403, "connect_to_routed_host"),
                (405, "method_not_allowed"),
                (431, "header_too_large"),
                (502, "upstream_unreachable"),
                (502, "upstream_tls"),
                (502, "upstream_reset"),
                (503, "token_unavailable"),
                (504, "upstream_timeout"),
                (508, "loop"),
                (400, "subject_required"),
                (400, "invalid_subject"),
                (403, "unknown_subject"),
                (401, "reauth_required"),
            ]
        );
    }

    #[test]
    fn response_carries_json_body_and_headers() {
        let e = ProxyError::new(ErrorCode::TokenUnavailable, "no token \"yet\"");
        let resp = e.response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[ERROR_HEADER], "token_unavailable");
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        assert!(resp.headers().get(CONNECTION).is_none());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"], "token_unavailable");
        assert_eq!(v["message"], "no token \"yet\"");
    }

    #[test]
    fn closing_answers_say_so() {
        let e = ProxyError::new(ErrorCode::BadRequest, "x").closing();
        assert_eq!(e.response().headers()[CONNECTION], "close");
        assert!(
            ProxyError::new(ErrorCode::Denied, "x")
                .response()
                .headers()
                .get(RETRY_AFTER)
                .is_none()
        );
    }

    #[test]
    fn raw_answer_is_a_complete_http1_response() {
        let raw = ProxyError::new(ErrorCode::HeaderTooLarge, "too big").http1_bytes();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\nx-bearer-proxy-error: header_too_large"));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "header_too_large");
    }

    #[test]
    fn every_refusal_has_a_reason_and_upstream_failures_do_not() {
        for c in ALL {
            let upstream = c.status().is_server_error()
                && c != ErrorCode::TokenUnavailable
                && c != ErrorCode::Loop;
            assert_eq!(c.reject_reason().is_none(), upstream, "{c:?}");
        }
    }
}
