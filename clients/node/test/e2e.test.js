'use strict';

// End to end: Shopify's real libraries (@shopify/shopify-api through @shopify/shopify-app-express)
// with TokenwalSessionStorage as their session storage, a real `tokenwal serve` process, and the
// tokenwal simulator standing in for Shopify (token endpoint and Admin API). See harness.js for
// how the processes are found.

const test = require('node:test');
const assert = require('node:assert/strict');
const express = require('express');
const { shopifyApp } = require('@shopify/shopify-app-express');
const { ApiVersion, LogSeverity } = require('@shopify/shopify-api');
// The CommonJS build, the one @shopify/shopify-app-express loads: its runtime hooks are the ones
// the library's clients read.
const { setAbstractFetchFunc } = require('@shopify/shopify-api/runtime');
const { MemorySessionStorage } = require('@shopify/shopify-app-session-storage-memory');
const { Session } = require('@shopify/shopify-api');
const { Sim, Broker, missing, untilAvailable, CLIENT_ID, CLIENT_SECRET } = require('./harness');
const { TokenwalSessionStorage, BrokerClient, NeedsReauthError, BrokerConnectionError } = require('../src/index');

const skip = missing();
if (skip) {
  // Loud, and the Rust wrapper (crates/tokenwal-cli/tests/node_adapter.rs) never lets this happen.
  console.error(`SKIPPED end-to-end tests: ${skip}`);
}

const SCOPES = ['write_products', 'read_orders'];

let sim;
/** Every access and refresh token the tests saw: none may appear in a broker log line. */
const secrets = new Set();

test.before(async () => {
  if (skip) return;
  sim = await Sim.start();
  // Shopify's library has no setting for the Admin API's base URL: it always builds
  // https://{shop}/admin/api/{version}/graphql.json. Its runtime fetch hook (the same hook its
  // own node/web/cf-worker adapters install) is the supported seam, so the test swaps in a fetch
  // that sends *.myshopify.com requests to the simulator's path-routed Admin API and leaves the
  // library's code path (client, headers, error handling) untouched.
  setAbstractFetchFunc((input, init) => {
    const url = typeof input === 'string' || input instanceof URL ? new URL(input) : null;
    if (url && url.hostname.endsWith('.myshopify.com')) return fetch(sim.rewrite(url), init);
    return fetch(input, init);
  });
});

test.after(async () => {
  if (sim) await sim.stop();
});

/**
 * A Shopify Express app (embedded, offline tokens) whose session storage is tokenwal, served on
 * loopback. `GET /app?shop=…&host=…` runs the library's ensureInstalledOnShop(): it loads the
 * offline session from storage and checks the token with an Admin API GraphQL call
 * (`{ shop { name } }`): a working token redirects into the Shopify admin; no session (or a
 * rejected token) redirects to OAuth.
 */
async function startApp(t, broker) {
  const storage = new TokenwalSessionStorage({ brokerOptions: broker.clientOptions(), inner: new MemorySessionStorage() });
  const shopify = shopifyApp({
    api: {
      apiKey: CLIENT_ID,
      apiSecretKey: CLIENT_SECRET,
      scopes: SCOPES,
      hostName: 'app.example.com',
      hostScheme: 'https',
      apiVersion: ApiVersion.January25,
      isEmbeddedApp: true,
      logger: { level: LogSeverity.Error },
    },
    auth: { path: '/api/auth', callbackPath: '/api/auth/callback' },
    webhooks: { path: '/api/webhooks' },
    sessionStorage: storage,
  });
  const app = express();
  app.get('/app', shopify.ensureInstalledOnShop(), (_req, res) => res.send('app'));
  const server = await new Promise((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => resolve(s));
  });
  t.after(async () => {
    storage.broker.close();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });
  const base = `http://127.0.0.1:${server.address().port}`;
  return {
    shopify,
    storage,
    /** The library's request path for `shop`: `{status, location}`. */
    async open(shop) {
      const host = Buffer.from(`admin.shopify.com/store/${shop.split('.')[0]}`).toString('base64url');
      const res = await fetch(`${base}/app?shop=${shop}&host=${host}`, { redirect: 'manual', headers: { 'user-agent': BROWSER } });
      await res.arrayBuffer();
      return { status: res.status, location: res.headers.get('location') ?? '' };
    },
    /** The offline session as the library loads it. */
    load(shop) {
      return shopify.config.sessionStorage.loadSession(shopify.api.session.getOfflineId(shop));
    },
  };
}

async function startBroker(t, config = {}) {
  const broker = await new Broker({ simUrl: sim.url, config }).start();
  t.after(() => {
    if (process.env.TOKENWAL_E2E_LOG) console.error(`broker log (${t.name}):\n${broker.log.join('\n')}`);
    for (const line of broker.log) {
      for (const s of secrets) assert.ok(!line.includes(s), `a token appears in the broker's log: ${line.replace(s, '<the token>')}`);
    }
    return broker.stop();
  });
  return broker;
}

/**
 * Seeds `shop` in the simulator and installs its pair through the library's storage, as an OAuth
 * callback would (storeSession of the offline session). `claimedLifeMs` is the expiry the app
 * tells tokenwal (default: the real one): a negative one makes the shop due at once.
 */
async function install(app, shop, claimedLifeMs = undefined, { hold = false, revoked = false } = {}) {
  const t = await sim.seedShop(shop);
  // Revoked on Shopify's side before tokenwal gets the pair: whoever refreshes first (a load or the
  // broker's scheduler) is refused.
  if (revoked) await sim.revoke(shop);
  // Armed before tokenwal knows the shop, so the first refresh is held whoever starts it (a load,
  // or the broker's own scheduler as soon as the due pair is installed).
  if (hold) await sim.hold(shop);
  secrets.add(t.access_token);
  secrets.add(t.refresh_token);
  const session = new Session({
    id: app.shopify.api.session.getOfflineId(shop),
    shop,
    state: 'installed',
    isOnline: false,
    accessToken: t.access_token,
    refreshToken: t.refresh_token,
    expires: new Date(Date.now() + (claimedLifeMs ?? t.expires_in * 1000)),
    refreshTokenExpires: new Date(Date.now() + t.refresh_token_expires_in * 1000),
    scope: t.scope,
  });
  assert.equal(await app.shopify.config.sessionStorage.storeSession(session), true);
  return t;
}

// The library answers bots (isbot matches node's own fetch) with 410: the app is opened as a browser.
const BROWSER = 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36';
const EMBEDDED = /^https:\/\/admin\.shopify\.com\/store\//;
const OAUTH = /\/admin\/oauth\/authorize\?/;

test('the library loads the offline session and calls the Admin API with a valid token across 12 rotations', { skip: skip ?? false }, async (t) => {
  const shop = 'rotations.myshopify.com';
  // Short lifetimes, so 12 rotations take seconds: tokens live 4 s and the broker's margin is 1 s.
  // (With Shopify's 1-hour tokens the default 5-minute margin applies; the engine never refreshes
  // before half a token's life, so a lifetime under twice the margin would not rotate at the margin.)
  const margin = 1000;
  const broker = await startBroker(t, { refresh_margin: '1s' });
  const app = await startApp(t, broker);
  const { access_ttl_ms: ttl } = await sim.config();
  await sim.patchConfig({ access_ttl_ms: 4000 });
  t.after(() => sim.patchConfig({ access_ttl_ms: ttl }));
  await install(app, shop);
  const seen = new Set();
  const before = await sim.counters(shop);
  for (let i = 0; i < 12; i++) {
    // The library's path: load through storage, GraphQL `{ shop { name } }` with the token.
    const opened = await app.open(shop);
    assert.equal(opened.status, 302);
    assert.match(opened.location, EMBEDDED, `round ${i}: the library did not accept the token (${opened.location})`);
    const session = await app.load(shop);
    secrets.add(session.accessToken);
    assert.equal(session.refreshToken, undefined, 'the library is never handed a refresh token');
    // expires_at has whole seconds: up to 1 s earlier than the broker's own figure.
    assert.ok(session.expires.getTime() - Date.now() > margin - 1000, 'served with more than the margin left');
    assert.equal(session.isExpired(), false);
    seen.add(session.accessToken);
    // Wait until this token is inside the margin: the next load must rotate.
    const due = session.expires.getTime() - margin - Date.now();
    assert.ok(due < 10_000, `round ${i}: the token is not due for ${due} ms (the short lifetime did not apply)`);
    await new Promise((r) => setTimeout(r, Math.max(0, due) + 150));
  }
  const after = await sim.counters(shop);
  const rotations = after.rotations - (before.rotations ?? 0);
  assert.ok(rotations >= 10, `only ${rotations} rotations`);
  assert.ok(seen.size >= 11, `only ${seen.size} distinct access tokens`);
  assert.equal((after.admin_unauthorized ?? 0) - (before.admin_unauthorized ?? 0), 0, 'the Admin API never saw a dead token');
  assert.ok(after.admin_ok - (before.admin_ok ?? 0) >= 12);
  assert.equal(after.rejections && Object.keys(after.rejections).length, 0, 'no refresh was rejected');
});

test('50 concurrent loads of a due shop cause exactly one refresh', { skip: skip ?? false }, async (t) => {
  const shop = 'concurrent.myshopify.com';
  const broker = await startBroker(t);
  const app = await startApp(t, broker);
  // tokenwal is told the token expired a minute ago: due now. The refresh is held
  // on the wire until all 50 loads are waiting, so they are concurrent with it by construction.
  const before = await sim.counters(shop);
  const seeded = await install(app, shop, -60_000, { hold: true });
  const loads = Promise.all(Array.from({ length: 50 }, () => app.load(shop)));
  await sim.waitHeld(shop);
  await new Promise((r) => setTimeout(r, 200)); // let the last of the 50 requests reach the broker
  await sim.release(shop);
  const sessions = await loads;
  const after = await sim.counters(shop);
  assert.equal(after.rotations - (before.rotations ?? 0), 1, 'exactly one refresh');
  assert.equal(after.token_requests - (before.token_requests ?? 0), 1, 'exactly one token request');
  const tokens = new Set(sessions.map((s) => s.accessToken));
  assert.equal(tokens.size, 1, 'every caller got the same fresh token');
  const [fresh] = tokens;
  secrets.add(fresh);
  assert.notEqual(fresh, seeded.access_token);
  const opened = await app.open(shop);
  assert.match(opened.location, EMBEDDED);
});

test('loads while a due (still valid) token is being refreshed wait for that refresh: no 503, one refresh', { skip: skip ?? false }, async (t) => {
  // The everyday case: the broker's scheduler refreshes the shop at expiry minus the margin, and
  // the app's requests keep coming meanwhile. Short lifetimes (4 s, margin 1 s) make it due soon.
  const shop = 'due.myshopify.com';
  const broker = await startBroker(t, { refresh_margin: '1s' });
  const app = await startApp(t, broker);
  const { access_ttl_ms: ttl } = await sim.config();
  await sim.patchConfig({ access_ttl_ms: 4000 });
  t.after(() => sim.patchConfig({ access_ttl_ms: ttl }));
  const before = await sim.counters(shop);
  const seeded = await install(app, shop, undefined, { hold: true });
  await sim.waitHeld(shop); // the due refresh is on the wire; the old token has about a second left
  const loads = Promise.all(Array.from({ length: 50 }, () => app.load(shop)));
  await new Promise((r) => setTimeout(r, 300));
  await sim.release(shop);
  const sessions = await loads;
  const after = await sim.counters(shop);
  assert.equal(after.rotations - (before.rotations ?? 0), 1, 'exactly one refresh');
  const tokens = new Set(sessions.map((s) => s.accessToken));
  assert.equal(tokens.size, 1);
  const [fresh] = tokens;
  secrets.add(fresh);
  assert.notEqual(fresh, seeded.access_token, 'nobody was handed the token inside the margin');
});

test('the broker killed with kill -9 mid-refresh and restarted: no lockout, the next load succeeds', { skip: skip ?? false }, async (t) => {
  const shop = 'killed.myshopify.com';
  const broker = await startBroker(t);
  const app = await startApp(t, broker);
  const before = await sim.counters(shop);
  await install(app, shop, -60_000, { hold: true });
  const pending = app.load(shop).then(
    (s) => ({ s }),
    (e) => ({ e }),
  );
  await sim.waitHeld(shop); // the refresh is on the wire; Shopify has already rotated
  await broker.kill9();
  const outcome = await pending;
  assert.ok(outcome.e instanceof BrokerConnectionError, `a dead broker must throw, not look like "no session": ${outcome.e ?? 'resolved'}`);
  await sim.release(shop); // the answer goes nowhere: the broker is gone

  await broker.start({ ready: false });
  // While recovery runs the broker answers 503 "recovering": the storage throws, the test waits.
  const session = await untilAvailable(() => app.load(shop));
  assert.ok(session, 'the grant survived: not a lockout');
  secrets.add(session.accessToken);
  const opened = await app.open(shop);
  assert.equal(opened.status, 302);
  assert.match(opened.location, EMBEDDED, 'the library accepts the recovered token');
  const c = await sim.counters(shop);
  const d = (k) => (c[k] ?? 0) - (before[k] ?? 0);
  assert.equal(d('rotations'), 1, 'Shopify rotated once: the held answer was lost with the broker');
  assert.ok(d('replays') >= 1, 'recovery retried the old refresh token and got the committed pair back');
  assert.equal(d('family_revocations'), 0);
  assert.equal(d('admin_unauthorized'), 0);
});

test('a dead grant is the library\'s "no session" path (redirect to OAuth), not a 500', { skip: skip ?? false }, async (t) => {
  const shop = 'dead.myshopify.com';
  const broker = await startBroker(t);
  const app = await startApp(t, broker);
  // The merchant uninstalled on Shopify's side; tokenwal is told the token expired, so the next
  // load refreshes, and the refresh is refused.
  await install(app, shop, -60_000, { revoked: true });
  const opened = await app.open(shop);
  assert.equal(opened.status, 302, `expected a redirect to OAuth, got ${opened.status}`);
  assert.match(opened.location, OAUTH);
  assert.ok(opened.location.startsWith(`https://${shop}/`), opened.location);
  assert.equal(await app.load(shop), undefined);
  const client = new BrokerClient(broker.clientOptions());
  t.after(() => client.close());
  const e = await client.getToken(shop).catch((e) => e);
  assert.ok(e instanceof NeedsReauthError, `${e}`);
  const listed = await client.grants('needs-reauth');
  assert.ok(listed.some((g) => g.shop === shop), JSON.stringify(listed));
  // A shop tokenwal never heard of is the same "no session" path.
  const unknown = await app.open('never-installed.myshopify.com');
  assert.equal(unknown.status, 302);
  assert.match(unknown.location, OAUTH);
});

test('a late store of an older pair keeps the newer one; uninstall through deleteSessions; a reinstall works', { skip: skip ?? false }, async (t) => {
  const shop = 'lifecycle.myshopify.com';
  const broker = await startBroker(t);
  const app = await startApp(t, broker);
  const storage = app.shopify.config.sessionStorage;
  const first = await install(app, shop, -60_000); // due: the next load rotates
  const rotated = await app.load(shop);
  secrets.add(rotated.accessToken);
  assert.notEqual(rotated.accessToken, first.access_token);
  // An install racing the refresh arrives late with the pair the refresh just replaced.
  const late = new Session({
    id: `offline_${shop}`,
    shop,
    state: '',
    isOnline: false,
    accessToken: first.access_token,
    refreshToken: first.refresh_token,
    expires: new Date(Date.now() - 60_000),
    scope: first.scope,
  });
  assert.equal(await storage.storeSession(late), true, 'older_pair resolves true');
  assert.equal((await app.load(shop)).accessToken, rotated.accessToken, 'the newer pair is kept');
  // The library's own round trip of a loaded session (no refresh token) changes nothing.
  assert.equal(await storage.storeSession(rotated), true);
  // app/uninstalled: the library deletes every session of the shop it finds.
  const found = await storage.findSessionsByShop(shop);
  assert.deepEqual(found.map((s) => s.id), [`offline_${shop}`]);
  assert.equal(await storage.deleteSessions(found.map((s) => s.id)), true);
  assert.equal(await app.load(shop), undefined);
  assert.match((await app.open(shop)).location, OAUTH);
  assert.deepEqual(await storage.findSessionsByShop(shop), []);
  // The merchant comes back: OAuth ends in storeSession with a new pair.
  await install(app, shop);
  const back = await app.load(shop);
  secrets.add(back.accessToken);
  assert.match((await app.open(shop)).location, EMBEDDED);
});
