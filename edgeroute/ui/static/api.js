// The API client: the key lives in sessionStorage only (never in a URL) and goes out as a
// bearer token. Errors become ApiError; a 404 for a route the server does not have means
// the feature is not available on this server.

const KEY = 'edgeroute.console.key';

export const session = {
  key() { return sessionStorage.getItem(KEY); },
  set(k) { sessionStorage.setItem(KEY, k); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message, path) {
    super(message);
    this.status = status;
    this.path = path;
  }
  // The server has no such endpoint (it answers 404 for the route itself), or the feature is off.
  get unavailable() { return this.status === 404; }
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? '?' + s : '';
}

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export async function api(path, opts = {}) {
  const headers = { Accept: 'application/json' };
  const key = session.key();
  if (key) headers.Authorization = 'Bearer ' + key;
  let body = opts.body;
  if (body !== undefined && typeof body !== 'string') {
    body = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  } else if (typeof body === 'string') {
    headers['Content-Type'] = opts.contentType || 'text/plain';
  }
  let resp;
  try {
    resp = await fetch(path + query(opts.params), {
      method: opts.method || 'GET', headers, body, credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer',
    });
  } catch (e) {
    throw new ApiError(0, 'The server did not answer (' + e.message + ').', path);
  }
  const text = await resp.text();
  let data = null;
  const json = (resp.headers.get('Content-Type') || '').includes('json');
  if (json && text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!resp.ok) {
    const msg = data && data.error && data.error.message ? data.error.message : resp.status + ' ' + resp.statusText;
    if (resp.status === 401 && !opts.quiet401) onUnauthorized();
    throw new ApiError(resp.status, msg, path);
  }
  return json ? data : text;
}

// What to say on a page section whose request failed.
export function describe(err) {
  if (!(err instanceof ApiError)) return { text: 'Error: ' + err.message, kind: 'error' };
  if (err.status === 404) return { text: 'Not available on this server (' + err.message + ')', kind: 'unavailable' };
  if (err.status === 403) return { text: 'Your key may not see this (' + err.message + ')', kind: 'error' };
  return { text: err.message, kind: 'error' };
}
