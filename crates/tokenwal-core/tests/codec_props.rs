//! Property tests of the record codec and response classification: total on arbitrary bytes,
//! identity on encode→decode, corruption always detected.

use proptest::prelude::*;
use tokenwal_core::codec::{decode_record, decode_state, encode_record, encode_state};
use tokenwal_core::*;

fn grant() -> impl Strategy<Value = GrantKey> {
    prop_oneof![
        "[a-z0-9][a-z0-9-]{0,20}"
            .prop_map(|h| GrantKey::shopify(&ShopDomain::parse(&format!("{h}.myshopify.com")).unwrap())),
        ("[a-z]{1,8}", "[a-zA-Z0-9@.:_-]{1,40}").prop_map(|(p, a)| GrantKey::new(&p, &a).unwrap()),
    ]
}

fn at() -> impl Strategy<Value = UnixMillis> {
    any::<u64>().prop_map(UnixMillis)
}

fn fp() -> impl Strategy<Value = Fingerprint> {
    any::<[u8; 16]>().prop_map(Fingerprint)
}

fn summary() -> impl Strategy<Value = TokenSummary> {
    (fp(), at(), proptest::option::of(at()), proptest::option::of("[ -~]{0,30}"))
        .prop_map(|(refresh, a, r, scope)| TokenSummary { refresh, access_expires_at: a, refresh_expires_at: r, scope })
}

fn reason() -> impl Strategy<Value = AmbiguityReason> {
    prop_oneof![
        any::<u16>().prop_map(|status| AmbiguityReason::ServerError { status }),
        any::<u16>().prop_map(|status| AmbiguityReason::UnexpectedStatus { status }),
        (any::<u16>(), ".{0,20}").prop_map(|(status, detail)| AmbiguityReason::UnparseableSuccess { status, detail }),
        Just(AmbiguityReason::Timeout),
        Just(AmbiguityReason::ConnectionLost),
        Just(AmbiguityReason::Interrupted),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    let rid = proptest::option::of("[a-z0-9-]{0,36}");
    prop_oneof![
        (grant(), at(), any::<u64>(), summary()).prop_map(|(grant, at, g, tokens)| Record::Installed {
            grant,
            at,
            generation: Generation(g),
            tokens,
            source: InstallSource::Import
        }),
        (grant(), at(), any::<u64>(), any::<u64>(), fp()).prop_map(|(grant, at, a, g, presented)| Record::Intent {
            grant,
            at,
            attempt: AttemptId(a),
            generation: Generation(g),
            kind: AttemptKind::Refresh,
            presented
        }),
        (grant(), at(), any::<u64>(), any::<u64>(), summary(), rid.clone()).prop_map(
            |(grant, at, a, g, tokens, request_id)| {
                Record::Committed { grant, at, attempt: AttemptId(a), generation: Generation(g), tokens, request_id }
            }
        ),
        (grant(), at(), any::<u64>(), reason(), rid).prop_map(|(grant, at, a, why, request_id)| Record::Ambiguous {
            grant,
            at,
            attempt: AttemptId(a),
            why,
            request_id
        }),
        (grant(), at()).prop_map(|(grant, at)| Record::Uninstalled { grant, at }),
        (grant(), at(), "[ -~]{0,60}").prop_map(|(grant, at, scope)| Record::ScopesUpdated { grant, at, scope }),
        (
            grant(),
            at(),
            any::<u64>(),
            prop_oneof![Just(AttemptKind::TokenExchange), Just(AttemptKind::Migration)],
            fp()
        )
            .prop_map(|(grant, at, a, kind, presented)| Record::Intent {
                grant,
                at,
                attempt: AttemptId(a),
                generation: Generation(0),
                kind,
                presented
            }),
    ]
}

fn acquisition() -> impl Strategy<Value = Option<Acquisition>> {
    let subject = prop_oneof![
        ("[ -~]{1,60}", at())
            .prop_map(|(t, expires_at)| Subject::SessionToken { token: SessionToken::new(t), expires_at }),
        "[ -~]{1,60}".prop_map(|t| Subject::LegacyToken { token: LegacyToken::new(t) }),
    ];
    let prior = prop_oneof![
        Just(Phase::Healthy),
        at().prop_map(|since| Phase::NotInstalled { since }),
        at().prop_map(|since| Phase::Uninstalled { since }),
        (at(), ".{0,20}").prop_map(|(since, note)| Phase::NeedsReauth { reason: ReauthReason::Manual { note }, since }),
    ];
    proptest::option::of((subject, prior).prop_map(|(subject, prior)| Acquisition { subject, prior }))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn records_round_trip(r in record()) {
        let bytes = encode_record(&r).unwrap();
        prop_assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    #[test]
    fn corruption_is_detected(r in record(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = encode_record(&r).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(decode_record(&bytes).is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_record(&bytes);
        let _ = decode_state(&bytes);
    }

    #[test]
    fn decoding_valid_frames_of_garbage_never_panics(payload in prop::collection::vec(any::<u8>(), 0..200), magic in prop_oneof![Just(*b"TR"), Just(*b"TS")], version in 1u8..=2) {
        // A frame whose checksum is right but whose payload is garbage (a bug, or a format mix-up).
        let mut f = magic.to_vec();
        f.push(version);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&payload);
        let crc = crc32(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        let _ = decode_record(&f);
        let _ = decode_state(&f);
    }

    #[test]
    fn classification_is_total_and_never_optimistic(
        status in any::<u16>(),
        body in prop::collection::vec(any::<u8>(), 0..300),
        rid in proptest::option::of("[ -~]{0,200}"),
        retry in proptest::option::of("[ -~]{0,20}"),
    ) {
        let a = HttpAnswer { status, request_id: rid.as_deref(), retry_after: retry.as_deref(), body: &body, body_truncated: false };
        let o = classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, UnixMillis(0));
        if !(200..300).contains(&status) {
            prop_assert!(!matches!(o, Outcome::Success { .. }), "{} classified as success", status);
        }
    }

    #[test]
    fn states_round_trip(
        g in grant(),
        v in any::<u64>(),
        gen in any::<u64>(),
        tok in "[ -~]{1,40}",
        exp in at(),
        acquisition in acquisition(),
        acquired_at in proptest::option::of(at()),
    ) {
        let s = GrantState {
            grant: g,
            version: v,
            generation: Generation(gen),
            tokens: Some(TokenSet {
                access_token: AccessToken::new(tok.clone()),
                access_expires_at: exp,
                refresh_token: RefreshToken::new(tok),
                refresh_expires_at: None,
                scope: None,
            }),
            phase: Phase::Healthy,
            next_attempt: 1,
            credential_first_presented_at: None,
            consecutive_failures: 0,
            not_before: Some(exp),
            updated_at: exp,
            acquisition,
            acquired_at,
        };
        prop_assert_eq!(decode_state(&encode_state(&s).unwrap()).unwrap(), s);
    }
}

fn crc32(b: &[u8]) -> u32 {
    // IEEE CRC-32, bitwise (test-only; the codec uses crc32fast).
    let mut crc = 0xffff_ffffu32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
