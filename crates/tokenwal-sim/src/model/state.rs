//! Server-side records of grants and tokens, and the read-only views exposed to tests.

use serde::Serialize;

use crate::faults::Fault;
use crate::token::SimToken;

/// Identifies a grant: one app installed on one shop (Admin API), or one customer of one shop
/// signed in to a public client (Customer Account API).
///
/// `shop` is the grant's name in every per-shop table (faults, counters, holds, views): the shop
/// domain for the Admin API, `{shop_id}:{customer_id}` for a customer (see
/// [`customer_grant`](crate::model::customer_grant)).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GrantKey {
    pub(crate) client_id: String,
    pub(crate) shop: String,
    /// `(shop_id, customer_id)` of a Customer Account API grant.
    pub(crate) customer: Option<(u64, u64)>,
}

impl GrantKey {
    pub(crate) fn new(client_id: &str, shop: &str) -> Self {
        Self { client_id: client_id.to_owned(), shop: shop.to_owned(), customer: None }
    }

    pub(crate) fn customer(client_id: &str, shop_id: u64, customer_id: u64) -> Self {
        Self {
            client_id: client_id.to_owned(),
            shop: super::customer_grant(shop_id, customer_id),
            customer: Some((shop_id, customer_id)),
        }
    }
}

/// A grant: the acquisition counter and every token ever issued under it (for views and
/// family revocation).
#[derive(Clone, Debug, Default)]
pub(crate) struct Grant {
    /// Bumped by each acquisition (token exchange, migration, seed). Only refresh tokens of
    /// the current generation can be active.
    pub(crate) generation: u64,
    pub(crate) refresh_tokens: Vec<String>,
    pub(crate) access_tokens: Vec<String>,
}

/// Stored lifecycle state of a refresh token. Expiry is not stored: it follows from `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefreshState {
    /// Fresh, or used and still retryable (see `first_used_at`).
    Active,
    /// No longer accepted: replaced by a newer acquisition, its replacement was used, its
    /// retention lapsed, or (strict) it was used.
    Retired,
    /// Revoked with its whole grant (family revocation, uninstall).
    Revoked,
}

#[derive(Clone, Debug)]
pub(crate) struct RefreshRecord {
    pub(crate) key: GrantKey,
    pub(crate) generation: u64,
    pub(crate) issued_at: u64,
    pub(crate) expires_at: u64,
    pub(crate) first_used_at: Option<u64>,
    /// The refresh token this one was rotated into (latest, if retries minted new pairs).
    pub(crate) replacement: Option<String>,
    /// The access token minted with `replacement`.
    pub(crate) replacement_access: Option<String>,
    /// The refresh token whose use minted this one.
    pub(crate) predecessor: Option<String>,
    pub(crate) state: RefreshState,
}

#[derive(Clone, Debug)]
pub(crate) struct AccessRecord {
    pub(crate) key: GrantKey,
    pub(crate) generation: u64,
    pub(crate) issued_at: u64,
    pub(crate) expires_at: u64,
    pub(crate) revoked: bool,
    /// The refresh token whose use minted this access token (None for acquisitions).
    pub(crate) minted_by: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Migration {
    pub(crate) at: u64,
    pub(crate) generation: u64,
    pub(crate) access: String,
    pub(crate) refresh: String,
}

/// A non-expiring offline token.
#[derive(Clone, Debug)]
pub(crate) struct LegacyRecord {
    pub(crate) key: GrantKey,
    /// Refused by the Admin API (migrated or uninstalled).
    pub(crate) revoked: bool,
    pub(crate) migration: Option<Migration>,
}

/// The status of a token as of the time a view was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// Accepted (a refresh token: fresh or still retryable; see
    /// [`RefreshTokenView::accepted_now`]).
    Active,
    /// No longer accepted, but not revoked with its grant.
    Retired,
    /// Revoked with its grant (or, for a non-expiring token, migrated or uninstalled).
    Revoked,
    /// Past its expiry.
    Expired,
}

/// A refresh token as the server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefreshTokenView {
    /// The token.
    pub token: SimToken,
    /// Acquisition generation it belongs to.
    pub generation: u64,
    /// Issue time, unix ms.
    pub issued_at_ms: u64,
    /// Expiry, unix ms.
    pub expires_at_ms: u64,
    /// First presentation in a successful refresh, unix ms.
    pub first_used_at_ms: Option<u64>,
    /// The token it was rotated into.
    pub replacement: Option<SimToken>,
    /// The token whose use minted it.
    pub predecessor: Option<SimToken>,
    /// Status now.
    pub status: TokenStatus,
    /// Whether a refresh presenting it now would succeed (fresh or as a retry).
    pub accepted_now: bool,
}

/// An access token as the server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessTokenView {
    /// The token.
    pub token: SimToken,
    /// Acquisition generation it belongs to.
    pub generation: u64,
    /// Issue time, unix ms.
    pub issued_at_ms: u64,
    /// Expiry, unix ms (extended by same-pair retries).
    pub expires_at_ms: u64,
    /// Status now: active, revoked or expired.
    pub status: TokenStatus,
}

/// One app's grant on the shop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantView {
    /// The app.
    pub client_id: String,
    /// Number of acquisitions so far.
    pub generation: u64,
    /// Whether some refresh token of the grant would be accepted now.
    pub alive: bool,
    /// Every refresh token issued, oldest first.
    pub refresh_tokens: Vec<RefreshTokenView>,
    /// Every access token issued, oldest first.
    pub access_tokens: Vec<AccessTokenView>,
}

/// A non-expiring offline token as the server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LegacyTokenView {
    /// The token.
    pub token: SimToken,
    /// The app.
    pub client_id: String,
    /// `active`, or `revoked` once migrated or uninstalled.
    pub status: TokenStatus,
    /// Time of the first successful migration, unix ms.
    pub migrated_at_ms: Option<u64>,
    /// Whether a migration retry now would return the migrated pair.
    pub migration_retry_open: bool,
}

/// Everything the server knows about one shop. For tests and debugging; an engine never
/// needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShopState {
    /// Shop domain.
    pub shop: String,
    /// Time the view was taken, unix ms.
    pub now_ms: u64,
    /// Whether any app's grant on the shop is alive.
    pub alive: bool,
    /// Grants by app.
    pub grants: Vec<GrantView>,
    /// Non-expiring tokens.
    pub legacy_tokens: Vec<LegacyTokenView>,
    /// Scripted faults still queued for the shop.
    pub pending_faults: Vec<Fault>,
}

impl ShopState {
    /// The grant of `client_id`, if any.
    pub fn grant(&self, client_id: &str) -> Option<&GrantView> {
        self.grants.iter().find(|g| g.client_id == client_id)
    }

    /// The refresh token view for `token`, in any grant.
    pub fn refresh_token(&self, token: &str) -> Option<&RefreshTokenView> {
        self.grants.iter().flat_map(|g| &g.refresh_tokens).find(|r| r.token.as_str() == token)
    }

    /// The access token view for `token`, in any grant.
    pub fn access_token(&self, token: &str) -> Option<&AccessTokenView> {
        self.grants.iter().flat_map(|g| &g.access_tokens).find(|a| a.token.as_str() == token)
    }
}
