//! The integration test binary: every area in its own module, real sockets on port 0, shared
//! helpers in `support`.

mod cli;
mod token;
