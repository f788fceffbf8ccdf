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
    #[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::wire::{Framer, Framing, Scan};

    /// Scans `body` in one call: the verdict and the data seen.
    fn one_shot(body: &[u8]) -> (Result<ChunkStep, ChunkError>, Vec<u8>) {
        let mut seen = Vec::new();
        let step = ChunkedScanner::new().scan(body, &mut |d| seen.extend_from_slice(d));
        (step, seen)
    }

    /// Where the body ends (`Ok(Some(n))`), or the offset of the refused byte (`Err`), fed
    /// one byte at a time.
    fn bytewise(body: &[u8]) -> (Result<Option<usize>, usize>, Vec<u8>) {
        let mut scanner = ChunkedScanner::new();
        let mut seen = Vec::new();
        for (i, b) in body.iter().enumerate() {
            match scanner.scan(std::slice::from_ref(b), &mut |d| seen.extend_from_slice(d)) {
                Ok(ChunkStep::More) => {}
                Ok(ChunkStep::End(n)) => {
                    assert_eq!(n, 1);
                    return (Ok(Some(i + 1)), seen);
                }
                Err(ChunkError) => return (Err(i), seen),
            }
        }
        (Ok(None), seen)
    }

    /// The framer's verdict on the same body after a chunked request head: where it expects
    /// the next head, or the offset (in `body`) of the byte it refuses.
    fn framer(body: &[u8]) -> Result<Option<usize>, usize> {
        const HEAD: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut f = Framer::new(1024);
        assert_eq!(f.scan(HEAD), Scan::All);
        for (i, b) in body.iter().enumerate() {
            match f.scan(std::slice::from_ref(b)) {
                Scan::Reject(..) => return Err(i),
                _ if f.framing() == Framing::Head => return Ok(Some(i + 1)),
                _ => {}
            }
        }
        Ok(None)
    }

    #[test]
    fn a_body_ends_after_its_trailers_and_data_is_decoded() {
        let body =
            b"5;ext=1\r\nhello\r\n10 \t\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1";
        let end = body.len() - b"GET / HTTP/1.1".len();
        let (step, seen) = one_shot(body);
        assert_eq!(step, Ok(ChunkStep::End(end)));
        assert_eq!(seen, b"hello0123456789abcdef");
        let (step, seen) = bytewise(body);
        assert_eq!(step, Ok(Some(end)));
        assert_eq!(seen, b"hello0123456789abcdef");
        assert_eq!(framer(body), Ok(Some(end)));
        // A scanner that has ended takes nothing more.
        let mut s = ChunkedScanner::new();
        assert_eq!(s.scan(b"0\r\n\r\n", &mut |_| {}), Ok(ChunkStep::End(5)));
        assert!(s.is_done());
        assert_eq!(
            s.scan(b"more", &mut |_| panic!("no data")),
            Ok(ChunkStep::End(0))
        );
    }

    #[test]
    fn malformed_framing_is_refused_where_hyper_refuses_it() {
        for (body, at) in [
            (&b"zz\r\n"[..], 0),
            (b"\r\n", 0),
            (b"11111111111111111\r\n", 16),
            (b"3\r\nabcX", 6),
            (b"3\r\nabc\rX", 7),
            (b"3;ext\nabc", 5),
            (b"3 x\r\n", 2),
            (b"3\rX", 2),
            (b"3\nabc", 1),
            (b"0\r\nX-T: 1\rX", 10),
            (b"0\r\n\rX", 4),
        ] {
            assert_eq!(
                bytewise(body).0,
                Err(at),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(framer(body), Err(at), "{}", String::from_utf8_lossy(body));
            assert_eq!(one_shot(body).0, Err(ChunkError));
        }
        // Once refused, always refused.
        let mut s = ChunkedScanner::new();
        assert!(s.scan(b"z", &mut |_| {}).is_err());
        assert!(s.scan(b"0\r\n\r\n", &mut |_| {}).is_err());
    }

    #[test]
    fn leading_zeros_and_the_largest_size_are_followed() {
        let (step, seen) = one_shot(b"00000000000000000005\r\nhello\r\n0\r\n\r\n");
        assert_eq!(step, Ok(ChunkStep::End(34)));
        assert_eq!(seen, b"hello");
        assert_eq!(
            one_shot(b"0000ffffffffffffffff\r\nabc").0,
            Ok(ChunkStep::More)
        );
        assert_eq!(bytewise(b"10000000000000000\r\n").0, Err(16));
    }

    /// Chunked bodies, mostly valid, some with one byte changed, inserted or cut.
    fn bodies() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let chunk = (
            0usize..20,
            proptest::sample::select(vec!["", "0", "00"]),
            any::<bool>(),
            proptest::sample::select(vec!["", " ", "\t ", ";a=b", " ;x", ";\t"]),
        );
        (
            proptest::collection::vec(chunk, 0..4),
            proptest::sample::select(vec!["", "X-T: 1\r\n", "a:b\r\nc: d\r\n"]),
            proptest::option::of((
                any::<proptest::sample::Index>(),
                proptest::sample::select(b"0aF\r\n ;\tzx:\x00\xff".to_vec()),
                0u8..3,
            )),
            proptest::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(chunks, trailers, mutation, tail)| {
                let mut body = Vec::new();
                for (len, zeros, upper, ext) in chunks {
                    let size = if upper {
                        format!("{zeros}{len:X}")
                    } else {
                        format!("{zeros}{len:x}")
                    };
                    body.extend_from_slice(size.as_bytes());
                    body.extend_from_slice(ext.as_bytes());
                    body.extend_from_slice(b"\r\n");
                    body.extend((0..len).map(|i| b'a' + (i % 26) as u8));
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n");
                body.extend_from_slice(trailers.as_bytes());
                body.extend_from_slice(b"\r\n");
                if let Some((at, byte, how)) = mutation {
                    let i = at.index(body.len());
                    match how {
                        0 => body[i] = byte,
                        1 => body.insert(i, byte),
                        _ => body.truncate(i),
                    }
                }
                body.extend_from_slice(&tail);
                body
            })
    }

    proptest::proptest! {
        #[test]
        fn the_scanner_agrees_with_itself_in_any_pieces_and_with_the_framer(
            body in bodies(),
            cuts in proptest::collection::vec(0usize..64, 0..6),
        ) {
            let (whole, whole_data) = one_shot(&body);
            let (bytes, bytes_data) = bytewise(&body);
            proptest::prop_assert_eq!(bytes, framer(&body));
            match (whole, bytes) {
                (Ok(ChunkStep::End(n)), Ok(Some(m))) => proptest::prop_assert_eq!(n, m),
                (Ok(ChunkStep::More), Ok(None)) | (Err(ChunkError), Err(_)) => {}
                (w, b) => proptest::prop_assert!(false, "one shot {w:?}, bytewise {b:?}"),
            }
            proptest::prop_assert_eq!(&whole_data, &bytes_data);
            // Any other cut gives the same verdict and data.
            let mut scanner = ChunkedScanner::new();
            let mut seen = Vec::new();
            let (mut at, mut verdict) = (0, Ok(None));
            let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
            ends.push(body.len());
            ends.sort_unstable();
            for end in ends {
                if end < at {
                    continue;
                }
                match scanner.scan(&body[at..end], &mut |d| seen.extend_from_slice(d)) {
                    Ok(ChunkStep::More) => at = end,
                    Ok(ChunkStep::End(n)) => {
                        verdict = Ok(Some(at + n));
                        break;
                    }
                    Err(ChunkError) => {
                        verdict = Err(());
                        break;
                    }
                }
            }
            proptest::prop_assert_eq!(verdict, bytes.map_err(|_| ()));
            // On a refusal, the data passed on before it may differ by cut (it is relayed as
            // it comes); on success it may not.
            if bytes.is_ok() {
                proptest::prop_assert_eq!(seen, whole_data);
            }
        }
    }
}
