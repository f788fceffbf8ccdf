//! Log output in tests: the suite-wide secret-leak guard ([`guard_logs`]) and a per-test
//! capture of formatted lines ([`Captured`]).

use std::sync::{Arc, Mutex};

/// Values that must never reach a log line: registered by the helpers that create tokens and
/// secrets, checked by the global subscriber against every formatted event.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static GUARD: std::sync::Once = std::sync::Once::new();

/// Registers a secret value that must never be logged, and makes sure the guard is installed.
pub fn never_log(secret: &str) {
    guard_logs();
    SECRETS.lock().unwrap().push(secret.to_owned());
}

/// Registers a PEM private key: each line of its Base64 body must never be logged (a key can
/// only leak in pieces that long or longer).
pub fn never_log_pem_key(pem: &str) {
    for line in pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
    {
        never_log(line);
    }
}

/// Installs, once per test binary, a global `tracing` subscriber at TRACE for every crate
/// (bearer-proxy, hyper, h2, rustls, reqwest…). Each formatted event is checked for every
/// registered secret, for the word "canary" (the marker of test secrets), for anything
/// shaped like a JWT, and for anything shaped like a code or refresh token the dev issuer mints
/// (those of other processes or minted inside a flow no test sees); a hit aborts the whole test run, whichever test caused it. Every helper
/// that starts a part of the product calls this, so the whole suite's scenarios run under it.
pub fn guard_logs() {
    GUARD.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LeakCheck(Vec::new()))
            .try_init();
    });
}

/// Buffers one formatted event and checks it when dropped.
struct LeakCheck(Vec<u8>);

impl std::io::Write for LeakCheck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LeakCheck {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.0);
        let leaked = SECRETS
            .lock()
            .map(|s| s.iter().find(|v| line.contains(v.as_str())).cloned())
            .unwrap_or_default()
            .or_else(|| {
                line.to_ascii_lowercase()
                    .contains("canary")
                    .then(|| "canary".into())
            })
            .or_else(|| looks_like_jwt(&line).then(|| "a JWT".into()))
            .or_else(|| {
                looks_like_minted(&line)
                    .then(|| "a code or refresh token the dev issuer minted".into())
            });
        if let Some(what) = leaked {
            eprintln!("SECRET LEAKED INTO A LOG LINE ({what}):\n{line}");
            std::process::abort();
        }
    }
}

/// `eyJ` (Base64 of `{"`) followed by a long Base64url run and a dot: a JWT header.
fn looks_like_jwt(line: &str) -> bool {
    line.match_indices("eyJ").any(|(i, _)| {
        let rest = &line[i..];
        let run = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        run >= 16 && rest.as_bytes().get(run) == Some(&b'.')
    })
}

/// `rt-` (a refresh token) or `ac-` (an authorization code) at a word start, then exactly 32
/// Base64url characters: what the dev issuer mints (24 random bytes).
fn looks_like_minted(line: &str) -> bool {
    const RUN: usize = 32;
    let bytes = line.as_bytes();
    let base64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    ["rt-", "ac-"].iter().any(|prefix| {
        line.match_indices(prefix).any(|(i, _)| {
            let at_word_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
            let run = bytes[i + prefix.len()..]
                .iter()
                .take_while(|b| base64url(**b))
                .count();
            at_word_start && run == RUN
        })
    })
}

#[test]
fn minted_shapes_are_recognised() {
    let minted = format!("rt-{}", "A".repeat(32));
    assert!(looks_like_minted(&format!("refresh {minted} sent")));
    assert!(looks_like_minted(&format!("code=ac-{}", "b_-9".repeat(8))));
    assert!(!looks_like_minted(&format!("cert-{}", "a".repeat(32))));
    assert!(!looks_like_minted("rt-original rt-memory ac-short"));
    assert!(!looks_like_minted(&format!("rt-{}", "a".repeat(64))));
}

/// Collects formatted log lines (install with `tracing::subscriber::set_default`; on a
/// current-thread test runtime every task of the test logs through it).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// A subscriber writing every event at `level` and above here, and the guard keeping it the
    /// default on this thread.
    pub fn install(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(level)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}
