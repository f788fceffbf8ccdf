//! The client connection's bytes, checked before hyper parses them: a pure framer
//! (`framer.rs`, bytes in, verdicts out, no I/O) and the I/O wrapper hyper reads through
//! (`guard.rs`, [`WireGuard`]: holds heads back, writes refusals, owns the timers).
//!
//! hyper resolves some ambiguous request framings itself instead of refusing them: with both
//! `Content-Length` and `Transfer-Encoding` it silently drops the length, and a repeated
//! identical `Content-Length` is merged. Neither reaches the service in a form it could detect,
//! and both are classic request-smuggling shapes that a proxy in front of other servers must
//! refuse. hyper also answers an oversized header section with a bare 431 and no body.
//!
//! [`WireGuard`] wraps the socket and follows the HTTP/1 message framing as bytes arrive
//! ([`Framer`]). A request head is held back from hyper until it is complete and has been
//! checked: over `max_header_bytes` or too many lines → 431; two lengths, a length with a
//! transfer coding, a coding other than a single `chunked`, an obsolete line fold, a version
//! other than HTTP/1.0 or 1.1 (this also refuses the HTTP/2 preface), or any byte hyper's parser
//! (httparse) would refuse → 400. A refused head never
//! reaches hyper: hyper sees the connection end, closes its side, and the guard writes the JSON
//! answer before the socket shuts down. Bodies are only counted (and chunk framing followed,
//! with exactly the rules of hyper's decoder) to know where the next head starts; they go
//! straight into hyper's buffer without a copy. A chunked body hyper's decoder would refuse
//! ends the input at the offending byte: hyper fails that request's body (the request path
//! answers 400) and never parses another byte of the connection. The guard never stops
//! following the framing while hyper still parses (only a `CONNECT` tunnel is unframed).
//!
//! The guard owns the connection's timers (hyper's own header timer is off, see `Proxy::new`):
//! * `header_read_timeout`, counted from the first byte of a head, cuts slowloris clients;
//! * `idle_timeout` cuts a connection on which hyper waits for the first byte of a request head
//!   (the first request, or the next one on a keep-alive connection), for body bytes, or for
//!   the client to read the response, and nothing moves for that long.
//!
//! A valid request pipelined before a refused one is still answered: hyper serves half-closed
//! connections (see `Proxy::new`), so the end of input the guard signals at the refused head
//! only stops it from reading further; it writes the earlier answer, then closes, which writes
//! the refusal.

mod framer;
mod guard;

pub use framer::Framing;
pub(crate) use framer::{Framer, MAX_HEADERS, Scan, head_len, judge_head};
pub(crate) use guard::{WireGuard, WireLimits};
