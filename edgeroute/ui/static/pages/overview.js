// Overview: the headline figures over the selected range, traffic/latency/cost over time,
// and each provider's uptime (the share of its requests that succeeded).

import { api } from '../api.js';
import { barList, timeChart } from '../chart.js';
import { h, clear, kpi, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const STATS = 'GET /admin/stats';

function kpis(ul, t, seconds) {
  clear(ul);
  const hours = seconds / 3600;
  ul.append(
    kpi('Requests', f.num(t.requests), t.requests, 'requests'),
    kpi('Requests/s', f.rate(t.requests / seconds), t.requests / seconds, 'rps'),
    kpi('Success rate', f.pct(t.success_rate), t.success_rate, 'success_rate'),
    kpi('Latency p50', f.ms(t.p50_ms), t.p50_ms, 'p50_ms'),
    kpi('Latency p95', f.ms(t.p95_ms), t.p95_ms, 'p95_ms'),
    kpi('TTFT p50', f.ms(t.ttft_p50_ms), t.ttft_p50_ms, 'ttft_p50_ms'),
    kpi('TTFT p95', f.ms(t.ttft_p95_ms), t.ttft_p95_ms, 'ttft_p95_ms'),
    kpi('Cost', f.usd(t.cost_usd), t.cost_usd, 'cost_usd'),
    kpi('Cost per hour', f.usd(t.cost_usd / hours), t.cost_usd / hours, 'cost_per_hour'),
    kpi('Savings', f.usd(t.savings_usd), t.savings_usd, 'savings_usd'),
  );
}

export default {
  title: () => 'Overview',
  mount(main, ctx) {
    const rangeNote = h('p', { class: 'muted' }, 'Last ' + f.durationLabel(ctx.seconds) + '.');
    const ul = h('ul', { class: 'kpis', 'aria-label': 'Headline figures' });
    const traffic = h('div'), latency = h('div'), cost = h('div'), uptime = h('div');
    main.append(rangeNote, ul,
      h('div', { class: 'grid2' }, panel('Traffic', traffic), panel('Latency', latency)),
      h('div', { class: 'grid2' }, panel('Cost', cost), panel('Provider uptime', uptime)));
    const bucket = f.bucketFor(ctx.seconds);

    const refresh = () => {
      const now = Date.now() / 1000, t0 = now - ctx.seconds;
      if (ctx.has(STATS)) {
        load(traffic, ctx, [STATS], () => api('/admin/stats', { params: { since: ctx.range, group_by: 'none', bucket } }), (body, d) => {
          kpis(ul, d.totals, ctx.seconds);
          const pts = (k, scale = 1) => d.rows.map((r) => [r.t, r[k] === null ? null : r[k] * scale]);
          body.append(timeChart({ label: 'Requests and errors per second', t0, t1: now, bucket,
            series: [{ name: 'requests/s', kind: 'area', points: pts('requests', 1 / bucket) },
              { name: 'errors/s', kind: 'line', points: pts('errors', 1 / bucket) }], yFormat: (v) => f.dec(v, 2) }));
          clear(latency).append(timeChart({ label: 'Latency and time to first token', t0, t1: now,
            series: [{ name: 'p50', points: pts('p50_ms') }, { name: 'p95', points: pts('p95_ms') },
              { name: 'TTFT p50', points: pts('ttft_p50_ms') }, { name: 'TTFT p95', points: pts('ttft_p95_ms') }], yFormat: f.ms }));
          clear(cost).append(timeChart({ label: 'Cost and savings per bucket', t0, t1: now, bucket,
            series: [{ name: 'cost', kind: 'bar', points: pts('cost_usd') }, { name: 'savings', kind: 'bar', points: pts('savings_usd') }],
            yFormat: f.usd }));
        });
        load(uptime, ctx, [STATS], () => api('/admin/stats', { params: { since: ctx.range, group_by: 'provider' } }), (body, d) => {
          body.append(barList({ label: 'Success rate by provider', rows: d.rows.map((r) => ({ label: r.group, value: r.success_rate })), format: f.pct }),
            table([
              { label: 'Provider', key: 'group' },
              { label: 'Requests', key: 'requests', num: true, format: f.num },
              { label: 'Errors', key: 'errors', num: true, format: f.num },
              { label: 'Uptime', key: 'success_rate', num: true, format: f.pct, field: 'uptime' },
              { label: 'p95', key: 'p95_ms', num: true, format: f.ms },
            ], d.rows, { caption: 'Uptime by provider', rowAttrs: (r) => ({ 'data-group': r.group }) }));
        });
        return;
      }
      // No request statistics on this server: the ledger's totals and the live counters.
      const spendNote = h('p', { class: 'notice' }, 'GET /admin/stats: not available on this server; figures below come from the spend ledger and the live deployment counters.');
      load(traffic, ctx, ['GET /admin/spend'], () => api('/admin/spend', { params: { by: 'deployment', since: ctx.range } }), (body, d) => {
        const t = d.total;
        kpis(ul, { requests: t.requests, success_rate: t.requests ? t.ok / t.requests : null, cost_usd: t.cost_usd, savings_usd: t.savings_usd }, ctx.seconds);
        body.append(spendNote);
      });
      clear(latency).append(h('p', { class: 'notice' }, 'Latency over time needs GET /admin/stats: not available on this server.'));
      clear(cost).append(h('p', { class: 'notice' }, 'Cost over time needs GET /admin/stats: not available on this server.'));
      load(uptime, ctx, ['GET /admin/deployments'], () => api('/admin/deployments'), (body, d) => {
        const by = {};
        for (const dep of d.deployments) {
          const p = (by[dep.provider] ||= { group: dep.provider, requests: 0, errors: 0 });
          p.requests += dep.requests;
          p.errors += dep.failures;
        }
        const rows = Object.values(by).map((p) => ({ ...p, success_rate: p.requests ? 1 - p.errors / p.requests : null }));
        body.append(h('p', { class: 'muted' }, 'Attempts since the proxy started.'),
          table([
            { label: 'Provider', key: 'group' },
            { label: 'Attempts', key: 'requests', num: true, format: f.num },
            { label: 'Failed', key: 'errors', num: true, format: f.num },
            { label: 'Uptime', key: 'success_rate', num: true, format: f.pct, field: 'uptime' },
          ], rows, { caption: 'Uptime by provider', rowAttrs: (r) => ({ 'data-group': r.group }) }));
      });
    };
    refresh();
    return refresh;
  },
};
