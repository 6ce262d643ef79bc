// Runs the OAuth 2.0 Device Authorization Grant (RFC 8628) against an issuer the way a real
// device and a real person do, and prints the token response JSON on stdout.
//
// Usage: node device_flow.mjs ISSUER USERNAME PASSWORD [RESOURCE]
//
// The device asks for a code and polls the token endpoint (honouring `interval` and `slow_down`)
// while, at the same time, the person opens the verification page in a "browser" (cookies kept,
// redirects followed, the provider's HTML forms submitted with their hidden xsrf fields), enters
// the user code, confirms it, logs in and consents. Only Node's built-in fetch is used.
//
// Exits 1 with a message on stderr when any step fails, e.g. an unknown user or a bad resource.

const [issuer, username, password, resource] = process.argv.slice(2);
if (!issuer || !username || password === undefined) {
  console.error('usage: node device_flow.mjs ISSUER USERNAME PASSWORD [RESOURCE]');
  process.exit(2);
}

const CLIENT_ID = 'mail-client';
const SCOPE = 'openid email profile offline_access';
// Long enough for a slow CI machine, short enough that a broken flow fails the test quickly.
const DEADLINE = Date.now() + 60_000;

function fail(message) {
  console.error(`device_flow: ${message}`);
  process.exit(1);
}

async function getJson(url) {
  const res = await fetch(url);
  if (!res.ok) fail(`GET ${url}: ${res.status} ${await res.text()}`);
  return res.json();
}

async function postForm(url, fields) {
  return fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(fields).toString(),
  });
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/** A minimal browser: one cookie jar, manual redirects, HTML forms. */
class Browser {
  constructor() {
    this.cookies = new Map();
  }

  cookieHeader() {
    return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }

  remember(res) {
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const expired = attrs.some((a) => /^\s*expires=Thu, 01 Jan 1970/i.test(a))
        || attrs.some((a) => /^\s*max-age=0\s*$/i.test(a));
      if (expired || value === '') this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
  }

  /** Sends one request and follows redirects with GET; returns the final URL, status and body. */
  async request(url, init = {}) {
    let current = new URL(url);
    let options = init;
    for (let hops = 0; hops < 20; hops += 1) {
      const res = await fetch(current, {
        ...options,
        redirect: 'manual',
        headers: { ...(options.headers || {}), cookie: this.cookieHeader() },
      });
      this.remember(res);
      const location = res.headers.get('location');
      if (res.status >= 300 && res.status < 400 && location) {
        await res.arrayBuffer();
        current = new URL(location, current);
        options = {};
        continue;
      }
      return { url: current, status: res.status, body: await res.text() };
    }
    return fail(`too many redirects at ${current}`);
  }

  /** Submits `form` (from parseForms) with `values` filling its visible fields. */
  async submit(page, form, values) {
    const fields = { ...form.fields };
    for (const name of Object.keys(fields)) {
      if (name in values) fields[name] = values[name];
    }
    const action = new URL(form.action || page.url, page.url);
    return this.request(action, {
      method: (form.method || 'GET').toUpperCase(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(fields).toString(),
    });
  }
}

function attr(tag, name) {
  const m = tag.match(new RegExp(`\\s${name}\\s*=\\s*("([^"]*)"|'([^']*)'|([^\\s>]+))`, 'i'));
  if (!m) return undefined;
  return decodeEntities(m[2] ?? m[3] ?? m[4]);
}

function decodeEntities(s) {
  return s.replace(/&(#x[0-9a-f]+|#\d+|amp|lt|gt|quot|apos|#39);/gi, (all, e) => {
    const k = e.toLowerCase();
    if (k === 'amp') return '&';
    if (k === 'lt') return '<';
    if (k === 'gt') return '>';
    if (k === 'quot') return '"';
    if (k === 'apos' || k === '#39') return "'";
    if (k.startsWith('#x')) return String.fromCodePoint(parseInt(k.slice(2), 16));
    return String.fromCodePoint(parseInt(k.slice(1), 10));
  });
}

/** The forms of a page: action, method and every named input with its value. */
function parseForms(html) {
  const forms = [];
  const re = /<form\b([^>]*)>([\s\S]*?)<\/form>/gi;
  let m;
  while ((m = re.exec(html))) {
    const fields = {};
    for (const input of m[2].match(/<input\b[^>]*>/gi) || []) {
      const name = attr(input, 'name');
      if (name) fields[name] = attr(input, 'value') ?? '';
    }
    forms.push({
      id: attr(`<form ${m[1]}>`, 'id'),
      action: attr(`<form ${m[1]}>`, 'action'),
      method: attr(`<form ${m[1]}>`, 'method'),
      fields,
    });
  }
  return forms;
}

/** The person at the browser: from the verification page to "Sign-in Success". */
async function person(verificationUri, userCode) {
  const browser = new Browser();
  let page = await browser.request(verificationUri);
  for (let step = 0; step < 10; step += 1) {
    if (page.status >= 400) fail(`${page.url} answered ${page.status}: ${page.body}`);
    if (/Sign-in Success/.test(page.body)) return;
    if (/class="red"/.test(page.body)) fail(`${page.url} reported an error: ${page.body}`);
    const forms = parseForms(page.body);
    if (forms.length === 0) fail(`no form on ${page.url}: ${page.body}`);
    const [form] = forms;
    // The user code page, its confirmation page, the login page and the consent page each have
    // one form; the values below only fill the fields a page actually has.
    page = await browser.submit(page, form, { user_code: userCode, login: username, password });
  }
  fail(`device flow did not finish, last page ${page.url}: ${page.body}`);
}

/** The device: polls the token endpoint until the person is done. */
async function device(tokenEndpoint, deviceCode, startInterval) {
  let interval = startInterval;
  for (;;) {
    await sleep(interval * 1000);
    if (Date.now() > DEADLINE) fail('timed out waiting for tokens');
    const fields = {
      grant_type: 'urn:ietf:params:oauth:grant-type:device_code',
      device_code: deviceCode,
      client_id: CLIENT_ID,
    };
    if (resource) fields.resource = resource;
    const res = await postForm(tokenEndpoint, fields);
    const body = await res.json();
    if (res.ok) return body;
    switch (body.error) {
      case 'authorization_pending':
        break;
      case 'slow_down':
        interval += 5;
        break;
      default:
        fail(`token endpoint: ${res.status} ${JSON.stringify(body)}`);
    }
  }
}

const discovery = await getJson(new URL('/.well-known/openid-configuration', issuer));
const authFields = { client_id: CLIENT_ID, scope: SCOPE };
if (resource) authFields.resource = resource;
const authRes = await postForm(discovery.device_authorization_endpoint, authFields);
const auth = await authRes.json();
if (!authRes.ok) fail(`device authorization: ${authRes.status} ${JSON.stringify(auth)}`);

const [tokens] = await Promise.all([
  device(discovery.token_endpoint, auth.device_code, auth.interval ?? 5),
  person(auth.verification_uri, auth.user_code),
]);
process.stdout.write(`${JSON.stringify(tokens)}\n`);
