//! Test-only helpers for the dev issuer's unit tests: start one on loopback, post JSON or form
//! bodies, and read answers and JWT claims.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::StatusCode;
use http::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::form_urlencoded;

use super::{DevIssuer, IssuerControl, IssuerOptions};

/// A serving issuer and the means to stop it.
pub(super) struct Running {
    /// The issuer's switches and observations.
    pub(super) control: IssuerControl,
    /// `http://127.0.0.1:<port>`.
    pub(super) base: String,
    /// The token endpoint URL.
    pub(super) url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops the issuer and checks that `serve` returns promptly.
    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

/// Binds an issuer on 127.0.0.1:0 and serves it until [`Running::stop`].
pub(super) async fn start(opts: IssuerOptions) -> Running {
    let issuer = DevIssuer::bind("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let control = issuer.control();
    let base = issuer.base_url();
    let url = issuer.token_url();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(issuer.serve(async move {
        let _ = rx.await;
    }));
    Running {
        control,
        base,
        url,
        stop: Some(tx),
        task,
    }
}

/// An HTTP client that ignores proxy variables.
pub(super) fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider; plain http needs none, but the
    // builder wants one installed. A second install in the same process fails harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Client credentials as body fields, JSON.
pub(super) fn cc_json() -> Value {
    json!({
        "grant_type": "client_credentials",
        "client_id": "demo-client",
        "client_secret": "demo-secret",
    })
}

/// POSTs `body` as JSON.
pub(super) async fn post_json(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.unwrap()
}

/// POSTs `body` form-urlencoded.
pub(super) async fn post_form(url: &str, body: &[(&str, &str)]) -> reqwest::Response {
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(body)
        .finish();
    client()
        .post(url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(encoded)
        .send()
        .await
        .unwrap()
}

/// `client_secret_basic`: Base64 of form-urlencoded id and secret.
pub(super) fn basic_header(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

/// One request the token endpoint must refuse, as a row of a table: what it is, what is
/// sent, and the OAuth answer it must get.
pub(super) struct Refused {
    /// Says which row failed.
    pub(super) case: &'static str,
    /// An `Authorization` header, if any.
    pub(super) authorization: Option<String>,
    pub(super) content_type: &'static str,
    pub(super) body: Vec<u8>,
    pub(super) status: StatusCode,
    /// The OAuth `error` code.
    pub(super) error: &'static str,
}

impl Refused {
    /// A row whose body is `body` as JSON.
    pub(super) fn json(
        case: &'static str,
        body: Value,
        status: StatusCode,
        error: &'static str,
    ) -> Self {
        Self {
            case,
            authorization: None,
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            status,
            error,
        }
    }

    /// The same row with an `Authorization` header.
    pub(super) fn authorization(mut self, value: impl Into<String>) -> Self {
        self.authorization = Some(value.into());
        self
    }

    /// Sends every row to `url` in order and checks each answer, naming the row that differs.
    pub(super) async fn check_all(url: &str, rows: Vec<Self>) {
        for row in rows {
            let mut request = client()
                .post(url)
                .header(CONTENT_TYPE, row.content_type)
                .body(row.body);
            if let Some(value) = row.authorization {
                request = request.header(http::header::AUTHORIZATION, value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                error_of(response).await,
                (row.status, row.error.to_owned()),
                "{}",
                row.case
            );
        }
    }
}

/// The status and JSON body.
pub(super) async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The status and the OAuth `error` code.
pub(super) async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let (status, body) = json_of(response).await;
    (status, body["error"].as_str().unwrap().to_owned())
}

/// The claims of a JWT-shaped token, checking its shape on the way.
pub(super) fn claims_of(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "JWT-shaped: {token}");
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["typ"], "JWT");
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 32);
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}
