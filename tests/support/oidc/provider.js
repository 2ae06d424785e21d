// A real OpenID provider for tests/test_console_oidc.py: the `oidc-provider` package (pinned in package-lock.json,
// installed by `scripts/dev.sh install`), in memory, on 127.0.0.1:PORT.
//   node provider.js PORT JWKS_FILE CLIENT_SECRET
// JWKS_FILE holds the signing keys (private JWKs, made by the test so it can also sign tokens the provider's key
// signs: expired ones, for example). One confidential client, `sidecar-console`, whose redirect URIs are any
// loopback console callback (the sidecars under test get a new port each). The dev login form takes any password;
// the accounts: `operator` (groups: platform), `viewer` (groups: readers), `nobody` (no group).
import fs from 'node:fs';
import Provider from 'oidc-provider';

const [port, jwksFile, secret] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const accounts = {
  operator: { email: 'op@example.test', groups: ['platform'] },
  viewer: { email: 'viewer@example.test', groups: ['readers'] },
  nobody: { email: 'nobody@example.test', groups: [] },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'sidecar-console',
    client_secret: secret,
    redirect_uris: ['http://127.0.0.1/console/oidc/callback'],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: JSON.parse(fs.readFileSync(jwksFile, 'utf8')),
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  scopes: ['openid', 'email', 'groups'],
  pkce: { methods: ['S256'], required: () => true }, // a client that sends no challenge is refused
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['test-only-cookie-key'] },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() { return { sub: id, email: account.email, email_verified: true, groups: account.groups }; },
    };
  },
  // No consent screen: the console is a first-party client.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid email groups');
    await grant.save();
    return grant;
  },
});

// Any loopback port: the sidecar under test listens on a free port chosen at its start.
const loopback = /^http:\/\/127\.0\.0\.1:\d+\/console\/oidc\/callback$/;
provider.Client.prototype.redirectUriAllowed = function redirectUriAllowed(value) { return loopback.test(value); };

provider.listen(Number(port), '127.0.0.1', () => { console.log(`listening ${issuer}`); });
