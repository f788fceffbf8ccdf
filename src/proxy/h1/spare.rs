//! Spare buffers, per worker thread: a connection gives its buffers back while it waits for its
//! next request and takes them again when the request arrives, so an idle keep-alive
//! connection holds no buffer at all and a busy one allocates none.

use std::cell::RefCell;

/// Buffers kept per thread: enough for the connections one thread serves at the same instant
/// under load (each holds five while it works); beyond that, memory goes back to the allocator.
const KEPT: usize = 64;

/// Larger buffers (grown by a large head or body) are not kept: the cache's memory stays
/// bounded by `KEPT` times this.
const LARGEST_KEPT: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer, with whatever capacity a spare one has.
pub(super) fn take() -> Vec<u8> {
    SPARE.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Gives `buf` back (emptied), unless it has no capacity, is too large, or enough are kept.
pub(super) fn give(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > LARGEST_KEPT {
        return;
    }
    buf.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < KEPT {
            spare.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_the_cache_is_bounded() {
        let mut b = Vec::with_capacity(100);
        b.extend_from_slice(b"secret bytes");
        give(b);
        let again = take();
        assert!(again.is_empty() && again.capacity() >= 100);
        give(Vec::with_capacity(LARGEST_KEPT + 1));
        assert_eq!(take().capacity(), 0, "a large buffer was kept");
        for _ in 0..KEPT + 10 {
            give(Vec::with_capacity(16));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), KEPT);
    }
}
