//! The failures the dev issuer can be told to answer instead of a real result ([`Fault`]) and
//! what each one looks like on the wire. A new kind of failure is a variant here, its answer in
//! [`Fault::response`], and its name in the control API (`control.rs`).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::response::error_response;

/// The body of a `malformed` answer: what a misrouted request to a web server or a captive
/// portal looks like.
const MALFORMED_BODY: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
     <body><h1>Bad Gateway</h1><p>The upstream server is unreachable.</p></body></html>\n";

/// An injected failure, answered instead of the real result (see [`IssuerControl::fail_next`](super::IssuerControl::fail_next)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 `server_error`.
    ServerError,
    /// 503 `temporarily_unavailable`.
    Unavailable,
    /// 429 `temporarily_unavailable` with `Retry-After: <retry_after_secs>`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u32,
    },
    /// 400 with this OAuth error code (`invalid_grant`, `invalid_client`, `access_denied`, …).
    OAuthError(String),
    /// 200 with an HTML body (`text/html`): not JSON, not a token.
    Malformed,
    /// Exactly this answer, for what no well-behaved server sends: a redirect, a 404 page, an
    /// error echoing a secret, a token with a lifetime of zero or an `exp` in the past. A
    /// status that is not a valid code is answered 500; invalid header names or values are
    /// left out. Tests set it through [`IssuerControl::fail_next`](super::IssuerControl::fail_next)
    /// only; the control API has no name for it.
    Raw {
        /// The status code.
        status: u16,
        /// Header lines, in order.
        headers: Vec<(String, String)>,
        /// The body, verbatim.
        body: String,
    },
}

impl Fault {
    /// The answer a token request gets while this fault applies.
    pub(super) fn response(&self) -> Response<Full<Bytes>> {
        match self {
            Fault::ServerError => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "injected failure: an unhandled error occurred on the server",
            ),
            Fault::Unavailable => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "injected failure: the server is temporarily unavailable",
            ),
            Fault::RateLimited { retry_after_secs } => {
                let mut response = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "temporarily_unavailable",
                    "injected failure: too many requests",
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                response
            }
            Fault::OAuthError(code) => {
                error_response(StatusCode::BAD_REQUEST, code, "injected failure")
            }
            Fault::Malformed => {
                let mut response =
                    Response::new(Full::new(Bytes::from_static(MALFORMED_BODY.as_bytes())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                response
            }
            Fault::Raw {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(Full::new(Bytes::from(body.clone())));
                *response.status_mut() =
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                for (name, value) in headers {
                    if let (Ok(name), Ok(value)) = (
                        http::header::HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(value),
                    ) {
                        response.headers_mut().append(name, value);
                    }
                }
                response
            }
        }
    }
}
