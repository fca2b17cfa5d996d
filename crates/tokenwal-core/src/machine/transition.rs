//! What the machine hands to a store and to its driver: transitions, their encoded write batches,
//! the events they announce, and the values they hold back until they are durable.

use crate::codec::{self, CodecError};
use crate::domain::{Generation, GrantKey};
use crate::record::{AmbiguityReason, AttemptKind, GrantState, Phase, ReauthReason, Record, Resolution};
use crate::time::UnixMillis;
use std::fmt;
use std::future::Future;

/// What a transition decided, as a value the driver matches on (it never reads records back).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Verdict {
    /// An attempt's intent: once durable, its request may be sent.
    Intent,
    /// New tokens were committed (a refresh or an acquisition).
    Committed,
    /// The answer proved the credential was not processed (not sent, throttled, the app's
    /// credentials refused, a first token exchange refused): the grant is where it was.
    NotProcessed,
    /// The outcome is unknown: the same credential is retried later.
    Ambiguous,
    /// The credential is dead: the grant needs re-auth.
    Dead,
    /// An unresolved token exchange that can no longer be retried fell back (`docs/journal.md` §3).
    FellBack,
    /// The answer belonged to an attempt that is no longer live (an install, an uninstall or a newer
    /// attempt won): journaled, it changed nothing.
    Stale,
    /// Recovery turned an interrupted intent into an ambiguity.
    Interrupted,
    /// Tokens acquired elsewhere were installed.
    Installed,
    /// The app was uninstalled.
    Uninstalled,
    /// An operator or the application marked the grant needs-reauth.
    MarkedNeedsReauth,
    /// The granted scopes were updated.
    ScopesUpdated,
}

/// Something the application may want to know, emitted only after the transition is durable.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A refresh committed a new token set.
    Refreshed {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// A token set acquired elsewhere was installed.
    Installed {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// A rotation's outcome is unknown; tokenwal will retry the old credential.
    Ambiguous {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: AmbiguityReason,
    },
    /// An ambiguous rotation ended.
    Resolved {
        /// The grant.
        grant: GrantKey,
        /// How.
        how: Resolution,
    },
    /// The grant is dead: the merchant must open the app so that token exchange can run.
    NeedsReauth {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: ReauthReason,
    },
    /// The app's client credentials were refused. Page someone: this is fleet-wide.
    AppCredentialsRejected {
        /// The grant whose attempt saw it.
        grant: GrantKey,
        /// The HTTP status.
        status: u16,
        /// The OAuth error code.
        error: String,
    },
    /// The server throttled an attempt.
    Throttled {
        /// The grant.
        grant: GrantKey,
        /// When the next attempt may go.
        until: UnixMillis,
    },
    /// A grant that needed re-auth (or was uninstalled) is healthy again.
    Recovered {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// The app was uninstalled from the shop.
    Uninstalled {
        /// The grant.
        grant: GrantKey,
    },
    /// tokenwal's own acquisition (token exchange or migration) committed a new token set.
    Acquired {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
        /// `TokenExchange` or `Migration`.
        kind: AttemptKind,
    },
    /// The granted scopes changed (`app/scopes_update`).
    ScopesUpdated {
        /// The grant.
        grant: GrantKey,
    },
}

/// One atomic write: the grant's new state and the records explaining it.
#[derive(Clone, PartialEq, Eq)]
pub struct Transition {
    pub(super) expected_version: Option<u64>,
    /// The phase of the state the transition replaces (the one at `expected_version`), if any.
    pub(super) prior_phase: Option<&'static str>,
    pub(super) state: GrantState,
    pub(super) records: Vec<Record>,
    pub(super) events: Vec<Event>,
    pub(super) verdict: Verdict,
}

impl fmt::Debug for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // GrantState's Debug is redacted already; this keeps Transition's output short.
        f.debug_struct("Transition")
            .field("grant", &self.state.grant)
            .field("expected_version", &self.expected_version)
            .field("phase", &self.state.phase.name())
            .field("verdict", &self.verdict)
            .field("records", &self.records.iter().map(Record::kind_name).collect::<Vec<_>>())
            .finish()
    }
}

/// The encoded form of a [`Transition`], for a store to write atomically.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// The grant key ([`GrantKey::to_bytes`]).
    pub grant: Vec<u8>,
    /// The version the stored state must have (`None`: the grant must not exist yet).
    pub expected_version: Option<u64>,
    /// The version of the new state.
    pub new_version: u64,
    /// The new state, as a [`codec`] frame.
    pub state: Vec<u8>,
    /// Whether the new state is open (an intent without outcome, or an ambiguity): the store indexes
    /// these so that recovery never scans all grants.
    pub open: bool,
    /// The journal records, as [`codec`] frames, each with its timestamp (for retention).
    pub records: Vec<(UnixMillis, Vec<u8>)>,
}

impl fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBatch")
            .field("grant", &String::from_utf8_lossy(&self.grant))
            .field("expected_version", &self.expected_version)
            .field("new_version", &self.new_version)
            .field("state_bytes", &self.state.len())
            .field("open", &self.open)
            .field("records", &self.records.len())
            .finish()
    }
}

impl Transition {
    /// An empty transition replacing `current` by `state` (records and events are added after).
    pub(super) fn replacing(current: &GrantState, state: GrantState, verdict: Verdict) -> Transition {
        Transition {
            expected_version: Some(current.version),
            prior_phase: Some(current.phase.name()),
            state,
            records: Vec::new(),
            events: Vec::new(),
            verdict,
        }
    }

    /// The grant.
    pub fn grant(&self) -> &GrantKey {
        &self.state.grant
    }

    /// The version the stored state must have for this transition to apply.
    pub fn expected_version(&self) -> Option<u64> {
        self.expected_version
    }

    /// The phase after the transition.
    pub fn phase(&self) -> &Phase {
        &self.state.phase
    }

    /// The generation after the transition.
    pub fn generation(&self) -> Generation {
        self.state.generation
    }

    /// The records (they hold no secrets).
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The events to emit once durable.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// What the transition decided.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Encodes the transition for a store.
    pub fn write_batch(&self) -> Result<WriteBatch, CodecError> {
        let records =
            self.records.iter().map(|r| codec::encode_record(r).map(|b| (r.at(), b))).collect::<Result<Vec<_>, _>>()?;
        Ok(WriteBatch {
            grant: self.state.grant.to_bytes(),
            expected_version: self.expected_version,
            new_version: self.state.version,
            state: codec::encode_state(&self.state)?,
            open: self.state.phase.is_open(),
            records,
        })
    }

    /// The state after the transition. Only tests may look before it is durable.
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) fn state(&self) -> &GrantState {
        &self.state
    }
}

/// A log that makes transitions durable: the store's side of the ordering rules.
///
/// `apply` must return `Ok` only once the batch is durable (on disk, synced), and must write nothing
/// if the stored version differs from `batch.expected_version`.
pub trait DurableLog {
    /// The store's error (it must be able to carry an encoding failure).
    type Error: From<CodecError>;
    /// Writes `batch` atomically and durably.
    fn apply(&self, batch: WriteBatch) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A value held back until a transition is durable.
#[derive(Debug)]
#[must_use = "nothing happens until the transition is made durable"]
pub struct Pending<T> {
    pub(super) transition: Transition,
    pub(super) value: T,
}

impl<T> Pending<T> {
    /// The transition to make durable.
    pub fn transition(&self) -> &Transition {
        &self.transition
    }

    /// Makes the transition durable through `log`, then releases the value.
    pub async fn make_durable<L: DurableLog>(self, log: &L) -> Result<Durable<T>, L::Error> {
        let batch = self.transition.write_batch()?;
        log.apply(batch).await?;
        let Transition { expected_version, prior_phase, state, events, verdict, .. } = self.transition;
        let prior = expected_version.zip(prior_phase).map(|(version, phase)| Prior { version, phase });
        Ok(Durable { state, prior, events, verdict, value: self.value })
    }
}

impl Pending<()> {
    /// Wraps a transition that releases nothing when durable (recovery, give-up, uninstall, marks).
    pub fn from_transition(transition: Transition) -> Pending<()> {
        Pending { transition, value: () }
    }
}

/// A value whose transition is durable. Only [`Pending::make_durable`] builds one.
#[derive(Debug)]
pub struct Durable<T> {
    state: GrantState,
    prior: Option<Prior>,
    events: Vec<Event>,
    verdict: Verdict,
    value: T,
}

impl<T> Durable<T> {
    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Takes the value.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The durable state the transition wrote.
    pub fn state(&self) -> &GrantState {
        &self.state
    }

    /// The events to emit now that the transition is durable.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// What the durable transition decided.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The durable state this transition replaced (its version and phase; the store's
    /// compare-and-swap checked that version), or `None` if it created the grant.
    pub fn prior(&self) -> Option<Prior> {
        self.prior
    }
}

/// The state a durable transition replaced: exactly the one stored at `version` (the store's
/// compare-and-swap checked it), so `phase → Durable::state().phase` is a move the store made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prior {
    /// The replaced state's version.
    pub version: u64,
    /// The replaced state's phase ([`crate::Phase::name`]).
    pub phase: &'static str,
}
