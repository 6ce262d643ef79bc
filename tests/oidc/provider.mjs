// A real OpenID provider (node-oidc-provider) for Portcullis' integration tests.
//
// Usage: node provider.mjs [PORT] [ACCESS_TTL_SECS]
//   PORT             port on 127.0.0.1; 0 (the default) lets the kernel pick a free one, which
//                    avoids the race of a port probed free and taken before the bind
//   ACCESS_TTL_SECS  lifetime of access tokens (default 3600); expiry tests use a few seconds
// The same settings can come from the environment: OIDC_PORT, OIDC_ACCESS_TTL, and
// OIDC_DEVICE_INTERVAL (the polling interval the device flow announces, default 1 s; RFC 8628's
// default of 5 s would make every test wait).
//
// Prints `READY <port>` on stdout once it accepts connections, and exits when stdin closes or on
// SIGTERM/SIGINT, so the process never outlives the test that started it. Everything is kept in
// memory; nothing is written to disk.
//
// What it offers (issuer http://127.0.0.1:PORT):
// - accounts alice@, bob@ and carol@example.org (sub = the address). The development login page
//   accepts any non-empty password, but only these login names: others get a 403.
// - client `mail-client`: public (no secret), device code + refresh token grants.
// - client `portcullis`: confidential (client_secret_basic, `portcullis-introspection-secret`),
//   may introspect tokens issued to any client.
// - without a resource indicator the access token is opaque and works at the userinfo endpoint;
//   with resource `urn:portcullis:mail` it is a JWT (ES256, audience urn:portcullis:mail).
// - introspection (as `portcullis`) of an opaque access token returns active, sub, username,
//   email, client_id, exp, iat, iss, scope, token_type; `username` and `email` come from
//   extraTokenClaims, so JWT access tokens carry them too. JWT access tokens are not stored by the
//   provider, so introspecting one says {"active":false}: check them against the JWKS. Refresh
//   tokens introspect as active with sub, client_id, exp, iat, iss, scope (no username/email).
// - expired tokens are refused everywhere at once (clockTolerance 0, see below).
// - the device authorization response carries `interval`, and polling faster than that gets
//   `slow_down` (node-oidc-provider itself does neither), so clients are tested on both.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import * as querystring from 'node:querystring';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.OIDC_PORT ?? 0);
const accessTtl = Number(process.argv[3] ?? process.env.OIDC_ACCESS_TTL ?? 3600);
const deviceInterval = Number(process.env.OIDC_DEVICE_INTERVAL ?? 1);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new Error(`bad port ${process.argv[2]}`);
}
if (!Number.isInteger(accessTtl) || accessTtl <= 0) {
  throw new Error(`bad access token TTL ${process.argv[3]}`);
}

export const MAIL_RESOURCE = 'urn:portcullis:mail';
const ACCOUNTS = new Set(['alice@example.org', 'bob@example.org', 'carol@example.org']);

/** The account's claims; the address is the subject, the login name and the mail address. */
function account(id) {
  if (!ACCOUNTS.has(id)) return undefined;
  return {
    accountId: id,
    async claims() {
      return {
        sub: id, email: id, email_verified: true, preferred_username: id,
      };
    },
  };
}

// A fresh signing key per run: tests read it from the JWKS, so nothing needs to be stable, and no
// private key has to live in the repository.
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwk = {
  ...privateKey.export({ format: 'jwk' }), kid: `test-${randomBytes(4).toString('hex')}`, alg: 'ES256', use: 'sig',
};

// Listen before building the provider: the issuer contains the port, which is only known once
// the kernel picked it.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const actualPort = server.address().port;
const issuer = `http://127.0.0.1:${actualPort}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'mail-client',
      client_name: 'Portcullis test mail client',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token', 'authorization_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
      id_token_signed_response_alg: 'ES256',
    },
    {
      client_id: 'portcullis',
      client_name: 'Portcullis',
      client_secret: 'portcullis-introspection-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
      id_token_signed_response_alg: 'ES256',
    },
  ],
  jwks: { keys: [jwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  findAccount: (ctx, id) => account(id),
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile'],
  // Tokens name their owner, so introspection (and the JWT) show who the token is for without a
  // userinfo round trip.
  async extraTokenClaims(ctx, token) {
    if (!token.accountId) return undefined;
    return { username: token.accountId, email: token.accountId };
  },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    introspection: {
      enabled: true,
      // The proxy (`portcullis`) checks tokens the mail clients got; public clients may only
      // look at their own.
      async allowedPolicy(ctx, client, token) {
        return client.clientAuthMethod !== 'none' || token.clientId === client.clientId;
      },
    },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf,
      // A device code granted for the mail resource yields mail tokens even when the token
      // request does not repeat `resource`.
      useGrantedResource: async () => true,
      async getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== MAIL_RESOURCE) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: 'openid email profile offline_access',
          audience: MAIL_RESOURCE,
          accessTokenTTL: accessTtl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    DeviceCode: 600,
    Grant: 14 * 24 * 3600,
    IdToken: 3600,
    Interaction: 600,
    RefreshToken: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
  },
  // The default 15 s of tolerance would keep an expired access token working at the userinfo
  // endpoint (introspection ignores the tolerance); everything here shares one clock.
  clockTolerance: 0,
  // A refresh token keeps working after use, so a test can refresh twice with the same one.
  rotateRefreshToken: false,
});

/** Reads a request body that a middleware needs before the provider parses it. */
async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

// Unknown login names must not become sessions. The development login page passes any name to
// the provider, which would then loop back to the login prompt; refusing outright makes a typo in
// a test fail loudly. The provider accepts the already-read body from `req.body`.
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
    const raw = await readBody(ctx.req);
    ctx.req.body = raw;
    const form = querystring.parse(raw);
    if (form.prompt === 'login') {
      if (!ACCOUNTS.has(String(form.login)) || !form.password) {
        ctx.status = 403;
        ctx.type = 'html';
        ctx.body = '<!DOCTYPE html><html><body><p class="red">unknown account or empty password</p></body></html>';
        return;
      }
    }
  }
  await next();
});

// RFC 8628 polling: announce an interval and enforce it with `slow_down` (raising the interval
// by 5 s for that device code, as section 3.5 says).
const lastPoll = new Map();
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && ctx.path === '/token') {
    const raw = await readBody(ctx.req);
    ctx.req.body = raw;
    const form = querystring.parse(raw);
    if (form.grant_type === 'urn:ietf:params:oauth:grant-type:device_code' && typeof form.device_code === 'string') {
      const now = Date.now();
      const seen = lastPoll.get(form.device_code);
      const interval = seen ? seen.interval : deviceInterval;
      if (seen && now - seen.at < interval * 1000) {
        lastPoll.set(form.device_code, { at: now, interval: interval + 5 });
        ctx.status = 400;
        ctx.set('cache-control', 'no-store');
        ctx.body = { error: 'slow_down', error_description: 'you are polling too quickly and should back off at a reasonable rate' };
        return;
      }
      lastPoll.set(form.device_code, { at: now, interval });
    }
  }
  await next();
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body && ctx.body.device_code) {
    ctx.body = { ...ctx.body, interval: deviceInterval };
  }
});

// Unexpected server errors go to stderr, where the harness shows them when something fails.
provider.on('server_error', (ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());
process.stdout.write(`READY ${actualPort}\n`);

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
process.stdin.on('end', shutdown);
process.stdin.on('error', shutdown);
process.stdin.resume();
