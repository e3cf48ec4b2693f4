// A real OpenID Provider for the OIDC login tests: the npm package oidc-provider on 127.0.0.1.
//
// node oidc_provider.mjs <config.json>; the JSON holds the path of the installed package
// (`module`), the signing keys (`jwks`, private JWKs the test made), the client, and the
// accounts (`accounts`: login -> claims). It prints `listening <issuer>` once ready.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { pathToFileURL } from 'node:url';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { default: Provider } = await import(pathToFileURL(settings.module).href);

const server = createServer();
await new Promise((resolve) => server.listen(settings.port || 0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [settings.client],
  jwks: settings.jwks,
  // Scope claims go into the ID token itself (the proxy sees only that token).
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups', 'offline_access'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true }, // the package's own login and consent pages
    deviceFlow: { enabled: true },
  },
  ttl: { IdToken: settings.id_token_ttl || 3600 },
  async findAccount(ctx, id) {
    const claims = settings.accounts[id];
    if (!claims) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...claims }; } };
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
server.on('request', provider.callback());
console.log(`listening ${issuer}`);
