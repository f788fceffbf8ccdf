//! A count of one token's stored subjects by state and by encryption key, taken at start by
//! paging through the store. It answers two questions without a single token request:
//! - can every record be opened? A record sealed with a key that is not configured stops the
//!   start with an error naming that key id (and how many subjects use it), instead of those
//!   subjects failing one by one later;
//! - how far has a key rotation got? Once no record names an old key id, its file can go.
//!
//! It also gives the initial per-state counts the `bearer_proxy_subjects{token,state}` gauge
//! and `/status` start from. It reads records only, never opens a sealed value, so 100,000
//! subjects cost 100 listing pages and no decryption.

use std::collections::BTreeMap;

use super::keyring::KeyRing;
use super::record::{MAX_PAGE, StoreError, SubjectState, SubjectStore};

/// Subjects of one token, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Subjects per state.
    pub by_state: BTreeMap<&'static str, u64>,
    /// Subjects per key id that sealed their refresh token.
    pub by_key: BTreeMap<String, u64>,
}

/// Records sealed with keys that are not configured.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "token {token}: {} sealed with encryption key{} not in the configured key files: {}; add the key file back (rotation keeps old keys after the newest one)",
    plural(*.subjects, "subject"),
    if .missing.len() == 1 { "" } else { "s" },
    .missing.iter().map(|(id, n)| format!("{id} ({})", plural(*n, "subject"))).collect::<Vec<_>>().join(", ")
)]
pub struct MissingKeys {
    /// The token.
    pub token: String,
    /// Missing key ids, with how many subjects each holds.
    pub missing: Vec<(String, u64)>,
    /// Subjects affected in total.
    pub subjects: u64,
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

impl Census {
    /// Counts every subject of `token` in `store`.
    pub async fn take(store: &dyn SubjectStore, token: &str) -> Result<Self, StoreError> {
        let mut census = Census::default();
        for state in SubjectState::ALL {
            census.by_state.insert(state.as_str(), 0);
        }
        let mut cursor = None;
        loop {
            let page = store.list(token, None, cursor.as_ref(), MAX_PAGE).await?;
            for record in &page.records {
                *census.by_state.entry(record.state.as_str()).or_default() += 1;
                *census.by_key.entry(record.key_id().to_owned()).or_default() += 1;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(census),
            }
        }
    }

    /// Subjects in total.
    pub fn total(&self) -> u64 {
        self.by_state.values().sum()
    }

    /// Fails, naming every missing key id, if any record was sealed with a key `ring` lacks.
    pub fn check_keys(&self, token: &str, ring: &KeyRing) -> Result<(), MissingKeys> {
        let missing: Vec<(String, u64)> = self
            .by_key
            .iter()
            .filter(|(id, _)| !ring.ids().any(|k| k == id.as_str()))
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(MissingKeys {
            token: token.to_owned(),
            subjects: missing.iter().map(|(_, n)| n).sum(),
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::subject::keyring::tests::ring;
    use crate::subject::{FileStore, Record, SubjectId};

    #[tokio::test]
    async fn counts_by_state_and_key_and_names_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let (old, new) = (ring(&[1]), ring(&[2, 1]));
        let empty = Census::take(&store, "t").await.unwrap();
        assert_eq!(empty.total(), 0);
        assert_eq!(empty.by_state["needs_reauth"], 0);
        // More subjects than one listing page holds.
        for i in 0..(MAX_PAGE + 5) {
            let id = SubjectId::parse(&format!("s{i}")).unwrap();
            let ring = if i < 3 { &old } else { &new };
            let mut r = Record::enrolled(
                id.clone(),
                ring.seal("t", &id, &Secret::new("rt")).unwrap(),
                0,
            );
            if i % 2 == 0 {
                r.state = SubjectState::NeedsReauth;
            }
            store.put("t", &r, None).await.unwrap();
        }
        let census = Census::take(&store, "t").await.unwrap();
        assert_eq!(census.total(), MAX_PAGE as u64 + 5);
        assert_eq!(census.by_state["needs_reauth"], (MAX_PAGE as u64 + 6) / 2);
        assert_eq!(census.by_key[old.newest_id()], 3);
        assert_eq!(census.by_key[new.newest_id()], MAX_PAGE as u64 + 2);
        assert_eq!(census.check_keys("t", &new), Ok(()));
        // The old key file dropped too early: the start fails, naming the key and the count.
        let e = census.check_keys("t", &ring(&[2])).unwrap_err();
        assert_eq!(e.subjects, 3);
        let text = e.to_string();
        assert!(
            text.contains(&format!("{} (3 subjects)", old.newest_id())),
            "{text}"
        );
        // A wrong key file (another key): every subject is named as unopenable.
        let e = census.check_keys("t", &ring(&[9])).unwrap_err();
        assert_eq!(e.subjects, census.total());
        assert_eq!(e.missing.len(), 2);
    }
}
