'use strict';

/**
 * Errors of the tokenwal broker client, typed by what the caller can do about them.
 *
 * No message ever holds a token: messages are built from the broker's `error` code, its
 * `message` (which the broker promises never carries a token) with every secret of the request
 * scrubbed out anyway, and the shop.
 */

/** Base class: every error the client raises. `code` is the broker's error code or a local one. */
class TokenwalError extends Error {
  constructor(message, { code, status, shop, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    /** The broker's `error` code (e.g. `not_installed`) or a local one (`connection`, `timeout`). */
    this.code = code;
    /**
     * The HTTP status of the broker's answer, if there was one. (Not `status`: web frameworks
     * answer with an error's `status`, and a broker's 401 or 400 is not the app's answer.)
     */
    this.brokerStatus = status;
    /** The shop the call was for, if any. */
    this.shop = shop;
  }
}

/** 404 `not_installed`: tokenwal holds no grant for the shop. */
class NotInstalledError extends TokenwalError {}

/**
 * 409 `needs_reauth`: the shop's grant is dead (revoked, uninstalled, refresh token expired…).
 * Only a new install (OAuth or token exchange) brings it back; `reauthUrl` links there when the
 * broker knows the app's handle.
 */
class NeedsReauthError extends TokenwalError {
  constructor(message, opts = {}) {
    super(message, opts);
    /** The grant's state: `needs-reauth`, `uninstalled`, … */
    this.state = opts.state ?? null;
    /** Why, as the broker words it. */
    this.reason = opts.reason ?? null;
    /** Since when (a Date), or null. */
    this.since = opts.since ? new Date(opts.since) : null;
    /** `https://admin.shopify.com/store/{handle}/apps/{app_handle}`, or null. */
    this.reauthUrl = opts.reauthUrl ?? null;
  }
}

/**
 * 503 `unavailable`: transient. The broker is recovering, its store is poisoned, the app's
 * credentials were rejected, or a refresh failed upstream. Try again after `retryAfter` seconds;
 * this never means the shop is gone.
 */
class UnavailableError extends TokenwalError {
  constructor(message, opts = {}) {
    super(message, opts);
    /** For web frameworks (Express answers with an error's `status`): transient, 503. */
    this.status = 503;
    /** `recovering`, `store_poisoned`, `store_unavailable`, `app_credentials_rejected` or `upstream`. */
    this.reason = opts.reason ?? null;
    /** Seconds to wait before trying again (from Retry-After), or null. */
    this.retryAfter = opts.retryAfter ?? null;
  }
}

/** 409 `older_pair`: the broker already holds a newer token pair than the one offered. */
class OlderPairError extends TokenwalError {}

/** 401 `unauthorized`: the broker refused this client's bearer token. A configuration error. */
class BrokerAuthError extends TokenwalError {}

/** 400/413 and other refusals of the request itself (`invalid_shop`, `bad_request`, …). */
class BadRequestError extends TokenwalError {}

/**
 * The broker could not be reached or did not answer in time (`code` is `connection` or
 * `timeout`), or answered something that is not the contract. Transient as far as the shop is
 * concerned.
 */
class BrokerConnectionError extends TokenwalError {
  constructor(message, opts = {}) {
    super(message, opts);
    /** For web frameworks (Express answers with an error's `status`): transient, 503. */
    this.status = 503;
  }
}

module.exports = {
  TokenwalError,
  NotInstalledError,
  NeedsReauthError,
  UnavailableError,
  OlderPairError,
  BrokerAuthError,
  BadRequestError,
  BrokerConnectionError,
};
