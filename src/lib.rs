//! bearer-proxy
#![forbid(unsafe_code)]
pub mod config;
pub mod secret;
