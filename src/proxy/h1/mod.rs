//! The proxy port's purpose-built HTTP/1 request path (the "fast path"). (Driver in progress.)

pub(super) mod chunked;
mod pool;
pub(super) mod request;
pub(super) mod response;

pub(crate) use pool::H1Pool;
