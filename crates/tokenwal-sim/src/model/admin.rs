//! The Admin API check: which access tokens work, and the UNCONFIRMED retire-on-use switch.

use super::*;

/// How the Admin API treats a presented access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AdminVerdict {
    Ok,
    Unauthorized,
    NonExpiringRefused,
}

impl Model {
    /// Handles an Admin API request carrying `X-Shopify-Access-Token: token`.
    pub fn handle_admin(&mut self, now: u64, shop: &str, token: Option<&str>, api: AdminApi) -> AdminReply {
        let request_id = self.next_request_id();
        let verdict = token.map_or(AdminVerdict::Unauthorized, |t| self.admin_check(shop, t, now));
        let reply = match verdict {
            AdminVerdict::Ok => {
                self.counters.bump(shop, |c| c.admin_ok += 1);
                if self.config.admin_use_retires_previous {
                    self.retire_on_admin_use(token.expect("authorized"));
                }
                match api {
                    AdminApi::RestShop => {
                        HttpReply::json(200, &serde_json::json!({"shop": {"myshopify_domain": shop, "name": shop}}))
                    }
                    AdminApi::GraphQl => HttpReply::json(
                        200,
                        &serde_json::json!({"data": {"shop": {"myshopifyDomain": shop, "name": shop}}}),
                    ),
                }
            }
            AdminVerdict::Unauthorized => {
                self.counters.bump(shop, |c| c.admin_unauthorized += 1);
                HttpReply::json(401, &serde_json::json!({"errors": ADMIN_UNAUTHORIZED}))
            }
            AdminVerdict::NonExpiringRefused => {
                self.counters.bump(shop, |c| c.admin_forbidden += 1);
                HttpReply::json(403, &serde_json::json!({"errors": NON_EXPIRING_REFUSED}))
            }
        };
        AdminReply { request_id, authorized: verdict == AdminVerdict::Ok, reply }
    }

    pub(super) fn admin_check(&self, shop: &str, token: &str, now: u64) -> AdminVerdict {
        let live = if let Some(a) = self.access.get(token) {
            a.key.shop == shop && !a.revoked && now < a.expires_at
        } else if self.legacy.get(token).is_some_and(|l| l.key.shop == shop && !l.revoked) {
            if self.config.reject_non_expiring_admin {
                return AdminVerdict::NonExpiringRefused;
            }
            true
        } else {
            false
        };
        if live {
            AdminVerdict::Ok
        } else {
            AdminVerdict::Unauthorized
        }
    }

    /// UNCONFIRMED switch: API use of A′ retires the R whose first use minted A′.
    pub(super) fn retire_on_admin_use(&mut self, access: &str) {
        let Some(parent) = self.access.get(access).and_then(|a| a.minted_by.clone()) else {
            return;
        };
        let is_current = self.refresh.get(&parent).is_some_and(|r| r.replacement_access.as_deref() == Some(access));
        if is_current {
            self.retire_if_active(&parent);
        }
    }
}
