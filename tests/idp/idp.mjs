// A test OpenID provider for Glastonbury's end-to-end tests: `node idp.mjs PORT`.
// Clients: `backend` (client_credentials, private_key_jwt with the fixture JWKS) and `console`
// (authorization code + PKCE, client_secret_basic). Access tokens are JWTs for the resource
// given in AUDIENCE (or for any other resource the request names), carrying `roles`.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const audience = process.env.AUDIENCE ?? 'https://glastonbury.test';
const role = process.env.ROLE ?? 'clinician';
const consoleRedirect = process.env.CONSOLE_REDIRECT ?? 'http://127.0.0.1:1/console/callback';
const fixtureJwks = JSON.parse(
  readFileSync(new URL('../fixtures/backend-services/jwks.json', import.meta.url)),
);

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'backend',
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'ES384',
      jwks: fixtureJwks,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: 'system/*.rs',
    },
    {
      client_id: 'console',
      client_secret: 'console-test-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: [consoleRedirect],
      scope: 'openid profile',
    },
  ],
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: 'system/*.rs',
        audience: resourceIndicator,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  scopes: ['openid', 'profile', 'system/*.rs'],
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384', 'PS256'],
  },
  extraTokenClaims: () => ({
    roles: [role],
    ...(process.env.PURPOSE ? { purpose_of_use: process.env.PURPOSE } : {}),
  }),
  claims: { openid: ['sub'], profile: ['name', 'roles'] },
  conformIdTokenClaims: false,
  findAccount: (ctx, id) => ({
    accountId: id,
    claims: () => ({ sub: id, name: id, roles: [role] }),
  }),
  pkce: { required: () => true },
});
provider.proxy = false;
provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
