'use strict';

// Unit tests of the broker client against a scripted fake broker (the real one is in e2e.test.js).

const test = require('node:test');
const assert = require('node:assert/strict');
const util = require('node:util');
const { fakeBroker, tokenBody } = require('./fake-broker');
const {
  BrokerClient,
  NotInstalledError,
  NeedsReauthError,
  UnavailableError,
  OlderPairError,
  BrokerAuthError,
  BadRequestError,
  BrokerConnectionError,
} = require('../src/index');

const SHOP = 'unit.myshopify.com';
const BEARER = 'bearer-secret-1234';
const ACCESS = 'shpat_access_secret_5678';

test('getToken sends the bearer token and answers a BrokerToken that never prints its token', async (t) => {
  const fake = await fakeBroker(() => [200, tokenBody(SHOP, ACCESS)]);
  t.after(() => fake.close());
  const c = new BrokerClient({ socketPath: fake.socketPath, token: BEARER });
  t.after(() => c.close());
  const tok = await c.getToken(SHOP);
  assert.equal(tok.accessToken, ACCESS);
  assert.equal(tok.shop, SHOP);
  assert.ok(tok.expiresAt instanceof Date && tok.expiresAt > new Date());
  assert.equal(tok.scope, 'read_products');
  assert.equal(fake.requests[0].method, 'GET');
  assert.equal(fake.requests[0].url, `/v1/shops/${SHOP}/token`);
  assert.equal(fake.requests[0].headers.authorization, `Bearer ${BEARER}`);
  for (const shown of [util.inspect(tok), JSON.stringify(tok), `${tok}`, util.inspect(c), JSON.stringify(c)]) {
    assert.ok(!shown.includes(ACCESS) && !shown.includes(BEARER), `secret shown in ${shown}`);
  }
});

test('answers map to typed errors that carry no secret', async (t) => {
  const script = [
    [404, { error: 'not_installed', message: 'no grant' }],
    [409, { error: 'needs_reauth', message: 'dead', state: 'needs-reauth', reason: 'invalid_grant', since: '2026-12-06T20:00:00Z', reauth_url: 'https://admin.shopify.com/store/unit/apps/app' }],
    [503, { error: 'unavailable', message: 'recovering', reason: 'recovering', retry_after: 2 }, { 'retry-after': '3' }],
    [401, { error: 'unauthorized', message: `bad token ${BEARER}` }],
    [400, { error: 'invalid_shop', message: 'must end in .myshopify.com' }],
    [500, 'not json'],
  ];
  let i = 0;
  const fake = await fakeBroker(() => script[i++]);
  t.after(() => fake.close());
  const c = new BrokerClient({ socketPath: fake.socketPath, token: BEARER });
  t.after(() => c.close());
  const expect = [NotInstalledError, NeedsReauthError, UnavailableError, BrokerAuthError, BadRequestError, Error];
  const errs = [];
  for (const E of expect) {
    const e = await c.getToken(SHOP).then(() => assert.fail('resolved'), (e) => e);
    assert.ok(e instanceof E, `${e.name} is not ${E.name}`);
    errs.push(e);
  }
  assert.equal(errs[1].state, 'needs-reauth');
  assert.equal(errs[1].reauthUrl, 'https://admin.shopify.com/store/unit/apps/app');
  assert.deepEqual(errs[1].since, new Date('2026-12-06T20:00:00Z'));
  assert.equal(errs[2].reason, 'recovering');
  assert.equal(errs[2].retryAfter, 3, 'the Retry-After header wins over the body');
  assert.equal(errs[4].code, 'invalid_shop');
  assert.match(errs[4].message, /must end in \.myshopify\.com/);
  assert.equal(errs[5].brokerStatus, 500);
  assert.equal(errs[3].status, undefined, "a broker 401 must not become the app's answer");
  assert.equal(errs[2].status, 503);
  for (const e of errs) {
    const shown = `${e.message} ${util.inspect(e)}`;
    assert.ok(!shown.includes(BEARER), `bearer token in ${shown}`);
  }
});

test('installGrant sends the contract body; older_pair is an OlderPairError; secrets stay out of errors', async (t) => {
  const fake = await fakeBroker((r) =>
    r.body.refresh_token === 'old-refresh-secret' ? [409, { error: 'older_pair', message: `older than shpat_x (you sent old-refresh-secret)` }] : [200, { installed: true }],
  );
  t.after(() => fake.close());
  const c = new BrokerClient({ socketPath: fake.socketPath, token: BEARER });
  t.after(() => c.close());
  const expires = new Date('2026-12-06T21:00:00.123Z');
  assert.deepEqual(await c.installGrant(SHOP, { accessToken: ACCESS, refreshToken: 'new-refresh', expiresAt: expires, refreshTokenExpiresIn: 7776000, scope: 'a,b' }), { installed: true });
  assert.equal(fake.requests[0].method, 'PUT');
  assert.equal(fake.requests[0].url, `/v1/shops/${SHOP}/grant`);
  assert.deepEqual(fake.requests[0].body, {
    access_token: ACCESS,
    refresh_token: 'new-refresh',
    expires_at: '2026-12-06T21:00:00Z',
    refresh_token_expires_in: 7776000,
    scope: 'a,b',
  });
  const e = await c.installGrant(SHOP, { accessToken: ACCESS, refreshToken: 'old-refresh-secret', expiresIn: 60 }).catch((e) => e);
  assert.ok(e instanceof OlderPairError);
  assert.ok(!e.message.includes('old-refresh-secret'), e.message);
});

test('a broker that does not answer in time is a BrokerConnectionError(timeout); a missing socket is connection', async (t) => {
  const fake = await fakeBroker(() => 'hang');
  t.after(() => fake.close());
  const c = new BrokerClient({ socketPath: fake.socketPath, token: BEARER, timeoutMs: 200 });
  t.after(() => c.close());
  const e = await c.getToken(SHOP).catch((e) => e);
  assert.ok(e instanceof BrokerConnectionError);
  assert.equal(e.code, 'timeout');
  const gone = new BrokerClient({ socketPath: '/nonexistent/tokenwal.sock', token: BEARER });
  const e2 = await gone.getToken(SHOP).catch((e) => e);
  assert.ok(e2 instanceof BrokerConnectionError);
  assert.equal(e2.code, 'connection');
  assert.ok(!util.inspect(e2).includes(BEARER));
});

test('configuration errors are clear: no token, no address, non-loopback TCP', () => {
  const saved = { ...process.env };
  delete process.env.TOKENWAL_BROKER_TOKEN;
  delete process.env.TOKENWAL_BROKER_ADDRESS;
  try {
    assert.throws(() => new BrokerClient({ socketPath: '/x' }), /no tokenwal broker token/);
    assert.throws(() => new BrokerClient({ token: 't' }), /no tokenwal broker address/);
    assert.throws(() => new BrokerClient({ url: 'http://10.0.0.5:8080', token: 't' }), /must be on loopback/);
    assert.throws(() => new BrokerClient({ address: 'tcp:example.com:80', token: 't' }), /must be on loopback/);
    assert.throws(() => new BrokerClient({ address: 'udp:1', token: 't' }), /unix:PATH or tcp:HOST:PORT/);
    process.env.TOKENWAL_BROKER_TOKEN = 'from-env';
    process.env.TOKENWAL_BROKER_ADDRESS = 'tcp:127.0.0.1:9';
    assert.doesNotThrow(() => new BrokerClient());
  } finally {
    process.env = saved;
  }
});
