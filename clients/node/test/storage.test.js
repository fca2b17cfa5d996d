'use strict';

// Unit tests of the SessionStorage adapter's routing and error policy, against a scripted fake
// broker (the real broker is in e2e.test.js).

const test = require('node:test');
const assert = require('node:assert/strict');
const { Session } = require('@shopify/shopify-api');
const { MemorySessionStorage } = require('@shopify/shopify-app-session-storage-memory');
const { fakeBroker, tokenBody } = require('./fake-broker');
const { TokenwalSessionStorage, UnavailableError } = require('../src/index');

const SHOP = 'unit.myshopify.com';
const OFFLINE = `offline_${SHOP}`;

async function setup(t, handler) {
  const fake = await fakeBroker(handler);
  const inner = new MemorySessionStorage();
  const storage = new TokenwalSessionStorage({ brokerOptions: { socketPath: fake.socketPath, token: 'b' }, inner });
  t.after(async () => {
    storage.broker.close();
    await fake.close();
  });
  return { fake, inner, storage };
}

test('loadSession(offline) is the broker token with expiry and scope and no refresh token', async (t) => {
  const { storage } = await setup(t, () => [200, tokenBody(SHOP, 'shpat_fresh', 3000)]);
  const s = await storage.loadSession(OFFLINE);
  assert.ok(s instanceof Session);
  assert.equal(s.id, OFFLINE);
  assert.equal(s.shop, SHOP);
  assert.equal(s.isOnline, false);
  assert.equal(s.accessToken, 'shpat_fresh');
  assert.equal(s.scope, 'read_products');
  assert.ok(s.expires instanceof Date);
  assert.equal(s.refreshToken, undefined);
  assert.equal(s.refreshTokenExpires, undefined);
  // Inside the library's own 5-minute refresh window it would be "expired": the broker never serves such a token.
  assert.equal(s.isExpired(5 * 60 * 1000), false);
});

test('dead or unknown grants load as undefined; unavailable throws (never looks like an uninstall)', async (t) => {
  const script = [
    [404, { error: 'not_installed', message: 'x' }],
    [409, { error: 'needs_reauth', message: 'x', state: 'uninstalled', reason: 'x', since: '2026-12-06T20:00:00Z', reauth_url: null }],
    [503, { error: 'unavailable', message: 'x', reason: 'upstream', retry_after: 1 }, { 'retry-after': '1' }],
  ];
  let i = 0;
  const { storage } = await setup(t, () => script[i++]);
  assert.equal(await storage.loadSession(OFFLINE), undefined);
  assert.equal(await storage.loadSession(OFFLINE), undefined);
  await assert.rejects(storage.loadSession(OFFLINE), UnavailableError);
});

test('storeSession(offline) installs the pair; an older pair resolves true without overwriting', async (t) => {
  let answer = [200, { installed: true }];
  const { storage, fake, inner } = await setup(t, () => answer);
  const expires = new Date(Date.now() + 3_600_000);
  const session = new Session({ id: OFFLINE, shop: SHOP, state: 's', isOnline: false, accessToken: 'shpat_a', refreshToken: 'shprt_a', expires, refreshTokenExpires: new Date(Date.now() + 86_400_000), scope: 'read_products' });
  assert.equal(await storage.storeSession(session), true);
  const put = fake.requests[0];
  assert.equal(put.method, 'PUT');
  assert.equal(put.body.access_token, 'shpat_a');
  assert.equal(put.body.refresh_token, 'shprt_a');
  assert.equal(put.body.expires_at, expires.toISOString().replace(/\.\d{3}Z$/, 'Z'));
  assert.ok(put.body.refresh_token_expires_at);
  answer = [409, { error: 'older_pair', message: 'a newer pair is held' }];
  assert.equal(await storage.storeSession(session), true);
  assert.equal(await inner.loadSession(OFFLINE), undefined, 'offline sessions never reach the inner storage');
});

test('storeSession of an offline session without a refresh token: a no-op for the served token, an error otherwise', async (t) => {
  const { storage, fake } = await setup(t, () => [200, tokenBody(SHOP, 'shpat_served')]);
  const mk = (token) => new Session({ id: OFFLINE, shop: SHOP, state: '', isOnline: false, accessToken: token });
  assert.equal(await storage.storeSession(mk('shpat_served')), true);
  await assert.rejects(storage.storeSession(mk('shpat_legacy_nonexpiring')), /expiring offline tokens only/);
  assert.ok(fake.requests.every((r) => r.method === 'GET'), 'nothing was installed');
  const noExpiry = new Session({ id: OFFLINE, shop: SHOP, state: '', isOnline: false, accessToken: 'a', refreshToken: 'r' });
  await assert.rejects(storage.storeSession(noExpiry), /no expiry/);
});

test('online sessions go to the inner storage; findSessionsByShop merges; deletes route by id', async (t) => {
  const { storage, fake, inner } = await setup(t, (r) => (r.url.endsWith('/uninstall') ? [200, { uninstalled: true }] : [200, tokenBody(SHOP, 'shpat_fresh')]));
  const online = new Session({ id: `${SHOP}_42`, shop: SHOP, state: 's', isOnline: true, accessToken: 'online_tok' });
  assert.equal(await storage.storeSession(online), true);
  assert.equal(fake.requests.length, 0, 'the broker never sees online sessions');
  assert.equal((await storage.loadSession(online.id)).accessToken, 'online_tok');
  const found = await storage.findSessionsByShop(SHOP);
  assert.deepEqual(found.map((s) => s.id).sort(), [online.id, OFFLINE].sort());
  assert.equal(await storage.deleteSessions([online.id, OFFLINE]), true);
  assert.equal(await inner.loadSession(online.id), undefined);
  const un = fake.requests.filter((r) => r.url.endsWith('/uninstall'));
  assert.equal(un.length, 1);
  assert.equal(un[0].url, `/v1/shops/${SHOP}/uninstall`);
  assert.equal(await storage.deleteSession(OFFLINE), true);
  assert.equal(fake.requests.filter((r) => r.url.endsWith('/uninstall')).length, 2);
});

test('without an inner storage, storing an online session is a clear error', async (t) => {
  const fake = await fakeBroker(() => [500, {}]);
  t.after(() => fake.close());
  const storage = new TokenwalSessionStorage({ brokerOptions: { socketPath: fake.socketPath, token: 'b' } });
  t.after(() => storage.broker.close());
  const online = new Session({ id: `${SHOP}_42`, shop: SHOP, state: 's', isOnline: true, accessToken: 'x' });
  await assert.rejects(storage.storeSession(online), /no inner storage/);
  assert.equal(await storage.loadSession(online.id), undefined);
});
