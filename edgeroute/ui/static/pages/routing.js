// Routing: where decisions went (by rule, policy, task type, experiment variant), the share
// sent to each deployment, the savings against each route's most expensive deployment, and
// experiment variants and feedback learning side by side.

import { api } from '../api.js';
import { barList } from '../chart.js';
import { h, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const STATS = 'GET /admin/stats';

function statsTable(rows, what) {
  const total = rows.reduce((a, r) => a + r.requests, 0) || 1;
  return table([
    { label: what, key: 'group', format: (v) => (v === null || v === '' ? '(none)' : v) },
    { label: 'Requests', key: 'requests', num: true, format: f.num, field: 'requests' },
    { label: 'Share', value: (r) => r.requests / total, num: true, format: f.pct },
    { label: 'Success', key: 'success_rate', num: true, format: f.pct },
    { label: 'p50', key: 'p50_ms', num: true, format: f.ms },
    { label: 'p95', key: 'p95_ms', num: true, format: f.ms },
    { label: 'Cost', key: 'cost_usd', num: true, format: f.usd, field: 'cost_usd' },
    { label: 'Cost/request', value: (r) => (r.requests ? r.cost_usd / r.requests : null), num: true, format: f.usd },
    { label: 'Savings', key: 'savings_usd', num: true, format: f.usd },
  ], rows, { caption: 'Requests by ' + what, rowAttrs: (r) => ({ 'data-group': r.group ?? '' }) });
}

export default {
  title: () => 'Routing',
  mount(main, ctx) {
    const groups = [['rule', 'Rule'], ['policy', 'Policy'], ['task', 'Task type'], ['variant', 'Experiment variant']];
    const share = h('div'), savings = h('div'), learning = h('div'), shadow = h('div');
    const bodies = groups.map(() => h('div'));
    main.append(
      h('div', { class: 'grid2' }, panel('Share sent to each deployment', share), panel('Savings by route', savings)),
      h('div', { class: 'grid2' }, ...groups.slice(0, 2).map(([, label], i) => panel('Decisions by ' + label.toLowerCase(), bodies[i]))),
      h('div', { class: 'grid2' }, ...groups.slice(2).map(([, label], i) => panel('Decisions by ' + label.toLowerCase(), bodies[i + 2]))),
      h('div', { class: 'grid2' }, panel('Shadow traffic', shadow), panel('Feedback learning', learning)));
    const refresh = () => {
      load(share, ctx, [STATS], () => api('/admin/stats', { params: { since: ctx.range, group_by: 'deployment' } }), (body, d) => {
        const total = d.rows.reduce((a, r) => a + r.requests, 0) || 1;
        body.append(barList({ label: 'Share of requests by deployment', rows: d.rows.map((r) => ({ label: r.group, value: r.requests / total })), format: f.pct }),
          statsTable(d.rows, 'Deployment'));
      });
      groups.forEach(([by, label], i) => {
        load(bodies[i], ctx, [STATS], () => api('/admin/stats', { params: { since: ctx.range, group_by: by } }), (body, d) => {
          const seen = d.rows.filter((r) => r.group !== null && r.group !== '');
          const what = label.toLowerCase();
          if (!seen.length) body.append(notice(`No request in this range was routed by ${/^[aeiou]/.test(what) ? 'an' : 'a'} ${what}.`));
          body.append(statsTable(d.rows, label));
        });
      });
      load(savings, ctx, ['GET /admin/spend'], () => api('/admin/spend', { params: { by: 'route', since: ctx.range } }), (body, d) => {
        const t = d.total;
        body.append(h('p', {}, 'Saved ', h('strong', { 'data-field': 'savings_usd', 'data-value': String(t.savings_usd) }, f.usd(t.savings_usd)),
          ' (', h('span', { 'data-field': 'savings_percent' }, f.dec(t.savings_percent, 2) + '%'), ') against sending each request to the most expensive deployment of its route.'),
        table([
          { label: 'Route', key: 'route', format: (v) => v ?? '(none)' },
          { label: 'Requests', key: 'requests', num: true, format: f.num },
          { label: 'Cost', key: 'cost_usd', num: true, format: f.usd },
          { label: 'At the priciest', key: 'baseline_cost_usd', num: true, format: f.usd },
          { label: 'Savings', key: 'savings_usd', num: true, format: f.usd, field: 'savings_usd' },
        ], d.rows, { caption: 'Savings by route', rowAttrs: (r) => ({ 'data-group': r.route }) }));
      });
      load(shadow, ctx, ['GET /admin/spend'], () => api('/admin/spend', { params: { by: 'outcome', since: ctx.range } }), (body, d) => {
        const sh = d.rows.find((r) => r.outcome === 'shadow');
        const live = d.rows.filter((r) => r.outcome !== 'shadow');
        if (!sh) return body.append(notice('No shadow requests in this range (a model\'s `shadow:` mirrors a share of its traffic).'));
        const liveReq = live.reduce((a, r) => a + r.requests, 0), liveCost = live.reduce((a, r) => a + r.cost_usd, 0);
        body.append(h('p', { class: 'muted' }, 'Mirrored requests are answered by the candidate but never returned; their answers are in the shadow log.'),
          table([
            { label: 'Traffic', key: 'name' },
            { label: 'Requests', key: 'requests', num: true, format: f.num },
            { label: 'Cost', key: 'cost_usd', num: true, format: f.usd },
            { label: 'Cost/request', value: (r) => (r.requests ? r.cost_usd / r.requests : null), num: true, format: f.usd },
          ], [{ name: 'served', requests: liveReq, cost_usd: liveCost }, { name: 'shadow', requests: sh.requests, cost_usd: sh.cost_usd }], { caption: 'Shadow against served traffic' }));
      });
      load(learning, ctx, ['GET /admin/learning'], () => api('/admin/learning'), (body, d) => {
        if (d.enabled === false || !d.posteriors) {
          body.append(notice('Feedback learning is not enabled on this server (learning.feedback).'));
          return;
        }
        body.append(h('p', { class: 'muted' }, 'Posterior quality of each route per task type, from feedback scores (max shift ' + d.max_shift + ', cost weight ' + d.cost_weight + ').'),
          table([
            { label: 'Task', key: 'task' }, { label: 'Route', key: 'route', format: (v) => v ?? '(none)' },
            { label: 'Mean', key: 'mean', num: true, format: (v) => f.dec(v, 3) },
            { label: 'α', key: 'alpha', num: true, format: (v) => f.dec(v, 1) },
            { label: 'β', key: 'beta', num: true, format: (v) => f.dec(v, 1) },
          ], d.posteriors, { caption: 'Feedback learning' }));
        if ((d.teams || []).length) {  // a team's own shifts: its ratings steer its requests alone
          body.append(table([
            { label: 'Team', key: 'team' }, { label: 'Task', key: 'task' }, { label: 'Route', key: 'route' },
            { label: 'Mean', key: 'mean', num: true, format: (v) => f.dec(v, 3) },
            { label: 'α', key: 'alpha', num: true, format: (v) => f.dec(v, 1) },
            { label: 'β', key: 'beta', num: true, format: (v) => f.dec(v, 1) },
          ], d.teams, { caption: 'Per-team learning (a team\'s ratings steer its own requests)' }));
        }
      });
    };
    refresh();
    return refresh;
  },
};
