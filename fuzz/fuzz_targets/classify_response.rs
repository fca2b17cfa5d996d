//! Token-endpoint answers: classification is total and never optimistic (no success outside 2xx;
//! every success has non-empty printable tokens and expiries not before the receive time), and no
//! outcome's `Debug` or ambiguity detail quotes a string value from the body (it may be a token).
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
    let outcome = classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, now);
    if let Outcome::Success { tokens, .. } = &outcome {
        assert!((200..300).contains(&i.status));
        assert!(!i.truncated);
        assert!(!tokens.access_token.is_empty() && !tokens.refresh_token.is_empty());
        for t in [tokens.access_token.expose_secret(), tokens.refresh_token.expose_secret()] {
            assert!(t.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
        assert!(tokens.access_expires_at >= now);
    }
    // A token-looking `access_token` / `refresh_token` value in the body is never echoed.
    let shown = match &outcome {
        Outcome::Ambiguous { reason, .. } => format!("{outcome:?} {reason}"),
        _ => format!("{outcome:?}"),
    };
    // The request id header is echoed by design, sanitized (non-printable characters dropped, so
    // two runs of it may join): a value is excused if the *echoed* id contains it.
    let echoed_id = outcome.request_id();
    let text = String::from_utf8_lossy(i.body);
    for key in ["\"access_token\":\"", "\"refresh_token\":\""] {
        for (at, _) in text.match_indices(key) {
            let value: String = text[at + key.len()..].chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            // (A fuzzer may make the request id contain a value.)
            if value.len() >= 16 && !echoed_id.is_some_and(|r| r.contains(&value)) {
                assert!(!shown.contains(&value), "{shown}");
            }
        }
    }
});
