//! Model-based test of the in-memory store: random sequences of writes, stale writes, compactions
//! and crashes (including crashes while a batch is written but not yet synced), checked after
//! every step against a plain model of what was durably acknowledged.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;
use tokenwal_core::*;
use tokenwal_store::{Store, StoreConfig, StoreError};

const T0: u64 = 1_800_000_000_000;
const GRANTS: usize = 3;
const RETENTION_MS: u64 = 5_000;

#[derive(Clone, Debug)]
enum Op {
    /// The next transition of grant `g` (install, refresh intent, or superseding install).
    Write(usize),
    /// A write computed from no state over an existing grant: must conflict and write nothing.
    Stale(usize),
    /// Compaction to completion at the current time.
    Compact,
    /// Crash now: continue with the crash image.
    Crash,
    /// Crash while grant `g`'s next write is applied but not synced; continue with the crash image
    /// (`true`) or with the live store once the write is acknowledged (`false`).
    CrashMidWrite(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..GRANTS).prop_map(Op::Write),
        1 => (0..GRANTS).prop_map(Op::Stale),
        1 => Just(Op::Compact),
        1 => Just(Op::Crash),
        2 => ((0..GRANTS), any::<bool>()).prop_map(|(g, c)| Op::CrashMidWrite(g, c)),
    ]
}

fn key(i: usize) -> GrantKey {
    GrantKey::new("oidc", &format!("user-{i}")).unwrap()
}

fn tokens(now: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("at_{now}")),
        access_expires_at: UnixMillis(now + 3_600_000),
        refresh_token: RefreshToken::new(format!("rt_{now}")),
        refresh_expires_at: None,
        scope: None,
    }
}

/// What the store must hold: per grant, the last acknowledged state, and the timestamps of its
/// records as readers see them (`live`: compaction applied) and as a crash would find them
/// (`durable`: compaction is made durable by the next sync, not by itself).
#[derive(Clone, Default)]
struct Model {
    states: BTreeMap<usize, GrantState>,
    live: BTreeMap<usize, Vec<u64>>,
    durable: BTreeMap<usize, Vec<u64>>,
}

impl Model {
    fn next_batch(&self, m: &Machine, g: usize, now: u64) -> WriteBatch {
        let at = UnixMillis(now);
        let t = match self.states.get(&g) {
            None => m.install(None, key(g), tokens(now), InstallSource::Import, at).transition().clone(),
            Some(s) if s.phase.is_open() => {
                m.install(Some(s), key(g), tokens(now), InstallSource::Import, at).transition().clone()
            }
            Some(s) => m.plan_attempt(s, at).unwrap().transition().clone(),
        };
        t.write_batch().unwrap()
    }

    /// A write was acknowledged: it, and every compaction before it, is durable.
    fn acknowledge(&mut self, g: usize, b: &WriteBatch) {
        self.states.insert(g, codec::decode_state(&b.state).unwrap());
        self.live.entry(g).or_default().extend(b.records.iter().map(|(at, _)| at.0));
        self.durable = self.live.clone();
    }

    fn compact(&mut self, cutoff: u64) {
        for h in self.live.values_mut() {
            h.retain(|at| *at >= cutoff);
        }
    }

    fn crash(&mut self) {
        self.live = self.durable.clone();
    }

    /// Checks `store` against the states and the `live` (or, for a crash image, `durable`) history.
    fn check(&self, store: &Store, crash_image: bool) -> Result<(), TestCaseError> {
        let histories = if crash_image { &self.durable } else { &self.live };
        for g in 0..GRANTS {
            let stored = store.get(&key(g)).unwrap();
            prop_assert_eq!(stored.as_ref(), self.states.get(&g));
            let history: Vec<u64> = store.history(&key(g)).unwrap().iter().map(|(_, r)| r.at().0).collect();
            prop_assert_eq!(history, histories.get(&g).cloned().unwrap_or_default());
        }
        let open: Vec<GrantKey> = store.open_grants().unwrap().into_iter().map(|s| s.grant).collect();
        let expected: Vec<GrantKey> =
            self.states.iter().filter(|(_, s)| s.phase.is_open()).map(|(g, _)| key(*g)).collect();
        prop_assert_eq!(open, expected);
        prop_assert_eq!(store.grant_count(), self.states.len());
        Ok(())
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let cfg = StoreConfig::default().with_retention(Duration::from_millis(RETENTION_MS)).with_compact_chunk(3);
    let mut store = Store::in_memory_with(cfg);
    let m = Machine::shopify(store.fingerprint_key());
    let mut model = Model::default();
    let mut now = T0;
    for op in ops {
        now += 1000;
        match op {
            Op::Write(g) => {
                let b = model.next_batch(&m, g, now);
                store.apply_blocking(b.clone()).unwrap();
                model.acknowledge(g, &b);
            }
            Op::Stale(g) => {
                if model.states.contains_key(&g) {
                    let b = m
                        .install(None, key(g), tokens(now), InstallSource::Import, UnixMillis(now))
                        .transition()
                        .clone();
                    let err = store.apply_blocking(b.write_batch().unwrap()).unwrap_err();
                    prop_assert!(matches!(err, StoreError::Conflict { expected: None, .. }), "{:?}", err);
                }
            }
            Op::Compact => {
                while store.compact(UnixMillis(now)).unwrap().more {}
                model.compact(now - RETENTION_MS);
            }
            Op::Crash => {
                store = store.crash_image();
                model.crash();
            }
            Op::CrashMidWrite(g, continue_crashed) => {
                let b = model.next_batch(&m, g, now);
                let hold = store.hold_acks();
                let writer = {
                    let (store, b) = (store.clone(), b.clone());
                    std::thread::spawn(move || store.apply_blocking(b))
                };
                prop_assert!(hold.wait_parked(Duration::from_secs(10)));
                let crashed = store.crash_image();
                // Readers of the live store do not see the write yet either.
                model.check(&store, false)?;
                hold.release();
                writer.join().unwrap().unwrap();
                model.check(&crashed, true)?;
                if continue_crashed {
                    store = crashed;
                    model.crash();
                } else {
                    model.acknowledge(g, &b);
                }
            }
        }
        model.check(&store, false)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_store_holds_exactly_what_was_acknowledged(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
