//! The integration test binary: every area in its own module, real sockets on port 0, shared
//! helpers in `support`.

// A panic is how a test reports failure; helpers here unwrap freely.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod build;
mod cli;
mod faults;
mod hardening;
mod hostile;
mod proxy;
mod soak;
mod support;
mod token;
mod underscore;
