//! Model-based property tests of the core state machine.
//!
//! The real [`Machine`] runs against a plain reference model of an OAuth server under each retention
//! policy, through random sequences of: time passing, refreshes with every fault (rotate-then-drop,
//! 5xx before processing, never sent, throttled, invalid_client, definitive rejection), crashes at
//! every step of the journal protocol (before the intent is durable, after it, after the server
//! processed the request, before the outcome's commit is durable), restarts with recovery, installs
//! from outside and server-side revocation.
//!
//! A crash discards everything volatile: the only state that survives is what the test log made
//! durable. After every step the invariants of `docs/journal.md` are checked; at the end, a fault-free
//! "settle" phase checks liveness: no lockout caused by tokenwal, no false re-auth.

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokenwal_core::codec::decode_state;
use tokenwal_core::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;
const T0: UnixMillis = UnixMillis(1_800_000_000_000);

fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the test log never pends"),
    }
}

// ---------------------------------------------------------------------------------------------
// The durable log: what survives a crash.

#[derive(Debug, PartialEq)]
enum LogError {
    Conflict,
    DiskFull,
    Codec,
}

impl From<CodecError> for LogError {
    fn from(_: CodecError) -> Self {
        LogError::Codec
    }
}

#[derive(Default)]
struct Log {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    state: Option<GrantState>,
    records: Vec<Record>,
    fail_next: bool,
}

impl DurableLog for Log {
    type Error = LogError;
    #[allow(clippy::manual_async_fn)]
    fn apply(&self, batch: WriteBatch) -> impl Future<Output = Result<(), LogError>> + Send {
        async move {
            let mut g = self.inner.lock().unwrap();
            if std::mem::take(&mut g.fail_next) {
                return Err(LogError::DiskFull);
            }
            let found = g.state.as_ref().map(|s| s.version);
            if found != batch.expected_version {
                return Err(LogError::Conflict);
            }
            let state = decode_state(&batch.state).expect("state frames decode");
            assert_eq!(state.version, batch.new_version);
            assert_eq!(state.phase.is_open(), batch.open);
            for (at, frame) in &batch.records {
                let r = codec::decode_record(frame).expect("record frames decode");
                assert_eq!(r.at(), *at);
                g.records.push(r);
            }
            g.state = Some(state);
            Ok(())
        }
    }
}

impl Log {
    fn state(&self) -> GrantState {
        self.inner.lock().unwrap().state.clone().expect("installed")
    }
    fn records_len(&self) -> usize {
        self.inner.lock().unwrap().records.len()
    }
    fn records_since(&self, n: usize) -> Vec<Record> {
        self.inner.lock().unwrap().records[n..].to_vec()
    }
    fn intent_durable(&self, attempt: AttemptId) -> bool {
        self.inner
            .lock()
            .unwrap()
            .records
            .iter()
            .any(|r| matches!(r, Record::Intent { attempt: a, .. } if *a == attempt))
    }
}

use tokenwal_core::codec;

// ---------------------------------------------------------------------------------------------
// The reference server.

#[derive(Clone, Copy, Debug, PartialEq)]
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
}

#[derive(Clone, Debug)]
struct Rt {
    expires_at: u64,
    first_used_at: Option<u64>,
    replacement: Option<String>,
    retired: bool,
    /// The access token minted with this refresh token.
    access: String,
    access_expires_at: u64,
}

struct Server {
    policy: Policy,
    rts: HashMap<String, Rt>,
    revoked: bool,
    n: u64,
    access_ttl: u64,
    refresh_ttl: u64,
    /// Access tokens ever issued and their expiry (old ones stay valid to expiry).
    access: HashMap<String, u64>,
}

enum Answer {
    Tokens { access: String, refresh: String, access_exp: u64, refresh_exp: u64 },
    Dead,
}

impl Server {
    fn new(policy: Policy) -> Server {
        Server {
            policy,
            rts: HashMap::new(),
            revoked: false,
            n: 0,
            access_ttl: HOUR,
            refresh_ttl: 90 * DAY,
            access: HashMap::new(),
        }
    }

    /// A new acquisition (install / token exchange): retires every older refresh token.
    fn acquire(&mut self, now: u64) -> (String, String, u64, u64) {
        for rt in self.rts.values_mut() {
            rt.retired = true;
        }
        self.revoked = false;
        self.mint(now)
    }

    fn mint(&mut self, now: u64) -> (String, String, u64, u64) {
        self.n += 1;
        let (a, r) = (format!("shpat_{}", self.n), format!("shprt_{}", self.n));
        let rt = Rt {
            expires_at: now + self.refresh_ttl,
            first_used_at: None,
            replacement: None,
            retired: false,
            access: a.clone(),
            access_expires_at: now + self.access_ttl,
        };
        self.access.insert(a.clone(), now + self.access_ttl);
        self.rts.insert(r.clone(), rt);
        (a, r, now + self.access_ttl, now + self.refresh_ttl)
    }

    fn would_accept(&self, rt: &str, now: u64) -> bool {
        if self.revoked {
            return false;
        }
        let Some(info) = self.rts.get(rt) else { return false };
        if info.retired || now >= info.expires_at {
            return false;
        }
        match (&info.replacement, self.policy) {
            (None, _) => true,
            (Some(rep), Policy::Retain) => {
                let rep_used = self.rts.get(rep).is_some_and(|r| r.first_used_at.is_some());
                !rep_used && now < info.first_used_at.unwrap() + 30 * DAY
            }
            (Some(_), Policy::Window) => now < info.first_used_at.unwrap() + HOUR,
            (Some(_), Policy::Strict | Policy::StrictRevokeFamily) => false,
        }
    }

    fn refresh(&mut self, rt: &str, now: u64) -> Answer {
        if !self.would_accept(rt, now) {
            if self.policy == Policy::StrictRevokeFamily && self.rts.get(rt).is_some_and(|i| i.replacement.is_some()) {
                self.revoked = true;
            }
            return Answer::Dead;
        }
        // Presenting a replacement retires its predecessor.
        let preds: Vec<String> =
            self.rts.iter().filter(|(_, i)| i.replacement.as_deref() == Some(rt)).map(|(k, _)| k.clone()).collect();
        for p in preds {
            self.rts.get_mut(&p).unwrap().retired = true;
        }
        let info = self.rts.get(rt).unwrap().clone();
        if let Some(rep) = &info.replacement {
            // A retained retry: the same pair.
            let r = self.rts.get(rep).unwrap();
            return Answer::Tokens {
                access: r.access.clone(),
                refresh: rep.clone(),
                access_exp: r.access_expires_at,
                refresh_exp: r.expires_at,
            };
        }
        let (a, r, ae, re) = self.mint(now);
        let i = self.rts.get_mut(rt).unwrap();
        i.first_used_at = Some(now);
        i.replacement = Some(r.clone());
        Answer::Tokens { access: a, refresh: r, access_exp: ae, refresh_exp: re }
    }

    fn access_valid(&self, a: &str, now: u64) -> bool {
        !self.revoked && self.access.get(a).is_some_and(|exp| now < *exp)
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// The server rotates; the answer is lost (520 / timeout / reset).
    RotateThenDrop,
    /// The server fails before processing (5xx).
    FailBefore,
    /// Connect refused.
    NotSent,
    /// 429.
    Throttle,
    /// invalid_client.
    InvalidClient,
    /// The server rotates and answers a 200 the client cannot parse.
    RotateThenGarble,
}

#[derive(Clone, Copy, Debug)]
enum Crash {
    /// Crash after the intent is durable, before sending.
    AfterIntent,
    /// Crash after the server processed, before the outcome is recorded.
    AfterSend,
    /// The outcome's commit fails (disk full) and the process restarts.
    CommitFails,
}

#[derive(Clone, Debug)]
enum Op {
    Tick(u64),
    Refresh(Fault),
    RefreshCrash(Fault, Crash),
    /// A restart (with recovery) with nothing in flight.
    Restart,
    /// A token set acquired elsewhere (the app's front end did token exchange).
    Install,
    /// The grant is revoked server-side (app uninstalled elsewhere, merchant revoked access).
    ServerRevoke,
    /// A second planner works from a stale read: its write must conflict.
    StalePlanner,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::None),
        3 => Just(Fault::RotateThenDrop),
        2 => Just(Fault::FailBefore),
        1 => Just(Fault::NotSent),
        1 => Just(Fault::Throttle),
        1 => Just(Fault::InvalidClient),
        1 => Just(Fault::RotateThenGarble),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..=40 * MIN).prop_map(Op::Tick),
        6 => fault().prop_map(Op::Refresh),
        3 => (fault(), prop_oneof![Just(Crash::AfterIntent), Just(Crash::AfterSend), Just(Crash::CommitFails)])
            .prop_map(|(f, c)| Op::RefreshCrash(f, c)),
        1 => Just(Op::Restart),
        1 => Just(Op::Install),
        1 => Just(Op::StalePlanner),
    ]
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct World {
    policy: Policy,
    machine: Machine,
    log: Log,
    server: Server,
    now: u64,
    entropy: u64,
    /// Refresh tokens whose replacement has been durably committed: never to be presented again.
    superseded: HashSet<String>,
    /// Whether the server revoked the grant (it is then truly dead until an install).
    revoked: bool,
}

impl World {
    fn new(policy: Policy, entropy: u64) -> World {
        let mut server = Server::new(policy);
        let (a, r, ae, re) = server.acquire(T0.0);
        let machine = Machine {
            policy: policy.retry(),
            refresh_margin: Duration::from_secs(300),
            refresh_token_margin: Duration::from_secs(7 * 86_400),
            fingerprints: FingerprintKey::from_bytes([9; 32]),
        };
        let log = Log::default();
        let grant = GrantKey::shopify(&ShopDomain::parse("model.myshopify.com").unwrap());
        let tokens = set(a, r, ae, re);
        block_on(machine.install(None, grant, tokens, InstallSource::Import, T0).make_durable(&log)).unwrap();
        World { policy, machine, log, server, now: T0.0, entropy, superseded: HashSet::new(), revoked: false }
    }

    fn now(&self) -> UnixMillis {
        UnixMillis(self.now)
    }

    fn next_entropy(&mut self) -> u64 {
        self.entropy = self.entropy.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.entropy >> 11
    }

    /// Sends `req` to the server with `fault`; returns what the client observes.
    fn send(&mut self, req: &Durable<AttemptRequest>, fault: Fault) -> Outcome {
        let r = req.value();
        assert!(self.log.intent_durable(r.attempt()), "invariant 1: request sent before its intent was durable");
        let presented = r.credential().expose_secret().to_owned();
        assert!(
            !self.superseded.contains(&presented),
            "invariant 2: presented a refresh token whose replacement was durably committed"
        );
        let now = self.now;
        let process = |s: &mut Server| s.refresh(&presented, now);
        match fault {
            Fault::NotSent => Outcome::NotSent(NotSentReason::Connect { detail: "refused".into() }),
            Fault::FailBefore => {
                Outcome::Ambiguous { reason: AmbiguityReason::ServerError { status: 503 }, request_id: None }
            }
            Fault::Throttle => Outcome::Throttled { retry_after: Some(Duration::from_secs(2)), request_id: None },
            Fault::InvalidClient => {
                Outcome::BadCredentials { status: 401, error: "invalid_client".into(), request_id: None }
            }
            Fault::RotateThenDrop => {
                process(&mut self.server);
                Outcome::Ambiguous { reason: AmbiguityReason::ServerError { status: 520 }, request_id: None }
            }
            Fault::RotateThenGarble => {
                process(&mut self.server);
                Outcome::Ambiguous {
                    reason: AmbiguityReason::UnparseableSuccess { status: 200, detail: "truncated".into() },
                    request_id: None,
                }
            }
            Fault::None => match process(&mut self.server) {
                Answer::Tokens { access, refresh, access_exp, refresh_exp } => Outcome::Success {
                    tokens: set(access, refresh, access_exp, refresh_exp),
                    request_id: Some("rid".into()),
                },
                Answer::Dead => Outcome::Rejected {
                    status: 401,
                    error: "invalid_request".into(),
                    description: Some("This request requires an active refresh_token".into()),
                    request_id: None,
                },
            },
        }
    }

    /// Applies an outcome and checks the invariants of the resulting transition.
    fn settle(&mut self, sent: &Durable<AttemptRequest>, outcome: Outcome) -> Result<(), LogError> {
        let before = self.log.state();
        let presented = sent.value().credential().expose_secret().to_owned();
        let n = self.log.records_len();
        let e = self.next_entropy();
        let pending = self.machine.on_outcome(&before, sent, outcome, self.now(), e);
        let done = block_on(pending.make_durable(&self.log))?;
        let after = done.state().clone();
        if let Some(tokens) = done.value() {
            // Only a durable commit releases tokens, and they are the state's tokens.
            assert_eq!(after.tokens.as_ref(), Some(tokens));
            if tokens.refresh_token.expose_secret() != presented {
                self.superseded.insert(presented);
            }
        }
        self.check_transition(&before, &after, &self.log.records_since(n));
        Ok(())
    }

    fn check_transition(&self, before: &GrantState, after: &GrantState, records: &[Record]) {
        // Invariant 4: an ambiguity ends only through a definitive answer (or the window / an install).
        let was_ambiguous = matches!(before.phase, Phase::Ambiguous(_) | Phase::Refreshing { resolving: Some(_), .. });
        if was_ambiguous && matches!(after.phase, Phase::Healthy | Phase::NeedsReauth { .. }) {
            assert!(
                records.iter().any(|r| matches!(r, Record::Resolved { .. })),
                "invariant 4: ambiguity ended without a Resolved record: {records:?}"
            );
        }
        // Invariant 5: needs-reauth only on definitive rejection of the newest durable credential,
        // or an elapsed retry window.
        if let (false, Phase::NeedsReauth { reason, .. }) =
            (matches!(before.phase, Phase::NeedsReauth { .. }), &after.phase)
        {
            match reason {
                ReauthReason::CredentialRejected { .. } => {
                    let rt = after.tokens.as_ref().unwrap().refresh_token.expose_secret();
                    assert!(
                        !self.server.would_accept(rt, self.now),
                        "invariant 5: marked needs-reauth while the server would accept the stored credential"
                    );
                }
                ReauthReason::RetryWindowElapsed { deadline, .. } => assert!(self.now >= deadline.0),
                ReauthReason::Manual { .. } => panic!("nothing marks manually here"),
            }
        }
        // Generations only grow.
        assert!(after.generation >= before.generation);
    }

    fn refresh(&mut self, fault: Fault, crash: Option<Crash>) {
        let state = self.log.state();
        let planned = match self.machine.step(&state, self.now()) {
            Step::Dormant | Step::InFlight => return,
            // Callers may refresh at any time (e.g. a 401 from the Admin API); backoff still applies.
            Step::Idle { .. } | Step::Attempt | Step::Wait { .. } => self.machine.plan_attempt(&state, self.now()),
        };
        let Ok(pending) = planned else { return };
        let sent = block_on(pending.make_durable(&self.log)).unwrap();
        // Invariant 3: while in flight, no second attempt can be planned.
        assert_eq!(self.machine.plan_attempt(sent.state(), self.now()).unwrap_err(), Refusal::InFlight);
        if let Some(Crash::AfterIntent) = crash {
            return self.restart();
        }
        let outcome = self.send(&sent, fault);
        match crash {
            Some(Crash::AfterSend) => self.restart(),
            Some(Crash::CommitFails) => {
                self.log.inner.lock().unwrap().fail_next = true;
                assert_eq!(self.settle(&sent, outcome).unwrap_err(), LogError::DiskFull);
                self.restart();
            }
            _ => self.settle(&sent, outcome).unwrap(),
        }
    }

    /// A restart: volatile state is gone; recovery runs on the durable state.
    fn restart(&mut self) {
        let state = self.log.state();
        let e = self.next_entropy();
        let plan = recovery::plan(&self.machine, [&state], self.now(), e);
        for item in &plan.items {
            if let Some(t) = &item.transition {
                let n = self.log.records_len();
                block_on(Pending::<()>::from_transition(t.clone()).make_durable(&self.log)).unwrap();
                let after = self.log.state();
                self.check_transition(&state, &after, &self.log.records_since(n));
            }
        }
        // Invariant 6: planning again after applying the plan changes nothing and intends the same.
        let again = recovery::plan(&self.machine, [&self.log.state()], self.now(), e);
        assert!(again.items.iter().all(|i| i.transition.is_none()), "recovery is not idempotent: {again:?}");
        // Grants the first plan left open keep their intention; those it marked dead left the index.
        for (first, second) in plan.items.iter().zip(&again.items) {
            match (&first.intention, &second.intention) {
                (Intention::Resolve { .. }, Intention::Resolve { .. }) => {}
                (Intention::NeedsReauth(_) | Intention::Nothing, Intention::Nothing) => {}
                (a, b) => panic!("recovery changed its mind: {a:?} then {b:?}"),
            }
        }
        assert!(!self.log.state().phase.is_open() || matches!(self.log.state().phase, Phase::Ambiguous(_)));
    }

    fn install(&mut self) {
        let (a, r, ae, re) = self.server.acquire(self.now);
        self.revoked = false;
        let state = self.log.state();
        let old = state.tokens.as_ref().map(|t| t.refresh_token.expose_secret().to_owned());
        let grant = state.grant.clone();
        let pending =
            self.machine.install(Some(&state), grant, set(a, r, ae, re), InstallSource::Application, self.now());
        block_on(pending.make_durable(&self.log)).unwrap();
        if let Some(old) = old {
            self.superseded.insert(old);
        }
    }

    fn stale_planner(&mut self) {
        let stale = self.log.state();
        if self.machine.plan_attempt(&stale, self.now()).is_err() {
            return;
        }
        // Someone else writes first (an install), then the stale planner's intent must conflict.
        self.install();
        let pending = self.machine.plan_attempt(&stale, self.now()).unwrap();
        assert_eq!(block_on(pending.make_durable(&self.log)).unwrap_err(), LogError::Conflict);
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Tick(ms) => self.now += ms,
            Op::Refresh(f) => self.refresh(*f, None),
            Op::RefreshCrash(f, c) => self.refresh(*f, Some(*c)),
            Op::Restart => self.restart(),
            Op::Install => self.install(),
            Op::ServerRevoke => {
                self.server.revoked = true;
                self.revoked = true;
            }
            Op::StalePlanner => self.stale_planner(),
        }
        assert!(!matches!(self.log.state().phase, Phase::Refreshing { .. }), "left an attempt in flight");
    }

    /// Fault-free settling: drive the grant until it is idle-healthy or dormant.
    fn settle_fault_free(&mut self) {
        for _ in 0..200 {
            let state = self.log.state();
            match self.machine.step(&state, self.now()) {
                Step::Idle { .. } | Step::Dormant => return,
                Step::Wait { until } => self.now = until.0,
                Step::Attempt => self.refresh(Fault::None, None),
                Step::InFlight => unreachable!("nothing is left in flight between ops"),
            }
        }
        panic!("grant did not settle: {:?}", self.log.state().phase);
    }

    fn check_end(&self, elapsed_ambiguous_windows: bool) {
        let s = self.log.state();
        let rt = s.tokens.as_ref().map(|t| t.refresh_token.expose_secret().to_owned()).unwrap_or_default();
        let alive = self.server.would_accept(&rt, self.now);
        match &s.phase {
            Phase::Healthy => {
                let a = s.tokens.as_ref().unwrap().access_token.expose_secret();
                assert!(self.server.access_valid(a, self.now), "healthy grant holds an access token the API rejects");
                assert!(alive, "healthy grant holds a dead refresh token");
            }
            Phase::NeedsReauth { reason, .. } => {
                // No false re-auth: the stored credential really is dead, or its window passed.
                match reason {
                    ReauthReason::CredentialRejected { .. } => assert!(!alive, "false re-auth: {reason:?}"),
                    ReauthReason::RetryWindowElapsed { .. } => {}
                    ReauthReason::Manual { .. } => unreachable!(),
                }
                // No lockout caused by tokenwal: under retention, a grant dies only because the
                // server killed it (revocation) or its retry window elapsed.
                if self.policy == Policy::Retain && !self.revoked && !elapsed_ambiguous_windows {
                    panic!("locked out under retain-until-replacement-used: {reason:?}");
                }
            }
            other => panic!("unexpected end phase {other:?}"),
        }
    }
}

fn set(a: String, r: String, ae: u64, re: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(a),
        access_expires_at: UnixMillis(ae),
        refresh_token: RefreshToken::new(r),
        refresh_expires_at: Some(UnixMillis(re)),
        scope: Some("read_orders".into()),
    }
}

fn run_sequence(policy: Policy, ops: &[Op], entropy: u64) {
    let mut w = World::new(policy, entropy);
    for op in ops {
        w.run(op);
    }
    w.restart();
    w.settle_fault_free();
    // A revocation tokenwal has not yet run into: the app's Admin API call gets a 401 and asks for a
    // refresh (`on_unauthorized`), which must then find the grant dead.
    let s = w.log.state();
    if matches!(s.phase, Phase::Healthy)
        && !w.server.access_valid(s.tokens.as_ref().unwrap().access_token.expose_secret(), w.now)
    {
        assert!(w.revoked, "a healthy grant's access token is rejected without a revocation");
        if let Some(nb) = s.not_before {
            w.now = w.now.max(nb.0); // the engine waits out the backoff, as `on_unauthorized` does
        }
        w.refresh(Fault::None, None);
        assert!(matches!(w.log.state().phase, Phase::NeedsReauth { .. }), "{:?}", w.log.state().phase);
    }
    // Sequences are at most 80 ops of at most 40 minutes: far inside Shopify's 30 days.
    let total = w.now - T0.0;
    w.check_end(total >= 30 * DAY);
    if policy == Policy::Retain && !w.revoked {
        assert!(matches!(w.log.state().phase, Phase::Healthy), "retain policy must end healthy");
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("TOKENWAL_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn retain_until_replacement_used(ops in prop::collection::vec(op(), 1..80), e in any::<u64>()) {
        run_sequence(Policy::Retain, &ops, e);
    }

    #[test]
    fn legacy_window(ops in prop::collection::vec(op(), 1..80), e in any::<u64>()) {
        run_sequence(Policy::Window, &ops, e);
    }

    #[test]
    fn strict_single_use(ops in prop::collection::vec(op(), 1..80), e in any::<u64>()) {
        run_sequence(Policy::Strict, &ops, e);
    }

    #[test]
    fn strict_with_family_revocation(
        ops in prop::collection::vec(prop_oneof![9 => op(), 1 => Just(Op::ServerRevoke)], 1..80),
        e in any::<u64>(),
    ) {
        run_sequence(Policy::StrictRevokeFamily, &ops, e);
    }

    #[test]
    fn retain_with_revocations(
        ops in prop::collection::vec(prop_oneof![9 => op(), 1 => Just(Op::ServerRevoke)], 1..80),
        e in any::<u64>(),
    ) {
        run_sequence(Policy::Retain, &ops, e);
    }
}

/// Under a strict server, a rotate-then-drop loses the grant for good: tokenwal must say so
/// (needs-reauth), neither loop on it nor report it healthy.
#[test]
fn strict_rotate_then_drop_is_marked_dead() {
    let mut w = World::new(Policy::Strict, 1);
    w.now += 56 * MIN;
    w.run(&Op::Refresh(Fault::RotateThenDrop));
    assert!(matches!(w.log.state().phase, Phase::Ambiguous(_)));
    w.settle_fault_free();
    let s = w.log.state();
    assert!(
        matches!(
            &s.phase,
            Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { after_ambiguity: true, .. }, .. }
        ),
        "{:?}",
        s.phase
    );
}

/// The incident of community thread 35182: two 520s after rotation. Under today's retention the
/// third try with the same old token gets the pair back.
#[test]
fn two_520s_then_recovery_under_retention() {
    let mut w = World::new(Policy::Retain, 2);
    w.now += 56 * MIN;
    w.run(&Op::Refresh(Fault::RotateThenDrop));
    w.now += 18_000;
    w.run(&Op::Refresh(Fault::RotateThenDrop));
    assert!(matches!(&w.log.state().phase, Phase::Ambiguous(a) if a.tries == 2));
    w.settle_fault_free();
    w.check_end(false);
    assert!(matches!(w.log.state().phase, Phase::Healthy));
}

/// A crash after the server rotated, before anything was recorded: recovery retries the old token.
#[test]
fn crash_after_send_recovers_by_retry() {
    let mut w = World::new(Policy::Retain, 3);
    w.now += 56 * MIN;
    w.run(&Op::RefreshCrash(Fault::None, Crash::AfterSend));
    let s = w.log.state();
    assert!(matches!(&s.phase, Phase::Ambiguous(a) if a.last_reason == AmbiguityReason::Interrupted));
    w.settle_fault_free();
    assert!(matches!(w.log.state().phase, Phase::Healthy));
    w.check_end(false);
}

/// invalid_client is the app's problem: the shop stays healthy, however often it happens.
#[test]
fn invalid_client_never_marks_the_shop() {
    let mut w = World::new(Policy::Retain, 4);
    w.now += 56 * MIN;
    for _ in 0..20 {
        w.run(&Op::Refresh(Fault::InvalidClient));
        w.now += 10 * MIN;
        assert!(matches!(w.log.state().phase, Phase::Healthy));
    }
}

/// Under the 60-minute window, a rotation lost and not resolved within the window: tokenwal keeps
/// probing (a 5xx past the window settles nothing), and the server's definitive rejection of the old
/// token marks the grant — never the clock alone.
#[test]
fn past_the_window_a_lost_rotation_ends_on_the_servers_rejection() {
    let mut w = World::new(Policy::Window, 5);
    w.now += 56 * MIN;
    w.run(&Op::Refresh(Fault::RotateThenDrop));
    w.now += 61 * MIN;
    assert!(w.machine.retry_deadline(&w.log.state()).is_some_and(|d| w.now() >= d));
    assert_eq!(w.machine.step(&w.log.state(), w.now()), Step::Attempt, "past the window, probe");
    w.run(&Op::Refresh(Fault::FailBefore));
    assert!(matches!(w.log.state().phase, Phase::Ambiguous(_)), "{:?}", w.log.state().phase);
    w.settle_fault_free();
    assert!(
        matches!(
            w.log.state().phase,
            Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { after_ambiguity: true, .. }, .. }
        ),
        "{:?}",
        w.log.state().phase
    );
}

/// Found by the interleaving property tests: under the window policy, a token the server never
/// processed (5xx before processing) must not be given up when the window passes — the probe after
/// the window succeeds.
#[test]
fn regression_window_probe_saves_an_unprocessed_token() {
    let mut w = World::new(Policy::Window, 6);
    w.now += 56 * MIN;
    w.run(&Op::Refresh(Fault::FailBefore));
    w.now += 61 * MIN;
    w.settle_fault_free();
    assert_eq!(w.log.state().phase, Phase::Healthy);
    w.check_end(false);
}

/// An intent left by a process that was down past the window: recovery probes instead of giving up.
#[test]
fn regression_interrupted_past_the_window_is_probed() {
    let mut w = World::new(Policy::Window, 7);
    w.now += 56 * MIN;
    w.run(&Op::RefreshCrash(Fault::None, Crash::AfterIntent));
    // (The crash restarted at once; make the process "down" for 61 minutes by re-entering Refreshing.)
    w.now += 61 * MIN;
    w.restart();
    w.settle_fault_free();
    assert_eq!(w.log.state().phase, Phase::Healthy);
}

/// Shrunk from `retain_with_revocations` (the harness once forgot that backoff applies to the
/// app's 401-triggered refresh): a connect failure, then a server-side revocation. The grant must
/// end needs-reauth once the app's 401 makes tokenwal try, never stay "healthy" with a dead token.
#[test]
fn regression_not_sent_then_revocation() {
    run_sequence(Policy::Retain, &[Op::Refresh(Fault::NotSent), Op::ServerRevoke], 0);
}
