//! Fuzzes the wire guard's framer, which decides where each request head and body ends before
//! hyper sees the bytes. Any disagreement with hyper would let a request be smuggled past the
//! guard's checks, so:
//! - feeding the same bytes in any segmentation (as the guard does, re-offering a partial head
//!   from its start) gives the same verdict as feeding them at once;
//! - the whole pipelined stream is walked as hyper would walk it, head by head: each head
//!   against httparse (the parser hyper uses, same version) and hyper's framing rules (if the
//!   framer accepts a complete head, httparse must not need more bytes, must find the same end
//!   and, where hyper accepts the head, frame the body the same way; a head httparse refuses
//!   must have been refused by the framer first), and each body through a model of hyper's
//!   decoder (`proto/h1/decode.rs`, chunked rule by rule): where the model ends a body the
//!   framer must expect the next head at exactly that byte, and where the model refuses a
//!   chunked byte the framer must have refused the stream by then.
#![no_main]

use bearer_proxy::proxy::fuzzing::{Framer, Framing, Scan, head_len, judge_head};
use libfuzzer_sys::fuzz_target;

/// Feeds `data` cut at `cuts` (increasing, ending at `data.len()`), as the guard does; returns
/// the refusal (absolute offset, code) or where the unconsumed partial head starts and what the
/// framer expects next.
fn feed(
    max_head: usize,
    data: &[u8],
    cuts: &[usize],
) -> Result<(usize, Framing), (usize, &'static str)> {
    let mut f = Framer::new(max_head);
    let mut start = 0;
    for &end in cuts {
        if end <= start {
            continue;
        }
        match f.scan(&data[start..end]) {
            Scan::All => start = end,
            Scan::Partial(k) => start += k,
            Scan::Reject(k, code) => return Err((start + k, code)),
        }
    }
    Ok((start, f.framing()))
}

/// hyper's server framing for a parsed request (role.rs): `None` where hyper refuses it.
fn hyper_framing(req: &httparse::Request<'_, '_>) -> Option<Framing> {
    let http11 = req.version? == 1;
    let (mut is_te, mut te_chunked, mut is_cl, mut cl) = (false, false, false, None::<u64>);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return None;
            }
            is_te = true;
            if is_cl {
                cl = None;
            }
            te_chunked = std::str::from_utf8(h.value).is_ok_and(|s| {
                s.rsplit(',')
                    .next()
                    .is_some_and(|e| e.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if h.name.eq_ignore_ascii_case("content-length") {
            is_cl = true;
            if is_te {
                continue;
            }
            // hyper's from_digits: digits only, no sign, no whitespace, no overflow.
            if h.value.is_empty() || !h.value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n = h.value.iter().try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })?;
            if cl.is_some_and(|prev| prev != n) {
                return None;
            }
            if n > u64::MAX - 2 {
                return None;
            }
            cl = Some(n);
        }
    }
    if is_te && !te_chunked {
        return None;
    }
    Some(if is_te {
        Framing::Chunked
    } else {
        match cl {
            Some(n) if n > 0 => Framing::Fixed(n),
            _ => Framing::Head,
        }
    })
}

/// Where a chunked body ends according to hyper's decoder.
enum Chunked {
    /// The body (trailers included) is this many bytes.
    End(usize),
    /// hyper refuses the byte at this offset.
    Refused(usize),
    /// More bytes are needed.
    More,
}

/// hyper 1.x's chunked decoder (`ChunkedState`), byte by byte, without its size limits
/// (extension bytes, trailer count and size), which the inputs here cannot reach or which only
/// make hyper stricter than the framer (it then fails the body and closes).
fn hyper_chunked(data: &[u8]) -> Chunked {
    #[derive(Clone, Copy)]
    enum S {
        Start,
        Size,
        Lws,
        Ext,
        SizeLf,
        Body,
        BodyCr,
        BodyLf,
        EndCr,
        Trailer,
        TrailerLf,
        EndLf,
    }
    let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
    let (mut s, mut size, mut i) = (S::Start, 0u64, 0usize);
    while i < data.len() {
        let b = data[i];
        s = match s {
            S::Body => {
                let take = usize::try_from(size)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                size -= take as u64;
                i += take;
                if size == 0 { S::BodyCr } else { S::Body }
            }
            _ => {
                let next = match (s, b) {
                    (S::Start | S::Size, _) if hex(b).is_some() => {
                        match size.checked_mul(16).and_then(|n| n.checked_add(hex(b)?)) {
                            Some(n) => {
                                size = n;
                                Some(S::Size)
                            }
                            None => None,
                        }
                    }
                    (S::Start, _) => None,
                    (S::Size | S::Lws, b'\t' | b' ') => Some(S::Lws),
                    (S::Size | S::Lws, b';') => Some(S::Ext),
                    (S::Size | S::Lws | S::Ext, b'\r') => Some(S::SizeLf),
                    (S::Size | S::Lws, _) => None,
                    (S::Ext, b'\n') => None,
                    (S::Ext, _) => Some(S::Ext),
                    (S::SizeLf, b'\n') if size == 0 => Some(S::EndCr),
                    (S::SizeLf, b'\n') => Some(S::Body),
                    (S::BodyCr, b'\r') => Some(S::BodyLf),
                    (S::BodyLf, b'\n') => {
                        size = 0;
                        Some(S::Start)
                    }
                    (S::EndCr, b'\r') => Some(S::EndLf),
                    (S::Trailer, b'\r') => Some(S::TrailerLf),
                    (S::EndCr | S::Trailer, _) => Some(S::Trailer),
                    (S::TrailerLf, b'\n') => Some(S::EndCr),
                    (S::EndLf, b'\n') => return Chunked::End(i + 1),
                    _ => None,
                };
                match next {
                    Some(n) => {
                        i += 1;
                        n
                    }
                    None => return Chunked::Refused(i),
                }
            }
        };
    }
    Chunked::More
}

fuzz_target!(|input: &[u8]| {
    let [seed, size, data @ ..] = input else {
        return;
    };
    let max_head = 64 + usize::from(*size) * 16;

    // 1. Segmentation does not change the verdict.
    let whole = feed(max_head, data, &[data.len()]);
    let mut cuts = Vec::new();
    let mut at = 0usize;
    let mut s = u32::from(*seed) | 1;
    while at < data.len() {
        s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        at += 1 + (s >> 16) as usize % 17;
        cuts.push(at.min(data.len()));
    }
    assert_eq!(feed(max_head, data, &cuts), whole, "cuts {cuts:?}");
    let bytewise: Vec<usize> = (1..=data.len()).collect();
    assert_eq!(feed(max_head, data, &bytewise), whole, "byte by byte");

    // 2. The whole stream, head by head and body by body, as hyper would walk it.
    let mut at = 0;
    loop {
        let Some(next) = check_message(max_head, data, at) else {
            return;
        };
        assert_eq!(
            feed(max_head, data, &[next]),
            Ok((next, Framing::Head)),
            "hyper expects the next head at byte {next}, the framer does not"
        );
        at = next;
    }
});

/// Checks the message starting at `at` against httparse and the model of hyper's decoder;
/// returns where hyper expects the next head, or `None` where the walk ends (incomplete input,
/// or a message hyper or the framer refuses).
fn check_message(max_head: usize, data: &[u8], at: usize) -> Option<usize> {
    let stream = &data[at..];
    let skip = stream
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let rest = &stream[skip..];
    let n = head_len(rest)?;
    if n > max_head {
        return None;
    }
    let framing = judge_head(&rest[..n]).ok()?;
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let body_at = match req.parse(stream) {
        Ok(httparse::Status::Complete(m)) => {
            assert_eq!(
                m,
                skip + n,
                "the framer and httparse end the head at different bytes"
            );
            at + m
        }
        Ok(httparse::Status::Partial) => {
            panic!("the framer saw a complete head where httparse needs more bytes")
        }
        // hyper would refuse the head itself, with a bare 400: the guard must refuse it first
        // (with its JSON answer). The one exception: a lone CR before the request line, which
        // the guard skips like an empty line (hyper then refuses; nothing is smuggled).
        Err(e) => {
            let lone_cr = stream[..skip]
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\r' && stream.get(i + 1) != Some(&b'\n'));
            assert!(
                lone_cr,
                "the framer accepted a head httparse refuses: {e:?}"
            );
            return None;
        }
    };
    if req.method == Some("CONNECT") {
        return None;
    }
    let want = hyper_framing(&req)?;
    assert_eq!(
        framing, want,
        "the framer and hyper frame the body differently"
    );
    match want {
        Framing::Head => Some(body_at),
        Framing::Fixed(len) => {
            let end = body_at.checked_add(usize::try_from(len).ok()?)?;
            (end <= data.len()).then_some(end)
        }
        Framing::Chunked => match hyper_chunked(&data[body_at..]) {
            Chunked::End(len) => Some(body_at + len),
            Chunked::Refused(i) => {
                let bad = body_at + i;
                assert!(
                    feed(max_head, data, &[bad + 1]).is_err(),
                    "hyper refuses the chunked byte at {bad}, the framer does not"
                );
                None
            }
            Chunked::More => None,
        },
        Framing::Opaque => None,
    }
}
