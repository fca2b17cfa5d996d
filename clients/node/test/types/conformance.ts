// Compiled with `tsc --noEmit` by test/types.test.js: the adapter must be assignable to the
// installed packages' SessionStorage (and so usable as shopifyApp({sessionStorage})).
import type { SessionStorage } from '@shopify/shopify-app-session-storage';
import { MemorySessionStorage } from '@shopify/shopify-app-session-storage-memory';
import type { Session } from '@shopify/shopify-api';
import { shopifyApp } from '@shopify/shopify-app-express';
import { ApiVersion } from '@shopify/shopify-api';
import { TokenwalSessionStorage, BrokerClient, UnavailableError, NeedsReauthError } from '../../src/index';

const storage: SessionStorage = new TokenwalSessionStorage({
  brokerOptions: { address: 'unix:/run/tokenwal.sock', token: 'x' },
  inner: new MemorySessionStorage(),
});
const withClient: SessionStorage = new TokenwalSessionStorage({ broker: new BrokerClient({ socketPath: '/tmp/s', token: 'x' }) });

shopifyApp({
  api: { apiVersion: ApiVersion.January25, apiKey: 'k', apiSecretKey: 's', hostName: 'localhost' },
  auth: { path: '/api/auth', callbackPath: '/api/auth/callback' },
  webhooks: { path: '/api/webhooks' },
  sessionStorage: new TokenwalSessionStorage(),
});

async function use(s: SessionStorage): Promise<Session | undefined> {
  try {
    return await s.loadSession('offline_x.myshopify.com');
  } catch (e) {
    if (e instanceof UnavailableError) {
      const wait: number | null = e.retryAfter;
      void wait;
    }
    if (e instanceof NeedsReauthError) {
      const link: string | null = e.reauthUrl;
      void link;
    }
    throw e;
  }
}
void use(storage);
void withClient;
