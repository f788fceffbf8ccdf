//! The proxy port's purpose-built HTTP/1 request path (the "fast path"). (Driver in progress.)

mod chunked;
mod pool;
mod request;
mod response;

pub(crate) use pool::H1Pool;
