//! Attempts belong to the engine, not to the caller's future (issue 18.1), and a late uninstall
//! loses to an acquisition in flight (issue 18.3). Real loopback sockets against the simulator.
//!
//! A caller of `access_token`, `on_unauthorized` or `exchange_session_token` may be dropped at any
//! await point (a `tokio::time::timeout`, a client that disconnects, an aborted task). Whatever point
//! that is, the grant must not be stranded `Refreshing`: the attempt runs to its durable outcome and
//! the next call is served. The cancellation tests cut the caller's future after exactly `n` polls,
//! for every `n` until the call completes on its own, so every await point of the call is a cut.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokenwal::core::{AttemptKind, GrantKey, GrantState, Phase, Record, SessionToken};
use tokenwal::{Engine, Error, StoreLocation};
use tokenwal_sim::{Fault, SimHandle};
use tokenwal_testkit::{accepted, engine_config, now, requests, seed, shop, sim, SECRET};

async fn engine(sim: &SimHandle) -> Engine {
    Engine::open(engine_config(&sim.base_url(), StoreLocation::InMemory, SECRET)).await.unwrap().0
}

fn state(engine: &Engine, name: &str) -> GrantState {
    tokenwal_testkit::state(engine, name).expect("installed")
}

/// Waits (bounded) until the grant is no longer mid-attempt; panics if it stays `Refreshing`.
async fn settles(engine: &Engine, name: &str) -> GrantState {
    for _ in 0..500 {
        let s = state(engine, name);
        if !matches!(s.phase, Phase::Refreshing { .. }) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name}: stranded mid-attempt: {:?}", state(engine, name).phase);
}

/// Waits (bounded) until an attempt of `kind` is on the wire (its intent is durable).
async fn on_the_wire(engine: &Engine, name: &str, kind: AttemptKind) {
    for _ in 0..500 {
        if matches!(state(engine, name).phase, Phase::Refreshing { kind: k, .. } if k == kind) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{name}: no {kind} went out");
}

/// Polls a future at most `polls` times, then drops it (a cancellation at that await point).
/// `Some` if it completed first.
struct CutAfter<F> {
    fut: Pin<Box<F>>,
    polls: usize,
}

impl<F: Future> Future for CutAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            return Poll::Ready(None);
        }
        self.polls -= 1;
        match self.fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn cut_after<F: Future>(polls: usize, fut: F) -> Option<F::Output> {
    CutAfter { fut: Box::pin(fut), polls }.await
}

#[tokio::test]
async fn a_caller_that_times_out_mid_refresh_does_not_strand_the_shop() {
    let sim = sim().await;
    let name = "impatient";
    let tokens = seed(&sim, name);
    sim.push_faults(&shop(name).to_string(), [Fault::Slow { delay_ms: 600 }]).unwrap();
    let engine = engine(&sim).await;
    engine.install(&shop(name), tokens.clone()).await.unwrap();

    // The caller gives up while the request is on the wire (an HTTP handler's own deadline).
    let gave_up = tokio::time::timeout(Duration::from_millis(150), engine.access_token(&shop(name))).await;
    assert!(gave_up.is_err(), "the slow refresh cannot have finished in 150 ms");
    assert!(matches!(state(&engine, name).phase, Phase::Refreshing { .. }), "the intent was durable");

    // The attempt still runs to its durable outcome…
    let s = settles(&engine, name).await;
    assert_eq!(s.phase, Phase::Healthy);
    let committed = s.tokens.expect("committed").access_token;
    assert_ne!(committed, tokens.access_token);
    assert!(accepted(&sim, name, &committed));
    // …and the next caller is served that commit without another request.
    assert_eq!(engine.access_token(&shop(name)).await.unwrap(), committed);
    assert_eq!(requests(&sim, name), 1);
    engine.shutdown().await;
}

#[tokio::test]
async fn access_token_cut_at_every_await_point_never_strands_the_shop() {
    let sim = sim().await;
    let engine = engine(&sim).await;
    let mut completed = false;
    for polls in 1..200 {
        let name = format!("cut-{polls}");
        let tokens = seed(&sim, &name);
        engine.install(&shop(&name), tokens.clone()).await.unwrap();
        if let Some(done) = cut_after(polls, engine.access_token(&shop(&name))).await {
            done.unwrap();
            completed = true;
        }
        let s = settles(&engine, &name).await;
        assert!(matches!(s.phase, Phase::Healthy), "{name}: {:?}", s.phase);
        let served = engine.access_token(&shop(&name)).await.unwrap();
        assert!(accepted(&sim, &name, &served), "{name}: the served token is live");
        assert!(requests(&sim, &name) <= 1, "{name}: one rotation at most");
        if completed {
            break;
        }
    }
    assert!(completed, "the call never completed within 200 polls");
    engine.shutdown().await;
}

#[tokio::test]
async fn on_unauthorized_cut_at_every_await_point_never_strands_the_shop() {
    let sim = sim().await;
    let engine = engine(&sim).await;
    let mut completed = false;
    for polls in 1..200 {
        let name = format!("unauth-{polls}");
        let mut tokens = seed(&sim, &name);
        tokens.access_expires_at = now().saturating_add(Duration::from_secs(3600));
        engine.install(&shop(&name), tokens.clone()).await.unwrap();
        let rejected = tokens.access_token.clone();
        if let Some(done) = cut_after(polls, engine.on_unauthorized(&shop(&name), &rejected)).await {
            assert_ne!(done.unwrap(), rejected);
            completed = true;
        }
        settles(&engine, &name).await;
        let served = engine.on_unauthorized(&shop(&name), &rejected).await.unwrap();
        assert_ne!(served, rejected, "{name}");
        assert!(accepted(&sim, &name, &served), "{name}: the served token is live");
        assert_eq!(requests(&sim, &name), 1, "{name}: exactly one rotation");
        if completed {
            break;
        }
    }
    assert!(completed, "the call never completed within 200 polls");
    engine.shutdown().await;
}

#[tokio::test]
async fn a_first_install_by_token_exchange_cut_at_every_await_point_is_never_busy_for_ever() {
    let sim = sim().await;
    let engine = engine(&sim).await;
    let mut completed = false;
    for polls in 1..200 {
        let name = format!("first-{polls}");
        sim.seed_shop(&shop(&name).to_string());
        let session = SessionToken::new(sim.session_token(&shop(&name).to_string()));
        if let Some(done) = cut_after(polls, engine.exchange_session_token(&shop(&name), session)).await {
            done.unwrap();
            completed = true;
        }
        if engine.state(&GrantKey::shopify(&shop(&name))).unwrap().is_none() {
            continue; // cut before the intent: nothing happened
        }
        let s = settles(&engine, &name).await;
        assert!(s.has_live_pair(), "{name}: {:?}", s.phase);
        let fresh = SessionToken::new(sim.session_token(&shop(&name).to_string()));
        // The shop holds a pair: a second exchange is not refused as busy.
        let again = engine.exchange_session_token(&shop(&name), fresh).await;
        assert!(!matches!(again, Err(tokenwal::ExchangeError::Busy { .. })), "{name}: {again:?}");
        let served = engine.access_token(&shop(&name)).await.unwrap();
        assert!(accepted(&sim, &name, &served), "{name}: the served token is live");
        if completed {
            break;
        }
    }
    assert!(completed, "the call never completed within 200 polls");
    engine.shutdown().await;
}

#[tokio::test]
async fn a_late_uninstall_loses_to_a_reinstall_in_flight() {
    let sim = sim().await;
    let name = "returning";
    let engine = engine(&sim).await;
    engine.install(&shop(name), seed(&sim, name)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The merchant uninstalls (the webhook is triggered now, delivered late)…
    let triggered_at = now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // …and reinstalls: the app's front end exchanges a session token, slowly.
    sim.push_faults(&shop(name).to_string(), [Fault::Slow { delay_ms: 500 }]).unwrap();
    let session = SessionToken::new(sim.session_token(&shop(name).to_string()));
    let exchange = {
        let e = engine.clone();
        tokio::spawn(async move { e.exchange_session_token(&shop(name), session).await })
    };
    on_the_wire(&engine, name, AttemptKind::TokenExchange).await;

    // The late webhook arrives while the exchange is in flight: it is older than the reinstall.
    let applied = engine.uninstalled_as_of(&shop(name), triggered_at).await.unwrap();
    assert!(!applied, "an uninstall older than the acquisition in flight must not apply");

    let generation = exchange.await.unwrap().unwrap();
    let s = state(&engine, name);
    assert!(s.has_live_pair(), "installed, not uninstalled: {:?}", s.phase);
    assert_eq!(s.generation, generation);
    let history: Vec<Record> =
        engine.store().history(&GrantKey::shopify(&shop(name))).unwrap().into_iter().map(|(_, r)| r).collect();
    assert!(!history.iter().any(|r| matches!(r, Record::Uninstalled { .. })), "no uninstall journaled");
    assert!(!history.iter().any(|r| matches!(r, Record::StaleOutcome { .. })), "the exchange applied");
    assert!(accepted(&sim, name, &engine.access_token(&shop(name)).await.unwrap()));

    // An uninstall triggered after the reinstall still applies.
    assert!(engine.uninstalled_as_of(&shop(name), now()).await.unwrap());
    assert!(matches!(engine.access_token(&shop(name)).await, Err(Error::Uninstalled { .. })));
    engine.shutdown().await;
}
