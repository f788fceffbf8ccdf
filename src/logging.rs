//! Logging: a `tracing` subscriber writing JSON (default) or text lines to stderr, filtered by
//! `[log] level` or `RUST_LOG`, and the handle a configuration reload changes the level with.
//!
//! Nothing in the product logs a token, client secret, refresh token or authorization code:
//! those live in `Secret` and sensitive `HeaderValue`s, which print placeholders. The test
//! suite runs the binary at `trace` with canary secrets and greps its output.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// The installed filter's reload handle and the format the subscriber was built with; unset
/// until [`init`] (tests and library users install their own subscriber).
static INSTALLED: OnceLock<(reload::Handle<EnvFilter, Registry>, LogFormat)> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `[log] level`.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let filter = match env_filter() {
        Some(f) => f?,
        None => EnvFilter::try_new(&cfg.level).map_err(|e| format!("log.level: {e}"))?,
    };
    // The filter sits in a reload layer so a configuration reload can change the level; the
    // format layer's type differs between JSON and text, so the format is fixed at start.
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Json => Registry::default()
            .with(filter)
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => Registry::default().with(filter).with(fmt).try_init(),
    };
    result.map_err(|e| e.to_string())?;
    let _ = INSTALLED.set((handle, cfg.format));
    Ok(())
}

/// The filter `RUST_LOG` asks for, when set.
fn env_filter() -> Option<Result<EnvFilter, String>> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            Some(EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG: {e}")))
        }
        _ => None,
    }
}

/// What a reload did to the logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogChange {
    /// The new level is in force.
    Applied,
    /// `RUST_LOG` is set and keeps winning over `[log] level`.
    EnvWins,
    /// No subscriber of ours is installed (a library user's or a test's).
    NotInstalled,
}

/// Applies `[log] level` to the running subscriber. Returns whether the format differs from
/// the one the subscriber was built with (that needs a restart).
pub fn apply(cfg: &LogConfig) -> Result<(LogChange, bool), String> {
    let Some((handle, format)) = INSTALLED.get() else {
        return Ok((LogChange::NotInstalled, false));
    };
    let format_differs = *format != cfg.format;
    if env_filter().is_some() {
        return Ok((LogChange::EnvWins, format_differs));
    }
    let filter = EnvFilter::try_new(&cfg.level).map_err(|e| format!("log.level: {e}"))?;
    handle
        .reload(filter)
        .map_err(|e| format!("log.level: {e}"))?;
    Ok((LogChange::Applied, format_differs))
}
