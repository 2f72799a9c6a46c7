// The console's shell: sign-in, navigation (hash routes, so no key or state goes to the
// server in a URL), the time range and auto-refresh, and each page's life cycle.

import { api, session, setUnauthorizedHandler } from './api.js';
import { link } from './page.js';
import { h, clear, notice, announce } from './dom.js';
import { RANGES } from './fmt.js';
import overview from './pages/overview.js';
import deployments from './pages/deployments.js';
import routing from './pages/routing.js';
import spend from './pages/spend.js';
import requests from './pages/requests.js';
import alerts from './pages/alerts.js';
import configPage from './pages/config.js';

const PAGES = { overview, deployments, routing, spend, requests, alerts, config: configPage };
const RANK = { service: 0, viewer: 1, operator: 2, admin: 3 };
const PREFS = 'edgeroute.console.prefs';

const state = { who: null, page: null, timer: null, generation: 0 };

function prefs() {
  try { return JSON.parse(localStorage.getItem(PREFS) || '{}'); } catch { return {}; }
}

function savePrefs() {
  const p = { range: document.getElementById('range').value, refresh: document.getElementById('refresh').value };
  localStorage.setItem(PREFS, JSON.stringify(p));
}

// A part as written when it is not a valid escape (`%E0`): decodeURIComponent throws, and a
// link with one left the console on the page before it (or blank when it was the first).
function decodePart(p) {
  try { return decodeURIComponent(p); } catch { return p; }
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, q] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodePart);
  return { name: parts[0] || 'overview', arg: parts[1] || null, params: Object.fromEntries(new URLSearchParams(q || '')) };
}

function showLogin(message) {
  stopTimer();
  state.who = null;
  document.body.classList.add('login');
  document.getElementById('top').hidden = true;
  document.getElementById('nav').hidden = true;
  const main = clear(document.getElementById('main'));
  const input = h('input', { id: 'key', name: 'key', type: 'password', autocomplete: 'off', required: true,
    'aria-describedby': message ? 'login-error' : null });
  const form = h('form', { class: 'login-box', 'aria-labelledby': 'login-title' },
    h('h1', { id: 'login-title' }, 'edgeroute console'),
    h('p', { class: 'muted' }, 'Sign in with an API key whose role is viewer, operator or admin. The key is kept in this browser tab only.'),
    h('label', { for: 'key' }, 'API key'), input,
    message ? h('p', { id: 'login-error', class: 'error', role: 'alert' }, message) : null,
    h('p', {}, h('button', { type: 'submit', id: 'signin' }, 'Sign in')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    session.set(key);
    await boot();
  });
  main.append(form);
  document.title = 'Sign in · edgeroute';
  input.focus();
}

async function boot() {
  let who;
  try {
    who = await api('/ui/session');
  } catch (e) {
    return showLogin('The console could not reach the server: ' + e.message);
  }
  if (!who.signed_in) {
    const had = session.key();
    session.clear();
    if (who.reason === 'role') return showLogin(who.message);
    return showLogin(had ? 'That key is not valid.' : null);
  }
  state.who = who;
  state.routes = new Set(who.routes);
  state.everyTeam = new Set(who.every_team || []);
  document.body.classList.remove('login');
  document.getElementById('top').hidden = false;
  document.getElementById('nav').hidden = false;
  const label = who.auth === 'key' ? `${who.key} (${who.role})` : who.auth === 'loopback' ? 'loopback, no keys configured' : `shared key (${who.role})`;
  document.getElementById('who').textContent = label;
  document.getElementById('signout').hidden = who.auth === 'loopback';
  route();
}

function stopTimer() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

function route() {
  if (!state.who) return;
  stopTimer();
  const { name, arg, params } = parseHash();
  const page = PAGES[name];
  const main = clear(document.getElementById('main'));
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.getAttribute('href') === '#/' + name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const gen = ++state.generation;
  if (!page) {
    main.append(h('h1', { tabindex: -1 }, 'Not found'), notice('There is no page "' + name + '".'));
    return;
  }
  const rangeKey = document.getElementById('range').value;
  const ctx = {
    arg, params,
    range: rangeKey,
    seconds: RANGES[rangeKey],
    role: state.who.role,
    can: (role) => RANK[state.who.role] >= RANK[role],
    // Whether this server has the admin route and this key may call it: "GET /admin/stats".
    has: (route) => state.routes.has(route),
    // A route this server has that a team's key may not call: it covers every team.
    everyTeam: (route) => state.everyTeam.has(route),
    team: state.who.team || null,
    alive: () => gen === state.generation,
    link,
    go: (hash) => { location.hash = hash; },
  };
  const title = h('h1', { tabindex: -1, id: 'page-title' }, page.title(ctx));
  main.append(title);
  document.title = page.title(ctx) + ' · edgeroute';
  let refresh = null;
  try {
    refresh = page.mount(main, ctx);
  } catch (e) {
    main.append(notice('This page failed to draw: ' + e.message, 'error'));
  }
  if (state.focusOnRoute) title.focus();
  state.focusOnRoute = true;
  announce(page.title(ctx) + ' loaded');
  const every = Number(document.getElementById('refresh').value) || 0;
  const live = page.live || 0;  // pages with live data refresh on their own period
  const period = live && every ? Math.min(live, every) : live || every;
  if (refresh && period) {
    state.timer = setInterval(() => { if (ctx.alive() && !document.hidden) refresh(); }, period * 1000);
  }
}

function init() {
  const p = prefs();
  const range = document.getElementById('range');
  const refresh = document.getElementById('refresh');
  if (p.range && RANGES[p.range]) range.value = p.range;
  if (p.refresh && [...refresh.options].some((o) => o.value === p.refresh)) refresh.value = p.refresh;
  range.addEventListener('change', () => { savePrefs(); state.focusOnRoute = false; route(); });
  refresh.addEventListener('change', () => { savePrefs(); state.focusOnRoute = false; route(); });
  document.getElementById('signout').addEventListener('click', () => { session.clear(); showLogin(); });
  window.addEventListener('hashchange', route);
  setUnauthorizedHandler(() => { session.clear(); showLogin('Your key is no longer accepted; sign in again.'); });
  state.focusOnRoute = false;
  boot();
}

init();
