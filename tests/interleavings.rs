//! Property tests of interleaved failures, one level below HTTP: the real state machine
//! ([`tokenwal_core::Machine`]), the real in-memory store ([`tokenwal_store::Store`], whose crash
//! images hold exactly what was durably acknowledged) and the real simulator core
//! ([`tokenwal_sim::Model`], called directly with `now` as a parameter), driven by random schedules
//! over several shops.
//!
//! Each shop has at most one logical worker (the engine's per-shop single flight); a worker goes
//! through the journal protocol one step at a time — plan, intent durable, send (the simulator
//! answers, with whatever fault is queued for that shop), commit durable — and the schedule
//! interleaves those steps across shops with callers asking for tokens, 401s from the Admin API,
//! time passing, faults queued at the simulator, refused connections, installs from outside (a new
//! acquisition at the simulator, then `Machine::install`), stale planners, and crashes: between
//! any two steps (before or after an intent or a commit is durable, after the server answered),
//! in the middle of a write (applied but not yet synced, by `Store::hold_acks`), and in the middle
//! of recovery. A crash keeps only `Store::crash_image()` and runs recovery (plan, write the
//! transitions, probe every ambiguity).
//!
//! Checked after every step:
//!
//! * a request is sent only after its intent is durable (it is in the durable history), and never
//!   presents a refresh token whose replacement a refresh has durably committed;
//! * a durable `Refreshing` state always belongs to the one live worker of that shop (at most one
//!   attempt in flight; after a crash recovery leaves none);
//! * tokens are released only by a durable commit, and are the durable state's tokens;
//! * a token served to a caller is accepted by the Admin API;
//! * every transition into needs-reauth is justified: the server rejects the stored refresh token,
//!   or the retry window has passed (no false re-auth); under retain-until-replacement-used and the
//!   60-minute window, a grant dies only when the server really expired it (or, under the window,
//!   its window elapsed): no lockout caused by tokenwal;
//! * under retention, the server rejects only credentials it has good reason to (superseded by a
//!   newer acquisition, expired, or out of window): tokenwal presents nothing dead;
//! * recovery is idempotent.
//!
//! At the end, a fault-free settle phase (restart, then drive every shop until it needs nothing)
//! must terminate, and every shop must be healthy with tokens the simulator accepts, or
//! needs-reauth for a reason the simulator confirms — under a strict server a rotate-then-drop
//! leaves the shop dead and it must be marked so, neither looped on nor reported healthy.
//!
//! **PostgreSQL.** Every policy also runs as `…_pg` on a PostgreSQL store (a scratch schema per
//! case), with the same schedules and checks. A crash there drops the store with nothing pending
//! (every write of the world has been answered) and reopens the schema: what is committed is what is
//! durable. A crash mid-write (`hold_acks`: applied, not acknowledged) is the group written inside
//! its transaction with the `COMMIT` not sent and the process dead: the test ends the writer's
//! session from outside (`PgScratch::end_sessions_in_transaction`), the server rolls the
//! transaction back, the writer's answer is an error that may be durable, and the restart must not
//! see the write. (A `COMMIT` done whose answer was lost leaves the write durable: the same as a
//! crash right after that step, which `Op::Crash` covers.)
//!
//! Case count per policy: `TOKENWAL_PROPTEST_CASES` (default 1024 in memory, 16 on PostgreSQL,
//! where every write is a committed transaction: about 50 s for the four policies on two cores).

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokenwal_core::*;
use tokenwal_sim::{
    Delivery, Fault as SimFault, Model, ModelConfig, RotationPolicy, TokenOutcome, TokenParams, TokenReply, TokenStatus,
};
use tokenwal_store::{Store, StoreError};
use tokenwal_testkit::{Backend, TestStore};

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const T0: u64 = 1_800_000_000_000;
const CID: &str = "cid";
const SECRET: &str = "secret";
const MAX_SHOPS: usize = 6;

/// Runs a future to completion on this thread (the store answers from its committer thread).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

// ---------------------------------------------------------------------------------------------
// Policies.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Retain,
    Window,
    Strict,
    StrictRevokeFamily,
}

impl Policy {
    fn retry(self) -> RetryPolicy {
        match self {
            Policy::Retain => RetryPolicy::shopify(),
            Policy::Window => RetryPolicy::shopify_legacy_window(),
            Policy::Strict | Policy::StrictRevokeFamily => RetryPolicy::single_use(),
        }
    }

    fn sim(self) -> ModelConfig {
        let policy = match self {
            Policy::Retain => RotationPolicy::default(),
            Policy::Window => RotationPolicy::Window { window_ms: HOUR },
            Policy::Strict | Policy::StrictRevokeFamily => RotationPolicy::Strict,
        };
        ModelConfig { policy, revoke_family_on_reuse: self == Policy::StrictRevokeFamily, ..ModelConfig::default() }
    }

    /// Whether the server keeps a used refresh token retryable (so tokenwal must never lose a grant).
    fn retains(self) -> bool {
        matches!(self, Policy::Retain | Policy::Window)
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Debug)]
enum Op {
    /// A caller asks for shop `i`'s token (`access_token`): served if valid, refreshed if due.
    Ask(usize),
    /// The Admin API answered 401 (`on_unauthorized`): refresh now if nothing is in flight.
    Unauthorized(usize),
    /// Shop `i`'s in-flight attempt goes one step further.
    Step(usize),
    /// The simulator will apply this fault to shop `i`'s next token request.
    Fault(usize, SimFault),
    /// Shop `i`'s next request cannot connect (never reaches the server).
    Refuse(usize),
    /// Time passes.
    Tick(u64),
    /// The process stops now; the restart's recovery stops again after this many transitions
    /// (`None`: it completes).
    Crash(Option<u8>),
    /// The process stops while shop `i`'s next write (intent or commit) is applied but not synced.
    CrashMidWrite(usize),
    /// The app's front end did token exchange for shop `i` (a new acquisition) and installs it.
    Install(usize),
    /// A planner working from an old read of shop `i` tries to start an attempt: it must conflict.
    StalePlanner(usize),
    /// An install from outside of a pair shop `i` held earlier (the `k`-th it held; a re-run
    /// `tokenwal import`, a replayed install): it must be refused (or be a no-op for the pair held
    /// now), never put a superseded refresh token back in use.
    ReplayInstall(usize, usize),
}

fn sim_fault() -> impl Strategy<Value = SimFault> {
    prop_oneof![
        4 => Just(SimFault::RotateThenDrop),
        2 => Just(SimFault::RotateThenHang),
        2 => Just(SimFault::RotateThenReset),
        2 => (prop_oneof![Just(500u16), Just(502), Just(503), Just(504)], any::<bool>())
            .prop_map(|(status, json)| SimFault::FailBeforeProcessing { status, json }),
        1 => prop_oneof![Just(0u64), Just(2), Just(90)].prop_map(|s| SimFault::Throttle { retry_after_secs: s }),
        1 => Just(SimFault::Truncated),
        1 => Just(SimFault::Malformed),
        1 => Just(SimFault::MissingExpiresIn),
        1 => Just(SimFault::MissingRefreshTokenExpiresIn),
        1 => prop_oneof![Just(120u64), Just(86_400)].prop_map(|secs| SimFault::ShortRefreshTtl { secs }),
        1 => Just(SimFault::InvalidClient),
        1 => Just(SimFault::Slow { delay_ms: 5 }),
    ]
}

fn tick() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=5 * MIN,
        3 => 5 * MIN..=40 * MIN,
        1 => Just(61 * MIN),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let shop = 0..MAX_SHOPS;
    prop_oneof![
        6 => shop.clone().prop_map(Op::Ask),
        1 => shop.clone().prop_map(Op::Unauthorized),
        12 => shop.clone().prop_map(Op::Step),
        4 => (shop.clone(), sim_fault()).prop_map(|(i, f)| Op::Fault(i, f)),
        1 => shop.clone().prop_map(Op::Refuse),
        4 => tick().prop_map(Op::Tick),
        1 => prop_oneof![3 => Just(None), 1 => (0u8..3).prop_map(Some)].prop_map(Op::Crash),
        1 => shop.clone().prop_map(Op::CrashMidWrite),
        1 => shop.clone().prop_map(Op::Install),
        1 => shop.clone().prop_map(Op::StalePlanner),
        1 => (shop, 0usize..8).prop_map(|(i, k)| Op::ReplayInstall(i, k)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Coverage: what the cases actually exercised (printed, and a floor asserted per policy).

#[derive(Default)]
struct Coverage {
    sends: AtomicU64,
    rotations: AtomicU64,
    replays: AtomicU64,
    rejections: AtomicU64,
    family_revocations: AtomicU64,
    crashes: AtomicU64,
    /// Crashes that cut a shop's attempt short: planned (intent not durable), permitted (intent
    /// durable, not sent), answered (the server acted, nothing recorded).
    crashed_planned: AtomicU64,
    crashed_permitted: AtomicU64,
    crashed_answered: AtomicU64,
    crashes_mid_write: AtomicU64,
    crashes_in_recovery: AtomicU64,
    recovery_probes: AtomicU64,
    stale_outcomes: AtomicU64,
    stale_planner_conflicts: AtomicU64,
    older_installs_refused: AtomicU64,
    abandoned_before_send: AtomicU64,
    ambiguous: AtomicU64,
    needs_reauth: AtomicU64,
    ended_dead: AtomicU64,
    shops: AtomicU64,
    /// Ambiguities kept alive by replays answering a zero lifetime (see
    /// `regression_replay_of_an_expiring_pair_is_retried_for_30_days`): fast-forwarded in settling.
    /// Grants given up (retry window elapsed) while the server would still accept their token.
    gave_up_on_live_token: AtomicU64,
    /// … of which the server had never even processed the token.
    gave_up_on_unused_token: AtomicU64,
    /// Healthy grants whose refresh token lapsed at the server with no lifetime ever known.
    lapsed_without_notice: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "shops={} sends={} rotations={} replays={} rejections={} family_revocations={} ambiguous={} \
             needs_reauth={} ended_dead={} crashes={} (cut: planned {} permitted {} answered {}) mid_write={} in_recovery={} probes={} stale_outcomes={} \
             stale_planner_conflicts={} older_installs_refused={} abandoned_before_send={} gave_up_on_live_token={} (unused: {}) lapsed_without_notice={}",
            r(&self.shops),
            r(&self.sends),
            r(&self.rotations),
            r(&self.replays),
            r(&self.rejections),
            r(&self.family_revocations),
            r(&self.ambiguous),
            r(&self.needs_reauth),
            r(&self.ended_dead),
            r(&self.crashes),
            r(&self.crashed_planned),
            r(&self.crashed_permitted),
            r(&self.crashed_answered),
            r(&self.crashes_mid_write),
            r(&self.crashes_in_recovery),
            r(&self.recovery_probes),
            r(&self.stale_outcomes),
            r(&self.stale_planner_conflicts),
            r(&self.older_installs_refused),
            r(&self.abandoned_before_send),
            r(&self.gave_up_on_live_token),
            r(&self.gave_up_on_unused_token),
            r(&self.lapsed_without_notice),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The world.

/// Where a shop's one in-flight attempt is.
enum Stage {
    /// Planned from a durable read; the intent is not durable yet.
    Planned(Pending<AttemptRequest>),
    /// The intent is durable; nothing sent.
    Permitted(Durable<AttemptRequest>),
    /// The server answered (or the transport failed); nothing of it is recorded.
    Answered(Durable<AttemptRequest>, Outcome),
}

/// The store under the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// The in-memory store: a crash keeps its crash image, exactly what was durably acknowledged.
    Memory,
    /// A PostgreSQL store in a scratch schema: a crash drops the store (nothing pending) and
    /// reopens the schema, keeping what was committed.
    Postgres,
}

struct World<'c> {
    policy: Policy,
    machine: Machine,
    store: Store,
    /// The PostgreSQL schema (dropped after the store), or `None` for the in-memory store.
    pg: Option<TestStore>,
    sim: Model,
    names: Vec<String>,
    grants: Vec<GrantKey>,
    workers: Vec<Option<Stage>>,
    refuse: Vec<u32>,
    now: u64,
    entropy: u64,
    /// Refresh tokens replaced by a durable commit or install: never to be planned with again.
    superseded: Vec<HashSet<String>>,
    /// Refresh tokens replaced by a durable refresh commit: never to be sent again.
    superseded_by_commit: Vec<HashSet<String>>,
    /// Refresh tokens retired at the server by an install (a stale worker may still send one).
    retired_by_install: Vec<HashSet<String>>,
    /// Phase name of each shop at the last check.
    last_phase: Vec<&'static str>,
    /// A durable read of each shop, from an earlier op (for stale planners).
    snapshots: Vec<Option<GrantState>>,
    /// Every token set each shop has durably held, oldest first (for replayed installs).
    pairs: Vec<Vec<TokenSet>>,
    /// Shops whose last answer was a replay with a zero lifetime (a known engine bug: the engine
    /// calls it ambiguous and retries it until the retry window ends).
    cov: &'c Coverage,
}

fn core_tokens(t: &tokenwal_sim::TokenSet, now: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(t.access_token.as_str()),
        access_expires_at: UnixMillis(now + t.expires_in * 1000),
        refresh_token: RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: Some(UnixMillis(now + t.refresh_token_expires_in * 1000)),
        scope: Some(t.scope.clone()),
    }
}

/// What the transport would make of the simulator's answer.
fn to_outcome(reply: &TokenReply, presented: &RefreshToken, now: u64) -> Outcome {
    let rules = ResponseRules::SHOPIFY;
    let at = UnixMillis(now);
    match &reply.delivery {
        Delivery::Respond { reply: http, .. } => {
            let retry_after =
                http.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("retry-after")).map(|(_, v)| v.as_str());
            let answer = HttpAnswer {
                status: http.status,
                request_id: Some(&reply.request_id),
                retry_after,
                body: &http.body,
                body_truncated: false,
            };
            classify(Exchange::Answer(answer), &rules, Some(presented), at)
        }
        Delivery::Hang => classify(Exchange::Failed(&TransportFailure::Timeout), &rules, Some(presented), at),
        Delivery::Reset => classify(Exchange::Failed(&TransportFailure::ConnectionLost), &rules, Some(presented), at),
    }
}

impl<'c> World<'c> {
    fn new(policy: Policy, backing: Backing, shops: usize, seed: u64, cov: &'c Coverage) -> World<'c> {
        let pg = match backing {
            Backing::Memory => None,
            Backing::Postgres => Some(TestStore::new(Backend::Postgres, "interleavings").expect("checked first")),
        };
        let store = pg.as_ref().map_or_else(Store::in_memory, TestStore::open);
        let machine = Machine {
            policy: policy.retry(),
            refresh_margin: Duration::from_secs(300),
            refresh_token_margin: Duration::from_secs(7 * 86_400),
            fingerprints: store.fingerprint_key(),
        };
        let mut sim = Model::new(policy.sim(), seed);
        sim.register_app(CID, SECRET);
        let names: Vec<String> = (0..shops).map(|i| format!("shop-{i}.myshopify.com")).collect();
        let grants = names.iter().map(|n| GrantKey::shopify(&ShopDomain::parse(n).unwrap())).collect();
        cov.shops.fetch_add(shops as u64, Ordering::Relaxed);
        let mut w = World {
            policy,
            machine,
            store,
            pg,
            sim,
            names,
            grants,
            workers: (0..shops).map(|_| None).collect(),
            refuse: vec![0; shops],
            now: T0,
            entropy: seed,
            superseded: vec![HashSet::new(); shops],
            superseded_by_commit: vec![HashSet::new(); shops],
            retired_by_install: vec![HashSet::new(); shops],
            last_phase: vec!["healthy"; shops],
            snapshots: vec![None; shops],
            pairs: vec![Vec::new(); shops],
            cov,
        };
        for i in 0..shops {
            let t = w.sim.seed_grant(T0, &w.names[i], None).unwrap();
            let mut tokens = core_tokens(&t, T0);
            // As the app's install hands it over: the engine treats the access token as expired,
            // so the first caller refreshes.
            tokens.access_expires_at = UnixMillis(T0);
            let p = w.machine.install(None, w.grants[i].clone(), tokens, InstallSource::Import, UnixMillis(T0));
            w.durable(p).unwrap();
        }
        w
    }

    fn n(&self) -> usize {
        self.names.len()
    }

    fn at(&self) -> UnixMillis {
        UnixMillis(self.now)
    }

    fn next_entropy(&mut self) -> u64 {
        self.entropy = self.entropy.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.entropy >> 11
    }

    fn state(&self, i: usize) -> GrantState {
        self.store.get(&self.grants[i]).unwrap().expect("installed")
    }

    fn index(&self, g: &GrantKey) -> usize {
        self.grants.iter().position(|x| x == g).unwrap()
    }

    /// Makes `p` durable; on success checks that readers now see exactly the state it wrote.
    fn durable<T>(&self, p: Pending<T>) -> Result<Durable<T>, StoreError> {
        let done = block_on(p.make_durable(&self.store))?;
        let read = self.store.get(&done.state().grant).unwrap();
        assert_eq!(read.as_ref(), Some(done.state()), "a durable write is not what readers see");
        Ok(done)
    }

    fn sim_refresh_status(&self, i: usize, rt: &str) -> Option<tokenwal_sim::RefreshTokenView> {
        self.sim.shop_state(&self.names[i], self.now).refresh_token(rt).cloned()
    }

    fn sim_accepts(&self, i: usize, rt: &str) -> bool {
        self.sim.refresh_token_accepted(CID, &self.names[i], rt, self.now)
    }

    // ----------------------------------------------------------------- callers

    /// The engine may hand out the durable access token while it is valid by its own clock: the
    /// Admin API must accept it (unless the whole grant was revoked server-side).
    fn serve(&self, i: usize, s: &GrantState) {
        let Some(t) = &s.tokens else { return };
        if self.now >= t.access_expires_at.0 {
            return;
        }
        let a = t.access_token.expose_secret();
        if !self.sim.access_token_valid(&self.names[i], a, self.now) {
            let view = self.sim.shop_state(&self.names[i], self.now);
            let status = view.access_token(a).map(|v| v.status);
            assert_eq!(
                status,
                Some(TokenStatus::Revoked),
                "shop {i}: served an access token the Admin API refuses ({status:?}, phase {})",
                s.phase.name()
            );
        }
    }

    fn ask(&mut self, i: usize, forced: bool) {
        if self.workers[i].is_some() {
            return; // single flight: the caller joins the attempt in flight
        }
        let s = self.state(i);
        self.serve(i, &s);
        self.snapshots[i] = Some(s.clone());
        match self.machine.step(&s, self.at()) {
            Step::Attempt => self.start(i, &s, false),
            Step::Idle { .. } if forced => self.start(i, &s, false),
            _ => {}
        }
    }

    fn start(&mut self, i: usize, s: &GrantState, recovery: bool) {
        let planned = if recovery {
            self.machine.plan_recovery_attempt(s, self.at())
        } else {
            self.machine.plan_attempt(s, self.at())
        };
        if let Ok(p) = planned {
            self.workers[i] = Some(Stage::Planned(p));
        }
    }

    fn commit(&mut self, t: Transition) {
        self.durable(Pending::from_transition(t)).unwrap();
    }

    // ----------------------------------------------------------------- the journal protocol

    fn step(&mut self, i: usize) {
        let Some(stage) = self.workers[i].take() else { return };
        match stage {
            Stage::Planned(p) => match self.durable(p) {
                Ok(d) => {
                    self.on_intent(i, &d);
                    self.workers[i] = Some(Stage::Permitted(d));
                }
                // Another writer won (an install): the worker ends; the next caller re-plans.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => panic!("intent write failed: {e}"),
            },
            Stage::Permitted(d) => {
                // The driver's re-check before sending: an install (or uninstall) since the intent
                // abandons the attempt; its retired credential never goes out.
                if let Some(p) = self.machine.abandon(&self.state(i), &d, self.at()) {
                    let done = self.durable(p).expect("journaling an abandoned attempt");
                    assert_eq!(done.verdict(), Verdict::Stale);
                    bump(&self.cov.abandoned_before_send);
                    return;
                }
                let outcome = self.send(i, &d);
                self.workers[i] = Some(Stage::Answered(d, outcome));
            }
            Stage::Answered(d, outcome) => self.settle(i, &d, outcome),
        }
    }

    fn on_intent(&self, i: usize, d: &Durable<AttemptRequest>) {
        let req = d.value();
        let cred = req.credential().expose_secret();
        assert!(!self.superseded[i].contains(cred), "shop {i}: planned with a superseded refresh token");
        assert!(
            matches!(&d.state().phase, Phase::Refreshing { attempt, .. } if *attempt == req.attempt()),
            "the durable intent is not this attempt"
        );
    }

    /// Sends the request: the simulator processes it (with the fault queued for the shop, if any).
    fn send(&mut self, i: usize, d: &Durable<AttemptRequest>) -> Outcome {
        let req = d.value();
        let cred = req.credential().expose_secret().to_owned();
        // Journal before network: the intent is in the durable history.
        let history = self.store.history(&self.grants[i]).unwrap();
        assert!(
            history.iter().rev().any(|(_, r)| matches!(r, Record::Intent { attempt, .. } if *attempt == req.attempt())),
            "shop {i}: request sent before its intent was durable"
        );
        assert!(
            !self.superseded_by_commit[i].contains(&cred),
            "shop {i}: presented a refresh token whose replacement was durably committed"
        );
        // Under every policy, family revocation included: an install's retired tokens never go out.
        assert!(!self.retired_by_install[i].contains(&cred), "shop {i}: presented a refresh token an install retired");
        bump(&self.cov.sends);
        if self.refuse[i] > 0 {
            self.refuse[i] -= 1;
            let f = TransportFailure::NotSent { detail: "connection refused".into() };
            return classify(Exchange::Failed(&f), &ResponseRules::SHOPIFY, req.refresh_token(), self.at());
        }
        let before = self.sim.counters().shop(&self.names[i]);
        let expected_dead = self.rejection_expected(i, &cred);
        let params = TokenParams::refresh(CID, SECRET, &cred);
        let reply = self.sim.handle_token_params(self.now, &self.names[i], &params);
        let after = self.sim.counters().shop(&self.names[i]);
        self.cov.rotations.fetch_add(after.rotations - before.rotations, Ordering::Relaxed);
        self.cov.replays.fetch_add(after.replays - before.replays, Ordering::Relaxed);
        self.cov.family_revocations.fetch_add(after.family_revocations - before.family_revocations, Ordering::Relaxed);
        if let TokenOutcome::Rejected(e) = &reply.outcome {
            if e.error != "invalid_client" {
                bump(&self.cov.rejections);
                if self.policy.retains() {
                    assert!(
                        expected_dead.is_some(),
                        "shop {i}: the server rejected a refresh token tokenwal had no reason to think dead"
                    );
                }
            }
        }
        to_outcome(&reply, req.refresh_token().expect("the interleavings test only refreshes"), self.now)
    }

    /// Why the server may reject `rt` now (under retention): retired by a newer acquisition,
    /// expired, or (window) out of its window.
    fn rejection_expected(&self, i: usize, rt: &str) -> Option<&'static str> {
        if self.retired_by_install[i].contains(rt) {
            return Some("retired by an install");
        }
        let view = self.sim_refresh_status(i, rt)?;
        if self.now >= view.expires_at_ms {
            return Some("expired");
        }
        if let (Policy::Window, Some(used)) = (self.policy, view.first_used_at_ms) {
            if self.now >= used + HOUR {
                return Some("window elapsed");
            }
        }
        None
    }

    fn settle(&mut self, i: usize, d: &Durable<AttemptRequest>, outcome: Outcome) {
        let cred = d.value().credential().expose_secret().to_owned();
        if matches!(outcome, Outcome::Ambiguous { .. }) {
            bump(&self.cov.ambiguous);
        }
        loop {
            let current = self.state(i);
            let live = matches!(&current.phase, Phase::Refreshing { attempt, .. } if *attempt == d.value().attempt());
            let e = self.next_entropy();
            let pending = self.machine.on_outcome(&current, d, outcome.clone(), self.at(), e);
            match self.durable(pending) {
                Ok(done) => {
                    if !live {
                        bump(&self.cov.stale_outcomes);
                        assert_eq!(done.state().tokens, current.tokens, "a stale outcome overwrote newer tokens");
                        assert_eq!(done.state().phase, current.phase, "a stale outcome changed the phase");
                    }
                    if let Some(t) = done.value() {
                        // Commit before use: the released tokens are the durable state's.
                        assert_eq!(done.state().tokens.as_ref(), Some(t));
                        assert_eq!(self.state(i).tokens.as_ref(), Some(t));
                        let new = t.refresh_token.expose_secret();
                        if new != cred {
                            self.superseded[i].insert(cred.clone());
                            self.superseded_by_commit[i].insert(cred.clone());
                        }
                        assert!(!self.superseded[i].contains(new), "committed a superseded refresh token");
                    }
                    return;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => panic!("commit failed: {e}"),
            }
        }
    }

    // ----------------------------------------------------------------- crashes and recovery

    /// The process stops: in-flight attempts are lost; the restart sees the crash image and runs
    /// recovery, which stops again after `stop_after` transitions if given.
    fn crash(&mut self, stop_after: Option<u8>) {
        bump(&self.cov.crashes);
        for w in &mut self.workers {
            match w.take() {
                Some(Stage::Planned(_)) => bump(&self.cov.crashed_planned),
                Some(Stage::Permitted(_)) => bump(&self.cov.crashed_permitted),
                Some(Stage::Answered(..)) => bump(&self.cov.crashed_answered),
                None => {}
            }
        }
        self.restart();
        self.recover(stop_after);
    }

    /// The store as the restarted process finds it. In memory: the crash image. On PostgreSQL
    /// nothing is pending here (every write of the world has been answered), so what is committed
    /// is what is durable: the old store goes (leaving the store's members: the attempts it had in
    /// flight are anyone's, as a dead process's are once its lease ended) and the schema reopens.
    fn restart(&mut self) {
        self.store = match &self.pg {
            None => self.store.crash_image(),
            Some(pg) => {
                self.store = Store::in_memory();
                pg.open()
            }
        };
    }

    fn recover(&mut self, stop_after: Option<u8>) {
        let open = self.store.open_grants().unwrap();
        assert!(open.iter().all(|s| s.phase.is_open()));
        let e = self.next_entropy();
        let plan = recovery::plan(&self.machine, &open, self.at(), e);
        let mut written = 0u8;
        // The engine issues recovery's transitions concurrently through group commit: they become
        // durable in any order, and a crash in the middle leaves any subset of them. Write them in
        // an order drawn from the entropy (a Fisher-Yates shuffle with xorshift).
        let mut order: Vec<usize> = (0..plan.items.len()).collect();
        let mut x = e | 1;
        for k in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(k, (x % (k as u64 + 1)) as usize);
        }
        for item in order.iter().map(|&k| &plan.items[k]) {
            if let Some(t) = &item.transition {
                if stop_after == Some(written) {
                    bump(&self.cov.crashes_in_recovery);
                    return self.crash(None);
                }
                self.commit(t.clone());
                written += 1;
            }
        }
        // Idempotent: planning again writes nothing more and intends the same.
        let again_open = self.store.open_grants().unwrap();
        let again = recovery::plan(&self.machine, &again_open, self.at(), e);
        assert!(again.items.iter().all(|i| i.transition.is_none()), "recovery is not idempotent: {again:?}");
        for first in &plan.items {
            let second = again.items.iter().find(|i| i.grant == first.grant);
            match (&first.intention, second.map(|s| &s.intention)) {
                (Intention::Resolve { .. }, Some(Intention::Resolve { .. })) => {}
                (Intention::NeedsReauth(_) | Intention::Nothing, None) => {}
                (a, b) => panic!("recovery changed its mind: {a:?} then {b:?}"),
            }
        }
        // Nothing is left in flight after a restart.
        for s in &again_open {
            assert!(matches!(s.phase, Phase::Ambiguous(_)), "recovery left {}", s.phase.name());
        }
        // Probe every ambiguity at once, whatever backoff the stopped process had set.
        for item in &plan.items {
            if let Intention::Resolve { .. } = item.intention {
                let i = self.index(&item.grant);
                let s = self.state(i);
                bump(&self.cov.recovery_probes);
                self.start(i, &s, true);
            }
        }
    }

    /// Crash while shop `i`'s next write is applied but not yet synced: the restart must not see it.
    /// On PostgreSQL: the group is written inside its transaction, the `COMMIT` not sent, and the
    /// process dies: the server ends its session and rolls the transaction back. (A `COMMIT` done
    /// whose answer was lost leaves the write durable: that is a crash right after the step, which
    /// `Op::Crash` after `Op::Step` covers.)
    fn crash_mid_write(&mut self, i: usize) {
        let pending: Option<Pending<()>> = match self.workers[i].take() {
            Some(Stage::Planned(p)) => {
                if p.transition().expected_version() != Some(self.state(i).version) {
                    None // it would conflict: nothing to hold
                } else {
                    Some(Pending::from_transition(p.transition().clone()))
                }
            }
            Some(Stage::Answered(d, outcome)) => {
                let current = self.state(i);
                let e = self.next_entropy();
                let p = self.machine.on_outcome(&current, &d, outcome, self.at(), e);
                Some(Pending::from_transition(p.transition().clone()))
            }
            _ => None,
        };
        let Some(pending) = pending else { return self.crash(None) };
        bump(&self.cov.crashes_mid_write);
        let before = self.state(i);
        let hold = self.store.hold_acks();
        let writer = {
            let store = self.store.clone();
            std::thread::spawn(move || block_on(pending.make_durable(&store)).map(|_| ()))
        };
        assert!(hold.wait_parked(Duration::from_secs(10)), "the write never reached the sync");
        // Neither readers nor a crash see a write that is not durable.
        assert_eq!(self.state(i), before);
        match self.pg.as_ref().and_then(TestStore::pg) {
            None => {
                let image = self.store.crash_image();
                hold.release();
                // The dead process's write (the image never sees it).
                writer.join().unwrap().unwrap();
                self.store = image;
            }
            Some(pg) => {
                assert_eq!(pg.end_sessions_in_transaction(), 1, "the writer's session holds the open group");
                hold.release();
                let err = writer.join().unwrap().expect_err("a COMMIT on an ended session succeeded");
                assert!(err.may_be_durable(), "{err}");
                self.restart();
            }
        }
        assert_eq!(self.state(i), before, "the restart sees a write that was never durable");
        bump(&self.cov.crashes);
        for w in &mut self.workers {
            *w = None;
        }
        self.recover(None);
    }

    // ----------------------------------------------------------------- outside events

    fn install(&mut self, i: usize) {
        let t = self.sim.seed_grant(self.now, &self.names[i], None).unwrap();
        let tokens = core_tokens(&t, self.now);
        loop {
            let current = self.state(i);
            let goal = Goal::Install { tokens: tokens.clone(), source: InstallSource::Application, force: false };
            let p = match self.machine.decide(Some(&current), &self.grants[i], &goal, self.at()) {
                Decision::Write(p) => p,
                other => panic!("shop {i}: a fresh acquisition was not installed: {other:?}"),
            };
            match self.durable(p) {
                Ok(_) => {
                    if let Some(old) = current.tokens {
                        let old = old.refresh_token.expose_secret().to_owned();
                        self.superseded[i].insert(old);
                    }
                    // A new acquisition retires every older refresh token at the server.
                    let view = self.sim.shop_state(&self.names[i], self.now);
                    for g in &view.grants {
                        for r in &g.refresh_tokens {
                            if r.token.as_str() != t.refresh_token.as_str() {
                                self.retired_by_install[i].insert(r.token.as_str().to_owned());
                            }
                        }
                    }
                    return;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => panic!("install failed: {e}"),
            }
        }
    }

    fn stale_planner(&mut self, i: usize) {
        let Some(snapshot) = self.snapshots[i].clone() else { return };
        let current = self.state(i);
        if snapshot.version == current.version {
            return;
        }
        if let Ok(p) = self.machine.plan_attempt(&snapshot, self.at()) {
            let err = self.durable(p).expect_err("a stale planner's intent was written");
            assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
            assert_eq!(self.state(i), current, "a conflicting write changed something");
            bump(&self.cov.stale_planner_conflicts);
        }
    }

    fn replay_install(&mut self, i: usize, k: usize) {
        let Some(old) = self.pairs[i].get(k).cloned() else { return };
        let current = self.state(i);
        let Some(held) = current.tokens.clone() else { return };
        let goal = Goal::Install { tokens: old.clone(), source: InstallSource::Import, force: false };
        let decision = self.machine.decide(Some(&current), &self.grants[i], &goal, self.at());
        if old.refresh_token == held.refresh_token && old.access_token == held.access_token {
            assert!(matches!(decision, Decision::Nothing(NoChange::SamePair)), "shop {i}: {decision:?}");
        } else if old.access_expires_at < held.access_expires_at {
            assert!(
                matches!(decision, Decision::Refuse(Refusal::OlderPair { held: g }) if g == current.generation),
                "shop {i}: an older pair would be installed over the one held: {decision:?}"
            );
            bump(&self.cov.older_installs_refused);
        }
        // (Pairs issued in the same simulated millisecond cannot be ordered; nothing is written.)
        assert_eq!(self.state(i), current, "deciding wrote something");
    }

    // ----------------------------------------------------------------- checks

    fn run(&mut self, op: &Op) {
        let n = self.n();
        match *op {
            Op::Ask(i) => self.ask(i % n, false),
            Op::Unauthorized(i) => self.ask(i % n, true),
            Op::Step(i) => self.step(i % n),
            Op::Fault(i, f) => self.sim.push_faults(&self.names[i % n], [f]).unwrap(),
            Op::Refuse(i) => self.refuse[i % n] += 1,
            Op::Tick(ms) => self.now += ms,
            Op::Crash(stop) => self.crash(stop),
            Op::CrashMidWrite(i) => self.crash_mid_write(i % n),
            Op::Install(i) => self.install(i % n),
            Op::StalePlanner(i) => self.stale_planner(i % n),
            Op::ReplayInstall(i, k) => self.replay_install(i % n, k),
        }
        self.check();
    }

    /// Invariants of the durable states after every op.
    fn check(&mut self) {
        for i in 0..self.n() {
            let s = self.state(i);
            if let Some(t) = &s.tokens {
                if self.pairs[i].last().is_none_or(|last| last.refresh_token != t.refresh_token) {
                    self.pairs[i].push(t.clone());
                }
            }
            if let Phase::Refreshing { attempt, .. } = &s.phase {
                let owner = match &self.workers[i] {
                    Some(Stage::Permitted(d) | Stage::Answered(d, _)) => Some(d.value().attempt()),
                    _ => None,
                };
                assert_eq!(owner, Some(*attempt), "shop {i}: a durable attempt in flight that no worker owns");
            }
            // Under retention the durable state is always recoverable: its refresh token is one the
            // server accepts, unless the server itself let it lapse.
            if self.policy.retains() && !matches!(s.phase, Phase::NeedsReauth { .. }) {
                let rt = s.tokens.as_ref().unwrap().refresh_token.expose_secret();
                assert!(
                    self.sim_accepts(i, rt) || self.death_explained(i, &s).is_some(),
                    "shop {i}: the durable refresh token is dead at the server ({})",
                    s.phase.name()
                );
            }
            let name = s.phase.name();
            if name == "needs-reauth" && self.last_phase[i] != "needs-reauth" {
                self.check_reauth(i, &s);
            }
            self.last_phase[i] = name;
        }
    }

    /// No false re-auth, and (under retention) no lockout caused by tokenwal.
    fn check_reauth(&self, i: usize, s: &GrantState) {
        bump(&self.cov.needs_reauth);
        let Phase::NeedsReauth { reason, .. } = &s.phase else { unreachable!() };
        let rt = s.tokens.as_ref().unwrap().refresh_token.expose_secret();
        match reason {
            ReauthReason::CredentialRejected { .. } => {
                assert!(!self.sim_accepts(i, rt), "shop {i}: false re-auth: the server accepts the stored token");
            }
            ReauthReason::RetryWindowElapsed { deadline, .. } => {
                assert!(self.now >= deadline.0, "shop {i}: gave up before the deadline");
                if self.sim_accepts(i, rt) {
                    bump(&self.cov.gave_up_on_live_token);
                    if self.sim_refresh_status(i, rt).is_some_and(|v| v.first_used_at_ms.is_none()) {
                        bump(&self.cov.gave_up_on_unused_token);
                    }
                }
            }
            ReauthReason::Manual { .. } => panic!("nothing marks manually here"),
        }
        if self.policy.retains() {
            let why = self.death_explained(i, s);
            assert!(why.is_some(), "shop {i}: locked out under {:?}: {reason:?}", self.policy);
        }
    }

    /// Why a grant may legitimately have died under a retaining server.
    fn death_explained(&self, i: usize, s: &GrantState) -> Option<&'static str> {
        let t = s.tokens.as_ref()?;
        let rt = t.refresh_token.expose_secret();
        let view = self.sim_refresh_status(i, rt)?;
        if self.now >= view.expires_at_ms {
            return Some("the server expired the refresh token");
        }
        // The only thing the stored token still yields is a replacement the server has expired.
        if let Some(rep) = &view.replacement {
            if self.sim_refresh_status(i, rep.as_str()).is_some_and(|r| self.now >= r.expires_at_ms) {
                return Some("the server expired the replacement");
            }
        }
        if self.policy == Policy::Retain && view.first_used_at_ms.is_some_and(|u| self.now >= u + 30 * 24 * HOUR) {
            return Some("the server's 30-day retention passed");
        }
        if self.policy == Policy::Window {
            if view.first_used_at_ms.is_some_and(|u| self.now >= u + HOUR) {
                return Some("the server's window passed");
            }
            if let Phase::NeedsReauth { reason: ReauthReason::RetryWindowElapsed { first_presented_at, .. }, .. } =
                &s.phase
            {
                if self.now >= first_presented_at.0 + HOUR {
                    return Some("the window passed unresolved");
                }
            }
        }
        if let Phase::NeedsReauth { reason: ReauthReason::RetryWindowElapsed { deadline, .. }, .. } = &s.phase {
            if t.refresh_expires_at == Some(*deadline) && self.now >= deadline.0 {
                return Some("the refresh token's own expiry passed");
            }
        }
        None
    }

    /// Fault-free settling: restart, then drive every shop until it needs nothing. Must end.
    fn settle_fault_free(&mut self) {
        for i in 0..self.n() {
            self.sim.clear_faults(&self.names[i]);
            self.refuse[i] = 0;
        }
        self.crash(None);
        self.check();
        for _ in 0..2_000 {
            if let Some(i) = (0..self.n()).find(|i| self.workers[*i].is_some()) {
                self.step(i);
                self.check();
                continue;
            }
            let mut wait: Option<u64> = None;
            let mut busy = false;
            for i in 0..self.n() {
                let s = self.state(i);
                match self.machine.step(&s, self.at()) {
                    Step::Attempt => {
                        self.start(i, &s, false);
                        busy = true;
                    }
                    Step::Wait { until } => {
                        let until = until.0;
                        wait = Some(wait.map_or(until, |w| w.min(until)));
                    }
                    Step::Idle { .. } | Step::Dormant => {}
                    Step::InFlight => panic!("shop {i}: in flight with no worker"),
                }
            }
            self.check();
            if busy {
                continue;
            }
            match wait {
                Some(until) => self.now = self.now.max(until),
                None => return self.lapsed_without_notice(),
            }
        }
        let phases: Vec<_> = (0..self.n()).map(|i| self.state(i).phase.name()).collect();
        panic!("the shops did not settle (looping): {phases:?}");
    }

    /// A healthy grant whose refresh token the server has let lapse although tokenwal was never
    /// told its lifetime (the answer that carried it was lost, and the replay omitted
    /// `refresh_token_expires_in`): healthy "as far as anyone knows". The app's next 401 makes tokenwal
    /// try, and the server's rejection must then mark it needs-reauth.
    fn lapsed_without_notice(&mut self) {
        for i in 0..self.n() {
            let s = self.state(i);
            let t = s.tokens.as_ref().unwrap();
            if s.phase != Phase::Healthy || self.sim_accepts(i, t.refresh_token.expose_secret()) {
                continue;
            }
            let view = self.sim_refresh_status(i, t.refresh_token.expose_secret()).unwrap();
            assert!(
                t.refresh_expires_at.is_none() && self.now >= view.expires_at_ms,
                "shop {i}: healthy with a refresh token the server rejects (and not by an expiry tokenwal missed)"
            );
            bump(&self.cov.lapsed_without_notice);
            self.ask(i, true);
            while self.workers[i].is_some() {
                self.step(i);
                self.check();
            }
            assert!(
                matches!(
                    self.state(i).phase,
                    Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { .. }, .. }
                ),
                "shop {i}: {:?}",
                self.state(i).phase
            );
        }
    }

    /// The end state: healthy with working tokens, or dead for a reason the server confirms.
    fn check_end(&self) {
        for i in 0..self.n() {
            let s = self.state(i);
            let t = s.tokens.as_ref().expect("tokens kept");
            let rt = t.refresh_token.expose_secret();
            match &s.phase {
                Phase::Healthy => {
                    assert!(self.sim_accepts(i, rt), "shop {i}: healthy with a refresh token the server rejects");
                    assert!(self.now < t.access_expires_at.0, "shop {i}: healthy and idle with an expired token");
                    self.serve(i, &s);
                    assert!(
                        self.sim.access_token_valid(&self.names[i], t.access_token.expose_secret(), self.now),
                        "shop {i}: healthy with an access token the Admin API refuses"
                    );
                }
                Phase::NeedsReauth { reason, .. } => {
                    bump(&self.cov.ended_dead);
                    // Checked when it happened; still true now.
                    match reason {
                        ReauthReason::CredentialRejected { .. } => assert!(!self.sim_accepts(i, rt), "shop {i}"),
                        ReauthReason::RetryWindowElapsed { deadline, .. } => assert!(self.now >= deadline.0),
                        ReauthReason::Manual { .. } => unreachable!(),
                    }
                }
                other => panic!("shop {i}: unexpected end phase {}", other.name()),
            }
            if !self.sim.grant_alive(&self.names[i], self.now) {
                assert!(matches!(s.phase, Phase::NeedsReauth { .. }), "shop {i}: dead at the server, not marked");
            }
        }
    }
}

fn run_case(policy: Policy, backing: Backing, shops: usize, ops: &[Op], seed: u64, cov: &Coverage) {
    let mut w = World::new(policy, backing, shops, seed, cov);
    for op in ops {
        w.run(op);
    }
    w.settle_fault_free();
    w.check_end();
}

/// Cases per policy: `TOKENWAL_PROPTEST_CASES`, else 1024 in memory and 16 on PostgreSQL (where
/// every write is a committed transaction and every read a round trip: a case takes about 1.5 s
/// there, the 16 cases of all four policies about 50 s on two busy cores).
fn cases(backing: Backing) -> u32 {
    let default = match backing {
        Backing::Memory => 1024,
        Backing::Postgres => 16,
    };
    std::env::var("TOKENWAL_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics of shrinking runs are not printed one by one (proptest reports the minimal one).
fn quiet_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
}

/// Whether the PostgreSQL variants run (a loud skip without a server, a failure under
/// `TOKENWAL_REQUIRE_PG=1`).
fn pg_reachable() -> bool {
    TestStore::new(Backend::Postgres, "interleavings").is_some()
}

fn run_policy(policy: Policy, backing: Backing) {
    if backing == Backing::Postgres && !pg_reachable() {
        return;
    }
    quiet_panics();
    let cov = Coverage::default();
    let cases = cases(backing);
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config);
    let ops = prop::collection::vec(op(), 1..120);
    let started = std::time::Instant::now();
    let result = runner.run(&(3usize..=MAX_SHOPS, ops, any::<u64>()), |(shops, ops, seed)| {
        run_case(policy, backing, shops, &ops, seed, &cov);
        Ok(())
    });
    QUIET.with(|q| q.set(false));
    eprintln!("{policy:?} ({backing:?}): {cases} cases in {:.1?}: {cov}", started.elapsed());
    if let Err(e) = result {
        panic!("{policy:?} ({backing:?}): {e}");
    }
    let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
    if cases >= 64 {
        assert!(r(&cov.crashes_mid_write) > 0 && r(&cov.stale_outcomes) > 0, "{cov}");
        assert!(r(&cov.older_installs_refused) > 0, "no replayed install of an older pair: {cov}");
        assert!(r(&cov.abandoned_before_send) > 0, "no install between an intent and its send: {cov}");
        assert!(r(&cov.replays) > 0 || !policy.retains(), "{cov}");
        assert!(r(&cov.crashes_in_recovery) > 0 && r(&cov.recovery_probes) > 0, "{cov}");
        assert!(r(&cov.crashed_permitted) > 0 && r(&cov.crashed_answered) > 0, "{cov}");
        if !policy.retains() {
            assert!(r(&cov.ended_dead) > 0, "strict runs never lost a grant: {cov}");
        }
    }
}

#[test]
fn retain_until_replacement_used() {
    run_policy(Policy::Retain, Backing::Memory);
}

#[test]
fn retain_until_replacement_used_pg() {
    run_policy(Policy::Retain, Backing::Postgres);
}

#[test]
fn legacy_window_60m() {
    run_policy(Policy::Window, Backing::Memory);
}

#[test]
fn legacy_window_60m_pg() {
    run_policy(Policy::Window, Backing::Postgres);
}

#[test]
fn strict_single_use() {
    run_policy(Policy::Strict, Backing::Memory);
}

#[test]
fn strict_single_use_pg() {
    run_policy(Policy::Strict, Backing::Postgres);
}

#[test]
fn strict_with_family_revocation_on_reuse() {
    run_policy(Policy::StrictRevokeFamily, Backing::Memory);
}

#[test]
fn strict_with_family_revocation_on_reuse_pg() {
    run_policy(Policy::StrictRevokeFamily, Backing::Postgres);
}

// ---------------------------------------------------------------------------------------------
// Named scenarios (and regressions of shrunk failures).

fn scenario(policy: Policy, shops: usize, ops: &[Op]) -> World<'static> {
    scenario_on(Backing::Memory, policy, shops, ops)
}

fn scenario_on(backing: Backing, policy: Policy, shops: usize, ops: &[Op]) -> World<'static> {
    static COV: std::sync::OnceLock<Coverage> = std::sync::OnceLock::new();
    let cov = COV.get_or_init(Coverage::default);
    let mut w = World::new(policy, backing, shops, 7, cov);
    for op in ops {
        w.run(op);
    }
    w
}

/// Under a strict server a rotate-then-drop loses the grant: the retry is rejected and the shop is
/// marked needs-reauth (after the ambiguity), not looped on and not reported healthy.
#[test]
fn strict_rotate_then_drop_is_marked_dead() {
    let mut w = scenario(
        Policy::Strict,
        3,
        &[
            Op::Fault(0, SimFault::RotateThenDrop),
            Op::Ask(0),
            Op::Step(0),
            Op::Step(0),
            Op::Step(0),
            Op::Tick(5 * MIN),
            Op::Ask(0),
        ],
    );
    assert!(matches!(w.state(0).phase, Phase::Ambiguous(_)));
    w.step(0);
    w.step(0);
    w.step(0);
    w.check();
    assert!(
        matches!(
            w.state(0).phase,
            Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { after_ambiguity: true, .. }, .. }
        ),
        "{:?}",
        w.state(0).phase
    );
    // Dead for tokenwal: the only token the server would still take is the replacement lost with
    // the 520 (a plain strict server keeps it; `grant_alive` counts it).
    let rt = w.state(0).tokens.unwrap().refresh_token.expose_secret().to_owned();
    let view = w.sim.shop_state(&w.names[0], w.now);
    let lost = view.refresh_token(&rt).unwrap().replacement.clone().unwrap();
    let live: Vec<_> = view
        .grants
        .iter()
        .flat_map(|g| &g.refresh_tokens)
        .filter(|r| r.accepted_now)
        .map(|r| r.token.clone())
        .collect();
    assert_eq!(live, vec![lost]);
    w.settle_fault_free();
    w.check_end();
}

/// Two shops interleaved through a crash: one stopped after the server rotated, the other after
/// its intent only. Recovery replays the first and rotates the second.
#[test]
fn interleaved_crash_after_send_and_after_intent() {
    crash_after_send_and_after_intent(Backing::Memory);
}

#[test]
fn interleaved_crash_after_send_and_after_intent_pg() {
    if pg_reachable() {
        crash_after_send_and_after_intent(Backing::Postgres);
    }
}

fn crash_after_send_and_after_intent(backing: Backing) {
    let ops = [Op::Ask(0), Op::Ask(1), Op::Step(0), Op::Step(1), Op::Step(0), Op::Crash(None)];
    let mut w = scenario_on(backing, Policy::Retain, 3, &ops);
    let c = |w: &World, i: usize| w.sim.counters().shop(&w.names[i]);
    assert_eq!((c(&w, 0).rotations, c(&w, 1).token_requests), (1, 0));
    for i in 0..2 {
        assert!(matches!(w.state(i).phase, Phase::Ambiguous(_)), "shop {i}");
        for _ in 0..3 {
            w.step(i);
            w.check();
        }
        assert_eq!(w.state(i).phase, Phase::Healthy);
    }
    assert_eq!((c(&w, 0).replays, c(&w, 1).rotations), (1, 1));
    w.settle_fault_free();
    w.check_end();
}

/// An install lands between a worker's intent and its send: the worker re-checks before sending,
/// finds its attempt replaced and abandons it (journaled as a stale outcome): the retired token never
/// goes out, the install stands and no shop is marked. (Before issue 16.4 the retired token was
/// presented and rejected.)
#[test]
fn install_between_intent_and_send_abandons_the_attempt() {
    let mut w = scenario(Policy::Retain, 3, &[Op::Ask(2), Op::Step(2), Op::Install(2), Op::Step(2), Op::Step(2)]);
    assert_eq!(w.state(2).phase, Phase::Healthy);
    let c = w.sim.counters().shop(&w.names[2]);
    assert_eq!((c.token_requests, c.total_rejections()), (0, 0), "the retired token was sent: {c:?}");
    let history = w.store.history(&w.grants[2]).unwrap();
    assert!(
        history.iter().any(|(_, r)| matches!(r, Record::StaleOutcome { outcome, .. } if outcome == ABANDONED)),
        "the abandoned attempt is journaled"
    );
    w.settle_fault_free();
    w.check_end();
}

/// The same race under a server that revokes the whole grant family on reuse: presenting the retired
/// token would have revoked the fresh install. Nothing is sent; the install's grant stays alive.
#[test]
fn install_between_intent_and_send_never_triggers_a_family_revocation() {
    let mut w =
        scenario(Policy::StrictRevokeFamily, 3, &[Op::Ask(2), Op::Step(2), Op::Install(2), Op::Step(2), Op::Step(2)]);
    assert_eq!(w.state(2).phase, Phase::Healthy);
    let c = w.sim.counters().shop(&w.names[2]);
    assert_eq!((c.token_requests, c.family_revocations), (0, 0), "{c:?}");
    w.settle_fault_free();
    w.check_end();
}

/// A crash with a commit applied but not synced: the restart finds the intent, and the retry of the
/// old token returns the pair the lost commit held. (On PostgreSQL: written in the group's
/// transaction, which the server rolls back when the process's session ends.)
#[test]
fn crash_with_commit_applied_but_not_durable() {
    commit_applied_but_not_durable(Backing::Memory);
}

#[test]
fn crash_with_commit_applied_but_not_durable_pg() {
    if pg_reachable() {
        commit_applied_but_not_durable(Backing::Postgres);
    }
}

fn commit_applied_but_not_durable(backing: Backing) {
    let mut w = scenario_on(backing, Policy::Retain, 3, &[Op::Ask(1), Op::Step(1), Op::Step(1), Op::CrashMidWrite(1)]);
    assert!(matches!(&w.state(1).phase, Phase::Ambiguous(a) if a.last_reason == AmbiguityReason::Interrupted));
    w.step(1);
    w.step(1);
    w.step(1);
    w.check();
    assert_eq!(w.state(1).phase, Phase::Healthy);
    assert_eq!(w.sim.counters().shop(&w.names[1]).replays, 1);
    w.settle_fault_free();
    w.check_end();
}

/// Shrunk from `retain_until_replacement_used` (4 shops, seed 3395):
/// `[Ask(3), Step(3), Fault(3, ShortRefreshTtl { secs: 120 }), Step(3), Ask(0), Tick(119001)]`, then the
/// fault-free settle never ended.
///
/// A rotation mints a refresh token R′ that lives only 120 s (api-ruby #1453) and its answer is
/// lost with the process. 119 s later the restart's probe retries the old token R; the server
/// (retaining R) replays the same pair, now with `refresh_token_expires_in: 0` (under a minute
/// left rounds down to zero, and stays zero once R′ has expired). `classify` reads a zero lifetime as
/// an unusable answer, so the rotation stays *ambiguous*, and every later retry gets the very same
/// replay: tokenwal retried every few minutes until the 30-day retention window passed. Fixed in
/// `classify`: a zero lifetime is a real answer ("expires now"). (Under the 60-minute window the
/// same happens with an access token whose `expires_in` has run out in a replay: there the grant is
/// alive, and tokenwal loses it.) A replay whose lifetimes have run out is a definitive answer: the
/// pair is the newest the server issued; committing it makes the next refresh fail definitively.
#[test]
fn regression_replay_with_zero_lifetime_is_committed_then_rejected() {
    let mut w = scenario(
        Policy::Retain,
        4,
        &[
            Op::Ask(3),
            Op::Step(3),
            Op::Fault(3, SimFault::ShortRefreshTtl { secs: 120 }),
            Op::Step(3),
            Op::Ask(0),
            Op::Tick(119_001),
        ],
    );
    w.crash(None);
    let mut attempts = 0;
    while (w.workers[3].is_some() || matches!(w.state(3).phase, Phase::Ambiguous(_))) && attempts < 20 {
        if w.workers[3].is_none() {
            let s = w.state(3);
            if let Some(nb) = s.not_before {
                w.now = w.now.max(nb.0);
            }
            w.start(3, &s, false);
            attempts += 1;
        }
        w.step(3);
        w.check();
    }
    let s = w.state(3);
    assert!(
        !s.phase.is_open(),
        "still ambiguous after {attempts} identical replays ({} token requests); the grant is dead at the server",
        w.sim.counters().shop(&w.names[3]).token_requests
    );
    // The replayed pair is committed (it is the newest the server issued, "expires in 0" meaning under
    // a second left): the shop is no longer stuck, and what it holds agrees with the server.
    let rt = s.tokens.as_ref().unwrap().refresh_token.expose_secret().to_owned();
    match &s.phase {
        Phase::Healthy => assert!(w.sim_accepts(3, &rt), "healthy with a token the server rejects"),
        Phase::NeedsReauth { .. } => assert!(!w.sim_accepts(3, &rt), "needs-reauth with a live token"),
        other => panic!("unexpected phase {other:?}"),
    }
}

/// The same under a server that revokes the whole grant on reuse: the retry makes the server kill
/// the grant, and it says so.
#[test]
fn strict_family_revocation_rotate_then_drop_is_marked_dead() {
    let mut w = scenario(
        Policy::StrictRevokeFamily,
        3,
        &[Op::Fault(0, SimFault::RotateThenDrop), Op::Ask(0), Op::Step(0), Op::Step(0), Op::Step(0), Op::Tick(MIN)],
    );
    w.settle_fault_free();
    w.check_end();
    assert!(matches!(w.state(0).phase, Phase::NeedsReauth { .. }));
    assert!(!w.sim.grant_alive(&w.names[0], w.now));
    assert_eq!(w.sim.counters().shop(&w.names[0]).family_revocations, 1);
    assert!((1..3).all(|i| w.state(i).phase == Phase::Healthy));
}

/// Under the 60-minute window, a lost answer retried inside the window is recovered.
#[test]
fn window_rotate_then_drop_retried_inside_the_window_recovers() {
    let mut w = scenario(
        Policy::Window,
        3,
        &[
            Op::Fault(1, SimFault::RotateThenHang),
            Op::Ask(1),
            Op::Step(1),
            Op::Step(1),
            Op::Step(1),
            Op::Tick(59 * MIN),
        ],
    );
    assert!(matches!(w.state(1).phase, Phase::Ambiguous(_)));
    w.settle_fault_free();
    w.check_end();
    assert_eq!(w.state(1).phase, Phase::Healthy);
    assert_eq!(w.sim.counters().shop(&w.names[1]).replays, 1);
}

/// Found by `legacy_window_60m` (most of its needs-reauth marks: `gave_up_on_live_token`). Under the
/// 60-minute window an intent is durable, the process stops before sending, and it restarts 61
/// minutes later: recovery marks the grant needs-reauth (`RetryWindowElapsed`) without a single
/// probe, although the server never saw the token and would accept it. The same happens when a 5xx
/// outage answered every try before processing for over an hour: every shop that tried during the
/// outage is given up. The contract allows it ("its retry window passed with the ambiguity
/// unresolved", docs/journal.md §1.6 and §3), but one last retry with the old token would be a
/// definitive answer either way (rotated-and-lost: rejected; never processed: a fresh pair), at the
/// cost of one request.
#[test]
fn regression_window_give_up_without_probe_loses_a_never_sent_token() {
    let w = scenario(Policy::Window, 3, &[Op::Ask(2), Op::Step(2), Op::Tick(61 * MIN), Op::Crash(None)]);
    let s = w.state(2);
    let rt = s.tokens.as_ref().unwrap().refresh_token.expose_secret().to_owned();
    assert_eq!(w.sim.counters().shop(&w.names[2]).token_requests, 0, "the token never left the process");
    assert!(w.sim_accepts(2, &rt), "the server would accept it");
    assert!(!matches!(s.phase, Phase::NeedsReauth { .. }), "given up without a probe: {:?}", s.phase);
}

/// The same gap after a long outage of 5xx answers given before processing.
#[test]
fn regression_window_give_up_after_an_outage_of_unprocessed_5xx() {
    let mut ops = vec![Op::Fault(0, SimFault::FailBeforeProcessing { status: 503, json: false })];
    ops.extend([Op::Ask(0), Op::Step(0), Op::Step(0), Op::Step(0)]);
    for _ in 0..3 {
        ops.extend([Op::Tick(20 * MIN), Op::Fault(0, SimFault::FailBeforeProcessing { status: 503, json: false })]);
        ops.extend([Op::Ask(0), Op::Step(0), Op::Step(0), Op::Step(0)]);
    }
    ops.extend([Op::Tick(MIN), Op::Ask(0)]);
    let w = scenario(Policy::Window, 3, &ops);
    let s = w.state(0);
    let rt = s.tokens.as_ref().unwrap().refresh_token.expose_secret().to_owned();
    assert_eq!(w.sim.counters().shop(&w.names[0]).rotations, 0, "the server never processed a request");
    assert!(w.sim_accepts(0, &rt));
    assert!(!matches!(s.phase, Phase::NeedsReauth { .. }), "given up without a probe: {:?}", s.phase);
}

/// Shrunk from `retain_until_replacement_used` (20 000 cases, seed 0): `[Fault(2, ShortRefreshTtl
/// { secs: 120 }), Fault(2, MissingRefreshTokenExpiresIn), Ask(2), Step(2), Step(2), Crash(None),
/// Step(2), Step(2), Step(2), Tick(120000)]` ended "healthy with a refresh token the server rejects".
///
/// The rotation minted a 120-second refresh token and its answer (which said so) was lost with the
/// process; the recovery probe's replay omitted `refresh_token_expires_in`, so tokenwal committed the
/// pair with an unknown refresh expiry and cannot refresh before the server lets it lapse. Healthy
/// "as far as anyone knows" is right, and the harness accepts it (`lapsed_without_notice`) provided
/// the next try (the app's 401) marks it needs-reauth on the server's rejection, which this pins.
#[test]
fn regression_short_lived_token_whose_lifetime_was_lost_lapses_and_is_then_marked() {
    let mut w = scenario(
        Policy::Retain,
        3,
        &[
            Op::Fault(2, SimFault::ShortRefreshTtl { secs: 120 }),
            Op::Fault(2, SimFault::MissingRefreshTokenExpiresIn),
            Op::Ask(2),
            Op::Step(2),
            Op::Step(2),
            Op::Crash(None),
            Op::Step(2),
            Op::Step(2),
            Op::Step(2),
            Op::Tick(120_000),
        ],
    );
    let s = w.state(2);
    assert_eq!(s.phase, Phase::Healthy);
    assert_eq!(s.tokens.as_ref().unwrap().refresh_expires_at, None, "the lifetime was never learned");
    w.settle_fault_free();
    w.check_end();
    assert!(matches!(w.state(2).phase, Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { .. }, .. }));
}
