//! Fuzzes the wire guard's framer, which decides where each request head and body ends before
//! hyper sees the bytes. Any disagreement with hyper would let a request be smuggled past the
//! guard's checks, so:
//! - feeding the same bytes in any segmentation (as the guard does, re-offering a partial head
//!   from its start) gives the same verdict as feeding them at once;
//! - for the first head, compared with httparse (the parser hyper uses, same version) and
//!   hyper's framing rules: if the framer accepts a complete head, httparse must not need more
//!   bytes (else hyper would read the framer's body bytes as head), must find the same end,
//!   and, where hyper accepts the head, must frame the body the same way; a head httparse
//!   refuses must have been refused by the framer first (so the answer is the proxy's JSON one).
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

    // 2. The first head against httparse and hyper's framing rules.
    let skip = data
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let rest = &data[skip..];
    let Some(n) = head_len(rest) else {
        return;
    };
    if n > max_head {
        return;
    }
    let Ok(framing) = judge_head(&rest[..n]) else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(data) {
        Ok(httparse::Status::Complete(m)) => {
            assert_eq!(
                m,
                skip + n,
                "the framer and httparse end the head at different bytes"
            );
            if req.method == Some("CONNECT") {
                return;
            }
            if let Some(want) = hyper_framing(&req) {
                assert_eq!(
                    framing, want,
                    "the framer and hyper frame the body differently"
                );
            }
        }
        Ok(httparse::Status::Partial) => {
            panic!("the framer saw a complete head where httparse needs more bytes")
        }
        // hyper would refuse the head itself, with a bare 400: the guard must refuse it first
        // (with its JSON answer). The one exception: a lone CR before the request line, which
        // the guard skips like an empty line (hyper then refuses; nothing is smuggled).
        Err(e) => {
            let lone_cr = data[..skip]
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\r' && data.get(i + 1) != Some(&b'\n'));
            assert!(
                lone_cr,
                "the framer accepted a head httparse refuses: {e:?}"
            );
        }
    }
});
