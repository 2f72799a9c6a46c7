// Request log: a filterable table (filters live in the page's hash, so a link to "the
// requests around an alert" is just a URL) and one request's detail: the decision, the
// attempts on a time axis, and the stored (redacted) content where the role may see it.

import { api, ApiError } from '../api.js';
import { attemptsTimeline } from '../chart.js';
import { h, clear, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const LIST = 'GET /admin/requests';
const DETAIL = 'GET /admin/requests/{id}';
const FILTERS = [
  ['since', 'Since', 'e.g. 15m, 24h or epoch s'], ['until', 'Until', 'epoch s'], ['model', 'Model'],
  ['deployment', 'Deployment'], ['key', 'Key'], ['team', 'Team'], ['status', 'Status'],
  ['error_class', 'Error class'], ['rule', 'Rule'], ['min_latency_ms', 'Min latency (ms)'], ['min_cost_usd', 'Min cost ($)'],
];
const OK_OUTCOMES = new Set(['success', 'ok', 'hedge_won']);

function statusBadge(v) {
  return h('span', { class: 'badge ' + (v >= 200 && v < 300 ? 'ok' : v >= 500 || v === 0 ? 'bad' : 'warn') }, v === null ? '–' : String(v));
}

// A key as an operator knows it: a managed key's name beside its id (`k…` alone says nothing).
function keyLabel(id, name) {
  if (id === null || id === undefined) return null;
  return name ? h('span', {}, id, ' ', h('span', { class: 'muted', 'data-field': 'key_name' }, '(' + name + ')')) : id;
}

function list(main, ctx) {
  const inputs = {};
  const form = h('form', { class: 'filters', 'aria-label': 'Filter requests' },
    FILTERS.map(([k, label, hint]) => {
      inputs[k] = h('input', { name: k, id: 'f-' + k, value: ctx.params[k] ?? (k === 'since' ? ctx.range : ''), placeholder: hint || null, autocomplete: 'off' });
      return h('label', { for: 'f-' + k }, label, inputs[k]);
    }),
    h('button', { type: 'submit' }, 'Apply'),
    h('button', { type: 'button', class: 'secondary', onclick: () => ctx.go(ctx.link('requests')) }, 'Clear'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const p = {};
    for (const [k] of FILTERS) if (inputs[k].value.trim()) p[k] = inputs[k].value.trim();
    ctx.go(ctx.link('requests', null, p));
  });
  const body = h('div');
  main.append(panel('Filters', form), panel('Requests', body));
  const params = { since: ctx.range, ...ctx.params, limit: 100 };
  const columns = [
    { label: 'Time', key: 'ts', format: f.time },
    { label: 'Request', key: 'id', format: (v) => h('a', { href: ctx.link('requests', v) }, v) },
    { label: 'Model', key: 'model' },
    { label: 'Key', key: 'key', format: (v, r) => keyLabel(v, r.key_name) },
    { label: 'Deployment', key: 'deployment' },
    { label: 'Rule', key: 'rule' },
    { label: 'Status', key: 'status', format: statusBadge },
    { label: 'Error', key: 'error_class' },
    { label: 'Latency', key: 'latency_ms', num: true, format: f.ms },
    { label: 'TTFT', key: 'ttft_ms', num: true, format: f.ms },
    { label: 'Tokens', value: (r) => (r.prompt_tokens ?? 0) + (r.completion_tokens ?? 0), num: true, format: (v, r) => f.num(v) + (r.tokens_estimated ? '*' : '') },
    { label: 'Cost', key: 'cost_usd', num: true, format: f.usd },
    { label: 'Attempts', key: 'attempts', num: true, format: f.num },
  ];
  const refresh = () => {
    load(body, ctx, [LIST], () => api('/admin/requests', { params }), (b, d) => {
      const rows = [...d.data];
      const tbody = () => b.querySelector('tbody');
      if (!rows.length) b.append(notice('No request matches these filters.'));
      b.append(table(columns, rows, { caption: 'Requests', rowAttrs: (r) => ({ 'data-id': r.id }) }));
      let cursor = d.next_cursor;
      const more = h('button', { type: 'button', class: 'secondary' }, 'Load more');
      more.hidden = !cursor;
      more.addEventListener('click', async () => {
        more.disabled = true;
        try {
          const next = await api('/admin/requests', { params: { ...params, cursor } });
          const extra = table(columns, next.data, { rowAttrs: (r) => ({ 'data-id': r.id }) }).querySelector('tbody');
          for (const tr of [...extra.children]) tbody().append(tr);
          cursor = next.next_cursor;
          more.hidden = !cursor;
        } catch (e) {
          more.after(notice(e.message, 'error'));
        } finally {
          more.disabled = false;
        }
      });
      b.append(h('p', {}, more), h('p', { class: 'muted' }, '* token counts estimated.'));
    });
  };
  refresh();
  // A list being read is not refreshed under the reader unless it follows "now".
  return ctx.params.until ? null : refresh;
}

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== '').map(([k, v, field]) =>
    [h('dt', {}, k), h('dd', { 'data-field': field || null }, v)]));
}

function detail(main, ctx) {
  const id = ctx.arg;
  const summary = h('div'), decision = h('div'), attempts = h('div'), content = h('div');
  main.append(h('p', {}, h('a', { href: ctx.link('requests') }, '← All requests')),
    h('div', { class: 'grid2' }, panel('Summary', summary), panel('Decision', decision)),
    panel('Attempts', attempts), panel('Content', content));
  if (!ctx.has(DETAIL)) {
    summary.append(notice('GET /admin/requests/{id}: not available on this server.'));
    return null;
  }
  summary.append(h('p', { class: 'muted' }, 'Loading…'));
  api('/admin/requests/' + encodeURIComponent(id)).then((r) => {
    if (!ctx.alive()) return;
    clear(summary).append(facts([
      ['Request id', r.id, 'id'], ['Client id', r.correlation_id], ['Time', f.time(r.ts)], ['Key', keyLabel(r.key, r.key_name)], ['Team', r.team], ['User', r.user],
      ['Model asked', r.model], ['Route', r.route], ['Deployment', r.deployment, 'deployment'], ['Status', statusBadge(r.status), 'status'],
      ['Error class', r.error_class], ['Latency', f.ms(r.latency_ms)], ['Time to first token', r.ttft_ms === null ? null : f.ms(r.ttft_ms)],
      ['Tokens', `${f.num(r.prompt_tokens)} in, ${f.num(r.completion_tokens)} out${r.tokens_estimated ? ' (estimated)' : ''}`],
      ['Cost', f.usd(r.cost_usd)], ['Cache', r.cache],
    ]));
    const reasons = Array.isArray(r.reasons) ? r.reasons : r.reasons ? [String(r.reasons)] : [];
    decision.append(facts([
      ['Rule', r.rule, 'rule'], ['Policy', r.policy], ['Task type', r.task], ['Difficulty', r.difficulty === null || r.difficulty === undefined ? null : f.dec(r.difficulty, 2)], ['Variant', r.variant],
      ['Tags', r.tags && Object.keys(r.tags).length ? Object.entries(r.tags).map(([k, v]) => k + '=' + v).join(', ') : null],
    ]), reasons.length ? h('ol', { class: 'reasons', 'aria-label': 'Why this route' }, reasons.map((x) => h('li', {}, typeof x === 'string' ? x : JSON.stringify(x)))) : notice('No decision explanation was recorded.'));
    const att = r.attempts || [];
    if (!att.length) {
      // A cache hit calls no upstream either, and was answered: it is not a refusal.
      const cached = r.cache === 'hit' || r.cache === 'stale';
      attempts.append(notice(cached ? `Answered from the response cache (${r.cache}): no upstream was called.`
        : 'No attempt reached an upstream (refused before dispatch).'));
    } else {
      attempts.append(attemptsTimeline({ label: 'Attempts of request ' + r.id + ' on a time axis',
        attempts: att.map((a) => ({ ...a, name: a.deployment, ok: OK_OUTCOMES.has(a.outcome) })) }),
      table([
        { label: '#', value: (a) => att.indexOf(a) + 1, num: true },
        { label: 'Kind', key: 'kind', field: 'kind' },
        { label: 'Deployment', key: 'deployment', field: 'deployment' },
        { label: 'Provider', key: 'provider' },
        { label: 'Outcome', key: 'outcome', field: 'outcome' },
        { label: 'Status', key: 'status', num: true },
        { label: 'Start', key: 'start_ms', num: true, format: f.ms },
        { label: 'Latency', key: 'latency_ms', num: true, format: f.ms },
        { label: 'TTFT', key: 'ttft_ms', num: true, format: f.ms },
        { label: 'Cost', key: 'cost_usd', num: true, format: f.usd },
        { label: 'Error', key: 'error' },
      ], att, { caption: 'Attempts', rowAttrs: () => ({ class: 'attempt' }) }));
    }
    if (r.content) {
      const show = (v) => (typeof v === 'string' ? v : JSON.stringify(v, null, 2));
      content.append(h('h3', {}, 'Request'), h('pre', { 'data-field': 'content-request' }, show(r.content.request)),
        h('h3', {}, 'Response'), h('pre', { 'data-field': 'content-response' }, show(r.content.response)));
    } else {
      content.append(notice(ctx.can('admin') ? 'No content was stored for this request (see the request log\'s log_content setting).'
        : 'Content is shown to admin keys only, where it was stored.'));
    }
  }).catch((e) => {
    if (!ctx.alive()) return;
    clear(summary);
    const gone = e instanceof ApiError && e.status === 404;
    summary.append(notice(gone ? 'No request with id ' + id + ' is in the log (it may have expired).' : e.message, gone ? null : 'error'));
  });
  return null;
}

export default {
  title: (ctx) => (ctx.arg ? 'Request ' + ctx.arg : 'Request log'),
  mount(main, ctx) {
    return ctx.arg ? detail(main, ctx) : list(main, ctx);
  },
};
