//! Walking an error's chain of sources (`outer → … → root`), written once: finding a cause of a
//! given type ([`cause_ref`], as linkerd's `linkerd-error` does), iterating the chain
//! ([`chain`]) and displaying it on one line ([`Chain`]). Only the walk lives here; what a
//! cause means is decided where it is used (`proxy/forward.rs`, `proxy/upstream.rs`, `token/client.rs`).

use std::error::Error;
use std::fmt;

/// `e`, then each of its sources in turn, down to the root cause.
pub(crate) fn chain<'a>(
    e: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(e), |&e| e.source())
}

/// The first error of type `E` in `e`'s chain (`e` included).
pub(crate) fn cause_ref<'a, E: Error + 'static>(e: &'a (dyn Error + 'static)) -> Option<&'a E> {
    chain(e).find_map(|e| e.downcast_ref::<E>())
}

/// Displays an error with its sources on one line: `outer: inner: root`. It shows only what the
/// errors' own `Display` shows; callers make sure those carry no secret.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut errors = chain(self.0);
        if let Some(outer) = errors.next() {
            write!(f, "{outer}")?;
        }
        errors.try_for_each(|e| write!(f, ": {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_is_walked_from_the_outer_error_to_the_root() {
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(Chain(&e).to_string(), "outer: root");
        assert_eq!(chain(&e).count(), 2);
        assert_eq!(cause_ref::<std::io::Error>(&e).unwrap().to_string(), "root");
        assert!(cause_ref::<Outer>(&e).is_some());
        assert!(cause_ref::<fmt::Error>(&e).is_none());
    }
}
