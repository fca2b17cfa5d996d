'use strict';

/**
 * A Shopify `SessionStorage` (the interface of @shopify/shopify-app-session-storage) whose
 * offline sessions live in tokenwal.
 *
 * * `offline_{shop}` sessions go to the broker. Storing one installs its token pair (a pair
 *   older than the one tokenwal holds is ignored, never written over the newer one); loading one
 *   answers a Session holding the broker's fresh access token, its real `expires` and scope, and
 *   **no refresh token**, so Shopify's library never refreshes on its own (it refreshes only
 *   when a session carries a `refreshToken`). The broker serves tokens with more than its refresh
 *   margin (5 minutes) left, beyond the library's own 5-minute window.
 * * A dead grant (not installed, needs re-auth, uninstalled) loads as `undefined`: the library's
 *   own "no session → OAuth / token exchange" path. A transient failure (broker unavailable or
 *   unreachable) throws, so it is never mistaken for an uninstall.
 * * Online sessions and any other id go to the `inner` storage the app passes.
 */

const { Session } = require('@shopify/shopify-api');
const { BrokerClient } = require('./client');
const { NotInstalledError, NeedsReauthError, OlderPairError } = require('./errors');

const OFFLINE_PREFIX = 'offline_';

class TokenwalSessionStorage {
  #broker;
  #inner;

  /**
   * @param {object} [options]
   * @param {BrokerClient} [options.broker] a client; else one is made from `options.brokerOptions`
   *   (or the environment: TOKENWAL_BROKER_ADDRESS, TOKENWAL_BROKER_TOKEN)
   * @param {object} [options.brokerOptions] options of `new BrokerClient(...)`
   * @param {import('@shopify/shopify-app-session-storage').SessionStorage} [options.inner]
   *   storage for online sessions and every id that is not `offline_{shop}`
   */
  constructor(options = {}) {
    this.#broker = options.broker ?? new BrokerClient(options.brokerOptions);
    this.#inner = options.inner;
  }

  /** The broker client (for uninstall webhooks, token exchange, …). */
  get broker() {
    return this.#broker;
  }

  async storeSession(session) {
    const shop = offlineShop(session.id);
    if (shop === null || session.isOnline) return this.#needInner('store', session.id).storeSession(session);
    if (!session.accessToken) throw new TypeError(`offline session ${session.id} has no access token to install`);
    if (!session.refreshToken) return this.#storeWithoutRefreshToken(shop, session);
    if (!session.expires) {
      throw new TypeError(
        `offline session ${session.id} has a refresh token but no expiry: tokenwal needs the access token's expiry (was expires_in missing from Shopify's answer?)`,
      );
    }
    try {
      await this.#broker.installGrant(shop, {
        accessToken: session.accessToken,
        refreshToken: session.refreshToken,
        expiresAt: session.expires,
        refreshTokenExpiresAt: session.refreshTokenExpires ?? undefined,
        scope: session.scope,
      });
    } catch (e) {
      // A newer pair is already held (a refresh or another install won): keeping it is right.
      if (e instanceof OlderPairError) return true;
      throw e;
    }
    return true;
  }

  async loadSession(id) {
    const shop = offlineShop(id);
    if (shop === null) return this.#inner ? this.#inner.loadSession(id) : undefined;
    const token = await this.#liveToken(shop);
    return token ? toSession(id, token) : undefined;
  }

  async deleteSession(id) {
    const shop = offlineShop(id);
    if (shop === null) return this.#inner ? this.#inner.deleteSession(id) : true;
    await this.#broker.uninstall(shop);
    return true;
  }

  async deleteSessions(ids) {
    const others = [];
    for (const id of ids) {
      const shop = offlineShop(id);
      if (shop === null) others.push(id);
      else await this.#broker.uninstall(shop);
    }
    if (others.length > 0 && this.#inner) return this.#inner.deleteSessions(others);
    return true;
  }

  async findSessionsByShop(shop) {
    const found = [];
    const token = await this.#liveToken(shop);
    if (token) found.push(toSession(OFFLINE_PREFIX + shop, token));
    if (this.#inner) {
      for (const s of await this.#inner.findSessionsByShop(shop)) if (offlineShop(s.id) === null) found.push(s);
    }
    return found;
  }

  /** The broker's token, or null for a dead or unknown grant; transient failures throw. */
  async #liveToken(shop) {
    try {
      return await this.#broker.getToken(shop);
    } catch (e) {
      if (e instanceof NotInstalledError || e instanceof NeedsReauthError) return null;
      throw e;
    }
  }

  /**
   * An offline session without a refresh token: either one this storage loaded and the library
   * stores back (same access token as the broker's: nothing to install), or a non-expiring
   * token, which tokenwal does not hold.
   */
  async #storeWithoutRefreshToken(shop, session) {
    const current = await this.#liveToken(shop);
    if (current && current.accessToken === session.accessToken) return true;
    throw new TypeError(
      `offline session ${session.id} has no refresh token: tokenwal holds expiring offline tokens only (request expiring offline tokens: expiring: true or the expiringOfflineAccessTokens future flag, or install through the broker's token exchange)`,
    );
  }

  #needInner(what, id) {
    if (!this.#inner) throw new TypeError(`cannot ${what} session ${id}: it is not an offline session and no inner storage was given`);
    return this.#inner;
  }
}

/** The shop of an `offline_{shop}` id, else null. */
function offlineShop(id) {
  return typeof id === 'string' && id.startsWith(OFFLINE_PREFIX) && id.length > OFFLINE_PREFIX.length ? id.slice(OFFLINE_PREFIX.length) : null;
}

function toSession(id, token) {
  // No refreshToken / refreshTokenExpires: the library must never spend a refresh token.
  return new Session({
    id,
    shop: token.shop,
    state: '',
    isOnline: false,
    accessToken: token.accessToken,
    expires: token.expiresAt,
    scope: token.scope ?? undefined,
  });
}

module.exports = { TokenwalSessionStorage };
