//! Secret-free views of grant states and journal records, for people (tables) and scripts (JSON).
//!
//! Nothing here serialises a [`GrantState`] or a [`TokenSet`](tokenwal::core::TokenSet) directly: their tokens would go with
//! them. Every view is built field by field from what is safe to show (phases, expiries, attempt
//! ids, request ids, reasons, keyed fingerprints).

use serde::Serialize;
use tokenwal::core::{
    AttemptKind, FingerprintKey, GrantState, NotSentReason, Phase, Record, RefusalReason, Resolution, TokenSummary,
    UnixMillis,
};

use crate::timefmt;

/// A timestamp in both forms.
#[derive(Serialize, Clone, Copy)]
pub struct Instant {
    /// RFC 3339.
    pub at: UnixMillisText,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// `UnixMillis` rendered as RFC 3339 when serialised.
#[derive(Clone, Copy)]
pub struct UnixMillisText(pub UnixMillis);

impl Serialize for UnixMillisText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl Instant {
    /// Wraps `at`.
    pub fn of(at: UnixMillis) -> Instant {
        Instant { at: UnixMillisText(at), at_ms: at.0 }
    }
}

/// One grant, without its secrets.
#[derive(Serialize)]
pub struct GrantView {
    /// The grant, `provider/account` (e.g. `shopify/a.myshopify.com`,
    /// `shopify-customer-account/4242:7`).
    pub grant: String,
    /// The grant's provider id (`shopify` for the Admin API).
    pub provider: String,
    /// The grant's account: the shop for the Admin API (the field's historical name), a
    /// customer's `{shop_id}:{customer_id}`, or a generic provider's account.
    pub shop: String,
    /// `healthy`, `refreshing`, `ambiguous`, `needs-reauth` or `uninstalled`.
    pub state: &'static str,
    /// Generation of the stored token set.
    pub generation: u64,
    /// State version (bumped by every write).
    pub version: u64,
    /// Access-token expiry.
    pub access_expires: Option<Instant>,
    /// Refresh-token expiry (if known).
    pub refresh_expires: Option<Instant>,
    /// Keyed fingerprint of the stored refresh token (matches the journal's `presented`).
    pub refresh_fingerprint: Option<String>,
    /// Granted scopes.
    pub scope: Option<String>,
    /// Since when the grant is in this state (ambiguous, needs-reauth, uninstalled, refreshing).
    pub since: Option<Instant>,
    /// Why (needs-reauth reason, ambiguity reason).
    pub why: Option<String>,
    /// Attempts with the same credential (ambiguous).
    pub tries: Option<u32>,
    /// No attempt before this instant (backoff).
    pub not_before: Option<Instant>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// When the current refresh token was first presented (starts the retry window).
    pub credential_first_presented: Option<Instant>,
    /// When the state was written.
    pub updated: Instant,
    /// Needs-reauth only, when an app handle is known: the Shopify admin link that makes the
    /// merchant's next app open run token exchange
    /// (`https://admin.shopify.com/store/{shop-handle}/apps/{app-handle}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deep_link: Option<String>,
}

impl GrantView {
    /// How tables name the grant: the shop for the Admin API, `provider/account` otherwise.
    pub fn display_name(&self) -> String {
        if self.provider == tokenwal::core::SHOPIFY_PROVIDER {
            self.shop.clone()
        } else {
            self.grant.clone()
        }
    }

    /// The view of `s`; `key` fingerprints the refresh token.
    pub fn of(s: &GrantState, key: &FingerprintKey) -> GrantView {
        let t = s.tokens.as_ref();
        let (since, why, tries) = match &s.phase {
            Phase::Healthy => (None, None, None),
            Phase::Refreshing { started_at, resolving, attempt, .. } => (
                Some(Instant::of(resolving.as_ref().map_or(*started_at, |a| a.since))),
                Some(match resolving {
                    Some(a) => format!("attempt {} retrying an ambiguity ({})", attempt.0, a.last_reason),
                    None => format!("attempt {} in flight (or interrupted by a stop)", attempt.0),
                }),
                resolving.as_ref().map(|a| a.tries),
            ),
            Phase::Ambiguous(a) => (Some(Instant::of(a.since)), Some(a.last_reason.to_string()), Some(a.tries)),
            Phase::NeedsReauth { reason, since } => (Some(Instant::of(*since)), Some(reason.to_string()), None),
            Phase::Uninstalled { since } | Phase::NotInstalled { since } => (Some(Instant::of(*since)), None, None),
        };
        GrantView {
            grant: s.grant.to_string(),
            provider: s.grant.provider().to_owned(),
            shop: s.grant.account().to_owned(),
            state: s.phase.name(),
            generation: s.generation.0,
            version: s.version,
            access_expires: t.map(|t| Instant::of(t.access_expires_at)),
            refresh_expires: t.and_then(|t| t.refresh_expires_at).map(Instant::of),
            refresh_fingerprint: t.map(|t| format!("{:?}", key.refresh_token(&t.refresh_token))),
            scope: t.and_then(|t| t.scope.clone()),
            since,
            why,
            tries,
            not_before: s.not_before.map(Instant::of),
            consecutive_failures: s.consecutive_failures,
            credential_first_presented: s.credential_first_presented_at.map(Instant::of),
            updated: Instant::of(s.updated_at),
            deep_link: None,
        }
    }

    /// Adds the re-auth link of a needs-reauth grant: an Admin API shop's admin link (when
    /// `app_handle` is known), another grant's re-login link (when `login_url` is configured).
    pub fn with_deep_link(mut self, s: &GrantState, app_handle: Option<&str>, login_url: Option<&str>) -> GrantView {
        if let Phase::NeedsReauth { .. } = &s.phase {
            self.deep_link = tokenwal::webhook_sink::reauth_link(&s.grant, app_handle, login_url);
        }
        self
    }
}

/// One journal record, without secrets (records never hold any: see `docs/journal.md` §5).
#[derive(Serialize)]
pub struct RecordView {
    /// Log sequence number.
    pub lsn: u64,
    /// When it was written.
    pub time: Instant,
    /// `installed`, `intent`, `committed`, `rejected`, `refused`, `ambiguous`, `not-sent`,
    /// `resolved`, `needs-reauth`, `uninstalled`, `stale-outcome`.
    pub kind: &'static str,
    /// The attempt (for `resolved`: the first ambiguous attempt).
    pub attempt: Option<u64>,
    /// The generation concerned.
    pub generation: Option<u64>,
    /// The server's `x-request-id`.
    pub request_id: Option<String>,
    /// What happened, in words.
    pub detail: String,
}

fn summary(t: &TokenSummary) -> String {
    let mut s = format!("access expires {}", t.access_expires_at);
    if let Some(r) = t.refresh_expires_at {
        s.push_str(&format!(", refresh expires {r}"));
    }
    s.push_str(&format!(", refresh token {:?}", t.refresh));
    s
}

impl RecordView {
    /// The view of record `r` at `lsn`.
    pub fn of(lsn: u64, r: &Record) -> RecordView {
        let mut v = RecordView {
            lsn,
            time: Instant::of(r.at()),
            kind: r.kind_name(),
            attempt: None,
            generation: None,
            request_id: None,
            detail: String::new(),
        };
        match r {
            Record::Installed { generation, tokens, source, .. } => {
                v.generation = Some(generation.0);
                v.detail = format!("installed ({source:?}); {}", summary(tokens));
            }
            Record::Intent { attempt, generation, kind, presented, .. } => {
                v.attempt = Some(attempt.0);
                v.generation = Some(generation.0);
                let credential = match kind {
                    AttemptKind::Refresh => "refresh token",
                    AttemptKind::TokenExchange => "session token",
                    AttemptKind::Migration => "legacy token",
                };
                v.detail = format!("{kind} presenting {credential} {presented:?}");
            }
            Record::Committed { attempt, generation, tokens, request_id, .. } => {
                v.attempt = Some(attempt.0);
                v.generation = Some(generation.0);
                v.request_id = request_id.clone();
                v.detail = format!("new token set committed; {}", summary(tokens));
            }
            Record::Rejected { attempt, status, error, description, request_id, .. } => {
                v.attempt = Some(attempt.0);
                v.request_id = request_id.clone();
                v.detail = match description {
                    Some(d) => format!("{status} {error}: {d}"),
                    None => format!("{status} {error}"),
                };
            }
            Record::Refused { attempt, why, request_id, .. } => {
                v.attempt = Some(attempt.0);
                v.request_id = request_id.clone();
                v.detail = match why {
                    RefusalReason::Throttled { retry_after_ms: Some(ms) } => {
                        format!("throttled (429, retry after {ms} ms)")
                    }
                    RefusalReason::Throttled { retry_after_ms: None } => "throttled (429)".into(),
                    RefusalReason::AppCredentials { status, error } => {
                        format!("app credentials refused ({status} {error}); not the shop's fault")
                    }
                };
            }
            Record::Ambiguous { attempt, why, request_id, .. } => {
                v.attempt = Some(attempt.0);
                v.request_id = request_id.clone();
                v.detail = format!("outcome unknown: {why}");
            }
            Record::NotSent { attempt, why, .. } => {
                v.attempt = Some(attempt.0);
                v.detail = match why {
                    NotSentReason::Connect { detail } => format!("not sent: {detail}"),
                    NotSentReason::Build { detail } => format!("not sent (request not built): {detail}"),
                };
            }
            Record::Resolved { attempt, how, .. } => {
                v.attempt = Some(attempt.0);
                v.detail = match how {
                    Resolution::Succeeded { generation } => {
                        v.generation = Some(generation.0);
                        format!("ambiguity resolved: retry succeeded, generation {}", generation.0)
                    }
                    Resolution::Rejected => "ambiguity resolved: retry rejected".into(),
                    Resolution::Superseded { generation } => {
                        v.generation = Some(generation.0);
                        format!("ambiguity resolved: superseded by install of generation {}", generation.0)
                    }
                    Resolution::WindowElapsed => "ambiguity resolved: retry window elapsed".into(),
                    Resolution::Uninstalled => "ambiguity resolved: uninstalled".into(),
                };
            }
            Record::NeedsReauth { reason, .. } => v.detail = format!("needs re-auth: {reason}"),
            Record::Uninstalled { .. } => v.detail = "app uninstalled; secrets dropped".into(),
            Record::StaleOutcome { attempt, outcome, .. } => {
                v.attempt = Some(attempt.0);
                v.detail = format!("late outcome `{outcome}` ignored: the grant had moved on");
            }
            Record::ScopesUpdated { scope, .. } => v.detail = format!("scopes updated: {scope}"),
        }
        v
    }
}

/// Prints `rows` as left-aligned columns under `header`, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// The overview table of `shops` and `grants`: one row per grant, named by `name` (the column
/// headed `first`), with its state, generation, expiries, and why and since when it is not healthy.
pub fn overview(first: &str, views: &[GrantView], name: impl Fn(&GrantView) -> String, now: UnixMillis) -> String {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let since = |s: &Instant| timefmt::relative(UnixMillis(s.at_ms), now);
            let note = match (v.state, &v.why, &v.since) {
                ("healthy", _, _) => String::new(),
                (_, Some(why), Some(s)) => format!("{why} (since {})", since(s)),
                (_, None, Some(s)) => format!("since {}", since(s)),
                _ => String::new(),
            };
            vec![
                name(v),
                v.state.to_owned(),
                v.generation.to_string(),
                expiry_cell(&v.access_expires, now),
                expiry_cell(&v.refresh_expires, now),
                note,
            ]
        })
        .collect();
    table(&[first, "STATE", "GEN", "ACCESS EXPIRES", "REFRESH EXPIRES", "WHY / SINCE"], &rows)
}

/// `—` for a missing value.
pub fn or_dash(s: Option<String>) -> String {
    s.unwrap_or_else(|| "—".into())
}

/// An expiry column: `2026-…Z (in 4m)`.
pub fn expiry_cell(i: &Option<Instant>, now: UnixMillis) -> String {
    or_dash(i.as_ref().map(|i| timefmt::stamp(UnixMillis(i.at_ms), now)))
}
