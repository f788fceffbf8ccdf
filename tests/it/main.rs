//! The integration test binary: every area in its own module, real sockets on port 0, shared
//! helpers in `support`.

// A panic is how a test reports failure; helpers here unwrap freely.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The admin port of a whole running server: metric values, readiness, `/status`, and the
// exposition checked by Prometheus' own linter.
mod admin;

// The build script run on its own: git checkout, tarball, nested repository, commit from outside.
mod build;

// The binary as an operator runs it (`check`, `token`, `run`, signals), canary secrets in
// every output.
mod cli;

// The fast path (`proxy/h1/`) against the hyper path: the same bytes, the same upstream
// request and answer; hand-over to hyper mid-connection; refusals unchanged.
mod fastpath;

// Fault injection against `Server::start`: token endpoint, upstream, client and process
// misbehave; status, error code, what the upstream got, recovery, no leaked connection.
mod faults;

// The dev issuer's end users (issue #12): authorize redirect, per-user codes and tokens,
// relogin, rotation, revoke, the FDX-like resource, the token engine against per-user codes.
mod issuer_users;

// Issue #10, proxy half: waits a peer could stretch forever and framing the wire guard and
// hyper must agree on.
mod hardening;

// Hostile input on the proxy port over raw TCP: smuggling, header limits, absolute-URI tricks,
// `Expect`, upgrades, HTTP/1.0; checks the answer and what each upstream received.
mod hostile;

// HTTPS interception (`[proxy.intercept]`): an operator CA from `ca init`, curl, Python,
// Node and rustls clients through intercepted CONNECTs to a real TLS upstream.
mod intercept;

// The proxy port end to end on an in-process proxy: token injection, sanitising, refusals,
// limits, tunnels, streaming, replay, shutdown.
mod proxy;

// Configuration reload (issue #14): steady load through route, header, token and log level
// changes, an invalid file, the admin trigger, the watch on a `..data` symlink swap, SIGHUP.
mod reload;

// The Redis store against a real redis-server: crash and AOF restart, racing connections, TLS,
// passwords, Redis gone and back, leases, shared access-token slots, tampering.
mod redis;

// Replicas (issue #13): two bearer-proxy processes sharing one redis-server and the dev
// issuer: one token request per refresh between them, rotation, Redis down and back, TLS.
mod replicas;

// Per-subject tokens (issue #12) through the whole server: one token per customer, the
// subject header, needs_reauth, 10,000 subjects at start, restart, keys, no plaintext at rest.
mod subjects;

// `shared = true` named tokens (issue #13): three processes, one Redis, Redis going away.
mod shared_token;

// Soak under token rotation: the binary as a child for `SOAK_SECS`; `#[ignore]`d, run by
// `tests/soak/run.sh`.
mod soak;

// The SubjectStore contract, one suite run against the file store and the Redis store.
mod subject_store;

// The subjects API (issue #12) against the real dev issuer, and the `subjects` CLI.
mod subjects_api;

// Issue #16: client certificates to the token endpoint and upstreams, private_key_jwt, check.
mod clientauth;

// Shared helpers, one module per role: leak guard and logs, upstreams, raw client, test CA,
// proxy under test and fixture builder, metrics, the binary as a process.
mod support;

// The token engine against the real dev issuer over real sockets.
mod token;

// Header names with `_` (`proxy.underscore_headers`) and one upstream pool per credential.
mod underscore;
