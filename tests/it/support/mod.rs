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

/// The bound for the load tests, where no request is answered before all of the test's work
/// is done (a thousand requests wait for one token; fifty 401s are held until the last one
/// arrives): their first answer comes after the whole test's CPU time (1–4 s in a debug build),
/// which a two-core machine shared with several compilers (load 10–30) stretches 15–30-fold.
/// Waits there (the client's, and the proxy's `token_wait`, `connect_timeout`,
/// `response_timeout` and the token request's timeout in those tests) get this instead of
/// [`PATIENCE`] and the defaults; it still fails a hung test.
pub const LOAD_PATIENCE: Duration = Duration::from_secs(120);
