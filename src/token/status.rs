//! What a token's refresher reports about itself: the state the admin port shows, the class
//! and details of the last failure, and the snapshot [`crate::token::TokenCell::status`] hands
//! out. Plain data with no behaviour beyond deriving the state, so the client, the refresher
//! and the admin port can all depend on it without depending on each other.

use std::time::{Duration, SystemTime};

/// What the admin port shows for a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TokenState {
    /// A valid token is held and the last attempt succeeded.
    Fresh,
    /// A valid token is held, and a refresh is in flight or being retried.
    Refreshing,
    /// No valid token is held.
    #[default]
    Expired,
    /// The token endpoint refused the credentials on the last attempt.
    Rejected,
}

impl TokenState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Fresh => "fresh",
            TokenState::Refreshing => "refreshing",
            TokenState::Expired => "expired",
            TokenState::Rejected => "rejected",
        }
    }
}

/// Class of a refresh failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A retry can fix it (connect, timeout, 5xx, 408, 429, malformed body), or it is not the
    /// credentials' fault (an error status without an OAuth `error`: a wrong `token_url`).
    Transient,
    /// The token endpoint refused the credentials (a 4xx with an OAuth `error`).
    Rejected,
}

/// The last refresh failure, without any secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Transient or rejected.
    pub kind: ErrorKind,
    /// Bounded reason (a metric label value).
    pub reason: &'static str,
    /// HTTP status, if the server answered.
    pub status: Option<u16>,
    /// OAuth `error` code, if the server sent one.
    pub oauth_error: Option<String>,
    /// OAuth `error_description`, if the server sent one.
    pub description: Option<String>,
    /// Human-readable summary.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// A snapshot of one refresher's state.
#[derive(Clone, Debug, Default)]
pub struct TokenStatus {
    /// Derived state.
    pub state: TokenState,
    /// Whether a valid token is held right now.
    pub valid: bool,
    /// A refresh attempt is in flight.
    pub in_flight: bool,
    /// Generation of the latest token (0: none yet).
    pub generation: u64,
    /// Wall-clock expiry of the latest token.
    pub expires_wall: Option<SystemTime>,
    /// Time left before the latest token expires.
    pub expires_in: Option<Duration>,
    /// Last successful refresh.
    pub last_success: Option<SystemTime>,
    /// Last failure.
    pub last_error: Option<ErrorInfo>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// When the next attempt is scheduled.
    pub next_attempt: Option<SystemTime>,
    /// Successful refreshes.
    pub refreshes_ok: u64,
    /// Failed refreshes.
    pub refreshes_failed: u64,
    /// A refresh token the server rotated is held only in memory: the state file could not be
    /// written (or no `state_dir` is set), so a restart would lose it.
    pub refresh_token_in_memory_only: bool,
}

impl TokenStatus {
    pub(crate) fn derive_state(&self) -> TokenState {
        let last_rejected = self
            .last_error
            .as_ref()
            .is_some_and(|e| e.kind == ErrorKind::Rejected)
            && self.consecutive_failures > 0;
        if last_rejected {
            TokenState::Rejected
        } else if !self.valid {
            TokenState::Expired
        } else if self.in_flight || self.consecutive_failures > 0 {
            TokenState::Refreshing
        } else {
            TokenState::Fresh
        }
    }
}
