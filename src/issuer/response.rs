//! What the dev issuer answers with: JSON bodies that are never cached, and the OAuth error
//! answer of RFC 6749 §5.2 (`{error, error_description}`; 401 with a Basic challenge when the
//! client tried the `Authorization` header).

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::params::ParamError;

/// The `WWW-Authenticate` challenge sent with a 401.
const BASIC_CHALLENGE: &str = "Basic realm=\"bearer-proxy dev issuer\"";

/// An OAuth error answer.
#[derive(Debug)]
pub(super) struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: &'static str,
}

impl OAuthError {
    /// An answer with this status, `error` code and description.
    pub(super) fn new(status: StatusCode, code: &'static str, description: &'static str) -> Self {
        Self {
            status,
            code,
            description,
        }
    }

    /// 400 `invalid_request`: the request itself is unusable.
    pub(super) fn invalid_request(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// 400 `invalid_grant`: the code, refresh token or redirect URI is not accepted.
    pub(super) fn invalid_grant(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    /// `invalid_client`: 401 if the client tried the `Authorization` header, else 400
    /// (RFC 6749 §5.2).
    pub(super) fn invalid_client(via_header: bool, description: &'static str) -> Self {
        let status = if via_header {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, "invalid_client", description)
    }

    /// The status it answers with.
    #[cfg(test)]
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// The OAuth `error` code.
    #[cfg(test)]
    pub(super) fn code(&self) -> &'static str {
        self.code
    }

    /// The JSON answer, with a Basic challenge on a 401.
    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = error_response(self.status, self.code, self.description);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(BASIC_CHALLENGE));
        }
        response
    }
}

impl From<ParamError> for OAuthError {
    /// Unusable parameters are `invalid_request`.
    fn from(e: ParamError) -> Self {
        Self::invalid_request(e.0)
    }
}

/// `{error, error_description}` with this status.
pub(super) fn error_response(
    status: StatusCode,
    code: &str,
    description: &str,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": code, "error_description": description }),
    )
}

/// 405 `invalid_request` with `Allow: POST`, for an endpoint that takes only POST; `what` says
/// which ("the token endpoint takes POST").
pub(super) fn post_only(what: &str) -> Response<Full<Bytes>> {
    let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", what);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static("POST"));
    response
}

/// A JSON answer, never cached (RFC 6749 §5.1 asks that of token responses).
pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}
