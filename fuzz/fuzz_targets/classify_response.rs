//! Token-endpoint answers: classification is total and never optimistic (no success outside 2xx;
//! every success has non-empty tokens and expiries not before the receive time).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokenwal_core::{classify, Exchange, HttpAnswer, Outcome, ResponseRules, UnixMillis};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    status: u16,
    request_id: Option<&'a str>,
    retry_after: Option<&'a str>,
    truncated: bool,
    body: &'a [u8],
}

fuzz_target!(|i: Input<'_>| {
    let a = HttpAnswer {
        status: i.status,
        request_id: i.request_id,
        retry_after: i.retry_after,
        body: i.body,
        body_truncated: i.truncated,
    };
    let now = UnixMillis(1_800_000_000_000);
    match classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, now) {
        Outcome::Success { tokens, .. } => {
            assert!((200..300).contains(&i.status));
            assert!(!i.truncated);
            assert!(!tokens.access_token.is_empty() && !tokens.refresh_token.is_empty());
            assert!(tokens.access_expires_at >= now);
        }
        _ => {}
    }
});
