'use strict';

/**
 * A small client of the tokenwal broker (`tokenwal serve`, API v1): HTTP/1.1 over a Unix
 * socket (node:http with `socketPath`) or loopback TCP, a bearer token on every request,
 * a deadline on every call, typed errors.
 */

const http = require('node:http');
const util = require('node:util');
const {
  TokenwalError,
  NotInstalledError,
  NeedsReauthError,
  UnavailableError,
  OlderPairError,
  BrokerAuthError,
  BadRequestError,
  BrokerConnectionError,
} = require('./errors');

const ENV_TOKEN = 'TOKENWAL_BROKER_TOKEN';
const ENV_ADDRESS = 'TOKENWAL_BROKER_ADDRESS';
const DEFAULT_TIMEOUT_MS = 15_000;
/** Answers larger than this are not the contract: refused instead of buffered without bound. */
const MAX_ANSWER_BYTES = 1 << 20;
const REDACTED = '[redacted]';

/**
 * A fresh access token as the broker hands it out. The token itself is reachable only through
 * `accessToken`; `util.inspect`, `console.log` and `JSON.stringify` show it redacted.
 */
class BrokerToken {
  #accessToken;

  constructor(body) {
    this.#accessToken = body.access_token;
    /** The shop domain, `x.myshopify.com`. */
    this.shop = body.shop;
    /** When the access token expires. */
    this.expiresAt = new Date(body.expires_at);
    /** Whole seconds of life it had when the broker answered. */
    this.expiresIn = body.expires_in;
    /** Granted scopes (comma-separated), or null. */
    this.scope = body.scope ?? null;
  }

  /** The access token, for the `X-Shopify-Access-Token` header. */
  get accessToken() {
    return this.#accessToken;
  }

  toJSON() {
    return { shop: this.shop, access_token: REDACTED, expires_at: this.expiresAt.toISOString(), expires_in: this.expiresIn, scope: this.scope };
  }

  [util.inspect.custom](depth, options, inspect) {
    return `BrokerToken ${inspect({ shop: this.shop, accessToken: REDACTED, expiresAt: this.expiresAt, expiresIn: this.expiresIn, scope: this.scope }, options)}`;
  }
}

/**
 * Where the broker listens, from `socketPath`, `url` or `address` (the CLI's `--listen`
 * syntax: `unix:/path` or `tcp:127.0.0.1:8080`).
 */
function parseTarget({ socketPath, url, address }) {
  if (socketPath) return { socketPath };
  if (url) {
    const u = new URL(url);
    if (u.protocol !== 'http:') throw new TypeError(`tokenwal broker url must be http:// on loopback, got ${u.protocol}`);
    return loopback(u.hostname.replace(/^\[|\]$/g, ''), Number(u.port || 80));
  }
  if (address) {
    if (address.startsWith('unix:')) return { socketPath: address.slice('unix:'.length) };
    if (address.startsWith('tcp:')) {
      const u = new URL(`http://${address.slice('tcp:'.length)}`);
      return loopback(u.hostname.replace(/^\[|\]$/g, ''), Number(u.port));
    }
    throw new TypeError(`tokenwal broker address must be unix:PATH or tcp:HOST:PORT, got ${JSON.stringify(address)}`);
  }
  throw new TypeError(`no tokenwal broker address: pass socketPath, url or address, or set ${ENV_ADDRESS}`);
}

/** The bearer token travels in clear over TCP: loopback only, as the broker itself insists. */
function loopback(host, port) {
  const ok = host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
  if (!ok) throw new TypeError(`tokenwal broker must be on loopback (the bearer token is sent in clear), got host ${host}`);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new TypeError(`tokenwal broker port is invalid: ${port}`);
  return { host, port };
}

/** Replaces every secret of the request that a text might echo. */
function scrub(text, secrets) {
  let out = String(text ?? '');
  for (const s of secrets) if (s && s.length >= 4) out = out.split(s).join(REDACTED);
  return out;
}

/** Seconds from a Retry-After header (seconds or an HTTP date), else the body's `retry_after`. */
function retryAfterSeconds(header, body) {
  if (header !== undefined) {
    const n = Number(header);
    if (Number.isFinite(n) && n >= 0) return n;
    const at = Date.parse(header);
    if (Number.isFinite(at)) return Math.max(0, Math.ceil((at - Date.now()) / 1000));
  }
  const b = body && Number(body.retry_after);
  return Number.isFinite(b) && b >= 0 ? b : null;
}

/** The typed error for a non-2xx answer. */
function answerError(status, headers, body, shop, secrets) {
  const code = body && typeof body.error === 'string' ? body.error : `http_${status}`;
  const said = body && body.message ? `: ${scrub(body.message, secrets)}` : '';
  const where = shop ? ` for ${shop}` : '';
  const opts = { code, status, shop };
  switch (true) {
    case status === 401:
      return new BrokerAuthError(`tokenwal broker refused the bearer token (401 ${code})${said}`, opts);
    case status === 404 && code === 'not_installed':
      return new NotInstalledError(`tokenwal holds no grant${where}${said}`, opts);
    case status === 409 && code === 'needs_reauth':
      return new NeedsReauthError(`grant${where} needs re-authorization (${body.state ?? 'unknown state'})${said}`, {
        ...opts,
        state: body.state,
        reason: body.reason,
        since: body.since,
        reauthUrl: body.reauth_url,
      });
    case status === 409 && code === 'older_pair':
      return new OlderPairError(`tokenwal already holds a newer token pair${where}${said}`, opts);
    case status === 503: {
      const retryAfter = retryAfterSeconds(headers['retry-after'], body);
      const reason = (body && body.reason) || null;
      return new UnavailableError(
        `tokenwal broker unavailable${where} (${reason ?? 'no reason given'}; retry after ${retryAfter ?? '?'} s)${said}`,
        { ...opts, reason, retryAfter },
      );
    }
    case status >= 400 && status < 500:
      return new BadRequestError(`tokenwal broker refused the request${where} (${status} ${code})${said}`, opts);
    default:
      return new TokenwalError(`tokenwal broker failed${where} (${status} ${code})${said}`, opts);
  }
}

class BrokerClient {
  #token;
  #target;
  #agent;
  #timeoutMs;

  /**
   * @param {object} [options]
   * @param {string} [options.socketPath] the broker's Unix socket
   * @param {string} [options.url] `http://127.0.0.1:PORT` (loopback only)
   * @param {string} [options.address] `unix:/path` or `tcp:127.0.0.1:PORT`; default `$TOKENWAL_BROKER_ADDRESS`
   * @param {string} [options.token] bearer token; default `$TOKENWAL_BROKER_TOKEN`
   * @param {number} [options.timeoutMs] deadline of one call, default 15 s (above the broker's
   *   own 10 s wait for a refresh in flight)
   * @param {number} [options.maxSockets] connection pool size, default 64
   */
  constructor(options = {}) {
    const address = options.address ?? process.env[ENV_ADDRESS];
    this.#target = parseTarget({ socketPath: options.socketPath, url: options.url, address });
    const token = options.token ?? process.env[ENV_TOKEN];
    if (!token) throw new TypeError(`no tokenwal broker token: pass options.token or set ${ENV_TOKEN}`);
    this.#token = token;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#agent = new http.Agent({ keepAlive: true, maxSockets: options.maxSockets ?? 64 });
  }

  /** A fresh access token (refreshed by the broker first if due). */
  async getToken(shop) {
    return new BrokerToken(await this.#call('GET', `/v1/shops/${enc(shop)}/token`, undefined, shop));
  }

  /** Reports a 401 the app saw with `accessToken`; answers the newer token. */
  async reportUnauthorized(shop, accessToken) {
    const body = await this.#call('POST', `/v1/shops/${enc(shop)}/unauthorized`, { access_token: accessToken }, shop, [accessToken]);
    return new BrokerToken(body);
  }

  /**
   * Installs a token pair (OAuth callback, front-end token exchange). Resolves `{installed: true}`;
   * rejects with OlderPairError when the broker holds a newer pair.
   * @param {string} shop
   * @param {{accessToken: string, refreshToken: string, expiresAt?: Date, expiresIn?: number,
   *   refreshTokenExpiresAt?: Date, refreshTokenExpiresIn?: number, scope?: string}} grant
   */
  async installGrant(shop, grant) {
    const body = { access_token: grant.accessToken, refresh_token: grant.refreshToken };
    if (grant.expiresAt !== undefined) body.expires_at = iso(grant.expiresAt);
    else if (grant.expiresIn !== undefined) body.expires_in = grant.expiresIn;
    if (grant.refreshTokenExpiresAt !== undefined) body.refresh_token_expires_at = iso(grant.refreshTokenExpiresAt);
    else if (grant.refreshTokenExpiresIn !== undefined) body.refresh_token_expires_in = grant.refreshTokenExpiresIn;
    if (grant.scope !== undefined && grant.scope !== null) body.scope = grant.scope;
    return this.#call('PUT', `/v1/shops/${enc(shop)}/grant`, body, shop, [grant.accessToken, grant.refreshToken]);
  }

  /** Exchanges an App Bridge session token through the broker's journal; answers the new token. */
  async tokenExchange(shop, sessionToken) {
    const body = await this.#call('POST', `/v1/shops/${enc(shop)}/token-exchange`, { session_token: sessionToken }, shop, [sessionToken]);
    return new BrokerToken(body);
  }

  /** Uninstalls (idempotent). `triggeredAt`: the webhook's time (default: now). Resolves `{uninstalled}`. */
  async uninstall(shop, triggeredAt) {
    const body = triggeredAt === undefined ? {} : { triggered_at: iso(triggeredAt) };
    return this.#call('POST', `/v1/shops/${enc(shop)}/uninstall`, body, shop);
  }

  /** Grants in `state` (default `needs-reauth`), with their re-auth links. */
  async grants(state = 'needs-reauth') {
    const body = await this.#call('GET', `/v1/grants?state=${encodeURIComponent(state)}`);
    return body.grants;
  }

  /** `{status: "alive"}`. */
  async healthz() {
    return this.#call('GET', '/healthz');
  }

  /** `{ready: true}`, or rejects with UnavailableError (reason `recovering` / `store_poisoned`). */
  async readyz() {
    return this.#call('GET', '/readyz');
  }

  /** Closes idle pooled connections. */
  close() {
    this.#agent.destroy();
  }

  [util.inspect.custom]() {
    const where = this.#target.socketPath ? `unix:${this.#target.socketPath}` : `tcp:${this.#target.host}:${this.#target.port}`;
    return `BrokerClient { ${where}, token: ${REDACTED} }`;
  }

  toJSON() {
    return { broker: this.#target.socketPath ?? `${this.#target.host}:${this.#target.port}`, token: REDACTED };
  }

  #call(method, path, body, shop, secrets = []) {
    secrets = [this.#token, ...secrets];
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers = { authorization: `Bearer ${this.#token}`, accept: 'application/json' };
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (err, value) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(value);
      };
      const req = http.request({ ...this.#target, method, path, headers, agent: this.#agent });
      const timer = setTimeout(() => {
        finish(new BrokerConnectionError(`tokenwal broker did not answer ${method} ${redactPath(path)} within ${this.#timeoutMs} ms`, { code: 'timeout', shop }));
        req.destroy();
      }, this.#timeoutMs);
      req.on('error', (e) => {
        finish(new BrokerConnectionError(`cannot reach the tokenwal broker (${e.code ?? 'error'}): ${scrub(e.message, secrets)}`, { code: 'connection', shop }));
      });
      req.on('response', (res) => {
        const chunks = [];
        let size = 0;
        res.on('data', (c) => {
          size += c.length;
          if (size > MAX_ANSWER_BYTES) {
            finish(new BrokerConnectionError(`tokenwal broker answer over ${MAX_ANSWER_BYTES} bytes`, { code: 'bad_answer', status: res.statusCode, shop }));
            req.destroy();
          } else chunks.push(c);
        });
        res.on('error', (e) => finish(new BrokerConnectionError(`tokenwal broker answer cut (${e.code ?? 'error'})`, { code: 'connection', shop })));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed;
          try {
            parsed = text === '' ? {} : JSON.parse(text);
          } catch {
            parsed = undefined;
          }
          const status = res.statusCode;
          if (status >= 200 && status < 300) {
            if (parsed === undefined || typeof parsed !== 'object' || parsed === null) {
              finish(new BrokerConnectionError(`tokenwal broker answered ${status} without a JSON object`, { code: 'bad_answer', status, shop }));
            } else finish(null, parsed);
          } else {
            finish(answerError(status, res.headers, parsed && typeof parsed === 'object' ? parsed : null, shop, secrets));
          }
        });
      });
      req.end(payload);
    });
  }
}

function enc(shop) {
  if (typeof shop !== 'string' || shop === '') throw new TypeError('shop must be a non-empty string');
  return encodeURIComponent(shop);
}

function iso(d) {
  const date = d instanceof Date ? d : new Date(d);
  if (Number.isNaN(date.getTime())) throw new TypeError('invalid date');
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** Paths carry shops, never tokens; the query string is dropped anyway. */
function redactPath(path) {
  return path.split('?')[0];
}

module.exports = { BrokerClient, BrokerToken, ENV_TOKEN, ENV_ADDRESS };
