//! Operation sequences over the core state machine with a log that decodes every frame it is given:
//! no panic, every transition encodes and decodes, versions and generations only grow, and an
//! outcome never applies to an attempt that is not the grant's current one.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::sync::Mutex;
use tokenwal_core::*;

#[derive(Arbitrary, Debug)]
enum Op {
    Tick(u32),
    Plan,
    Outcome(Kind, u8),
    Install,
    Uninstall,
    Recover,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    Success,
    NotSent,
    Throttled,
    Rejected,
    BadCredentials,
    Ambiguous,
}

struct Log(Mutex<Option<GrantState>>);

impl DurableLog for Log {
    type Error = CodecError;
    fn apply(&self, batch: WriteBatch) -> impl Future<Output = Result<(), CodecError>> + Send {
        async move {
            let mut g = self.0.lock().unwrap();
            let s = codec::decode_state(&batch.state)?;
            for (_, r) in &batch.records {
                codec::decode_record(r)?;
            }
            if let Some(old) = g.as_ref() {
                assert_eq!(Some(old.version), batch.expected_version);
                assert!(s.version > old.version && s.generation >= old.generation);
            }
            *g = Some(s);
            Ok(())
        }
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!(),
    }
}

fn tokens(n: u64, now: UnixMillis) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("a{n}")),
        access_expires_at: UnixMillis(now.0 + 3_600_000),
        refresh_token: RefreshToken::new(format!("r{n}")),
        refresh_expires_at: Some(UnixMillis(now.0 + 7_776_000_000)),
        scope: None,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let m = Machine::shopify(FingerprintKey::from_bytes([3; 32]));
    let log = Log(Mutex::new(None));
    let grant = GrantKey::shopify(&ShopDomain::parse("fuzz.myshopify.com").unwrap());
    let mut now = UnixMillis(1_800_000_000_000);
    let mut n = 0u64;
    block_on(m.install(None, grant.clone(), tokens(0, now), InstallSource::Import, now).make_durable(&log)).unwrap();
    let mut inflight: Vec<Durable<AttemptRequest>> = Vec::new();
    for op in ops.into_iter().take(256) {
        let state = log.0.lock().unwrap().clone().unwrap();
        match op {
            Op::Tick(ms) => now = UnixMillis(now.0 + u64::from(ms)),
            Op::Plan => {
                if let Ok(p) = m.plan_attempt(&state, now) {
                    inflight.push(block_on(p.make_durable(&log)).unwrap());
                }
            }
            Op::Outcome(kind, which) => {
                if inflight.is_empty() {
                    continue;
                }
                let sent = inflight.remove(usize::from(which) % inflight.len());
                n += 1;
                let outcome = match kind {
                    Kind::Success => Outcome::Success { tokens: tokens(n, now), request_id: None },
                    Kind::NotSent => Outcome::NotSent(NotSentReason::Connect { detail: String::new() }),
                    Kind::Throttled => Outcome::Throttled { retry_after: None, request_id: None },
                    Kind::Rejected => Outcome::Rejected {
                        status: 401,
                        error: "invalid_request".into(),
                        description: None,
                        request_id: None,
                    },
                    Kind::BadCredentials => {
                        Outcome::BadCredentials { status: 401, error: "invalid_client".into(), request_id: None }
                    }
                    Kind::Ambiguous => Outcome::Ambiguous { reason: AmbiguityReason::Timeout, request_id: None },
                };
                let live =
                    matches!(state.phase, Phase::Refreshing { attempt, .. } if attempt == sent.value().attempt());
                let done = block_on(m.on_outcome(&state, &sent, outcome, now, n).make_durable(&log)).unwrap();
                if !live {
                    assert!(done.value().is_none(), "a stale outcome released tokens");
                    assert_eq!(done.state().phase, state.phase);
                }
            }
            Op::Install => {
                n += 1;
                block_on(
                    m.install(Some(&state), grant.clone(), tokens(n, now), InstallSource::Application, now)
                        .make_durable(&log),
                )
                .unwrap();
            }
            Op::Uninstall => {
                if let Some(t) = m.uninstall(&state, now) {
                    block_on(Pending::from_transition(t).make_durable(&log)).unwrap();
                }
            }
            Op::Recover => {
                inflight.clear();
                for item in recovery::plan(&m, [&state], now, n).items {
                    if let Some(t) = item.transition {
                        block_on(Pending::from_transition(t).make_durable(&log)).unwrap();
                    }
                }
            }
        }
    }
});
