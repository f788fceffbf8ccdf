//! Logging: a `tracing` subscriber writing JSON (default) or text lines to stderr, filtered by
//! `[log] level` or `RUST_LOG`.
//!
//! Nothing in the product logs a token, client secret, refresh token or authorization code:
//! those live in `Secret` and sensitive `HeaderValue`s, which print placeholders. The test
//! suite runs the binary at `trace` with canary secrets and greps its output.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `[log] level`.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(&cfg.level).map_err(|e| format!("log.level: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}
