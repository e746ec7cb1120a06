// A real OAuth 2.0 / OpenID Connect authorization server (oidc-provider) used as
// a test peer by grantkeeper's integration and end-to-end tests.
//
// Start:   node server.mjs
// Env:     OIDC_PORT         TCP port on 127.0.0.1; 0 (default) picks a free one.
//          OIDC_ACCESS_TTL   access token lifetime in seconds (default 20).
//          OIDC_REFRESH_TTL  refresh token (and grant) lifetime in seconds (default 86400).
//          OIDC_CLIENTS      JSON list of {client_id, client_secret, token_endpoint_auth_method,
//                            redirect_uris?}; default: one client "gk-test" with a random
//                            secret that is printed nowhere.
// Output:  exactly one line of JSON on stdout once listening: {"issuer": "...", "port": N}.
//          Everything else (oidc-provider notices and warnings) goes to stderr, so stdout
//          never fills up even if the parent stops reading it.
// Stop:    SIGTERM or SIGINT -> closes the listener and all connections, exits 0.
//
// Besides the OAuth endpoints it serves, before the provider, two test-only endpoints:
//   GET  /__test__/stats        -> counters (see `stats` below for exact semantics)
//   POST /__test__/reset-stats  -> zeroes them
//
// Written against oidc-provider 9.13.3 (pinned exactly in package.json); the counter
// derivations below quote that version's source, re-check them when bumping it.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

// oidc-provider prints its NOTICEs with console.info (stdout). stdout is the protocol
// channel to the parent process, so send all console output except our one line to stderr.
console.info = console.error;
console.log = console.error;

const { default: Provider, errors } = await import('oidc-provider');

const DEFAULT_REDIRECT_URI = 'http://127.0.0.1/cb';
const TEST_PREFIX = '/__test__/';

function intFromEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function clientsFromEnv() {
  const raw = process.env.OIDC_CLIENTS;
  const specs = raw
    ? JSON.parse(raw)
    : [{
      client_id: 'gk-test',
      client_secret: randomBytes(24).toString('base64url'),
      token_endpoint_auth_method: 'client_secret_basic',
    }];
  if (!Array.isArray(specs) || specs.length === 0) {
    throw new Error('OIDC_CLIENTS must be a non-empty JSON list');
  }
  return specs.map((spec) => ({
    client_id: spec.client_id,
    client_secret: spec.client_secret,
    token_endpoint_auth_method: spec.token_endpoint_auth_method ?? 'client_secret_basic',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: spec.redirect_uris ?? [DEFAULT_REDIRECT_URI],
    id_token_signed_response_alg: 'ES256',
  }));
}

// ---------------------------------------------------------------------------------------
// Storage adapter: an unbounded Map with per-entry expiry.
//
// oidc-provider's bundled MemoryAdapter is an LRU capped at 1000 entries (two generations),
// so in a long e2e run with many accounts live refresh tokens and grants would silently be
// evicted and later refreshes would fail with invalid_grant "refresh token not found".
// This adapter keeps everything until it expires; a sweep drops expired entries.
// ---------------------------------------------------------------------------------------
const store = new Map(); // key -> { value, expiresAt (ms epoch) | undefined }
const grantMembers = new Map(); // grantId -> Set of keys of tokens/codes of that grant
const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);

function storeGet(key) {
  const entry = store.get(key);
  if (entry === undefined) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.value;
}

function storeSet(key, value, expiresIn) {
  const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
  store.set(key, { value, expiresAt });
}

function forgetGrantMember(key, payload) {
  if (!payload?.grantId) return;
  const members = grantMembers.get(payload.grantId);
  if (members === undefined) return;
  members.delete(key);
  if (members.size === 0) grantMembers.delete(payload.grantId);
}

const sweep = setInterval(() => {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt !== undefined && entry.expiresAt <= now) {
      store.delete(key);
      forgetGrantMember(key, entry.value);
    }
  }
}, 30_000);
sweep.unref();

class MapAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    forgetGrantMember(key, storeGet(key));
    if (this.model === 'Session' && payload.uid) {
      storeSet(`sessionUid:${payload.uid}`, id, expiresIn);
    }
    if (payload.userCode) {
      storeSet(`userCode:${payload.userCode}`, id, expiresIn);
    }
    if (GRANTABLE.has(this.model) && payload.grantId) {
      let members = grantMembers.get(payload.grantId);
      if (members === undefined) {
        members = new Set();
        grantMembers.set(payload.grantId, members);
      }
      members.add(key);
    }
    storeSet(key, payload, expiresIn);
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    const id = storeGet(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = storeGet(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload === undefined) return;
    if (payload.consumed && this.model === 'RefreshToken') {
      // Only reachable if two requests with the same refresh token interleave between
      // the grant's `consumed` check and this call. With this in-memory adapter the
      // refresh handler runs that stretch without yielding to I/O, so it never happens
      // today; should it, behave like the built-in reuse detection instead of letting
      // both requests succeed: revoke the whole grant and fail with the same error.
      await this.revokeByGrantId(payload.grantId);
      store.delete(`Grant:${payload.grantId}`);
      provider.emit('grant.revoked', Provider.ctx, payload.grantId);
      throw new errors.InvalidGrant('refresh token already used');
    }
    payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    const key = this.key(id);
    forgetGrantMember(key, storeGet(key));
    store.delete(key);
  }

  async revokeByGrantId(grantId) {
    const members = grantMembers.get(grantId);
    if (members === undefined) return;
    for (const key of members) store.delete(key);
    grantMembers.delete(grantId);
  }
}

// ---------------------------------------------------------------------------------------
// Counters. Exact semantics:
//
// token_requests         every HTTP POST to the token endpoint path (/token), counted by the
//                        HTTP dispatcher before the provider sees it, whatever the grant type
//                        or outcome (malformed requests and client-auth failures included).
// refresh_grants_ok      `grant.success` events (emitted after the grant handler produced a
//                        token response) whose ctx.oidc.params.grant_type is refresh_token.
// refresh_grants_failed  token endpoint error responses for grant_type=refresh_token:
//                        `grant.error` events (any OAuth error: invalid_client, invalid_grant,
//                        invalid_request, ...) plus `server_error` events on the token route
//                        (oidc-provider emits server_error *instead of* grant.error for 5xx).
//                        Requests whose body could not be parsed (no grant_type known) are not
//                        counted here, but are in token_requests.
// reuse_detections       subset of refresh_grants_failed: the refresh token grant found the
//                        presented refresh token already consumed (rotated away). oidc-provider
//                        then destroys that token, revokes the whole grant (all its access and
//                        refresh tokens) and throws InvalidGrant with error_detail exactly
//                        'refresh token already used' (lib/actions/grants/refresh_token.js);
//                        we match that error_detail. Note that the consumed token is destroyed
//                        by the detection, so presenting it yet again is "refresh token not
//                        found" (a plain failure, not a second detection), and a consumed token
//                        of a grant that was already revoked is also just "not found".
// revocations            tokens actually destroyed by the revocation endpoint: the
//                        `access_token.destroyed` / `refresh_token.destroyed` model events
//                        emitted while the current request's route (Provider.ctx.oidc.route)
//                        is 'revocation'. Revoking an unknown, expired or already revoked token
//                        answers 200 but counts nothing. Either kind of token revoked there
//                        also revokes every other token of its grant (lib/helpers/revoke.js
//                        calls revokeByGrantId for all token models: revoking an access token
//                        kills the refresh token too); those are not counted here. The Grant
//                        record is destroyed as well (-> grants_revoked) for a refresh token,
//                        not for an access token (default revokeGrantPolicy).
// code_grants_ok         `grant.success` events for grant_type=authorization_code (extra).
// grants_revoked         `grant.revoked` events, any cause: revocation endpoint, reuse
//                        detection, authorization code replay (extra).
// ---------------------------------------------------------------------------------------
const COUNTERS = [
  'token_requests', 'refresh_grants_ok', 'refresh_grants_failed', 'reuse_detections',
  'revocations', 'code_grants_ok', 'grants_revoked',
];
const stats = {};
function resetStats() {
  for (const name of COUNTERS) stats[name] = 0;
}
resetStats();

function grantTypeOf(ctx) {
  try {
    return ctx.oidc?.params?.grant_type;
  } catch {
    return undefined;
  }
}

function onTokenError(ctx, err) {
  if (grantTypeOf(ctx) !== 'refresh_token') return;
  stats.refresh_grants_failed += 1;
  if (err?.error === 'invalid_grant' && err?.error_detail === 'refresh token already used') {
    stats.reuse_detections += 1;
  }
}

function onTokenDestroyed() {
  if (Provider.ctx?.oidc?.route === 'revocation') stats.revocations += 1;
}

// ---------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------
const port = intFromEnv('OIDC_PORT', 0);
const accessTtl = intFromEnv('OIDC_ACCESS_TTL', 20);
const refreshTtl = intFromEnv('OIDC_REFRESH_TTL', 86_400);
const clients = clientsFromEnv();

let handler = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
const server = createServer((req, res) => handler(req, res));
server.keepAliveTimeout = 5_000;

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', () => {
    server.off('error', reject);
    resolve();
  });
});

const actualPort = server.address().port;
const issuer = `http://127.0.0.1:${actualPort}`;

const signingKey = generateKeyPairSync('ec', { namedCurve: 'P-256' })
  .privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  adapter: MapAdapter,
  clients,
  jwks: { keys: [{ ...signingKey, kid: 'peer-es256', use: 'sig', alg: 'ES256' }] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  async findAccount(_ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id };
      },
    };
  },
  features: {
    devInteractions: { enabled: true },
    revocation: {
      enabled: true,
      // Same rule as the library default, minus its "you SHOULD change this" notice.
      allowedPolicy(_ctx, client, token) {
        return token.clientId === client.clientId;
      },
    },
    introspection: {
      enabled: true,
      // Any registered (confidential) client may introspect any token.
      allowedPolicy() {
        return true;
      },
    },
  },
  scopes: ['openid', 'offline_access'],
  // Rotate on every use. Reuse detection is built into the refresh_token grant: presenting
  // a consumed refresh token destroys it and revokes the whole grant (see counters above).
  rotateRefreshToken: true,
  // offline_access survives in the authorization request only with prompt=consent (and a
  // client allowed the refresh_token grant); the devInteractions consent form then adds it
  // to the Grant. A refresh token is issued exactly when the granted scope has it.
  issueRefreshToken(_ctx, client, code) {
    return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
  },
  // PKCE: verified whenever the client sends code_challenge; never mandatory for these
  // confidential clients (it would be for public ones, which we do not register).
  pkce: {
    required(_ctx, client) {
      return client.clientAuthMethod === 'none';
    },
  },
  ttl: {
    AccessToken: accessTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: refreshTtl,
    Grant: refreshTtl,
    Session: refreshTtl,
    Interaction: 3600,
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

provider.on('grant.success', (ctx) => {
  const grantType = grantTypeOf(ctx);
  if (grantType === 'refresh_token') stats.refresh_grants_ok += 1;
  else if (grantType === 'authorization_code') stats.code_grants_ok += 1;
});
provider.on('grant.error', onTokenError);
provider.on('server_error', (ctx, err) => {
  if (ctx?.oidc?.route === 'token') onTokenError(ctx, err);
  console.error('oidc-peer server_error:', err);
});
provider.on('grant.revoked', () => {
  stats.grants_revoked += 1;
});
provider.on('access_token.destroyed', onTokenDestroyed);
provider.on('refresh_token.destroyed', onTokenDestroyed);

const providerCallback = provider.callback();

function sendJson(res, status, body) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
    'cache-control': 'no-store',
  });
  res.end(payload);
}

function testEndpoint(req, res, pathname) {
  if (pathname === `${TEST_PREFIX}stats` && req.method === 'GET') {
    sendJson(res, 200, stats);
  } else if (pathname === `${TEST_PREFIX}reset-stats` && req.method === 'POST') {
    resetStats();
    sendJson(res, 200, stats);
  } else {
    sendJson(res, 404, { error: 'not_found' });
  }
  req.resume();
}

handler = (req, res) => {
  const pathname = new URL(req.url, issuer).pathname;
  if (pathname.startsWith(TEST_PREFIX)) {
    testEndpoint(req, res, pathname);
    return;
  }
  if (req.method === 'POST' && pathname === '/token') stats.token_requests += 1;
  providerCallback(req, res);
};

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.error(`oidc-peer: ${signal} received, shutting down`);
  clearInterval(sweep);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2_000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

process.stdout.write(`${JSON.stringify({ issuer, port: actualPort })}\n`);
