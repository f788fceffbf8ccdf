//! `bearer-proxy subjects list|show|enrol|import|delete|refresh`: the subjects API
//! (`crate::subject::api`) from the command line, so an operator needs no curl recipes.
//!
//! - **Where.** `--api URL`; else the `[subjects] listen` of the configuration (`--config` or
//!   `BEARER_PROXY_CONFIG`; an unspecified address such as `0.0.0.0` becomes loopback); else
//!   `http://127.0.0.1:9902`, the default `listen`.
//! - **Who.** `--api-token-file PATH`; else the configuration's `subjects.api_token_file`; else
//!   no `Authorization` header.
//! - **Secrets never on the command line** (any user can read another's argv in `ps`): the
//!   code of `enrol` and the refresh token of `import` are read from `--code-file` /
//!   `--refresh-token-file`, or from standard input when the option is absent or `-`.
//! - **Output.** Text for people; `--json` prints the API's JSON as it came.
//! - **Exit codes.** 0 success; 1 the API refused or could not be reached (its message is
//!   printed); 2 usage (bad arguments, an invalid subject id, an empty secret, an invalid
//!   configuration).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{Failure, block_on, load};
use crate::subject::SubjectId;
use crate::subject::config::DEFAULT_LISTEN;

/// How long one API call may take: longer than a token request (10 s by default) or a
/// revocation, which an enrolment or a deletion waits for, yet bounded so a hung server does
/// not hang the operator's shell.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest secret read from a file or standard input; the API refuses bigger bodies anyway.
const MAX_SECRET_BYTES: u64 = 16 * 1024;

/// Options of `bearer-proxy subjects`.
#[derive(Debug, Args)]
pub struct SubjectsArgs {
    /// Base URL of the subjects API [default: the configuration's [subjects] listen, else
    /// http://127.0.0.1:9902].
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// File holding the subjects API token [default: the configuration's
    /// subjects.api_token_file].
    #[arg(long, global = true)]
    pub api_token_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: SubjectsCommand,
}

/// The `subjects` subcommands.
#[derive(Debug, Subcommand)]
pub enum SubjectsCommand {
    /// List a token's subjects (one page unless --all).
    List {
        /// The per-subject token.
        token: String,
        /// Only subjects in this state.
        #[arg(long, value_parser = ["active", "needs_reauth"])]
        state: Option<String>,
        /// Subjects per page (1 to 1000; the API's default is 100).
        #[arg(long)]
        limit: Option<usize>,
        /// Continue after this cursor (printed by the previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow every page.
        #[arg(long)]
        all: bool,
    },
    /// Show one subject's state.
    Show {
        /// The per-subject token.
        token: String,
        /// The subject id.
        subject: String,
    },
    /// Enrol a subject with an authorization code (read from --code-file or standard input).
    #[command(alias = "enroll")]
    Enrol {
        /// The per-subject token.
        token: String,
        /// The subject id.
        subject: String,
        /// File holding the code; `-` or absent: standard input.
        #[arg(long)]
        code_file: Option<PathBuf>,
        /// The redirect_uri the code was issued for, if not the configured one.
        #[arg(long)]
        redirect_uri: Option<String>,
    },
    /// Import a subject's existing refresh token (read from --refresh-token-file or standard
    /// input); validated by one refresh.
    Import {
        /// The per-subject token.
        token: String,
        /// The subject id.
        subject: String,
        /// File holding the refresh token; `-` or absent: standard input.
        #[arg(long)]
        refresh_token_file: Option<PathBuf>,
    },
    /// Forget a subject.
    Delete {
        /// The per-subject token.
        token: String,
        /// The subject id.
        subject: String,
        /// Revoke the consent at the token's revoke_url first (the subject is kept if that
        /// fails).
        #[arg(long)]
        revoke: bool,
    },
    /// Refresh a subject's access token now.
    Refresh {
        /// The per-subject token.
        token: String,
        /// The subject id.
        subject: String,
    },
}

/// Runs `bearer-proxy subjects …`.
pub(super) fn run(config: Option<&Path>, args: SubjectsArgs) -> Result<(), Failure> {
    let (api, token_file) = target(config, &args)?;
    let bearer = match &token_file {
        Some(p) => Some(read_secret(Some(p), "API token")?),
        None => None,
    };
    // An https API is verified against the system's and the bundled roots.
    let tls = crate::tls::client_config(None, &[b"http/1.1"], None).context("TLS roots")?;
    let client = Client {
        http: reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            // This process must not send the API token through an HTTP_PROXY (possibly the
            // proxy itself).
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("HTTP client")?,
        api,
        bearer,
        json: args.json,
    };
    block_on(1, client.command(args.command))?
}

/// The API's base URL and the API token file, from the options, then the configuration.
fn target(
    config: Option<&Path>,
    args: &SubjectsArgs,
) -> Result<(url::Url, Option<PathBuf>), Failure> {
    let from_config = match (config, &args.api, &args.api_token_file) {
        (Some(path), None, _) | (Some(path), _, None) => load(Some(path))?.subjects,
        _ => None,
    };
    let base = match (&args.api, &from_config) {
        (Some(api), _) => api.clone(),
        (None, Some(sc)) => {
            let mut addr = sc.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        }
        (None, None) => format!("http://{DEFAULT_LISTEN}"),
    };
    let url = url::Url::parse(&base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| Failure::config(anyhow!("--api {base:?} is not an http(s) URL")))?;
    let token_file = args
        .api_token_file
        .clone()
        .or_else(|| from_config.and_then(|sc| sc.api_token_file));
    Ok((url, token_file))
}

/// A secret from `path`, or from standard input when `path` is absent or `-`; trimmed, never
/// empty.
fn read_secret(path: Option<&Path>, what: &str) -> Result<crate::secret::Secret, Failure> {
    let mut raw = Vec::new();
    match path.filter(|p| *p != Path::new("-")) {
        Some(p) => {
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_SECRET_BYTES + 1).read_to_end(&mut raw))
                .map_err(|e| {
                    Failure::config(anyhow!("cannot read the {what} from {}: {e}", p.display()))
                })?;
        }
        None => {
            std::io::stdin()
                .take(MAX_SECRET_BYTES + 1)
                .read_to_end(&mut raw)
                .map_err(|e| {
                    Failure::config(anyhow!("cannot read the {what} from standard input: {e}"))
                })?;
        }
    }
    if raw.len() as u64 > MAX_SECRET_BYTES {
        return Err(Failure::config(anyhow!(
            "the {what} is longer than {MAX_SECRET_BYTES} bytes"
        )));
    }
    let text = String::from_utf8(raw)
        .map_err(|_| Failure::config(anyhow!("the {what} is not UTF-8 text")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(Failure::config(anyhow!("the {what} is empty")));
    }
    Ok(crate::secret::Secret::new(text))
}

fn subject_id(subject: &str) -> Result<SubjectId, Failure> {
    SubjectId::parse(subject).map_err(|e| Failure::config(e.into()))
}

/// Talks to one subjects API.
struct Client {
    http: reqwest::Client,
    api: url::Url,
    bearer: Option<crate::secret::Secret>,
    json: bool,
}

impl Client {
    async fn command(&self, command: SubjectsCommand) -> Result<(), Failure> {
        use SubjectsCommand as C;
        match command {
            C::List {
                token,
                state,
                limit,
                cursor,
                all,
            } => self.list(&token, state, limit, cursor, all).await,
            C::Show { token, subject } => {
                let s = subject_id(&subject)?;
                let v = self
                    .call(
                        reqwest::Method::GET,
                        &self.url(&token, Some(&s), None),
                        None,
                    )
                    .await?;
                self.print_subject(&v);
                Ok(())
            }
            C::Enrol {
                token,
                subject,
                code_file,
                redirect_uri,
            } => {
                let s = subject_id(&subject)?;
                let code = read_secret(code_file.as_deref(), "code")?;
                let mut body = serde_json::json!({ "code": code.expose() });
                if let Some(uri) = redirect_uri {
                    body["redirect_uri"] = Value::from(uri);
                }
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &self.url(&token, Some(&s), Some("code")),
                        Some(body),
                    )
                    .await?;
                self.print_subject(&v);
                Ok(())
            }
            C::Import {
                token,
                subject,
                refresh_token_file,
            } => {
                let s = subject_id(&subject)?;
                let rt = read_secret(refresh_token_file.as_deref(), "refresh token")?;
                let body = serde_json::json!({ "refresh_token": rt.expose() });
                let v = self
                    .call(
                        reqwest::Method::PUT,
                        &self.url(&token, Some(&s), None),
                        Some(body),
                    )
                    .await?;
                self.print_subject(&v);
                Ok(())
            }
            C::Delete {
                token,
                subject,
                revoke,
            } => {
                let s = subject_id(&subject)?;
                let mut url = self.url(&token, Some(&s), None);
                if revoke {
                    url.query_pairs_mut().append_pair("revoke", "true");
                }
                self.call(reqwest::Method::DELETE, &url, None).await?;
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"deleted": s.as_str(), "revoked": revoke})
                    );
                } else if revoke {
                    println!("{token}/{s}: consent revoked, subject deleted");
                } else {
                    println!("{token}/{s}: deleted");
                }
                Ok(())
            }
            C::Refresh { token, subject } => {
                let s = subject_id(&subject)?;
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &self.url(&token, Some(&s), Some("refresh")),
                        None,
                    )
                    .await?;
                self.print_subject(&v);
                Ok(())
            }
        }
    }

    async fn list(
        &self,
        token: &str,
        state: Option<String>,
        limit: Option<usize>,
        mut cursor: Option<String>,
        all: bool,
    ) -> Result<(), Failure> {
        let mut subjects = Vec::new();
        let next = loop {
            let mut url = self.url(token, None, None);
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = &state {
                    q.append_pair("state", s);
                }
                if let Some(n) = limit {
                    q.append_pair("limit", &n.to_string());
                }
                if let Some(c) = &cursor {
                    q.append_pair("cursor", c);
                }
            }
            if url.query() == Some("") {
                url.set_query(None);
            }
            let page = self.call(reqwest::Method::GET, &url, None).await?;
            if let Some(list) = page["subjects"].as_array() {
                subjects.extend(list.iter().cloned());
            }
            let next = page["next_cursor"].as_str().map(str::to_owned);
            match next {
                Some(c) if all => cursor = Some(c),
                other => break other,
            }
        };
        if self.json {
            let doc = serde_json::json!({"subjects": subjects, "next_cursor": next});
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            return Ok(());
        }
        println!(
            "{:<40} {:<13} {:<21} LAST_ERROR",
            "SUBJECT", "STATE", "ENROLLED_AT"
        );
        for s in &subjects {
            println!(
                "{:<40} {:<13} {:<21} {}",
                text(&s["subject"]),
                text(&s["state"]),
                text(&s["enrolled_at"]),
                text(&s["last_error"])
            );
        }
        if let Some(c) = next {
            eprintln!("more subjects: repeat with --cursor {c} (or --all)");
        }
        Ok(())
    }

    /// `<api>/v1/tokens/<token>/subjects[/<subject>[/<action>]]`, each segment escaped.
    fn url(&self, token: &str, subject: Option<&SubjectId>, action: Option<&str>) -> url::Url {
        let mut url = self.api.clone();
        url.set_query(None);
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty()
                .extend(["v1", "tokens", token, "subjects"]);
            if let Some(s) = subject {
                segs.push(s.as_str());
            }
            if let Some(a) = action {
                segs.push(a);
            }
        }
        url
    }

    /// One API call; any answer but 2xx is a failure (exit 1) carrying the API's message.
    async fn call(
        &self,
        method: reqwest::Method,
        url: &url::Url,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = self.http.request(method, url.clone());
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b.expose());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the subjects API at {}: {}",
                self.api,
                crate::error::Chain(&e.without_url())
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| anyhow!("reading the subjects API's answer: {}", e.without_url()))?;
        let v: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok(v);
        }
        if self.json && !v.is_null() {
            println!("{v}");
        }
        let code = v["error"].as_str().unwrap_or("unknown");
        let message = v["message"].as_str().unwrap_or("no message");
        let mut text = format!("HTTP {} {code}: {message}", status.as_u16());
        if let Some(o) = v["oauth_error"].as_str() {
            text.push_str(&format!(" (oauth error: {o})"));
        }
        Err(anyhow::Error::msg(text).into())
    }

    fn print_subject(&self, v: &Value) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        for key in [
            "token",
            "subject",
            "state",
            "enrolled_at",
            "last_refresh",
            "last_use",
            "access_token_expires_at",
            "last_error",
            "key_id",
        ] {
            println!("{key:<24} {}", text(&v[key]));
        }
    }
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(line: &[&str]) -> SubjectsArgs {
        let cli = crate::cli::Cli::try_parse_from(line).unwrap();
        match cli.command {
            Some(crate::cli::Command::Subjects(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_api_comes_from_the_option_else_the_default() {
        let a = args(&["bp", "subjects", "list", "fdx"]);
        let (url, file) = target(None, &a).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9902/");
        assert!(file.is_none());
        let a = args(&[
            "bp",
            "subjects",
            "show",
            "fdx",
            "c1",
            "--api",
            "http://h:1/base/",
        ]);
        let (url, _) = target(None, &a).unwrap();
        let client = Client {
            http: reqwest::Client::builder()
                .use_preconfigured_tls(
                    (*crate::tls::client_config(None, &[b"http/1.1"], None).unwrap()).clone(),
                )
                .build()
                .unwrap(),
            api: url,
            bearer: None,
            json: false,
        };
        let s = SubjectId::parse("c:1").unwrap();
        assert_eq!(
            client.url("fdx", Some(&s), Some("code")).as_str(),
            "http://h:1/base/v1/tokens/fdx/subjects/c:1/code"
        );
        let a = args(&["bp", "subjects", "--api", "ftp://x", "list", "fdx"]);
        assert!(target(None, &a).is_err());
    }

    #[test]
    fn secrets_are_read_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("code");
        std::fs::write(&p, "  the-code\n").unwrap();
        assert_eq!(read_secret(Some(&p), "code").unwrap().expose(), "the-code");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_secret(Some(&p), "code").is_err());
        std::fs::write(&p, "x".repeat(MAX_SECRET_BYTES as usize + 1)).unwrap();
        assert!(read_secret(Some(&p), "code").is_err());
    }
}
