//! Reading a dev issuer request: the body (bounded by [`MAX_BODY`]) and its parameters, from a
//! JSON or form body and, for control commands, the query string. It knows nothing of grants
//! or faults; a parameter problem is a [`ParamError`] the caller turns into its own answer.

use bytes::Bytes;
use http::HeaderMap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderName};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use url::form_urlencoded;

/// Largest accepted request body. A token request is a few hundred bytes; 64 KiB leaves ample
/// room for long fields while refusing a runaway client.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// Parameters that cannot be used, with a description for an `invalid_request` answer.
#[derive(Debug)]
pub(super) struct ParamError(pub(super) &'static str);

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space, `%XX` a byte).
pub(super) fn form_decode(component: &str) -> String {
    // The form parser splits on `&` and `=`; writing those as their escapes first keeps the
    // input a single name whose decoding is exactly the component's.
    let escaped = component.replace('&', "%26").replace('=', "%3D");
    form_urlencoded::parse(escaped.as_bytes())
        .next()
        .map(|(name, _)| name.into_owned())
        .unwrap_or_default()
}

/// Request parameters in arrival order. A name can repeat (form `a=1&a=2`, a JSON array).
#[derive(Debug, Default)]
pub(super) struct Params(pub(super) Vec<(String, String)>);

impl Params {
    /// Parses a body by its media type. An empty body has no parameters whatever its type.
    pub(super) fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, ParamError> {
        if body.is_empty() {
            return Ok(Self::default());
        }
        let media_type = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|mt| mt.trim().to_ascii_lowercase());
        match media_type.as_deref() {
            Some("application/json") => Self::from_json(body),
            Some("application/x-www-form-urlencoded") => Ok(Self::from_form(body)),
            _ => Err(ParamError(
                "unsupported content type: send application/json or \
                 application/x-www-form-urlencoded",
            )),
        }
    }

    pub(super) fn from_form(body: &[u8]) -> Self {
        Self(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// A JSON object of strings, numbers, booleans, nulls (skipped) and arrays of those.
    fn from_json(body: &[u8]) -> Result<Self, ParamError> {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
            return Err(ParamError("the body is not a JSON object"));
        };
        let mut params = Vec::with_capacity(object.len());
        for (name, value) in object {
            match value {
                Value::Array(items) => {
                    for item in items {
                        params.push((name.clone(), json_scalar(item)?));
                    }
                }
                Value::Null => {}
                other => params.push((name, json_scalar(other)?)),
            }
        }
        Ok(Self(params))
    }

    /// The value of `name`; a repeated parameter is an error (RFC 6749 §3.2).
    pub(super) fn one(&self, name: &str) -> Result<Option<&str>, ParamError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(ParamError("a parameter is repeated"));
        }
        Ok(first)
    }

    /// The first value of `name`, repeated or not.
    pub(super) fn first(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// Every value of `name`.
    pub(super) fn all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One JSON parameter value as text.
fn json_scalar(value: Value) -> Result<String, ParamError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ParamError(
            "JSON parameters must be strings, numbers or booleans",
        )),
    }
}

/// Why a body could not be read.
pub(super) enum BodyError {
    /// Declared or found to be over [`MAX_BODY`]: answered 413.
    TooLarge,
    /// The connection failed mid-body.
    Broken,
}

/// The whole body, refusing one over [`MAX_BODY`] before reading it when `Content-Length` says
/// so, and as soon as it passes the limit otherwise.
pub(super) async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750
/// §2.1), if there is exactly one such header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A header as text, if present and visible ASCII.
pub(super) fn header_string(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_of_one_component() {
        assert_eq!(form_decode("a+b%2B%2F%3A%25"), "a b+/:%");
        assert_eq!(form_decode("raw&and=kept"), "raw&and=kept");
        assert_eq!(form_decode(""), "");
        assert_eq!(form_decode("bad%zz"), "bad%zz");
    }

    #[test]
    fn bearer_tokens() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(AUTHORIZATION, v.parse().unwrap());
            }
            h
        };
        assert_eq!(bearer(&headers(&["Bearer abc"])), Some("abc"));
        assert_eq!(bearer(&headers(&["bearer  abc "])), Some("abc"));
        assert_eq!(bearer(&headers(&["Basic abc"])), None);
        assert_eq!(bearer(&headers(&["Bearer "])), None);
        assert_eq!(bearer(&headers(&["Bearer a", "Bearer b"])), None);
        assert_eq!(bearer(&headers(&[])), None);
    }

    #[test]
    fn json_params_accept_scalars_and_arrays_only() {
        let p = Params::parse(
            Some("Application/JSON; charset=utf-8"),
            br#"{"a":"x","n":5,"b":true,"z":null,"l":["1","2"]}"#,
        )
        .unwrap();
        assert_eq!(p.one("a").unwrap(), Some("x"));
        assert_eq!(p.one("n").unwrap(), Some("5"));
        assert_eq!(p.one("b").unwrap(), Some("true"));
        assert_eq!(p.one("z").unwrap(), None);
        assert!(p.one("l").is_err());
        assert_eq!(p.all("l").collect::<Vec<_>>(), ["1", "2"]);
        assert!(Params::parse(Some("application/json"), br#"{"a":{"b":1}}"#).is_err());
        assert!(Params::parse(Some("application/json"), b"[1]").is_err());
        assert!(Params::parse(None, b"a=1").is_err());
        assert!(Params::parse(None, b"").unwrap().0.is_empty());
    }
}
