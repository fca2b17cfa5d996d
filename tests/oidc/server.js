// A real OAuth 2.0 server for tokenwal's integration tests: panva's oidc-provider, configured so that
// every refresh rotates the refresh token, and a reused (already rotated) refresh token revokes the
// whole grant (oidc-provider's built-in reuse detection). A custom grant mints the first token pair
// without a browser. Usage: node server.js [PORT]; prints "LISTENING <port>" once ready.
import Provider from 'oidc-provider';
import http from 'node:http';

const MINT = 'urn:tokenwal:test:mint';
const port = Number(process.argv[2] || 0);

const server = http.createServer();
await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
const actual = server.address().port;

const provider = new Provider(`http://127.0.0.1:${actual}`, {
  clients: [
    {
      client_id: 'tokenwal',
      client_secret: 'tokenwal-test-secret',
      grant_types: ['refresh_token', MINT],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  rotateRefreshToken: true,
  ttl: { AccessToken: 600, RefreshToken: 86400 },
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
  features: { devInteractions: { enabled: false } },
});
provider.proxy = false;

provider.registerGrantType(
  MINT,
  async (ctx) => {
    const { client } = ctx.oidc;
    const accountId = ctx.oidc.params.account || 'user-1';
    const grant = new provider.Grant({ clientId: client.clientId, accountId });
    grant.addOIDCScope('openid offline_access');
    const grantId = await grant.save();
    const common = { accountId, client, grantId, scope: 'openid offline_access', gty: MINT };
    const at = new provider.AccessToken(common);
    const rt = new provider.RefreshToken(common);
    ctx.body = {
      access_token: await at.save(),
      token_type: 'Bearer',
      expires_in: at.expiration,
      refresh_token: await rt.save(),
      scope: 'openid offline_access',
    };
  },
  ['account'],
);

server.on('request', provider.callback());
process.stdout.write(`LISTENING ${actual}\n`);
