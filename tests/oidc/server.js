// A real OAuth 2.0 server for tokenwal's integration tests: panva's oidc-provider, configured so that
// every refresh rotates the refresh token, and a reused (already rotated) refresh token revokes the
// whole grant (oidc-provider's built-in reuse detection, see below). Two clients:
//
// - `tokenwal`: confidential (client_secret_basic); a custom grant mints its first token pair without
//   a browser (tests/oidc.rs).
// - `public-client`: a public client (token_endpoint_auth_method none: no secret) that gets its first
//   pair by the authorization code grant with PKCE (S256, required), as a SPA or a headless storefront
//   does (crates/tokenwal-cli/tests/oidc_provider.rs). The login and consent screens are replaced by
//   /interaction/:uid, which logs in the account named by the authorization request's `login_hint`
//   and grants what it asked for, at once: the client still has to follow the redirects with the
//   interaction cookies, and exchange the code with its PKCE verifier.
//
// Usage: node server.js [PORT]; prints "LISTENING <port>" once ready.
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
    {
      client_id: 'public-client',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1:1/callback'],
      token_endpoint_auth_method: 'none',
    },
  ],
  // Rotation on every refresh, for every client (oidc-provider's default rotates only for public
  // clients, or after 70 % of a token's life). Reuse detection is not a setting in oidc-provider
  // 9.x: presenting a refresh token that was already rotated destroys it and revokes its whole grant
  // (every refresh and access token issued under it), answering 400 invalid_grant "refresh token
  // already used" (lib/actions/grants/refresh_token.js, `if (refreshToken.consumed)`).
  rotateRefreshToken: true,
  // PKCE is required for the public client's authorization requests (and S256 is the only method).
  pkce: { required: (ctx, client) => client.clientAuthMethod === 'none' },
  // Every code exchange of a client allowed the refresh_token grant gets a refresh token (the default
  // also wants the offline_access scope, which oidc-provider drops unless prompt=consent).
  async issueRefreshToken(ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  // The public client's access tokens live 3 s, so that its suite rotates every 1.5 s (tokenwal
  // refreshes at half a token's life at the latest) without waiting minutes.
  ttl: {
    AccessToken: (ctx, token, client) => (client && client.clientId === 'public-client' ? 3 : 600),
    AuthorizationCode: 60,
    Interaction: 600,
    Session: 3600,
    Grant: 86400,
    RefreshToken: 86400,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
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

// The login and consent "screens": log in `login_hint` and grant the requested scope.
async function interaction(req, res) {
  try {
    const { params } = await provider.interactionDetails(req, res);
    const accountId = params.login_hint || 'user-1';
    const grant = new provider.Grant({ clientId: params.client_id, accountId });
    grant.addOIDCScope(params.scope);
    const grantId = await grant.save();
    await provider.interactionFinished(
      req,
      res,
      { login: { accountId }, consent: { grantId } },
      { mergeWithLastSubmission: false },
    );
  } catch (err) {
    res.statusCode = 400;
    res.setHeader('content-type', 'text/plain');
    res.end(`interaction failed: ${err.message}`);
  }
}

const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.method === 'GET' && req.url.startsWith('/interaction/')) {
    interaction(req, res);
  } else {
    callback(req, res);
  }
});
process.stdout.write(`LISTENING ${actual}\n`);
