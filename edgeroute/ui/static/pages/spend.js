// Spend and budgets: spend by model, team, key or day from the ledger; each budget against
// its limit with the projected end-of-period figure; rate-limit headroom.

import { api } from '../api.js';
import { barList, timeChart } from '../chart.js';
import { h, meter, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const BY = [['model', 'Model'], ['team', 'Team'], ['key', 'Key'], ['day', 'Day']];

export default {
  title: () => 'Spend & budgets',
  mount(main, ctx) {
    const by = BY.some(([k]) => k === ctx.params.by) ? ctx.params.by : 'model';
    const tabs = h('div', { class: 'tabs', role: 'group', 'aria-label': 'Group spend by' },
      BY.map(([k, label]) => h('button', { type: 'button', 'aria-pressed': String(k === by), 'data-by': k,
        onclick: () => ctx.go(ctx.link('spend', null, { by: k })) }, label)));
    const spendBody = h('div'), budgets = h('div'), limits = h('div');
    main.append(panel('Spend', tabs, spendBody), h('div', { class: 'grid2' }, panel('Budgets', budgets), panel('Rate-limit headroom', limits)));
    const refresh = () => {
      load(spendBody, ctx, ['GET /admin/spend'], () => api('/admin/spend', { params: { by, since: ctx.range } }), (body, d) => {
        const t = d.total;
        body.append(h('p', {}, 'Total ', h('strong', { 'data-field': 'total_cost', 'data-value': String(t.cost_usd) }, f.usd(t.cost_usd)),
          ' over ', f.num(t.requests), ' requests; saved ', f.usd(t.savings_usd), ' (', f.dec(t.savings_percent, 2), '%).'));
        if (by === 'day') {
          const pts = d.rows.map((r) => [Date.parse(r.day + 'T00:00:00Z') / 1000, r.cost_usd]).filter((p) => !Number.isNaN(p[0]));
          const t1 = Date.now() / 1000;
          body.append(timeChart({ label: 'Spend per day', t0: Math.min(t1 - ctx.seconds, ...pts.map((p) => p[0])), t1, bucket: 86400,
            series: [{ name: 'cost', kind: 'bar', points: pts }], yFormat: f.usd }));
        } else {
          // A managed key's bar by its name, as its row shows it beside the id.
          body.append(barList({ label: 'Spend by ' + by, rows: d.rows.slice(0, 15).map((r) => ({ label: r.name || (r[by] ?? '(none)'), value: r.cost_usd })), format: f.usd }));
        }
        body.append(table([
          { label: BY.find(([k]) => k === by)[1], key: by, format: (v) => v ?? '(none)' },
          ...(by === 'key' ? [{ label: 'Name', key: 'name', field: 'name' }] : []),  // as `keys create --name` gave it
          { label: 'Requests', key: 'requests', num: true, format: f.num, field: 'requests' },
          { label: 'Succeeded', key: 'ok', num: true, format: f.num },
          { label: 'Prompt tokens', key: 'prompt_tokens', num: true, format: f.num },
          { label: 'Completion tokens', key: 'completion_tokens', num: true, format: f.num },
          { label: 'Cost', key: 'cost_usd', num: true, format: f.usd, field: 'cost_usd' },
          { label: 'Savings', key: 'savings_usd', num: true, format: f.usd },
        ], d.rows, { caption: 'Spend by ' + by, rowAttrs: (r) => ({ 'data-group': r[by] ?? '' }) }));
      });
      // One request for both panels.
      let budgetsOnce = null;
      const fetchBudgets = () => (budgetsOnce ||= api('/admin/budgets'));
      load(budgets, ctx, ['GET /admin/budgets'], fetchBudgets, (body, d) => {
        if (d.team) body.append(h('p', { class: 'muted', 'data-field': 'budget_team' }, `The budgets that apply to team ${d.team}.`));
        if (!d.budgets.length) body.append(notice('No budgets are configured.'));
        for (const b of d.budgets) {
          // A key's budget: its name, and a key that no longer works marked (its spend stays).
          const ended = b.key_status && b.key_status !== 'active'
            ? h('span', { class: 'badge bad', 'data-field': 'key_status' }, b.key_status) : null;
          const what = b.scope === 'key' && b.key_name ? `key ${b.key_name}` : `${b.scope}${b.match ? ' ' + b.match : ''}`;
          const title = h('h3', {}, b.name, ' ', h('span', { class: 'muted' }, `(${what}, ${b.period})`), ended ? ' ' : null, ended);
          const period = [h('dt', {}, 'Period'), h('dd', {}, f.time(b.period_start) + ' → ' + f.time(b.period_end))];
          if (b.shared) {
            // It counts every team's spend: a team's key is shown its limit, not the figures.
            body.append(h('div', { class: 'budget', 'data-budget': b.name, 'data-match': b.match, 'data-shared': 'true' }, title,
              h('dl', { class: 'facts' },
                h('dt', {}, 'Limit'), h('dd', { 'data-field': 'limit_usd', 'data-value': String(b.limit_usd) }, f.usd(b.limit_usd)),
                h('dt', {}, 'Spent'), h('dd', { class: 'muted', 'data-field': 'withheld' }, 'counts every team\'s spend: not shown to a team\'s key'),
                ...period)));
            continue;
          }
          const frac = b.limit_usd ? b.spent_usd / b.limit_usd : 0;
          const proj = b.limit_usd ? b.projected_usd / b.limit_usd : 0;
          body.append(h('div', { class: 'budget', 'data-budget': b.name, 'data-match': b.match, 'data-key-status': b.key_status }, title,
            meter(frac, `${b.name}: ${f.pct(frac)} of the limit spent`),
            h('dl', { class: 'facts' },
              h('dt', {}, 'Spent'), h('dd', { 'data-field': 'spent_usd', 'data-value': String(b.spent_usd) }, `${f.usd(b.spent_usd)} of ${f.usd(b.limit_usd)} (${f.pct(frac)})`),
              h('dt', {}, 'Reserved'), h('dd', {}, f.usd(b.reserved_usd)),
              h('dt', {}, 'Projected at period end'), h('dd', { class: proj >= 1 ? 'badge bad' : null, 'data-field': 'projected_usd' }, `${f.usd(b.projected_usd)} (${f.pct(proj)})`),
              ...period)));
        }
      });
      load(limits, ctx, ['GET /admin/budgets'], fetchBudgets, (body, d) => {
        const rows = d.rate_limits || [];
        if (!rows.length) return body.append(notice('No rate limits are in use.'));
        // Each limit: used of the limit, the headroom left, and a meter of the use.
        const cell = (used, lim, what) => {
          if (!lim) return '–';
          // A limit every team's requests take from: a team's key is shown the limit alone.
          if (used === null || used === undefined) return h('div', {}, `limit ${f.num(lim)} (shared by every team)`);
          return h('div', {}, `${f.num(used)} / ${f.num(lim)} · ${f.pct(Math.max(0, 1 - used / lim))} free`, meter(used / lim, what + ' used'));
        };
        // A key's max_parallel: its requests in flight on this instance against the cap.
        const parallel = rows.some((r) => r.max_parallel)
          ? [{ label: 'In flight', value: (r) => r, format: (r) => cell(r.in_flight, r.max_parallel, 'requests in flight') }]
          : [];
        body.append(table([
          { label: 'Scope', key: 'scope' },
          { label: 'Name', key: 'name', format: (v, r) => (r.key_name ? h('span', {}, v, ' ', h('span', { class: 'muted' }, '(' + r.key_name + ')')) : v) },
          { label: 'Requests/min', value: (r) => r, format: (r) => cell(r.rpm_used, r.rpm_limit, 'requests per minute') },
          { label: 'Tokens/min', value: (r) => r, format: (r) => cell(r.tpm_used, r.tpm_limit, 'tokens per minute') },
          ...parallel,
        ], rows, { caption: 'Rate-limit headroom', rowAttrs: () => ({ class: 'rate-limit' }) }));
      });
    };
    refresh();
    return refresh;
  },
};
