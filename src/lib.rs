//! bearer-proxy: a sidecar forward proxy that adds OAuth2 bearer tokens to a legacy app's calls.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod shutdown;
pub mod tls;
pub mod token;
