use super::*;
use serde_json::json;

const SHOP: &str = "demo.myshopify.com";
const OTHER_SHOP: &str = "other.myshopify.com";
const CID: &str = "cid";
const SECRET: &str = "secret";
const T0: u64 = 1_800_000_000_000;
const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

fn model(config: ModelConfig) -> Model {
    let mut m = Model::new(config, 7);
    m.register_app(CID, SECRET);
    m
}

fn default_model() -> Model {
    model(ModelConfig::default())
}

fn with_policy(policy: RotationPolicy) -> Model {
    model(ModelConfig { policy, ..ModelConfig::default() })
}

fn retain(retry_returns: RetryReturns, extend_access_expiry: bool) -> RotationPolicy {
    RotationPolicy::RetainUntilReplacementUsed { max_retention_ms: 30 * DAY, retry_returns, extend_access_expiry }
}

fn refresh(m: &mut Model, now: u64, rt: &SimToken) -> TokenReply {
    m.handle_token_params(now, SHOP, &TokenParams::refresh(CID, SECRET, rt.as_str()))
}

fn ok(reply: TokenReply) -> TokenSet {
    match reply.outcome {
        TokenOutcome::Issued { tokens, .. } => tokens,
        other => panic!("expected tokens, got {other:?}"),
    }
}

fn kind(reply: &TokenReply) -> IssueKind {
    match &reply.outcome {
        TokenOutcome::Issued { kind, .. } => *kind,
        other => panic!("expected tokens, got {other:?}"),
    }
}

fn body(reply: &TokenReply) -> serde_json::Value {
    reply.delivery.reply().and_then(HttpReply::json_body).expect("a JSON reply")
}

fn status(reply: &TokenReply) -> u16 {
    reply.delivery.reply().expect("a reply").status
}

fn assert_inactive(reply: &TokenReply) {
    assert_eq!(status(reply), 401, "{reply:?}");
    assert_eq!(
        body(reply),
        json!({"error":"invalid_request","error_description":"This request requires an active refresh_token"})
    );
}

fn assert_invalid_subject(reply: &TokenReply) {
    assert_eq!(status(reply), 400, "{reply:?}");
    assert_eq!(body(reply), json!({"error":"invalid_subject_token"}));
}

fn exchange(m: &mut Model, now: u64, session_token: &str) -> TokenReply {
    m.handle_token_params(now, SHOP, &TokenParams::exchange(CID, SECRET, session_token))
}

fn session(now: u64) -> String {
    mint_session_token(SHOP, CID, SECRET, now, MIN)
}

fn refresh_view(m: &Model, now: u64, token: &SimToken) -> RefreshTokenView {
    m.shop_state(SHOP, now).refresh_token(token.as_str()).expect("known token").clone()
}

// ------------------------------------------------------------------ rotation

#[test]
fn first_use_rotates_and_keeps_previous_access_valid() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    assert!(t0.access_token.as_str().starts_with("shpat_"));
    assert!(t0.refresh_token.as_str().starts_with("shprt_"));
    assert_eq!((t0.expires_in, t0.refresh_token_expires_in), (3600, 7_776_000));

    let now = T0 + 50 * MIN;
    let reply = refresh(&mut m, now, &t0.refresh_token);
    assert_eq!(kind(&reply), IssueKind::Rotation);
    assert_eq!(status(&reply), 200);
    let b = body(&reply);
    for field in ["access_token", "expires_in", "refresh_token", "refresh_token_expires_in", "scope"] {
        assert!(b.get(field).is_some(), "missing {field} in {b}");
    }
    let t1 = ok(reply);
    assert_ne!(t1.access_token, t0.access_token);
    assert_ne!(t1.refresh_token, t0.refresh_token);
    assert_eq!((t1.expires_in, t1.refresh_token_expires_in), (3600, 7_776_000));
    assert_eq!(t1.scope, "write_products,read_orders");

    // The previous access token stays valid until its own expiry.
    assert!(m.access_token_valid(SHOP, t0.access_token.as_str(), now));
    assert!(!m.access_token_valid(SHOP, t0.access_token.as_str(), T0 + HOUR));
    assert!(m.access_token_valid(SHOP, t1.access_token.as_str(), T0 + HOUR));

    let v = refresh_view(&m, now, &t0.refresh_token);
    assert_eq!(v.first_used_at_ms, Some(now));
    assert_eq!(v.replacement.as_ref(), Some(&t1.refresh_token));
    assert_eq!(refresh_view(&m, now, &t1.refresh_token).predecessor, Some(t0.refresh_token.clone()));
    assert_eq!(m.counters().shop(SHOP).rotations, 1);
    assert_eq!(m.counters().total.token_requests, 1);
}

#[test]
fn same_pair_retry_extends_access_expiry_but_not_refresh_expiry() {
    let mut m = with_policy(retain(RetryReturns::SamePair, true));
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    let later = T0 + 10 * MIN;
    let reply = refresh(&mut m, later, &t0.refresh_token);
    assert_eq!(kind(&reply), IssueKind::ReplaySamePair);
    let retry = ok(reply);
    assert_eq!(retry.access_token, t1.access_token);
    assert_eq!(retry.refresh_token, t1.refresh_token);
    assert_eq!(retry.expires_in, 3600, "access expiry recomputed from now");
    assert_eq!(retry.refresh_token_expires_in, 7_776_000 - 600, "not extended");
    assert!(m.access_token_valid(SHOP, t1.access_token.as_str(), later + HOUR - 1));
    assert_eq!(m.counters().shop(SHOP).replays, 1);
    assert_eq!(m.counters().shop(SHOP).rotations, 1);
}

#[test]
fn same_pair_retry_without_extension_reports_remaining_lifetime() {
    let mut m = with_policy(retain(RetryReturns::SamePair, false));
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    let retry = ok(refresh(&mut m, T0 + 10 * MIN, &t0.refresh_token));
    assert_eq!(retry.access_token, t1.access_token);
    assert_eq!(retry.expires_in, 3000);
    assert!(!m.access_token_valid(SHOP, t1.access_token.as_str(), T0 + HOUR));
}

#[test]
fn new_pair_retry_mints_fresh_tokens_and_retires_the_superseded_one() {
    let mut m = with_policy(retain(RetryReturns::NewPair, true));
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    let reply = refresh(&mut m, T0 + MIN, &t0.refresh_token);
    assert_eq!(kind(&reply), IssueKind::ReplayNewPair);
    let t2 = ok(reply);
    assert_ne!(t2.access_token, t1.access_token);
    assert_ne!(t2.refresh_token, t1.refresh_token);
    assert_eq!(t2.refresh_token_expires_in, 7_776_000);
    // The superseded replacement no longer works, its access token lives on.
    assert_inactive(&refresh(&mut m, T0 + 2 * MIN, &t1.refresh_token));
    assert!(m.access_token_valid(SHOP, t1.access_token.as_str(), T0 + 2 * MIN));
    // Using the latest replacement ends R0's retention.
    ok(refresh(&mut m, T0 + 3 * MIN, &t2.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 4 * MIN, &t0.refresh_token));
}

#[test]
fn retention_ends_when_the_replacement_is_used() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    // Retrying R0 any number of times before R1 is used is fine.
    for i in 1..4 {
        assert_eq!(ok(refresh(&mut m, T0 + i * DAY, &t0.refresh_token)).refresh_token, t1.refresh_token);
    }
    let t2 = ok(refresh(&mut m, T0 + 5 * DAY, &t1.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 5 * DAY + 1, &t0.refresh_token));
    assert_eq!(refresh_view(&m, T0 + 5 * DAY + 1, &t0.refresh_token).status, TokenStatus::Retired);
    // R1 is itself retained until R2 is used.
    assert_eq!(ok(refresh(&mut m, T0 + 6 * DAY, &t1.refresh_token)).refresh_token, t2.refresh_token);
    assert_eq!(m.counters().shop(SHOP).rejections_of("invalid_request"), 1);
}

#[test]
fn retention_ends_after_max_retention() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    assert!(m.refresh_token_accepted(CID, SHOP, t0.refresh_token.as_str(), T0 + 30 * DAY - 1));
    ok(refresh(&mut m, T0 + 30 * DAY - 1, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 30 * DAY, &t0.refresh_token));
    // R1 is unused and unexpired: the grant is still recoverable.
    assert!(m.grant_alive(SHOP, T0 + 30 * DAY));
    ok(refresh(&mut m, T0 + 30 * DAY, &t1.refresh_token));
}

#[test]
fn retention_never_extends_past_the_refresh_token_expiry() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let first_use = T0 + 89 * DAY;
    ok(refresh(&mut m, first_use, &t0.refresh_token));
    ok(refresh(&mut m, T0 + 90 * DAY - 1, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 90 * DAY, &t0.refresh_token));
    assert_eq!(refresh_view(&m, T0 + 90 * DAY, &t0.refresh_token).status, TokenStatus::Expired);
}

#[test]
fn expired_and_unknown_refresh_tokens_are_rejected() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    assert_inactive(&refresh(&mut m, T0 + 90 * DAY, &t0.refresh_token));
    assert!(!m.grant_alive(SHOP, T0 + 90 * DAY));
    assert!(m.grant_alive(SHOP, T0 + 90 * DAY - 1));
    assert_inactive(&refresh(&mut m, T0, &SimToken::new("shprt_nope")));
    // A token of another shop or app is unknown here.
    let other = m.seed_grant(T0, OTHER_SHOP, None).unwrap();
    assert_inactive(&refresh(&mut m, T0, &other.refresh_token));
    m.register_app("cid2", "s2");
    let reply = m.handle_token_params(T0, SHOP, &TokenParams::refresh("cid2", "s2", t0.refresh_token.as_str()));
    assert_inactive(&reply);
    assert!(m.refresh_token_accepted(CID, SHOP, t0.refresh_token.as_str(), T0));
}

#[test]
fn invalid_grant_rejection_style() {
    let mut m = model(ModelConfig { rejection_style: RejectionStyle::InvalidGrant, ..ModelConfig::default() });
    let reply = refresh(&mut m, T0, &SimToken::new("shprt_unknown"));
    assert_eq!(status(&reply), 400);
    assert_eq!(
        body(&reply),
        json!({"error":"invalid_grant","error_description":"The refresh token is invalid or expired"})
    );
    assert_eq!(m.counters().total.rejections_of("invalid_grant"), 1);
}

// ------------------------------------------------------------------ other policies

#[test]
fn window_policy_replays_within_the_window_only() {
    let mut m = with_policy(RotationPolicy::Window { window_ms: HOUR });
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    // Using R1 does not end the window for R0.
    let t2 = ok(refresh(&mut m, T0 + MIN, &t1.refresh_token));
    let retry = ok(refresh(&mut m, T0 + HOUR - 1, &t0.refresh_token));
    assert_eq!(retry.access_token, t1.access_token);
    assert_eq!(retry.refresh_token, t1.refresh_token);
    assert_eq!(retry.expires_in, 0, "expiries are not extended in window mode");
    assert_inactive(&refresh(&mut m, T0 + HOUR, &t0.refresh_token));
    assert!(m.grant_alive(SHOP, T0 + HOUR));
    assert_eq!(ok(refresh(&mut m, T0 + MIN + HOUR - 1, &t1.refresh_token)).refresh_token, t2.refresh_token);
}

#[test]
fn strict_policy_rejects_any_reuse() {
    let mut m = with_policy(RotationPolicy::Strict);
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 1, &t0.refresh_token));
    assert!(!m.refresh_token_accepted(CID, SHOP, t0.refresh_token.as_str(), T0 + 1));
    assert!(m.grant_alive(SHOP, T0 + 1));
    ok(refresh(&mut m, T0 + 2, &t1.refresh_token));
}

#[test]
fn family_revocation_on_reuse_kills_the_grant() {
    let mut m = model(ModelConfig { revoke_family_on_reuse: true, ..ModelConfig::default() });
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    // A retry inside retention is not reuse.
    ok(refresh(&mut m, T0 + 1, &t0.refresh_token));
    let t2 = ok(refresh(&mut m, T0 + 2, &t1.refresh_token));
    assert!(m.grant_alive(SHOP, T0 + 3));
    assert_inactive(&refresh(&mut m, T0 + 3, &t0.refresh_token));
    assert!(!m.grant_alive(SHOP, T0 + 3));
    assert_inactive(&refresh(&mut m, T0 + 4, &t2.refresh_token));
    assert!(!m.access_token_valid(SHOP, t2.access_token.as_str(), T0 + 4));
    assert_eq!(m.counters().shop(SHOP).family_revocations, 1);
    let state = m.shop_state(SHOP, T0 + 4);
    assert!(state.grants[0].refresh_tokens.iter().all(|r| r.status == TokenStatus::Revoked));
    // A new acquisition recovers.
    let fresh = ok(exchange(&mut m, T0 + 5, &session(T0 + 5)));
    ok(refresh(&mut m, T0 + 6, &fresh.refresh_token));
}

#[test]
fn without_family_revocation_reuse_only_fails_that_request() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    let t2 = ok(refresh(&mut m, T0 + 1, &t1.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 2, &t0.refresh_token));
    ok(refresh(&mut m, T0 + 3, &t2.refresh_token));
    assert_eq!(m.counters().shop(SHOP).family_revocations, 0);
}

#[test]
fn tokens_retired_by_a_newer_acquisition_do_not_trigger_family_revocation() {
    let mut m = model(ModelConfig { revoke_family_on_reuse: true, ..ModelConfig::default() });
    let old = m.seed_grant(T0, SHOP, None).unwrap();
    let new = m.seed_grant(T0 + 1, SHOP, None).unwrap();
    assert_inactive(&refresh(&mut m, T0 + 2, &old.refresh_token));
    ok(refresh(&mut m, T0 + 3, &new.refresh_token));
    assert_eq!(m.counters().shop(SHOP).family_revocations, 0);
}

#[test]
fn strict_with_family_revocation() {
    let mut m =
        model(ModelConfig { policy: RotationPolicy::Strict, revoke_family_on_reuse: true, ..ModelConfig::default() });
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 1, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, T0 + 2, &t1.refresh_token));
    assert!(!m.grant_alive(SHOP, T0 + 2));
}

#[test]
fn admin_use_of_the_new_access_token_retires_the_previous_refresh_token_when_switched_on() {
    for switch in [false, true] {
        let mut m = model(ModelConfig { admin_use_retires_previous: switch, ..ModelConfig::default() });
        let t0 = m.seed_grant(T0, SHOP, None).unwrap();
        // Using the acquisition's own access token retires nothing.
        assert!(m.handle_admin(T0, SHOP, Some(t0.access_token.as_str()), AdminApi::RestShop).authorized);
        let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
        assert!(m.handle_admin(T0 + 1, SHOP, Some(t1.access_token.as_str()), AdminApi::RestShop).authorized);
        let retry = refresh(&mut m, T0 + 2, &t0.refresh_token);
        if switch {
            assert_inactive(&retry);
        } else {
            ok(retry);
        }
    }
}

// ------------------------------------------------------------------ acquisition

#[test]
fn token_exchange_acquires_and_retires_older_refresh_tokens() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    let now = T0 + MIN;
    let reply = exchange(&mut m, now, &session(now));
    assert_eq!(kind(&reply), IssueKind::Acquisition);
    let fresh = ok(reply);
    assert_eq!((fresh.expires_in, fresh.refresh_token_expires_in), (3600, 7_776_000));
    // Older refresh tokens die at once, including one still in retention.
    assert_inactive(&refresh(&mut m, now + 1, &t0.refresh_token));
    assert_inactive(&refresh(&mut m, now + 1, &t1.refresh_token));
    // Older access tokens live to their expiry.
    assert!(m.access_token_valid(SHOP, t1.access_token.as_str(), now + 1));
    assert!(m.access_token_valid(SHOP, t0.access_token.as_str(), now + 1));
    ok(refresh(&mut m, now + 2, &fresh.refresh_token));
    let state = m.shop_state(SHOP, now + 2);
    assert_eq!(state.grant(CID).unwrap().generation, 2);
    assert_eq!(m.counters().shop(SHOP).acquisitions, 2);
}

#[test]
fn acquisition_can_revoke_old_access_tokens() {
    let mut m = model(ModelConfig { revoke_old_access_on_acquisition: true, ..ModelConfig::default() });
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let fresh = ok(exchange(&mut m, T0 + 1, &session(T0 + 1)));
    assert!(!m.access_token_valid(SHOP, t0.access_token.as_str(), T0 + 2));
    assert!(m.access_token_valid(SHOP, fresh.access_token.as_str(), T0 + 2));
}

#[test]
fn session_token_failures_answer_invalid_subject_token_without_state_change() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let now = T0 + MIN;
    let bad_tokens = [
        mint_session_token(SHOP, CID, "wrong-secret", now, MIN),
        mint_session_token(SHOP, "other-app", SECRET, now, MIN),
        mint_session_token(OTHER_SHOP, CID, SECRET, now, MIN),
        mint_session_token(SHOP, CID, SECRET, now - 2 * MIN, MIN),
        mint_session_token(SHOP, CID, SECRET, now + MIN, MIN),
        "not-a-jwt".to_owned(),
    ];
    for t in &bad_tokens {
        assert_invalid_subject(&exchange(&mut m, now, t));
    }
    assert_eq!(m.counters().shop(SHOP).rejections_of("invalid_subject_token"), bad_tokens.len() as u64);
    // Nothing was acquired: R0 still works.
    ok(refresh(&mut m, now, &t0.refresh_token));
    assert_eq!(m.shop_state(SHOP, now).grant(CID).unwrap().generation, 1);
}

#[test]
fn session_token_leeway_is_a_switch() {
    let mut m = model(ModelConfig { session_token_leeway_ms: 5 * SEC, ..ModelConfig::default() });
    let t = session(T0);
    ok(exchange(&mut m, T0 + MIN + 4 * SEC, &t));
}

#[test]
fn expiring_accepts_strings_and_integers() {
    let st = session(T0);
    let base = TokenParams::exchange(CID, SECRET, &st);
    let mut m = default_model();

    // JSON integer 1.
    let mut v: serde_json::Value = serde_json::from_str(&base.to_json()).unwrap();
    v["expiring"] = json!(1);
    let r = m.handle_token_request(T0, SHOP, Some("application/json"), v.to_string().as_bytes());
    assert!(r.outcome.tokens().is_some(), "{r:?}");

    // Form string "1".
    let r = m.handle_token_request(T0, SHOP, Some("application/x-www-form-urlencoded"), base.to_form().as_bytes());
    assert!(r.outcome.tokens().is_some(), "{r:?}");

    // JSON integer 0 and string "0": a non-expiring token.
    for zero in [json!(0), json!("0")] {
        v["expiring"] = zero;
        let r = m.handle_token_request(T0, SHOP, Some("application/json"), v.to_string().as_bytes());
        assert!(matches!(r.outcome, TokenOutcome::IssuedNonExpiring(_)), "{r:?}");
        let b = body(&r);
        assert!(b.get("access_token").is_some() && b.get("refresh_token").is_none());
        let token = b["access_token"].as_str().unwrap();
        assert!(m.access_token_valid(SHOP, token, T0 + 365 * DAY));
    }

    // Absent means 0; other values are refused.
    let r = m.handle_token_params(T0, SHOP, &base.clone().without("expiring"));
    assert!(matches!(r.outcome, TokenOutcome::IssuedNonExpiring(_)));
    let r = m.handle_token_params(T0, SHOP, &base.clone().with("expiring", "2"));
    assert_eq!(status(&r), 400);
    assert_eq!(body(&r)["error"], "invalid_request");
}

#[test]
fn online_tokens_are_not_simulated() {
    let mut m = default_model();
    let p = TokenParams::exchange(CID, SECRET, &session(T0))
        .with("requested_token_type", crate::request::TOKEN_TYPE_ONLINE);
    let r = m.handle_token_params(T0, SHOP, &p);
    assert_eq!(status(&r), 400);
    assert_eq!(body(&r)["error"], "invalid_request");
}

// ------------------------------------------------------------------ migration

fn migrate(m: &mut Model, now: u64, legacy: &SimToken) -> TokenReply {
    m.handle_token_params(now, SHOP, &TokenParams::migrate(CID, SECRET, legacy.as_str()))
}

#[test]
fn migration_revokes_the_legacy_token_and_retries_return_the_same_pair() {
    let mut m = default_model();
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    let admin = |m: &mut Model, now, t: &str| m.handle_admin(now, SHOP, Some(t), AdminApi::RestShop).authorized;
    assert!(admin(&mut m, T0, legacy.as_str()));

    let reply = migrate(&mut m, T0, &legacy);
    assert_eq!(kind(&reply), IssueKind::Migration);
    let pair = ok(reply);
    assert!(!admin(&mut m, T0 + 1, legacy.as_str()));
    assert!(admin(&mut m, T0 + 1, pair.access_token.as_str()));

    let later = T0 + 6 * DAY;
    let reply = migrate(&mut m, later, &legacy);
    assert_eq!(kind(&reply), IssueKind::MigrationReplay);
    let retry = ok(reply);
    assert_eq!(retry.access_token, pair.access_token);
    assert_eq!(retry.refresh_token, pair.refresh_token);
    assert_eq!(retry.expires_in, 3600, "access expiry extended");
    assert_eq!(retry.refresh_token_expires_in, 7_776_000 - 6 * 86_400);
    assert!(admin(&mut m, later + 1, pair.access_token.as_str()));
    assert_eq!(m.counters().shop(SHOP).migrations, 1);
    assert_eq!(m.counters().shop(SHOP).migration_replays, 1);

    assert_invalid_subject(&migrate(&mut m, T0 + 7 * DAY, &legacy));
    let state = m.shop_state(SHOP, T0 + 7 * DAY);
    assert_eq!(state.legacy_tokens[0].status, TokenStatus::Revoked);
    assert!(!state.legacy_tokens[0].migration_retry_open);
    // The pair itself is fine.
    ok(refresh(&mut m, T0 + 7 * DAY, &pair.refresh_token));
}

#[test]
fn migration_retry_ends_once_the_pair_is_refreshed() {
    let mut m = default_model();
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    let pair = ok(migrate(&mut m, T0, &legacy));
    ok(refresh(&mut m, T0 + HOUR, &pair.refresh_token));
    assert_invalid_subject(&migrate(&mut m, T0 + HOUR + 1, &legacy));
}

#[test]
fn migration_retry_ends_with_a_later_acquisition() {
    let mut m = default_model();
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    ok(migrate(&mut m, T0, &legacy));
    ok(exchange(&mut m, T0 + MIN, &session(T0 + MIN)));
    assert_invalid_subject(&migrate(&mut m, T0 + 2 * MIN, &legacy));
}

#[test]
fn migration_error_body_is_a_switch() {
    let mut m = model(ModelConfig { migration_error: MigrationErrorStyle::InvalidRequest, ..ModelConfig::default() });
    let r = migrate(&mut m, T0, &SimToken::new("shpat_unknown"));
    assert_eq!(status(&r), 400);
    assert_eq!(body(&r), json!({"error":"invalid_request","error_description":"Invalid subject token"}));
}

#[test]
fn migration_requires_expiring_one_and_the_right_app_and_shop() {
    let mut m = default_model();
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    let p = TokenParams::migrate(CID, SECRET, legacy.as_str());
    let r = m.handle_token_params(T0, SHOP, &p.clone().with("expiring", "0"));
    assert_eq!(body(&r)["error"], "invalid_request");
    let r = m.handle_token_params(T0, SHOP, &p.clone().without("expiring"));
    assert_eq!(body(&r)["error"], "invalid_request");
    let r = m.handle_token_params(T0, OTHER_SHOP, &p);
    assert_invalid_subject(&r);
    // Still migratable after those refusals.
    ok(m.handle_token_params(T0, SHOP, &p));
    // Seeding a duplicate token string is refused.
    assert_eq!(m.seed_legacy_token(SHOP, None, Some(legacy.as_str())), Err(ModelError::DuplicateToken));
}

// ------------------------------------------------------------------ client auth and parsing

#[test]
fn invalid_client_for_wrong_or_unknown_credentials() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    for (id, secret) in [(CID, "wrong"), ("nobody", SECRET)] {
        let r = m.handle_token_params(T0, SHOP, &TokenParams::refresh(id, secret, t0.refresh_token.as_str()));
        assert_eq!(status(&r), 401);
        assert_eq!(body(&r), json!({"error":"invalid_client","error_description":"Client credentials are invalid"}));
    }
    let c = m.counters().shop(SHOP);
    assert_eq!((c.invalid_client, c.rejections_of("invalid_client")), (2, 2));
    // No state change.
    assert!(refresh_view(&m, T0, &t0.refresh_token).first_used_at_ms.is_none());

    let mut m = model(ModelConfig { invalid_client_status: 400, ..ModelConfig::default() });
    let r = m.handle_token_params(T0, SHOP, &TokenParams::refresh(CID, "x", "shprt_x"));
    assert_eq!(status(&r), 400);
}

#[test]
fn both_body_encodings_work_for_refresh() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let p = TokenParams::refresh(CID, SECRET, t0.refresh_token.as_str());
    let json_reply = m.handle_token_request(T0, SHOP, Some("application/json"), p.to_json().as_bytes());
    let t1 = ok(json_reply);
    let form_reply =
        m.handle_token_request(T0 + 1, SHOP, Some("application/x-www-form-urlencoded"), p.to_form().as_bytes());
    assert_eq!(ok(form_reply).refresh_token, t1.refresh_token);
}

#[test]
fn malformed_and_incomplete_requests() {
    let mut m = default_model();
    let r = m.handle_token_request(T0, SHOP, Some("application/json"), b"{not json");
    assert_eq!(status(&r), 400);
    assert_eq!(body(&r)["error"], "invalid_request");

    let cases = [
        TokenParams::refresh(CID, SECRET, "x").without("client_id"),
        TokenParams::refresh(CID, SECRET, "x").without("client_secret"),
        TokenParams::refresh(CID, SECRET, "x").without("grant_type"),
        TokenParams::refresh(CID, SECRET, "x").without("refresh_token"),
        TokenParams::exchange(CID, SECRET, "x").without("subject_token"),
        TokenParams::exchange(CID, SECRET, "x").without("subject_token_type"),
        TokenParams::exchange(CID, SECRET, "x").with("subject_token_type", "urn:other"),
    ];
    for p in cases {
        let r = m.handle_token_params(T0, SHOP, &p);
        assert_eq!(status(&r), 400, "{p:?}");
        assert_eq!(body(&r)["error"], "invalid_request", "{p:?}");
    }

    let r = m.handle_token_params(T0, SHOP, &TokenParams::refresh(CID, SECRET, "x").with("grant_type", "password"));
    assert_eq!(status(&r), 400);
    assert_eq!(body(&r), json!({"error":"unsupported_grant_type"}));
}

// ------------------------------------------------------------------ admin API

#[test]
fn admin_api_accepts_only_live_tokens_for_the_shop() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let a = t0.access_token.as_str();
    let ok_reply = m.handle_admin(T0, SHOP, Some(a), AdminApi::RestShop);
    assert!(ok_reply.authorized);
    assert_eq!(ok_reply.reply.status, 200);
    assert_eq!(ok_reply.reply.json_body().unwrap()["shop"]["myshopify_domain"], SHOP);
    let gql = m.handle_admin(T0, SHOP, Some(a), AdminApi::GraphQl);
    assert_eq!(gql.reply.json_body().unwrap()["data"]["shop"]["myshopifyDomain"], SHOP);
    let unauthorized = json!({"errors":"[API] Invalid API key or access token (unrecognized login or wrong password)"});
    for (shop, token, now) in
        [(SHOP, Some(a), T0 + HOUR), (OTHER_SHOP, Some(a), T0), (SHOP, Some("shpat_unknown"), T0), (SHOP, None, T0)]
    {
        let r = m.handle_admin(now, shop, token, AdminApi::RestShop);
        assert_eq!(r.reply.status, 401);
        assert_eq!(r.reply.json_body().unwrap(), unauthorized);
    }
    assert_eq!(m.counters().total.admin_ok, 2);
    assert_eq!(m.counters().total.admin_unauthorized, 4);
    assert_eq!(m.counters().shop(SHOP).admin_unauthorized, 3);
}

#[test]
fn uninstall_revokes_everything() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    assert!(m.uninstall(SHOP));
    assert_inactive(&refresh(&mut m, T0, &t0.refresh_token));
    assert!(!m.access_token_valid(SHOP, t0.access_token.as_str(), T0));
    assert!(!m.access_token_valid(SHOP, legacy.as_str(), T0));
    assert_invalid_subject(&migrate(&mut m, T0, &legacy));
    assert!(!m.grant_alive(SHOP, T0));
}

// ------------------------------------------------------------------ faults

#[test]
fn rotate_then_drop_commits_and_answers_520() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::RotateThenDrop, Fault::RotateThenDrop]).unwrap();
    let r = refresh(&mut m, T0, &t0.refresh_token);
    let reply = r.delivery.reply().unwrap();
    assert_eq!(reply.status, 520);
    assert_eq!(reply.content_type, crate::reply::CONTENT_TYPE_TEXT);
    assert_eq!(reply.body, b"error code: 520");
    let committed = r.outcome.tokens().unwrap().clone();
    assert_eq!(kind(&r), IssueKind::Rotation);
    // Second 520 on the retry (as in the community report) ...
    let r2 = refresh(&mut m, T0 + 18 * SEC, &t0.refresh_token);
    assert_eq!(r2.delivery.reply().unwrap().status, 520);
    // ... and the third attempt recovers the committed pair.
    let t1 = ok(refresh(&mut m, T0 + 36 * SEC, &t0.refresh_token));
    assert_eq!(t1.refresh_token, committed.refresh_token);
    let c = m.counters().shop(SHOP);
    assert_eq!((c.faults_of("rotate_then_drop"), c.rotations, c.replays), (2, 1, 2));
}

#[test]
fn rotate_then_drop_under_strict_locks_the_shop_out() {
    let mut m = with_policy(RotationPolicy::Strict);
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::RotateThenDrop]).unwrap();
    refresh(&mut m, T0, &t0.refresh_token);
    assert_inactive(&refresh(&mut m, T0 + 1, &t0.refresh_token));
    // Only R1 (which the client never saw) is alive.
    assert!(m.grant_alive(SHOP, T0 + 1));
    let state = m.shop_state(SHOP, T0 + 1);
    let alive: Vec<_> = state.grants[0].refresh_tokens.iter().filter(|r| r.accepted_now).collect();
    assert_eq!(alive.len(), 1);
    assert_ne!(alive[0].token, t0.refresh_token);
}

#[test]
fn hang_and_reset_commit_and_deliver_nothing() {
    for (fault, delivery) in [(Fault::RotateThenHang, Delivery::Hang), (Fault::RotateThenReset, Delivery::Reset)] {
        let mut m = default_model();
        let t0 = m.seed_grant(T0, SHOP, None).unwrap();
        m.push_faults(SHOP, [fault]).unwrap();
        let r = refresh(&mut m, T0, &t0.refresh_token);
        assert_eq!(r.delivery, delivery);
        let committed = r.outcome.tokens().unwrap().clone();
        let retry = refresh(&mut m, T0 + 1, &t0.refresh_token);
        assert_eq!(kind(&retry), IssueKind::ReplaySamePair);
        assert_eq!(ok(retry).refresh_token, committed.refresh_token);
    }
}

#[test]
fn fail_before_processing_and_throttle_change_nothing() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(
        SHOP,
        [
            Fault::FailBeforeProcessing { status: 503, json: false },
            Fault::FailBeforeProcessing { status: 500, json: true },
            Fault::Throttle { retry_after_secs: 7 },
            Fault::InvalidClient,
        ],
    )
    .unwrap();
    let r = refresh(&mut m, T0, &t0.refresh_token);
    assert_eq!(r.outcome, TokenOutcome::NotProcessed);
    let reply = r.delivery.reply().unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.json_body().is_none());

    let r = refresh(&mut m, T0, &t0.refresh_token);
    assert_eq!(r.delivery.reply().unwrap().status, 500);
    assert_eq!(body(&r), json!({"errors":"Internal Server Error"}));

    let r = refresh(&mut m, T0, &t0.refresh_token);
    let reply = r.delivery.reply().unwrap();
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains(&("Retry-After", "7".to_owned())));

    let r = refresh(&mut m, T0, &t0.refresh_token);
    assert_eq!(status(&r), 401);
    assert_eq!(body(&r)["error"], "invalid_client");

    assert!(refresh_view(&m, T0, &t0.refresh_token).first_used_at_ms.is_none());
    assert_eq!(kind(&refresh(&mut m, T0, &t0.refresh_token)), IssueKind::Rotation);
    let c = m.counters().shop(SHOP);
    assert_eq!(c.total_faults(), 4);
    assert_eq!(c.faults_of("fail_before_processing"), 2);
    assert_eq!(c.invalid_client, 1);
    assert_eq!(c.token_requests, 5);
}

#[test]
fn body_mangling_faults_commit() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::Truncated, Fault::Malformed, Fault::MissingExpiresIn]).unwrap();
    let full = {
        let r = refresh(&mut m, T0, &t0.refresh_token);
        let reply = r.delivery.reply().unwrap().clone();
        assert_eq!(reply.status, 200);
        assert!(reply.json_body().is_none(), "truncated body must not parse");
        serde_json::to_vec(r.outcome.tokens().unwrap()).unwrap()
    };
    let r = refresh(&mut m, T0, &t0.refresh_token);
    let reply = r.delivery.reply().unwrap();
    assert_eq!(reply.status, 200);
    assert!(reply.json_body().is_none());
    assert!(reply.body.len() != full.len());

    let r = refresh(&mut m, T0, &t0.refresh_token);
    let b = body(&r);
    assert!(b.get("expires_in").is_none());
    assert!(b.get("refresh_token_expires_in").is_some());
    assert_eq!(m.counters().shop(SHOP).replays, 2);
}

#[test]
fn short_refresh_ttl_and_slow() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::ShortRefreshTtl { secs: 120 }, Fault::Slow { delay_ms: 250 }]).unwrap();
    let t1 = ok(refresh(&mut m, T0, &t0.refresh_token));
    assert_eq!(t1.refresh_token_expires_in, 120);
    let r = refresh(&mut m, T0 + 1, &t1.refresh_token);
    assert!(matches!(r.delivery, Delivery::Respond { delay_ms: 250, .. }));
    let t2 = ok(r);
    assert_inactive(&refresh(&mut m, T0 + 2 * MIN, &t1.refresh_token));
    ok(refresh(&mut m, T0 + 2 * MIN, &t2.refresh_token));
}

#[test]
fn scripted_faults_are_per_shop() {
    let mut m = default_model();
    let a = m.seed_grant(T0, SHOP, None).unwrap();
    let b = m.seed_grant(T0, OTHER_SHOP, None).unwrap();
    m.push_faults(OTHER_SHOP, [Fault::RotateThenDrop]).unwrap();
    assert_eq!(m.pending_faults(OTHER_SHOP), vec![Fault::RotateThenDrop]);
    assert!(refresh(&mut m, T0, &a.refresh_token).fault.is_none());
    let r = m.handle_token_params(T0, OTHER_SHOP, &TokenParams::refresh(CID, SECRET, b.refresh_token.as_str()));
    assert_eq!(r.fault, Some(Fault::RotateThenDrop));
    assert!(m.push_faults(SHOP, [Fault::FailBeforeProcessing { status: 404, json: false }]).is_err());
}

#[test]
fn random_faults_are_reproducible_and_do_not_perturb_tokens() {
    let run = |faults: bool| {
        let mut m = default_model();
        if faults {
            m.set_random_faults(Some(RandomFaults {
                seed: 3,
                probabilities: crate::faults::FaultProbabilities {
                    rotate_then_drop: 0.3,
                    fail_before_processing: 0.2,
                    ..Default::default()
                },
                ..Default::default()
            }))
            .unwrap();
        }
        let mut rt = m.seed_grant(T0, SHOP, None).unwrap().refresh_token;
        let mut seen = Vec::new();
        for i in 0..50 {
            let r = refresh(&mut m, T0 + i, &rt);
            seen.push(r.fault);
            if let Some(t) = r.outcome.tokens() {
                if r.fault.is_none() {
                    rt = t.refresh_token.clone();
                }
            }
        }
        (seen, m.shop_state(SHOP, T0 + 100))
    };
    let (faults_a, state_a) = run(true);
    let (faults_b, state_b) = run(true);
    assert_eq!(faults_a, faults_b);
    assert_eq!(state_a, state_b);
    assert!(faults_a.iter().any(Option::is_some));
    assert!(faults_a.iter().any(Option::is_none));
    // Tokens minted by the first acquisition are the same with or without random faults.
    let (_, plain) = run(false);
    assert_eq!(plain.grants[0].refresh_tokens[0].token, state_a.grants[0].refresh_tokens[0].token);
}

// ------------------------------------------------------------------ determinism and ids

#[test]
fn same_seed_same_tokens() {
    let mint = |seed| {
        let mut m = Model::new(ModelConfig::default(), seed);
        m.register_app(CID, SECRET);
        m.seed_grant(T0, SHOP, None).unwrap()
    };
    assert_eq!(mint(1), mint(1));
    assert_ne!(mint(1), mint(2));
}

#[test]
fn request_ids_are_unique() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::RotateThenReset]).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..10 {
        ids.insert(refresh(&mut m, T0 + i, &t0.refresh_token).request_id);
        ids.insert(m.handle_admin(T0, SHOP, None, AdminApi::RestShop).request_id);
    }
    assert_eq!(ids.len(), 20);
}

#[test]
fn control_operations_need_a_known_app() {
    let mut m = Model::new(ModelConfig::default(), 1);
    assert_eq!(m.seed_grant(T0, SHOP, None), Err(ModelError::NoApp));
    m.register_app(CID, SECRET);
    m.register_app("second", "s");
    assert_eq!(m.default_client_id(), Some(CID));
    assert_eq!(m.seed_grant(T0, SHOP, Some("nobody")), Err(ModelError::UnknownApp("nobody".into())));
    let second = m.seed_grant(T0, SHOP, Some("second")).unwrap();
    let first = m.seed_grant(T0, SHOP, None).unwrap();
    // Grants are per app: the second app's acquisition did not retire the first's.
    assert!(m.refresh_token_accepted("second", SHOP, second.refresh_token.as_str(), T0));
    assert!(m.refresh_token_accepted(CID, SHOP, first.refresh_token.as_str(), T0));
    assert!(m.grant_alive_for("second", SHOP, T0));
    let st = m.session_token(T0, SHOP, Some("second"), MIN).unwrap();
    assert!(validate_session_token(&st, SHOP, "second", "s", T0, 0).is_ok());
}

#[test]
fn model_debug_output_has_no_secrets_or_tokens() {
    let mut m = Model::new(ModelConfig::default(), 7);
    m.register_app(CID, "s3cr3t-value");
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    let dbg = format!("{m:?} {t0:?} {:?}", m.shop_state(SHOP, T0));
    assert!(!dbg.contains("s3cr3t-value"), "{dbg}");
    assert!(!dbg.contains(t0.refresh_token.as_str()), "{dbg}");
    assert!(!dbg.contains(t0.access_token.as_str()), "{dbg}");
}

#[test]
fn missing_refresh_token_expires_in_fault() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    m.push_faults(SHOP, [Fault::MissingRefreshTokenExpiresIn]).unwrap();
    let r = refresh(&mut m, T0, &t0.refresh_token);
    let b = body(&r);
    assert!(b.get("refresh_token_expires_in").is_none() && b.get("expires_in").is_some(), "{b}");
    assert_eq!(m.counters().shop(SHOP).faults_of("missing_refresh_token_expires_in"), 1);
}

#[test]
fn session_field_is_a_switch() {
    let mut m = default_model();
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    assert!(body(&refresh(&mut m, T0, &t0.refresh_token)).get("session").is_none());
    let mut m = model(ModelConfig { include_session_field: true, ..ModelConfig::default() });
    let t0 = m.seed_grant(T0, SHOP, None).unwrap();
    assert!(t0.session.is_some());
    let b = body(&refresh(&mut m, T0, &t0.refresh_token));
    assert!(b["session"].is_string(), "{b}");
}

#[test]
fn non_expiring_tokens_can_be_refused_by_the_admin_api() {
    let mut m = model(ModelConfig { reject_non_expiring_admin: true, ..ModelConfig::default() });
    let legacy = m.seed_legacy_token(SHOP, None, None).unwrap();
    let r = m.handle_admin(T0, SHOP, Some(legacy.as_str()), AdminApi::RestShop);
    assert!(!r.authorized);
    assert_eq!(r.reply.status, 403);
    assert!(r.reply.json_body().unwrap()["errors"]
        .as_str()
        .unwrap()
        .starts_with("[API] Non-expiring access tokens are no longer accepted"));
    assert_eq!(m.counters().shop(SHOP).admin_forbidden, 1);
    // Migration still works, and the migrated token is then simply unknown (401).
    let pair = ok(migrate(&mut m, T0, &legacy));
    assert!(m.handle_admin(T0, SHOP, Some(pair.access_token.as_str()), AdminApi::RestShop).authorized);
    assert_eq!(m.handle_admin(T0, SHOP, Some(legacy.as_str()), AdminApi::RestShop).reply.status, 401);
}

// ---------------------------------------------------------------- Customer Account API mode

const PUBLIC: &str = "public-cid";

fn customer_model(config: ModelConfig) -> Model {
    let mut m = model(config);
    m.register_public_client(PUBLIC);
    m
}

fn customer_refresh(m: &mut Model, now: u64, shop_id: &str, rt: &SimToken) -> TokenReply {
    let p = TokenParams::from_pairs([
        ("client_id", PUBLIC),
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
    ]);
    m.handle_customer_token_request(
        now,
        shop_id,
        Some("application/x-www-form-urlencoded"),
        p.to_form().as_bytes(),
        None,
    )
}

fn assert_customer_refused(reply: &TokenReply) {
    assert_eq!(status(reply), 400, "{reply:?}");
    assert_eq!(body(reply), json!({"error":"invalid_grant","error_description":CUSTOMER_REFRESH_REFUSED}));
}

#[test]
fn customer_refresh_is_strict_single_use_per_customer() {
    let mut m = customer_model(ModelConfig::default());
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    assert!(t0.access_token.as_str().starts_with("shcat_") && t0.refresh_token.as_str().starts_with("shcrt_"));
    assert_eq!(t0.scope, CUSTOMER_SCOPE);
    let r1 = customer_refresh(&mut m, T0 + SEC, "42", &t0.refresh_token);
    assert_eq!(r1.grant, "42:7");
    assert_eq!(kind(&r1), IssueKind::Rotation);
    let t1 = ok(r1);
    assert_ne!(t1.refresh_token, t0.refresh_token);
    assert_eq!(t1.expires_in, 3600);
    // The profile's Retention is single use: the spent token is refused, the grant lives on.
    assert_customer_refused(&customer_refresh(&mut m, T0 + 2 * SEC, "42", &t0.refresh_token));
    assert!(m.customer_alive(42, 7, T0 + 2 * SEC));
    // The new token works, and the new access token is the customer's at the Customer Account API.
    assert_eq!(m.customer_access_token_valid("42", t1.access_token.as_str(), T0 + 3 * SEC), Some(7));
    assert_eq!(m.customer_access_token_valid("43", t1.access_token.as_str(), T0 + 3 * SEC), None);
    assert!(!m.access_token_valid("42", t1.access_token.as_str(), T0 + 3 * SEC), "not an Admin API token");
    let t2 = ok(customer_refresh(&mut m, T0 + 3 * SEC, "42", &t1.refresh_token));
    let c = m.counters().shop("42:7");
    assert_eq!((c.token_requests, c.rotations, c.rejections_of("invalid_grant")), (3, 2, 1));
    assert_eq!(m.shop_state("42:7", T0 + 4 * SEC).grants[0].client_id, PUBLIC);
    assert!(m.shop_state("42:7", T0 + 4 * SEC).refresh_token(t2.refresh_token.as_str()).unwrap().accepted_now);
}

#[test]
fn a_customers_token_works_only_for_that_customer_at_its_own_shop() {
    let mut m = customer_model(ModelConfig::default());
    let alice = m.seed_customer(T0, 42, 7, None).unwrap();
    let bob = m.seed_customer(T0, 42, 8, None).unwrap();
    // Another shop's path: refused and counted under that shop id, nothing rotated.
    let wrong = customer_refresh(&mut m, T0, "43", &alice.refresh_token);
    assert_customer_refused(&wrong);
    assert_eq!(wrong.grant, "43");
    // Unknown tokens and Admin API tokens are refused too.
    assert_customer_refused(&customer_refresh(&mut m, T0, "42", &SimToken::new("shcrt_nope")));
    let admin = m.seed_grant(T0, SHOP, None).unwrap();
    assert_customer_refused(&customer_refresh(&mut m, T0, "42", &admin.refresh_token));
    // A customer token is not an Admin API refresh token either.
    assert_inactive(&refresh(&mut m, T0, &alice.refresh_token));
    // Bob's refresh rotates Bob only.
    let r = customer_refresh(&mut m, T0 + SEC, "42", &bob.refresh_token);
    assert_eq!(r.grant, "42:8");
    ok(r);
    assert!(m.shop_state("42:7", T0 + SEC).refresh_token(alice.refresh_token.as_str()).unwrap().accepted_now);
    assert_eq!(m.counters().shop("42:7").rotations, 0);
    assert!(m.grant_alive(SHOP, T0 + SEC));
}

#[test]
fn a_public_client_must_not_authenticate_and_must_be_known() {
    let mut m = customer_model(ModelConfig::default());
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    let base = TokenParams::from_pairs([
        ("client_id", PUBLIC),
        ("grant_type", "refresh_token"),
        ("refresh_token", t0.refresh_token.as_str()),
    ]);
    let cases = [
        (base.clone().with("client_secret", "s3cret"), None, PUBLIC_CLIENT_MUST_NOT_AUTHENTICATE),
        (base.clone(), Some("Basic cHVibGljLWNpZDpzM2NyZXQ="), PUBLIC_CLIENT_MUST_NOT_AUTHENTICATE),
        (base.clone().with("client_id", "other-client"), None, "Client credentials are invalid"),
        // The Admin API app's id is not a public client.
        (base.clone().with("client_id", CID), None, "Client credentials are invalid"),
    ];
    for (params, authorization, description) in cases {
        let reply = m.handle_customer_token_request(T0, "42", None, params.to_form().as_bytes(), authorization);
        assert_eq!(status(&reply), 401, "{params:?}");
        assert_eq!(body(&reply), json!({"error":"invalid_client","error_description":description}));
    }
    let missing = m.handle_customer_token_params(T0, "42", &base.clone().without("client_id"));
    assert_eq!(status(&missing), 400);
    assert_eq!(m.counters().shop("42:7").invalid_client, 4);
    // None of it touched the customer's token: it still rotates (JSON bodies are read too).
    let reply = m.handle_customer_token_request(T0, "42", Some("application/json"), base.to_json().as_bytes(), None);
    ok(reply);
    // invalid_client's status is the shared switch.
    let mut m = customer_model(ModelConfig { invalid_client_status: 400, ..ModelConfig::default() });
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    let p = base.with("refresh_token", t0.refresh_token.as_str()).with("client_secret", "x");
    assert_eq!(status(&m.handle_customer_token_params(T0, "42", &p)), 400);
}

#[test]
fn customer_rejection_style_and_policy_are_switches() {
    let config = ModelConfig {
        customer_account: CustomerAccountConfig {
            policy: RotationPolicy::Window { window_ms: MIN },
            rejection_style: CustomerRejectionStyle::InvalidToken,
        },
        ..ModelConfig::default()
    };
    let mut m = customer_model(config);
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    let t1 = ok(customer_refresh(&mut m, T0, "42", &t0.refresh_token));
    // Within the window a retry returns the same pair; after it, 401 invalid_token.
    let again = customer_refresh(&mut m, T0 + SEC, "42", &t0.refresh_token);
    assert_eq!(kind(&again), IssueKind::ReplaySamePair);
    assert_eq!(ok(again).refresh_token, t1.refresh_token);
    let late = customer_refresh(&mut m, T0 + 2 * MIN, "42", &t0.refresh_token);
    assert_eq!(status(&late), 401);
    assert_eq!(body(&late), json!({"error":"invalid_token","error_description":CUSTOMER_REFRESH_REFUSED}));
    // The Admin API mode keeps its own policy and rejection.
    let admin = m.seed_grant(T0, SHOP, None).unwrap();
    let a1 = ok(refresh(&mut m, T0, &admin.refresh_token));
    assert_eq!(kind(&refresh(&mut m, T0 + 2 * MIN, &admin.refresh_token)), IssueKind::ReplaySamePair);
    assert_ne!(a1.refresh_token, admin.refresh_token);
    // Family revocation applies to customers too.
    let mut m = customer_model(ModelConfig { revoke_family_on_reuse: true, ..ModelConfig::default() });
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    ok(customer_refresh(&mut m, T0, "42", &t0.refresh_token));
    assert_customer_refused(&customer_refresh(&mut m, T0 + SEC, "42", &t0.refresh_token));
    assert!(!m.customer_alive(42, 7, T0 + SEC));
    assert_eq!(m.counters().shop("42:7").family_revocations, 1);
}

#[test]
fn faults_apply_per_customer_grant() {
    let mut m = customer_model(ModelConfig::default());
    let alice = m.seed_customer(T0, 42, 7, None).unwrap();
    let bob = m.seed_customer(T0, 42, 8, None).unwrap();
    m.push_faults("42:7", [Fault::FailBeforeProcessing { status: 503, json: false }, Fault::RotateThenDrop]).unwrap();
    // Bob is not scripted.
    ok(customer_refresh(&mut m, T0, "42", &bob.refresh_token));
    // A 5xx before processing changes nothing: the same token works afterwards ...
    let r = customer_refresh(&mut m, T0, "42", &alice.refresh_token);
    assert_eq!(r.outcome, TokenOutcome::NotProcessed);
    assert_eq!(status(&r), 503);
    // ... and a commit-then-520 under strict single use spends the token with its answer lost:
    let r = customer_refresh(&mut m, T0 + SEC, "42", &alice.refresh_token);
    assert_eq!(status(&r), 520);
    let committed = r.outcome.tokens().unwrap().clone();
    assert_customer_refused(&customer_refresh(&mut m, T0 + 2 * SEC, "42", &alice.refresh_token));
    // the customer can still be saved only by a client that somehow has the committed pair.
    assert!(m.customer_alive(42, 7, T0 + 2 * SEC));
    assert!(m.shop_state("42:7", T0).refresh_token(committed.refresh_token.as_str()).unwrap().accepted_now);
    let c = m.counters().shop("42:7");
    assert_eq!((c.faults_of("fail_before_processing"), c.faults_of("rotate_then_drop")), (1, 1));
    assert_eq!(m.counters().shop("42:8").total_faults(), 0);
    // Random faults draw for customers as for shops.
    m.set_random_faults(Some(RandomFaults {
        seed: 1,
        probabilities: crate::faults::FaultProbabilities { throttle: 1.0, ..Default::default() },
        ..RandomFaults::default()
    }))
    .unwrap();
    assert_eq!(status(&customer_refresh(&mut m, T0, "42", &committed.refresh_token)), 429);
}

#[test]
fn the_customer_account_api_accepts_only_live_customer_tokens() {
    let mut m = customer_model(ModelConfig { access_ttl_ms: MIN, ..ModelConfig::default() });
    let t0 = m.seed_customer(T0, 42, 7, None).unwrap();
    let reply = m.handle_customer_api(T0, "42", Some(t0.access_token.as_str()));
    assert!(reply.authorized);
    assert_eq!(reply.reply.json_body().unwrap(), json!({"data":{"customer":{"id":"gid://shopify/Customer/7"}}}));
    let bearer = format!("Bearer {}", t0.access_token.as_str());
    assert!(m.handle_customer_api(T0, "42", Some(&bearer)).authorized);
    assert!(!m.handle_customer_api(T0, "43", Some(t0.access_token.as_str())).authorized);
    assert!(!m.handle_customer_api(T0 + MIN, "42", Some(t0.access_token.as_str())).authorized, "expired");
    assert_eq!(m.handle_customer_api(T0, "42", None).reply.status, 401);
    assert_eq!(m.counters().shop("42:7").admin_ok, 2);
}

// ---------------------------------------------------------------- overlapping token requests

#[test]
fn overlapping_requests_are_counted_per_grant() {
    let mut m = default_model();
    // Two requests for one shop at once: the second overlaps.
    assert_eq!(m.begin_token_request(SHOP), 1);
    assert_eq!(m.begin_token_request(SHOP), 2);
    assert_eq!(m.token_requests_in_flight(SHOP), 2);
    m.end_token_request(SHOP);
    m.end_token_request(SHOP);
    // Two shops at once: no overlap.
    assert_eq!(m.begin_token_request(OTHER_SHOP), 1);
    assert_eq!(m.begin_token_request("42:7"), 1);
    m.end_token_request(OTHER_SHOP);
    m.end_token_request("42:7");
    // One after the other: no overlap either.
    m.begin_token_request(OTHER_SHOP);
    m.end_token_request(OTHER_SHOP);
    let c = m.counters();
    assert_eq!((c.shop(SHOP).overlapping_token_requests, c.shop(SHOP).max_concurrent_token_requests), (1, 2));
    assert_eq!(
        (c.shop(OTHER_SHOP).overlapping_token_requests, c.shop(OTHER_SHOP).max_concurrent_token_requests),
        (0, 1)
    );
    assert_eq!(c.shop("42:7").overlapping_token_requests, 0);
    assert_eq!((c.total.overlapping_token_requests, c.total.max_concurrent_token_requests), (1, 2));
    assert_eq!(c.overlapping_grants().into_iter().collect::<Vec<_>>(), vec![(SHOP, (1, 2))]);
    assert_eq!(m.token_requests_in_flight(SHOP), 0);
    // A reset zeroes the counts, not what is in flight; an unmatched end is harmless.
    m.begin_token_request(SHOP);
    m.reset_counters();
    assert_eq!(m.begin_token_request(SHOP), 2);
    assert_eq!(m.counters().shop(SHOP).overlapping_token_requests, 1);
    m.end_token_request("never-began");
}

#[test]
fn a_grant_seeded_with_given_tokens_serves_and_rotates_them() {
    let mut m = default_model();
    let first = m.seed_grant(T0, SHOP, None).unwrap();
    let seeded = m.seed_grant_with_tokens(T0 + MIN, SHOP, None, "shpat_given", "shprt_given").unwrap();
    assert_eq!((seeded.access_token.as_str(), seeded.refresh_token.as_str()), ("shpat_given", "shprt_given"));
    assert!(seeded.refresh_token_expires_in > 0 && seeded.expires_in > 0);
    // A new acquisition: the pair seeded before is retired, the given one is current.
    assert!(m.access_token_valid(SHOP, "shpat_given", T0 + MIN));
    assert!(m.refresh_token_accepted(CID, SHOP, "shprt_given", T0 + MIN));
    assert_inactive(&refresh(&mut m, T0 + MIN, &first.refresh_token));
    let next = ok(refresh(&mut m, T0 + 2 * MIN, &seeded.refresh_token));
    assert_ne!(next.refresh_token, seeded.refresh_token);
    // Strings already in use (or one string for both) are refused.
    for (a, r) in [("shpat_given", "shprt_new"), ("shpat_new", "shprt_given"), ("same", "same")] {
        assert_eq!(m.seed_grant_with_tokens(T0, OTHER_SHOP, None, a, r), Err(ModelError::DuplicateToken));
    }
}
