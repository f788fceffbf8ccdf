//! Test helpers: a private CA, a recording upstream (TLS or plain), a raw HTTP/1 client, a
//! proxy started in-process on port 0, a dev issuer (and its end-user flows), a metrics matcher, and the suite-wide
//! secret-leak guard ([`guard_logs`]).

mod cert;
mod client;
mod fixture;
mod issuer;
mod logs;
mod metrics;
mod process;
mod proxy;
mod redis;
mod upstream;

pub use self::redis::*;
pub use cert::*;
pub use client::*;
pub use fixture::*;
pub use issuer::*;
pub use logs::*;
pub use metrics::*;
pub use process::*;
pub use proxy::*;
pub use upstream::*;

use std::time::Duration;

/// Every socket wait in the tests is bounded by this, so a bug fails a test instead of hanging
/// the suite.
pub const PATIENCE: Duration = Duration::from_secs(20);
