//! The choice of grant and the refresh-token bookkeeping of one token, beside the state file
//! they keep ([`store`]): which credential the next token request exchanges (client
//! credentials, the authorization code in `code_file`, the refresh token from the file or the
//! saved state), which code is spent, and which refresh token a rotation replaced. The
//! refresher asks [`Grants::choose`] before each request and tells [`Grants::remember`] what
//! came back; nothing here sends a request or touches the token cell.

use std::sync::Arc;

use crate::config::{GrantType, TokenConfig};
use crate::secret::{Secret, read_file};
use crate::token::client::{FetchError, Grant};
use crate::token::store::{self, State, Store};

/// Which credential an attempt used, so its outcome can be persisted correctly.
pub(super) enum Used {
    /// Client credentials only.
    Client,
    /// A refresh token; `file_digest` is the digest of the file's content at the time.
    Refresh {
        token: Secret,
        file_digest: Option<String>,
    },
    /// An authorization code.
    Code,
}

/// Where a refresh token the server sent ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rotation {
    /// The server sent none, or the one it was sent.
    Unchanged,
    /// A new one, saved in the state file.
    Persisted,
    /// A new one, held only in memory (no `state_dir`, or the file could not be written).
    InMemoryOnly,
}

/// The grant state of one `[tokens.<name>]`: its store and the state loaded from it.
pub(super) struct Grants {
    cfg: Arc<TokenConfig>,
    store: Option<Store>,
    /// Persisted state, loaded on the first [`Grants::choose`].
    state: Option<State>,
}

impl Grants {
    /// The grants of `cfg`, with its store under `state_dir` if one is set.
    pub(super) fn new(cfg: Arc<TokenConfig>) -> Self {
        let store = cfg.state_dir.as_deref().map(|d| Store::new(d, &cfg.name));
        Self {
            cfg,
            store,
            state: None,
        }
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_or_insert_with(State::default)
    }

    async fn load_state(&mut self) -> Result<(), FetchError> {
        if self.state.is_none() {
            let state = match &self.store {
                Some(store) => store.load().await.map_err(|e| {
                    FetchError::Unusable(format!("cannot read persisted refresh token: {e}"))
                })?,
                None => State::default(),
            };
            self.state = Some(state);
        }
        Ok(())
    }

    /// Writes the state, if there is a store and a state to write.
    pub(super) async fn persist(&mut self) -> Result<(), store::StoreError> {
        match (&self.store, &self.state) {
            (Some(store), Some(state)) => store.save(state).await,
            _ => Ok(()),
        }
    }

    /// Chooses what to exchange (loading the saved state on first use): see the module
    /// documentation of [`store`].
    pub(super) async fn choose(&mut self) -> Result<(Grant, Used), FetchError> {
        self.load_state().await?;
        let stored = self
            .state
            .as_ref()
            .and_then(|s| s.refresh_token.clone())
            .map(Secret::new);
        match self.cfg.grant_type {
            GrantType::ClientCredentials => Ok((Grant::ClientCredentials, Used::Client)),
            GrantType::RefreshToken => {
                let file = match &self.cfg.refresh_token_file {
                    Some(path) => {
                        Some(read_file(path, "refresh_token").await?).filter(|s| !s.is_empty())
                    }
                    None => None,
                };
                let file_digest = file.as_ref().map(store::digest);
                let superseded = self
                    .state
                    .as_ref()
                    .and_then(|s| s.superseded_file_sha256.clone());
                // A stored token wins unless the file now holds something it did not replace.
                let token = match (stored, file) {
                    (Some(s), None) => s,
                    (Some(s), Some(_)) if superseded == file_digest => s,
                    (_, Some(f)) => f,
                    (None, None) => {
                        return Err(FetchError::Unusable(
                            "no refresh token: refresh_token_file is empty and none is stored"
                                .into(),
                        ));
                    }
                };
                Ok((
                    Grant::RefreshToken(token.clone()),
                    Used::Refresh { token, file_digest },
                ))
            }
            GrantType::AuthorizationCode => {
                let code = match &self.cfg.code_file {
                    Some(path) => read_file(path, "code").await.ok().filter(|c| !c.is_empty()),
                    None => None,
                };
                let spent = self
                    .state
                    .as_ref()
                    .and_then(|s| s.spent_code_sha256.clone());
                match (code, stored) {
                    (Some(code), _) if Some(store::digest(&code)) != spent => {
                        Ok((Grant::AuthorizationCode(code), Used::Code))
                    }
                    (_, Some(token)) => Ok((
                        Grant::RefreshToken(token.clone()),
                        Used::Refresh {
                            token,
                            file_digest: None,
                        },
                    )),
                    (Some(_), None) => Err(FetchError::Unusable(
                        "the authorization code in code_file was already exchanged and no \
                         refresh token is stored; put a new code in code_file"
                            .into(),
                    )),
                    (None, None) => Err(FetchError::Unusable(
                        "no authorization code in code_file and no refresh token stored".into(),
                    )),
                }
            }
        }
    }

    /// Keeps (and persists, before it is ever used) a refresh token the server sent, and says
    /// where it is kept.
    pub(super) async fn remember(&mut self, used: &Used, new: Option<&Secret>) -> Rotation {
        let Some(new) = new else {
            if matches!(used, Used::Code) {
                tracing::error!(
                    token = %self.cfg.name,
                    "the code exchange returned no refresh token; the next refresh will need a \
                     new code"
                );
            }
            return Rotation::Unchanged;
        };
        let state = self.state_mut();
        match used {
            Used::Refresh { token, .. } if token == new => return Rotation::Unchanged,
            Used::Refresh { file_digest, token } => {
                let from_file = state.refresh_token.as_deref() != Some(token.expose());
                if from_file {
                    state.superseded_file_sha256 = file_digest.clone();
                }
            }
            Used::Code | Used::Client => state.superseded_file_sha256 = None,
        }
        state.refresh_token = Some(new.expose().to_owned());
        if let Err(e) = self.persist().await {
            tracing::error!(
                token = %self.cfg.name,
                error = %e,
                "cannot persist the new refresh token; it is kept in memory and will be lost on \
                 restart (retried before every refresh)"
            );
            Rotation::InMemoryOnly
        } else if self.store.is_none() {
            tracing::warn!(
                token = %self.cfg.name,
                "the server sent a new refresh token but no state_dir is configured; it will be \
                 lost on restart"
            );
            Rotation::InMemoryOnly
        } else {
            Rotation::Persisted
        }
    }

    /// Records `code` as spent in the state file before it is sent, so a crash after this point
    /// cannot lead to sending it again. Returns the previous record, for [`Grants::unspend`].
    /// Fails (and records nothing) if the state file cannot be written: a code not recorded is
    /// not sent.
    pub(super) async fn spend_code(&mut self, code: &Secret) -> Result<Option<String>, FetchError> {
        let previous = self.state_mut().spent_code_sha256.clone();
        self.state_mut().spent_code_sha256 = Some(store::digest(code));
        if let Err(e) = self.persist().await {
            // Not recorded, so not sent: the code is still good, and the next attempt must try
            // it again (once the state directory is writable) rather than believe it spent.
            self.state_mut().spent_code_sha256 = previous;
            return Err(FetchError::Unusable(format!(
                "not sending the authorization code: cannot record it as spent: {e}"
            )));
        }
        Ok(previous)
    }

    /// Restores the spent-code record to `previous`: the code never reached the server, so it
    /// is still good.
    pub(super) async fn unspend(&mut self, previous: Option<String>) {
        self.state_mut().spent_code_sha256 = previous;
        if let Err(e) = self.persist().await {
            tracing::warn!(token = %self.cfg.name, error = %e, "cannot update state file");
        }
    }

    /// The refresh token held in the state, if any (for redacting server text).
    pub(super) fn stored_refresh_token(&self) -> Option<&str> {
        self.state.as_ref()?.refresh_token.as_deref()
    }

    /// Whether a `state_dir` is configured.
    pub(super) fn has_store(&self) -> bool {
        self.store.is_some()
    }
}
