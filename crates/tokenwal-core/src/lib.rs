//! # tokenwal-core
//!
//! The pure, deterministic core of tokenwal: no tokio, no reqwest, no sled, no clock. Every function
//! is a function of `(state, input, now)`.
//!
//! ## Layout
//!
//! * [`time`] — [`UnixMillis`], the only notion of time (always a parameter).
//! * [`secret`] — credentials as types: redacted `Debug`, no `Display`, zeroized on drop.
//! * [`domain`] — [`ShopDomain`] (strictly validated), [`GrantKey`], [`Generation`], [`TokenSet`],
//!   keyed [`Fingerprint`]s of credentials.
//! * [`record`] — journal [`Record`]s (no secrets) and the durable per-grant [`GrantState`].
//! * [`codec`] — the on-disk frame: magic | version | length | bincode payload | crc32.
//! * [`protocol`] — the token endpoint's wire format for every provider: the [`protocol::Request`]
//!   of each attempt ([`protocol::build`]) and what its answer means ([`classify`](mod@classify), [`Outcome`]; also
//!   re-exported at the crate root, as before).
//! * [`policy`] — per-provider retry policy: retention of old refresh tokens, backoff.
//! * [`profile`] — provider profiles (built in: Shopify's Admin API and Customer Account API): the
//!   grants, wire format, rotation and refresh buffer of one token endpoint.
//! * [`machine`] — the per-grant state machine; [`Pending`]/[`Durable`] make "journal before network"
//!   and "commit before use" hold by construction.
//! * [`recovery`] — the recovery planner.
//!
//! The durability contract these pieces implement is `docs/journal.md` at the repository root.
//!
//! ## Example
//!
//! ```
//! use tokenwal_core::*;
//!
//! // A trivial log for illustration: a real store returns only once the batch is on disk.
//! struct Log;
//! impl DurableLog for Log {
//!     type Error = CodecError;
//!     async fn apply(&self, _batch: WriteBatch) -> Result<(), CodecError> { Ok(()) }
//! }
//!
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     let mut f = std::pin::pin!(f);
//! #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
//! # }
//! let machine = Machine::shopify(FingerprintKey::from_bytes([7; 32]));
//! let shop = ShopDomain::parse("my-shop.myshopify.com").unwrap();
//! let now = UnixMillis(1_800_000_000_000);
//! let tokens = TokenSet {
//!     access_token: AccessToken::new("shpat_a"),
//!     access_expires_at: now,
//!     refresh_token: RefreshToken::new("shprt_r"),
//!     refresh_expires_at: None,
//!     scope: None,
//! };
//! let installed = block_on(
//!     machine.install(None, GrantKey::shopify(&shop), tokens, InstallSource::Import, now).make_durable(&Log),
//! ).unwrap();
//!
//! // The access token is due: plan a refresh. The request is unreachable until the intent is durable.
//! assert_eq!(machine.step(installed.state(), now), Step::Attempt);
//! let pending = machine.plan_attempt(installed.state(), now).unwrap();
//! let permit = block_on(pending.make_durable(&Log)).unwrap();
//! assert_eq!(permit.value().credential().expose_secret(), "shprt_r");
//!
//! // The server's answer was lost: the rotation is ambiguous, never a dead grant.
//! let outcome = Outcome::Ambiguous { reason: AmbiguityReason::ServerError { status: 520 }, request_id: None };
//! let settled = block_on(machine.on_outcome(permit.state(), &permit, outcome, now, 0).make_durable(&Log)).unwrap();
//! assert_eq!(settled.state().phase.name(), "ambiguous");
//! assert!(settled.value().is_none());
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
pub mod domain;
pub mod mac;
pub mod machine;
pub mod policy;
pub mod profile;
pub mod protocol;
pub mod record;
pub mod recovery;
pub mod secret;
pub mod time;

pub use codec::CodecError;
pub use domain::SHOPIFY as SHOPIFY_PROVIDER;
pub use domain::{
    AttemptId, CustomerAccount, CustomerAccountError, Fingerprint, FingerprintKey, Generation, GrantKey, GrantKeyError,
    ShopDomain, ShopDomainError, TokenSet, SHOPIFY_CUSTOMER_ACCOUNT,
};
pub use machine::{
    AttemptRequest, Credential, Decision, Durable, DurableLog, Event, Goal, Machine, NoChange, Pending, Prior, Refusal,
    Step, Transition, Verdict, WriteBatch, ABANDONED, MIGRATION_RETRY,
};
pub use policy::{Backoff, Retention, RetryPolicy};
pub use profile::{ProviderProfile, Rotation};
/// The classification keeps its old paths (`tokenwal_core::classify::…`, `tokenwal_core::classify`).
pub use protocol::classify;
pub use protocol::{classify_attempt, Exchange, HttpAnswer, Outcome, ResponseRules, TransportFailure, MAX_BODY};
pub use record::{
    Acquisition, Ambiguity, AmbiguityReason, AttemptKind, GrantState, InstallSource, NotSentReason, Phase,
    ReauthReason, Record, RefusalReason, Resolution, Subject, TokenSummary,
};
pub use recovery::{Intention, RecoveryItem, RecoveryPlan};
pub use secret::{AccessToken, ClientSecret, LegacyToken, RefreshToken, SessionToken};
pub use time::UnixMillis;
