//! Hostile input at the core's two trust boundaries (docs/hostile-input.md): the shop domain, which
//! becomes the host the client secret is sent to, and the token endpoint's answer bytes. Table-driven,
//! plus properties over arbitrary bytes; and the secret-holding types' `Debug` and panic output.

use proptest::prelude::*;
use tokenwal_core::*;

// ---------------------------------------------------------------------------------------------
// Shop domains
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_shop_domains_are_accepted_byte_for_byte() {
    let max = format!("{}.myshopify.com", "a".repeat(63));
    for s in [
        "a.myshopify.com",
        "0.myshopify.com",
        "my-shop.myshopify.com",
        "a-b-c-1.myshopify.com",
        "123456.myshopify.com",
        "ab-c.myshopify.com",
        "abc--d.myshopify.com",
        max.as_str(),
    ] {
        let d = ShopDomain::parse(s).unwrap_or_else(|e| panic!("{s:?} rejected: {e}"));
        assert_eq!(d.as_str(), s, "never rewritten");
        assert_eq!(s.parse::<ShopDomain>().unwrap(), d);
        assert_eq!(serde_json::from_str::<ShopDomain>(&serde_json::to_string(s).unwrap()).unwrap(), d);
        assert_eq!(GrantKey::new("shopify", s).unwrap(), GrantKey::shopify(&d));
    }
}

/// Every hostile form, with the error it must get. A `None` means "any error" (several checks
/// could fire first and the exact one is not part of the contract).
#[test]
fn hostile_shop_domains_are_rejected_with_a_clear_error() {
    use ShopDomainError::*;
    let long_label = format!("{}.myshopify.com", "a".repeat(64));
    let long_host = format!("{}.myshopify.com", "a.".repeat(120));
    let table: Vec<(&str, Option<ShopDomainError>)> = vec![
        // Empty and length.
        ("", Some(Empty)),
        (long_label.as_str(), Some(BadHandle)),
        (long_host.as_str(), Some(TooLong)),
        // Host confusion: paths, suffix tricks, userinfo.
        ("evil.com/x.myshopify.com", Some(BadHandle)),
        ("evil.com?x.myshopify.com", Some(BadHandle)),
        ("evil.com#x.myshopify.com", Some(BadHandle)),
        ("evil.com\\x.myshopify.com", Some(BadHandle)),
        ("shop.myshopify.com.evil.com", Some(WrongSuffix)),
        ("shop.myshopify.com/", Some(WrongSuffix)),
        ("shop.myshopify.com/admin", Some(WrongSuffix)),
        ("shop.myshopify.com?x=1", Some(WrongSuffix)),
        ("shop.myshopify.com#frag", Some(WrongSuffix)),
        ("shop.myshopify.comevil.com", Some(WrongSuffix)),
        ("shopmyshopify.com", Some(WrongSuffix)),
        ("myshopify.com", Some(WrongSuffix)),
        ("a@b.myshopify.com", Some(BadHandle)),
        ("user:pw@b.myshopify.com", Some(BadHandle)),
        ("shop.myshopify.com@evil.com", Some(WrongSuffix)),
        ("evil.com@shop.myshopify.com", Some(BadHandle)),
        ("https://shop.myshopify.com", Some(BadHandle)),
        ("//shop.myshopify.com", Some(BadHandle)),
        // Ports.
        ("shop.myshopify.com:443", Some(WrongSuffix)),
        ("shop.myshopify.com:8080", Some(WrongSuffix)),
        ("shop:1.myshopify.com", Some(BadHandle)),
        // IP literals in every spelling.
        ("127.0.0.1", Some(WrongSuffix)),
        ("169.254.169.254", Some(WrongSuffix)),
        ("[::1]", Some(WrongSuffix)),
        ("::1", Some(WrongSuffix)),
        ("2130706433", Some(WrongSuffix)),
        ("0x7f000001", Some(WrongSuffix)),
        ("0177.0.0.1", Some(WrongSuffix)),
        ("127.1", Some(WrongSuffix)),
        ("127.0.0.1.myshopify.com", Some(BadHandle)),
        ("[::1].myshopify.com", Some(BadHandle)),
        // Dots and labels.
        ("shop.myshopify.com.", Some(WrongSuffix)),
        (".myshopify.com", Some(BadHandle)),
        ("..myshopify.com", Some(BadHandle)),
        ("a..myshopify.com", Some(BadHandle)),
        ("a.b.myshopify.com", Some(BadHandle)),
        ("-shop.myshopify.com", Some(BadHandle)),
        ("shop-.myshopify.com", Some(BadHandle)),
        ("shop_x.myshopify.com", Some(BadHandle)),
        ("shop*.myshopify.com", Some(BadHandle)),
        ("%2e.myshopify.com", Some(BadHandle)),
        // Case: never lowercased.
        ("Shop.myshopify.com", Some(Uppercase)),
        ("SHOP.MYSHOPIFY.COM", Some(Uppercase)),
        ("shop.MyShopify.com", Some(Uppercase)),
        // Whitespace: never trimmed.
        (" shop.myshopify.com", Some(Whitespace)),
        ("shop.myshopify.com ", Some(Whitespace)),
        ("\tshop.myshopify.com", Some(Whitespace)),
        ("shop.myshopify.com\n", Some(Whitespace)),
        ("shop.myshopify.com\r\n", Some(Whitespace)),
        ("sh op.myshopify.com", Some(NotAscii)),
        ("\u{a0}shop.myshopify.com", Some(Whitespace)),
        // Control characters.
        ("sh\0op.myshopify.com", Some(NotAscii)),
        ("shop\r\nHost: evil.com.myshopify.com", Some(NotAscii)),
        ("shop\u{7f}.myshopify.com", Some(NotAscii)),
        ("shop\u{1b}[31m.myshopify.com", Some(NotAscii)),
        // Non-ASCII look-alikes and IDN.
        ("sh\u{43e}p.myshopify.com", Some(NotAscii)),      // Cyrillic о
        ("shop.myshоpify.com", Some(NotAscii)),            // Cyrillic о in the suffix
        ("shop\u{ff0e}myshopify.com", Some(NotAscii)),     // fullwidth full stop
        ("shop\u{3002}myshopify.com", Some(NotAscii)),     // ideographic full stop
        ("ｓhop.myshopify.com", Some(NotAscii)),           // fullwidth s
        ("shop\u{200b}.myshopify.com", Some(NotAscii)),    // zero-width space
        ("shop.myshopify.com\u{202e}", Some(NotAscii)),    // right-to-left override
        ("xn--shp-9oa.myshopify.com", Some(BadHandle)),    // punycode of a look-alike
        ("xn--80ak6aa92e.myshopify.com", Some(BadHandle)), // punycode
        ("ab--cd.myshopify.com", Some(BadHandle)),         // any reserved ??-- label
        ("shop.xn--myshopify-.com", None),
    ];
    for (input, want) in table {
        let got = ShopDomain::parse(input);
        let err = got.clone().err().unwrap_or_else(|| panic!("accepted {input:?}"));
        if let Some(want) = want {
            assert_eq!(err, want, "{input:?}");
        }
        // Every other entry point applies the very same rule.
        assert!(input.parse::<ShopDomain>().is_err(), "FromStr accepted {input:?}");
        assert!(GrantKey::new("shopify", input).is_err(), "GrantKey accepted {input:?}");
        let json = serde_json::to_string(input).unwrap();
        assert!(serde_json::from_str::<ShopDomain>(&json).is_err(), "serde accepted {input:?}");
        // The message is clear and does not echo the input (it may hold anything).
        let msg = err.to_string();
        assert!(msg.starts_with("shop "), "{msg}");
        assert!(input.len() < 4 || input == "myshopify.com" || !msg.contains(input), "{msg} echoes {input:?}");
    }
}

#[test]
fn shop_domain_errors_name_the_rule() {
    assert!(ShopDomain::parse("Shop.myshopify.com").unwrap_err().to_string().contains("never lowercased"));
    assert!(ShopDomain::parse(" shop.myshopify.com").unwrap_err().to_string().contains("never trimmed"));
}

proptest! {
    /// Whatever the string: accepted only if it is exactly `{label}.myshopify.com` with a strict
    /// label, and then `https://{it}/` parses to that very host with no userinfo, port or path.
    #[test]
    fn any_accepted_domain_is_exactly_one_myshopify_host(s in "\\PC{0,40}(\\.myshopify\\.com)?\\PC{0,4}") {
        if let Ok(d) = ShopDomain::parse(&s) {
            let handle = d.handle();
            prop_assert!(!handle.is_empty() && handle.len() <= 63);
            prop_assert!(handle.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!handle.starts_with('-') && !handle.ends_with('-'));
            let url = url::Url::parse(&format!("https://{}/admin/oauth/access_token", d.as_str())).unwrap();
            prop_assert_eq!(url.host_str(), Some(s.as_str()));
            prop_assert_eq!(url.username(), "");
            prop_assert_eq!(url.port(), None);
        }
    }

    #[test]
    fn valid_handles_are_accepted(h in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
        let s = format!("{h}.myshopify.com");
        let ok = h.get(2..4) != Some("--");
        prop_assert_eq!(ShopDomain::parse(&s).is_ok(), ok);
    }
}

// ---------------------------------------------------------------------------------------------
// Token-endpoint answers
// ---------------------------------------------------------------------------------------------

const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

fn classify_body(status: u16, body: &[u8]) -> Outcome {
    let a = HttpAnswer { status, request_id: None, retry_after: None, body, body_truncated: false };
    classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW)
}

/// The ambiguity detail of an outcome (empty when not ambiguous).
fn detail(o: &Outcome) -> String {
    match o {
        Outcome::Ambiguous { reason, .. } => reason.to_string(),
        _ => String::new(),
    }
}

/// `(body, label, substring of the message)`; status 200 unless the body starts a 4xx row.
#[test]
fn hostile_success_bodies_are_classified_with_a_clear_message() {
    let ok = r#""access_token":"shpat_A","refresh_token":"shprt_R""#;
    let j = |rest: &str| format!("{{{ok},{rest}}}");
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_obj = format!(r#"{{"access_token":"a","x":{}1{}}}"#, "{\"a\":".repeat(5_000), "}".repeat(5_000));
    let table: Vec<(Vec<u8>, &str, &str)> = vec![
        // The good case, to show the table can tell.
        (j(r#""expires_in":3600"#).into_bytes(), "success", ""),
        (j(r#""expires_in":0"#).into_bytes(), "success", ""),
        // Not a token response at all.
        (b"".to_vec(), "ambiguous", "not a token response"),
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>".to_vec(), "ambiguous", "not a token response"),
        (b"error code: 520".to_vec(), "ambiguous", "not a token response"),
        (b"null".to_vec(), "ambiguous", "not a token response"),
        (b"\"shpat_A\"".to_vec(), "ambiguous", "not a token response"),
        (b"[]".to_vec(), "ambiguous", "not a token response"),
        (deep.into_bytes(), "ambiguous", "not a token response"),
        (deep_obj.into_bytes(), "ambiguous", "refresh_token missing"), // deep junk in an ignored field: no stack overflow
        // Byte-level junk.
        ([b"\xef\xbb\xbf".as_slice(), j(r#""expires_in":3600"#).as_bytes()].concat(), "ambiguous", "not a token"),
        (
            format!(r#"{{"access_token":"a{}","refresh_token":"r","expires_in":3600}}"#, '\u{fffd}')
                .into_bytes()
                .into_iter()
                .map(|b| if b == 0xbd { 0xff } else { b })
                .collect(),
            "ambiguous",
            "not a token response",
        ),
        (j(r#""expires_in":3600"#).replace('}', "").into_bytes(), "ambiguous", "not a token response"),
        ([j(r#""expires_in":3600"#).as_bytes(), b"garbage"].concat(), "ambiguous", "not a token response"),
        ([j(r#""expires_in":3600"#).as_bytes(), b"\0"].concat(), "ambiguous", "not a token response"),
        // Numbers that are not a plain non-negative integer of seconds.
        (j(r#""expires_in":-1"#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (j(r#""expires_in":3600.0"#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (j(r#""expires_in":3.6e3"#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (j(r#""expires_in":1e400"#).into_bytes(), "ambiguous", "not a token response"),
        (j(r#""expires_in":18446744073709551616"#).into_bytes(), "ambiguous", "not a non-negative integer"),
        (j(r#""expires_in":18446744073709551615"#).into_bytes(), "ambiguous", "implausibly large"),
        (j(r#""expires_in":99999999999"#).into_bytes(), "ambiguous", "implausibly large"),
        (j(r#""expires_in":"3600""#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (j(r#""expires_in":null"#).into_bytes(), "ambiguous", "expires_in missing"),
        (j(r#""expires_in":true"#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (j(r#""expires_in":[3600]"#).into_bytes(), "ambiguous", "expires_in is not a non-negative integer"),
        (
            j(r#""expires_in":3600,"refresh_token_expires_in":-5"#).into_bytes(),
            "ambiguous",
            "refresh_token_expires_in is not a non-negative integer",
        ),
        // Missing or empty fields: never a half token set.
        (br#"{"access_token":"a","expires_in":3600}"#.to_vec(), "ambiguous", "refresh_token missing"),
        (
            br#"{"access_token":"a","refresh_token":"","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "refresh_token missing",
        ),
        (br#"{"refresh_token":"r","expires_in":3600}"#.to_vec(), "ambiguous", "access_token missing"),
        (br#"{"access_token":"","refresh_token":"r","expires_in":3600}"#.to_vec(), "ambiguous", "access_token missing"),
        (j("\"x\":1").into_bytes(), "ambiguous", "expires_in missing"),
        // Wrong types where strings are expected.
        (br#"{"access_token":42,"refresh_token":"r","expires_in":3600}"#.to_vec(), "ambiguous", "not a token"),
        (br#"{"access_token":"a","refresh_token":{},"expires_in":3600}"#.to_vec(), "ambiguous", "not a token"),
        (br#"{"access_token":"a","refresh_token":"r","expires_in":3600,"scope":7}"#.to_vec(), "ambiguous", "not a"),
        // Tokens a header could not carry.
        (
            br#"{"access_token":"a\nb","refresh_token":"r","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "access_token contains",
        ),
        (
            br#"{"access_token":"a","refresh_token":"r\u0000","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "refresh_token contains",
        ),
        (
            br#"{"access_token":" a","refresh_token":"r","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "access_token contains",
        ),
        (
            "{\"access_token\":\"\u{43e}\",\"refresh_token\":\"r\",\"expires_in\":3600}".as_bytes().to_vec(),
            "ambiguous",
            "access_token contains",
        ),
        // Duplicate keys: which one is meant is unknowable, so the answer is unusable.
        (j(r#""expires_in":3600,"expires_in":60"#).into_bytes(), "ambiguous", "duplicate field `expires_in`"),
        (
            br#"{"access_token":"a","access_token":"b","refresh_token":"r","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "duplicate field `access_token`",
        ),
        (
            br#"{"access_token":"a","refresh_token":"r","refresh_token":"s","expires_in":3600}"#.to_vec(),
            "ambiguous",
            "duplicate field `refresh_token`",
        ),
    ];
    for (body, label, msg) in table {
        let o = classify_body(200, &body);
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert_eq!(o.label(), label, "{shown:?} -> {o:?}");
        assert!(detail(&o).contains(msg), "{shown:?}: {:?} does not contain {msg:?}", detail(&o));
        // The detail never quotes the token values.
        assert!(!detail(&o).contains("shpat_A") && !detail(&o).contains("shprt_R"), "{}", detail(&o));
    }
}

#[test]
fn hostile_error_bodies_never_read_as_dead_or_alive_by_accident() {
    for (status, body, label) in [
        (401, &br#"{"error":"invalid_request","error":"invalid_grant"}"#[..], "ambiguous"),
        (400, br#"{"error":"invalid_grant","error":"x"}"#, "ambiguous"),
        (400, b"\xef\xbb\xbf{\"error\":\"invalid_grant\"}", "ambiguous"),
        (400, br#"{"error":["invalid_grant"]}"#, "ambiguous"),
        (400, br#"{"error":"INVALID_GRANT"}"#, "ambiguous"),
        (400, br#"{"error":"invalid_grant\u0000"}"#, "rejected"),
        (400, b"<html><title>invalid_grant</title></html>", "ambiguous"),
        (403, br#"{"error":"invalid_client"}"#, "bad-credentials"),
        (301, br#"{"access_token":"a","refresh_token":"r","expires_in":3600}"#, "ambiguous"),
        (302, b"", "ambiguous"),
        (307, b"", "ambiguous"),
        (308, b"", "ambiguous"),
        (204, b"", "ambiguous"),
        (199, br#"{"access_token":"a","refresh_token":"r","expires_in":3600}"#, "ambiguous"),
        (u16::MAX, b"", "ambiguous"),
    ] {
        let o = classify_body(status, body);
        assert_eq!(o.label(), label, "{status} {:?} -> {o:?}", String::from_utf8_lossy(body));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Arbitrary status, headers and bytes: classification never panics, success only on a
    /// complete 2xx with printable non-empty tokens and expiries not in the past, and nothing it
    /// returns prints a token.
    #[test]
    fn classification_is_total_and_never_optimistic(
        status in prop_oneof![any::<u16>(), 100u16..600],
        request_id in proptest::option::of("\\PC{0,40}"),
        retry_after in proptest::option::of("\\PC{0,20}"),
        truncated in any::<bool>(),
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (
                "[A-Za-z0-9_]{12,30}",
                "[A-Za-z0-9_]{12,30}",
                prop_oneof![Just("3600".to_owned()), "-?[0-9]{1,25}(\\.[0-9])?(e[0-9]{1,3})?", Just("\"1\"".into())],
                "\\PC{0,10}",
            )
                .prop_map(|(a, r, e, junk)| format!(
                    r#"{{"access_token":"tokA{a}","refresh_token":"tokR{r}","expires_in":{e}{junk}}}"#
                ).into_bytes()),
        ],
    ) {
        let a = HttpAnswer {
            status,
            request_id: request_id.as_deref(),
            retry_after: retry_after.as_deref(),
            body: &body,
            body_truncated: truncated,
        };
        let o = classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW);
        if let Outcome::Success { tokens, .. } = &o {
            prop_assert!((200..300).contains(&status) && !truncated);
            for t in [tokens.access_token.expose_secret(), tokens.refresh_token.expose_secret()] {
                prop_assert!(!t.is_empty() && t.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
            prop_assert!(tokens.access_expires_at >= NOW);
        }
        let shown = format!("{o:?} {}", detail(&o));
        let text = String::from_utf8_lossy(&body);
        for word in text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
            if word.starts_with("tokA") || word.starts_with("tokR") {
                prop_assert!(!shown.contains(word), "{shown}");
            }
        }
        // Server text in the outcome is sanitised to printable ASCII.
        prop_assert!(shown.chars().all(|c| c != '\n' && c != '\r' && c != '\u{1b}'), "{shown:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Secret-holding types: Debug, errors and panics
// ---------------------------------------------------------------------------------------------

const A: &str = "shpat_LEAKCANARY_ACCESS_0123456789";
const R: &str = "shprt_LEAKCANARY_REFRESH_0123456789";

fn state(shop: &ShopDomain) -> GrantState {
    GrantState {
        grant: GrantKey::shopify(shop),
        version: 1,
        generation: Generation(1),
        tokens: Some(tokens()),
        phase: Phase::Healthy,
        next_attempt: 1,
        credential_first_presented_at: None,
        consecutive_failures: 0,
        not_before: None,
        updated_at: NOW,
        acquisition: Some(Acquisition {
            subject: Subject::LegacyToken { token: LegacyToken::new("shpat_LEAKCANARY_LEGACY_0123456789") },
            prior: Phase::Healthy,
        }),
        acquired_at: Some(NOW),
    }
}

fn tokens() -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(A),
        access_expires_at: NOW,
        refresh_token: RefreshToken::new(R),
        refresh_expires_at: Some(NOW),
        scope: Some("read_orders".into()),
    }
}

#[test]
fn no_secret_holding_type_prints_its_secret() {
    let shop = ShopDomain::parse("canary.myshopify.com").unwrap();
    let st = state(&shop);
    let key = FingerprintKey::from_bytes([0x5a; 32]);
    let outcome = Outcome::Success { tokens: tokens(), request_id: None };
    let printed = [
        format!("{:?}", AccessToken::new(A)),
        format!("{:?}", RefreshToken::new(R)),
        format!("{:?}", ClientSecret::new(A)),
        format!("{:?}", SessionToken::new(A)),
        format!("{:?}", LegacyToken::new(A)),
        format!("{:?} {:#?}", tokens(), tokens()),
        format!("{:?} {:#?}", st, st),
        format!("{:?}", key),
        format!("{outcome:?} {outcome:#?}"),
        format!("{:?}", Some(tokens())),
        format!("{:?}", Ok::<_, ()>(tokens())),
    ];
    for p in &printed {
        assert!(!p.contains("LEAKCANARY") && !p.contains("5a5a5a"), "{p}");
    }
    // A panic whose message formats a token set (the usual `{:?}` in an `expect`/`assert`)
    // carries no secret either.
    let payload = std::panic::catch_unwind(|| {
        let t = tokens();
        panic!("unexpected state {t:?} / {:?}", state(&shop));
    })
    .unwrap_err();
    let msg = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("unexpected state") && !msg.contains("LEAKCANARY"), "{msg}");
}

#[test]
fn lifetimes_are_bounded_by_the_documented_maximum() {
    let body = |secs: u64| format!(r#"{{"access_token":"a","refresh_token":"r","expires_in":{secs}}}"#);
    let max = tokenwal_core::classify::MAX_ACCESS_LIFETIME.as_secs();
    assert_eq!(max, 366 * 86_400);
    assert_eq!(classify_body(200, body(max).as_bytes()).label(), "success");
    assert_eq!(classify_body(200, body(max + 1).as_bytes()).label(), "ambiguous");
}
