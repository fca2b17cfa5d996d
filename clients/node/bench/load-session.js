'use strict';

// How long TokenwalSessionStorage.loadSession takes for a cached token: a real `tokenwal serve`
// over its Unix socket, `concurrency` callers in a loop for `seconds`. Prints loads/s, p50, p99.
//
//   TOKENWAL_BIN=target/release/tokenwal TOKENWAL_SIM_BIN=target/release/tokenwal-sim \
//     node clients/node/bench/load-session.js [concurrency=64] [seconds=10]
//
// A measurement, not a test: nothing is asserted.

const { performance } = require('node:perf_hooks');
const { Session } = require('@shopify/shopify-api');
const { Sim, Broker, missing } = require('../test/harness');
const { TokenwalSessionStorage } = require('../src/index');

async function main() {
  const why = missing();
  if (why) throw new Error(why);
  const concurrency = Number(process.argv[2] ?? 64);
  const seconds = Number(process.argv[3] ?? 10);
  const sim = await Sim.start();
  const broker = await new Broker({ simUrl: sim.url, logLevel: 'warn' }).start();
  const storage = new TokenwalSessionStorage({ brokerOptions: broker.clientOptions() });
  const shop = 'bench.myshopify.com';
  const t = await sim.seedShop(shop);
  await storage.storeSession(
    new Session({ id: `offline_${shop}`, shop, state: '', isOnline: false, accessToken: t.access_token, refreshToken: t.refresh_token, expires: new Date(Date.now() + t.expires_in * 1000), scope: t.scope }),
  );
  for (let i = 0; i < 1000; i++) await storage.loadSession(`offline_${shop}`); // warm the pool and the cache
  const lat = [];
  const end = performance.now() + seconds * 1000;
  const worker = async () => {
    while (performance.now() < end) {
      const t0 = performance.now();
      const s = await storage.loadSession(`offline_${shop}`);
      lat.push(performance.now() - t0);
      if (!s) throw new Error('no session');
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: concurrency }, worker));
  const elapsed = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(3);
  console.log(`loadSession over unix socket: concurrency ${concurrency}, ${lat.length} loads in ${elapsed.toFixed(1)} s = ${Math.round(lat.length / elapsed)} loads/s; p50 ${q(0.5)} ms, p99 ${q(0.99)} ms`);
  storage.broker.close();
  await broker.stop();
  await sim.stop();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
