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
pub(crate) struct ChunkedScanner {
    state: State,
}

/// Position inside a chunked body: the states of the wire guard's framer (`wire/framer.rs`,
/// `Chunk`), which mirror hyper's decoder, plus the two ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// First hex digit of a size line.
    #[default]
    Start,
    /// More hex digits; the value so far.
    Size(u64),
    /// Spaces or tabs after the size.
    SizeLws(u64),
    /// A chunk extension, up to CR.
    Extension(u64),
    /// LF ending the size line.
    SizeLf(u64),
    /// Data bytes left.
    Data(u64),
    /// CR after data.
    DataCr,
    /// LF after data.
    DataLf,
    /// Start of a trailer line, or CR of the final empty line.
    EndCr,
    /// Inside a trailer line.
    Trailer,
    /// LF ending a trailer line.
    TrailerLf,
    /// LF of the final empty line.
    EndLf,
    /// The body has ended; nothing more belongs to it.
    Done,
    /// The framing was refused; it stays refused.
    Failed,
}

impl ChunkedScanner {
    /// At the start of a body.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Scans the next bytes of the body, calling `data` with each run of chunk data (decoded
    /// content, in order). After [`ChunkStep::End`] the body is over (a further call returns
    /// `End(0)`); after an error every call fails.
    pub(crate) fn scan(
        &mut self,
        input: &[u8],
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<ChunkStep, ChunkError> {
        let mut pos = 0;
        while pos < input.len() {
            self.state = match self.state {
                State::Done => return Ok(ChunkStep::End(pos)),
                State::Failed => return Err(ChunkError),
                State::Data(left) => {
                    // Bounded by the input's length, so it fits a usize.
                    let take = left.min((input.len() - pos) as u64) as usize;
                    data(&input[pos..pos + take]);
                    pos += take;
                    match left - take as u64 {
                        0 => State::DataCr,
                        left => State::Data(left),
                    }
                }
                state => {
                    let next = next(state, input[pos]);
                    pos += 1;
                    if next == State::Failed {
                        self.state = State::Failed;
                        return Err(ChunkError);
                    }
                    next
                }
            };
        }
        match self.state {
            State::Done => Ok(ChunkStep::End(pos)),
            State::Failed => Err(ChunkError),
            _ => Ok(ChunkStep::More),
        }
    }

    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// The state after one framing byte `b`: `Failed` where hyper's decoder (and so the framer's
/// `chunk_byte`) refuses it. A size is hex digits whose value fits a u64 (leading zeros are
/// free), then optional spaces or tabs, an optional extension up to CR (an LF in it is
/// refused), CR LF; data; CR LF; after the zero-size chunk, trailer lines each ending in
/// CR LF, then an empty line.
fn next(state: State, b: u8) -> State {
    let hex = (b as char).to_digit(16).map(u64::from);
    match (state, b) {
        (State::Start, _) => hex.map_or(State::Failed, State::Size),
        (State::Size(size), _) if hex.is_some() => size
            .checked_mul(16)
            .and_then(|s| s.checked_add(hex.unwrap_or(0)))
            .map_or(State::Failed, State::Size),
        (State::Size(size) | State::SizeLws(size), b' ' | b'\t') => State::SizeLws(size),
        (State::Size(size) | State::SizeLws(size), b';') => State::Extension(size),
        (State::Size(size) | State::SizeLws(size) | State::Extension(size), b'\r') => {
            State::SizeLf(size)
        }
        (State::Extension(_), b'\n') => State::Failed,
        (State::Extension(size), _) => State::Extension(size),
        (State::SizeLf(0), b'\n') => State::EndCr,
        (State::SizeLf(size), b'\n') => State::Data(size),
        (State::DataCr, b'\r') => State::DataLf,
        (State::DataLf, b'\n') => State::Start,
        (State::EndCr, b'\r') => State::EndLf,
        (State::Trailer, b'\r') => State::TrailerLf,
        (State::EndCr | State::Trailer, _) => State::Trailer,
        (State::TrailerLf, b'\n') => State::EndCr,
        (State::EndLf, b'\n') => State::Done,
        _ => State::Failed,
    }
}
