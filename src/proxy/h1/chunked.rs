//! Following a chunked body as it is relayed: [`ChunkedScanner`] finds where the body ends and
//! which bytes are data, with the rules of hyper's decoder (the same as the wire guard's
//! framer), so a relayed body ends exactly where hyper would have ended it and a malformed one
//! is never passed on as complete.

/// The body's framing is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub(crate) struct ChunkError;

/// What a scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChunkStep {
    /// Every byte given belongs to the body; it has not ended.
    More,
    /// The body ended after this many bytes of the input (the rest is not part of it).
    End(usize),
}

/// A chunked body's position, carried between reads.
#[derive(Debug, Default)]
pub(crate) struct ChunkedScanner {}

impl ChunkedScanner {
    /// At the start of a body.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Scans the next bytes of the body, calling `data` with each run of chunk data (decoded
    /// content, in order).
    pub(crate) fn scan(
        &mut self,
        input: &[u8],
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<ChunkStep, ChunkError> {
        let _ = (input, data);
        todo!()
    }
}
