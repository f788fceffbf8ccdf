//! How a token request fails: [`FetchError`] with its classification (transient or rejected,
//! [`FetchError::kind`]), its bounded metric reason (one of [`REFRESH_ERROR_REASONS`]), and the
//! redaction of every secret the request carried from whatever text the server sent back
//! ([`Redactor`]), before that text is cut to length, shown or logged.

use std::time::Duration;

use crate::secret::SecretFileError;
use crate::token::status::ErrorKind;

/// OAuth error codes and descriptions are shown on the status page and in logs; they are cut to
/// this length so a hostile server cannot flood either.
pub(super) const MAX_ERROR_TEXT: usize = 256;
/// What a secret echoed by the token server is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The OAuth error a token endpoint sent (`{error, error_description}`), cut to a safe length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthError {
    /// `error`.
    pub code: String,
    /// `error_description`.
    pub description: Option<String>,
}

/// A failed token request.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A credential file could not be read.
    #[error(transparent)]
    Credentials(#[from] SecretFileError),
    /// The request could not be sent because of local state (for example a spent code).
    #[error("{0}")]
    Unusable(String),
    /// The request timed out.
    #[error("token request timed out")]
    Timeout,
    /// No connection could be made, or it broke.
    #[error("cannot reach the token endpoint: {0}")]
    Connect(String),
    /// The server answered with an error status.
    #[error("token endpoint answered HTTP {status}{}", http_suffix(*.status, .oauth))]
    Http {
        /// The status.
        status: u16,
        /// The OAuth error, if the body carried one.
        oauth: Option<OAuthError>,
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that is not a usable token response.
    #[error("malformed token response: {0}")]
    Malformed(String),
    /// A well-formed token this proxy cannot use (wrong type).
    #[error("unusable token: {0}")]
    UnsupportedToken(String),
}

/// Reasons a token refresh failed (the `reason` label of
/// `bearer_proxy_token_refresh_errors_total`, and [`crate::token::ErrorInfo::reason`]): transport classes plus the OAuth error codes
/// of RFC 6749 §5.2 and Flinks' list; anything else is `other`.
pub const REFRESH_ERROR_REASONS: &[&str] = &[
    "timeout",
    "connect",
    "http_5xx",
    "http_429",
    "malformed",
    "access_denied",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "unauthorized_client",
    "unsupported_grant_type",
    "unsupported_response_type",
    "unsupported_token_type",
    "server_error",
    "temporarily_unavailable",
    "credentials_unreadable",
    "not_oauth",
    "other",
];

/// Maps a free-form reason to a bounded label value.
pub fn refresh_error_reason(reason: &str) -> &'static str {
    REFRESH_ERROR_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

/// Whether an error status without an OAuth `error` is one a working endpoint may send
/// (overload, timeouts, rate limits): then it is plain transient, not a misconfiguration.
fn overload_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

fn http_suffix(status: u16, oauth: &Option<OAuthError>) -> String {
    match oauth {
        None if (300..400).contains(&status) => {
            ": a redirect, not followed; token_url looks wrong (point it at the final URL)".into()
        }
        None if !overload_status(status) => {
            " without an OAuth error: token_url looks wrong, or something in front of the \
             token endpoint refuses the request"
                .into()
        }
        None => String::new(),
        Some(OAuthError {
            code,
            description: None,
        }) => format!(": {code}"),
        Some(OAuthError {
            code,
            description: Some(d),
        }) => format!(": {code} ({d})"),
    }
}

impl FetchError {
    /// Transient (retry with backoff) or rejected (retry slowly). Only an OAuth `error` in a
    /// 4xx answer rejects the credentials; an answer without one (a redirect, a 404) is a
    /// misconfiguration or a gateway's doing, retried with the normal backoff.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FetchError::Timeout | FetchError::Connect(_) | FetchError::Malformed(_) => {
                ErrorKind::Transient
            }
            FetchError::Http { status, oauth, .. } => match oauth {
                None => ErrorKind::Transient,
                Some(o) if o.code == "temporarily_unavailable" || o.code == "server_error" => {
                    ErrorKind::Transient
                }
                Some(_) if overload_status(*status) => ErrorKind::Transient,
                Some(_) => ErrorKind::Rejected,
            },
            FetchError::Credentials(_)
            | FetchError::Unusable(_)
            | FetchError::UnsupportedToken(_) => ErrorKind::Rejected,
        }
    }

    /// A bounded reason for metrics, one of [`REFRESH_ERROR_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Timeout => "timeout",
            FetchError::Connect(_) => "connect",
            FetchError::Malformed(_) => "malformed",
            FetchError::Credentials(_) => "credentials_unreadable",
            FetchError::Unusable(_) => "other",
            FetchError::UnsupportedToken(_) => "unsupported_token_type",
            FetchError::Http { status, oauth, .. } => match status {
                429 => "http_429",
                408 => "timeout",
                s if *s >= 500 => "http_5xx",
                _ => oauth
                    .as_ref()
                    .map_or("not_oauth", |o| refresh_error_reason(&o.code)),
            },
        }
    }

    /// Whether the answer says the configuration is wrong rather than the server busy or the
    /// credentials refused: an error status without an OAuth `error` that no working endpoint
    /// sends for load (a redirect, a 404, a gateway's 403).
    pub fn misconfigured(&self) -> bool {
        matches!(self, FetchError::Http { status, oauth: None, .. } if !overload_status(*status))
    }

    /// Replaces every occurrence of each of `secrets` (and their URL-encoded forms) in the
    /// text this error carries with [`REDACTED`] (the OAuth texts are cut to their length limit
    /// again afterwards). Empty secrets are ignored.
    pub fn redact(&mut self, secrets: &[&str]) {
        let redactor = Redactor::new(secrets.iter().copied());
        match self {
            FetchError::Http { oauth: Some(o), .. } => {
                o.code = redactor.clean(&o.code);
                o.description = o.description.as_deref().map(|d| redactor.clean(d));
            }
            FetchError::Unusable(m)
            | FetchError::Connect(m)
            | FetchError::Malformed(m)
            | FetchError::UnsupportedToken(m) => *m = redactor.apply(m),
            FetchError::Http { oauth: None, .. }
            | FetchError::Timeout
            | FetchError::Credentials(_) => {}
        }
    }

    /// The server's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The OAuth error, if the server sent one.
    pub fn oauth(&self) -> Option<&OAuthError> {
        match self {
            FetchError::Http { oauth, .. } => oauth.as_ref(),
            _ => None,
        }
    }

    /// Whether the server may have processed the request (it answered, or we stopped waiting).
    /// A one-time code counts as spent after such an attempt.
    pub fn server_may_have_seen(&self) -> bool {
        matches!(
            self,
            FetchError::Http { .. }
                | FetchError::Timeout
                | FetchError::Malformed(_)
                | FetchError::UnsupportedToken(_)
        )
    }
}

/// Replaces known secret values in text a token server sent back, before that text is cut to
/// length (a secret cut in half would escape an exact match) or stored.
#[derive(Default)]
pub(super) struct Redactor {
    /// The values to replace, raw and form-urlencoded, longest first so that a secret that
    /// contains another is replaced whole.
    needles: Vec<String>,
}

impl Redactor {
    pub(super) fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles = Vec::new();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            if encoded != secret {
                needles.push(encoded);
            }
            needles.push(secret.to_owned());
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Self { needles }
    }

    /// `text` with every needle replaced by [`REDACTED`].
    pub(super) fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), REDACTED);
            }
        }
        out
    }

    /// Server text made fit for the status page and logs: control characters dropped first (so
    /// one planted inside a secret cannot hide it from the match), secrets replaced, then cut
    /// to [`MAX_ERROR_TEXT`] characters.
    pub(super) fn clean(&self, text: &str) -> String {
        let visible: String = text.chars().filter(|c| !c.is_control()).collect();
        self.apply(&visible).chars().take(MAX_ERROR_TEXT).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_a_listed_label_and_unknown_codes_are_other() {
        let http = |status, code: Option<&str>| FetchError::Http {
            status,
            oauth: code.map(|c| OAuthError {
                code: c.into(),
                description: None,
            }),
            retry_after: None,
        };
        for e in [
            FetchError::Timeout,
            FetchError::Connect("refused".into()),
            FetchError::Malformed("x".into()),
            FetchError::Unusable("x".into()),
            FetchError::UnsupportedToken("x".into()),
            http(500, None),
            http(429, None),
            http(408, None),
            http(404, None),
            http(400, Some("invalid_grant")),
            http(400, Some("something odd")),
        ] {
            assert!(REFRESH_ERROR_REASONS.contains(&e.reason()), "{e}");
        }
        assert_eq!(http(400, Some("something odd")).reason(), "other");
        assert_eq!(http(400, Some("invalid_grant")).reason(), "invalid_grant");
        assert_eq!(refresh_error_reason("something odd"), "other");
    }
}
