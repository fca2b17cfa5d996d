'use strict';

/**
 * Real parts for the end-to-end tests: the tokenwal simulator (as Shopify) and `tokenwal serve`
 * processes.
 *
 * * The simulator: `TOKENWAL_SIM_URL` (one already running: crates/tokenwal-cli/tests/node_adapter.rs
 *   starts it in the Rust test process and passes its URL), else `TOKENWAL_SIM_BIN` (the
 *   `tokenwal-sim` binary, spawned here).
 * * The broker: `TOKENWAL_BIN` (the `tokenwal` binary), spawned per test on a fresh store, with
 *   a random store key and a random bearer token, listening on a Unix socket in a temp dir.
 *
 * Without these variables the end-to-end tests skip with a message (node --test alone, for
 * the unit tests); the Rust wrapper always sets them.
 */

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const CLIENT_ID = 'sim-client-id';
const CLIENT_SECRET = 'sim-client-secret';

/** Why the end-to-end tests cannot run here, or null. */
function missing() {
  if (!process.env.TOKENWAL_BIN) return 'TOKENWAL_BIN (the tokenwal binary) is not set';
  if (!process.env.TOKENWAL_SIM_URL && !process.env.TOKENWAL_SIM_BIN) return 'neither TOKENWAL_SIM_URL nor TOKENWAL_SIM_BIN is set';
  return null;
}

const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** Waits for a line matching `re` on `stream`; rejects after `ms`. Every line goes to `sink`. */
function waitLine(child, stream, re, ms, sink) {
  // After the match the stream keeps being read (and logged to `sink`) so the child never blocks on a full pipe.
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: stream });
    const timer = setTimeout(() => reject(new Error(`no line matching ${re} within ${ms} ms; saw:\n${sink.join('\n')}`)), ms);
    let found = false;
    rl.on('line', (line) => {
      sink.push(line);
      const m = !found && line.match(re);
      if (m) {
        found = true;
        clearTimeout(timer);
        resolve(m);
      }
    });
    // The stream ends when the process exits (or closes it): every line has been read by then.
    rl.on('close', () => {
      if (!found) {
        clearTimeout(timer);
        const how = child.exitCode ?? child.signalCode ?? 'closed its output';
        reject(new Error(`process exited (${how}) before printing ${re}:\n${sink.join('\n')}`));
      }
    });
  });
}

class Sim {
  constructor(url, child) {
    this.url = url.replace(/\/$/, '');
    this.child = child;
  }

  static async start() {
    if (process.env.TOKENWAL_SIM_URL) return new Sim(process.env.TOKENWAL_SIM_URL, null);
    const child = spawn(process.env.TOKENWAL_SIM_BIN, ['--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.add(child);
    const [url] = await waitLine(child, child.stdout, /^http:\/\/\S+$/, 20_000, []);
    return new Sim(url, child);
  }

  async call(method, p, body) {
    const res = await fetch(`${this.url}/_sim${p}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`simulator ${method} ${p}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : {};
  }

  /** A shop with a fresh token pair, as if by token exchange: `{access_token, refresh_token, expires_in, …}`. */
  seedShop(shop) {
    return this.call('POST', '/shops', { shop });
  }

  async counters(shop) {
    const all = await this.call('GET', '/counters');
    return (all.shops && all.shops[shop]) || {};
  }

  patchConfig(patch) {
    return this.call('PATCH', '/config', patch);
  }

  config() {
    return this.call('GET', '/config');
  }

  hold(shop) {
    return this.call('POST', `/shops/${shop}/hold`);
  }

  waitHeld(shop, timeoutMs = 20_000) {
    return this.call('POST', `/shops/${shop}/hold/wait`, { timeout_ms: timeoutMs });
  }

  release(shop) {
    return this.call('POST', `/shops/${shop}/hold/release`);
  }

  revoke(shop) {
    return this.call('POST', `/shops/${shop}/uninstall`);
  }

  /**
   * Where Shopify's library would send `https://{shop}/…`: the simulator's path-routed copy of
   * the Admin API, `{sim}/shops/{shop}/…`.
   */
  rewrite(url) {
    const u = new URL(url);
    return `${this.url}/shops/${u.hostname}${u.pathname}${u.search}`;
  }

  async stop() {
    if (this.child) {
      this.child.kill('SIGKILL');
      children.delete(this.child);
    }
  }
}

/** A `tokenwal serve` process on its own store; restartable on the same store. */
class Broker {
  constructor(opts = {}) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenwal-node-'));
    this.db = path.join(this.dir, 'store');
    this.socket = path.join(this.dir, 'broker.sock');
    this.token = crypto.randomBytes(24).toString('base64url');
    this.storeKey = crypto.randomBytes(32).toString('base64');
    this.config = path.join(this.dir, 'config.json');
    this.logLevel = opts.logLevel ?? 'debug';
    fs.writeFileSync(this.config, JSON.stringify({ insecure_test_endpoint: opts.simUrl, ...(opts.config || {}) }), { mode: 0o600 });
    /** Every stderr line of every run, for the no-secret-in-logs check. */
    this.log = [];
    this.child = null;
  }

  /**
   * Starts the broker and waits for `listening on unix:…`; with `ready`, also until `/readyz` says
   * recovery is over (the broker answers 503 "recovering" until then).
   */
  async start({ ready = true } = {}) {
    const env = {};
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('TOKENWAL_') && k !== 'RUST_LOG') env[k] = v;
    Object.assign(env, {
      TOKENWAL_STORE_KEY: this.storeKey,
      TOKENWAL_CLIENT_ID: CLIENT_ID,
      TOKENWAL_CLIENT_SECRET: CLIENT_SECRET,
      TOKENWAL_BROKER_TOKEN: this.token,
      RUST_LOG: this.logLevel,
    });
    const args = ['--db', this.db, '--config', this.config, 'serve', '--listen', `unix:${this.socket}`];
    const child = spawn(process.env.TOKENWAL_BIN, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    children.add(child);
    child.once('exit', () => children.delete(child));
    this.child = child;
    await waitLine(child, child.stderr, /listening on unix:/, 30_000, this.log);
    if (ready) {
      const { BrokerClient } = require('../src/index');
      const c = new BrokerClient(this.clientOptions());
      try {
        await untilAvailable(() => c.readyz());
      } finally {
        c.close();
      }
    }
    return this;
  }

  /** kill -9, and wait until it is gone. */
  async kill9() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
  }

  async stop() {
    await this.kill9();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  clientOptions() {
    return { socketPath: this.socket, token: this.token };
  }
}

/** Retries `fn` while it throws an UnavailableError (e.g. "recovering"), at most `ms`. */
async function untilAvailable(fn, ms = 20_000) {
  const { UnavailableError } = require('../src/index');
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof UnavailableError) || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, Math.min(1000, Math.max(50, (e.retryAfter ?? 0.1) * 1000))));
    }
  }
}

module.exports = { Sim, Broker, missing, untilAvailable, CLIENT_ID, CLIENT_SECRET };
