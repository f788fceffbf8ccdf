//! Fuzzes the token response parser: it must never panic, and whatever it accepts must be
//! usable as a header and have a lifetime within bounds.
#![no_main]

use std::time::{Duration, SystemTime};

use bearer_proxy::token::AccessToken;
use bearer_proxy::token::client::{MAX_LIFETIME, parse_token_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = parse_token_response(data, Duration::from_secs(60), SystemTime::now()) {
        assert!(!resp.lifetime.is_zero() && resp.lifetime <= MAX_LIFETIME);
        let token = AccessToken::new(
            resp.access_token.expose(),
            tokio::time::Instant::now(),
            SystemTime::now(),
            resp.lifetime,
            resp.scope,
        );
        assert!(
            token.is_ok(),
            "accepted a token that is not a valid header value"
        );
    }
});
