//! Integration tests: one binary, real sockets on 127.0.0.1, a shared support module.

mod proxy;
mod support;
