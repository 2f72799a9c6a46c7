// Deployments: each deployment's circuit, in-flight requests, error rate and latency, live
// (refreshed every 5 s), and their history over the range when the server keeps it.

import { api } from '../api.js';
import { stateStrip, timeChart } from '../chart.js';
import { h, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const CIRCUIT = { closed: 'ok', half_open: 'warn', open: 'bad' };

function circuit(state) {
  return h('span', { class: 'badge ' + (CIRCUIT[state] || 'warn') }, String(state).replace('_', '-'));
}

export default {
  title: () => 'Deployments',
  live: 5,
  mount(main, ctx) {
    const actions = h('div', { class: 'actions' });
    const now = h('div'), hist = h('div');
    main.append(actions, panel('Now', now), panel('History', hist));
    if (ctx.can('operator') && ctx.has('POST /admin/reload')) {
      const out = h('span', { role: 'status', class: 'muted' });
      const btn = h('button', { type: 'button', id: 'reload', class: 'secondary' }, 'Reload configuration');
      btn.addEventListener('click', async () => {
        if (!window.confirm('Reload the configuration from its source now?')) return;
        btn.disabled = true;
        out.textContent = 'Reloading…';
        try {
          await api('/admin/reload', { method: 'POST' });
          out.textContent = 'Reloaded.';
        } catch (e) {
          out.textContent = 'Reload refused: ' + e.message;
        } finally {
          btn.disabled = false;
        }
      });
      actions.append(btn, out);
    }
    let histAt = 0;
    const refresh = () => {
      load(now, ctx, ['GET /admin/deployments'], () => api('/admin/deployments'), (body, d) => {
        body.append(table([
          { label: 'Deployment', key: 'name' },
          { label: 'Provider', key: 'provider' },
          { label: 'Model', key: 'model' },
          { label: 'Circuit', key: 'circuit', format: circuit, field: 'circuit' },
          { label: 'In flight', key: 'in_flight', num: true, format: f.num, field: 'in_flight' },
          { label: 'Error rate', key: 'error_rate', num: true, format: f.pct, field: 'error_rate' },
          { label: 'Latency (EWMA)', key: 'latency_ms', num: true, format: f.ms, field: 'latency_ms' },
          { label: 'Attempts', key: 'requests', num: true, format: f.num, field: 'requests' },
          { label: 'Failed', key: 'failures', num: true, format: f.num, field: 'failures' },
          { label: 'Cool-down', key: 'cooldown_ms', num: true, format: (v) => (v ? f.ms(v) : '–') },
        ], d.deployments, { caption: 'Deployments now', rowAttrs: (r) => ({ 'data-deployment': r.name }) }));
      });
      // The history changes slowly: every 30 s is enough even while the table is live.
      if (Date.now() - histAt < 29000) return;
      histAt = Date.now();
      load(hist, ctx, ['GET /admin/deployments/history'], () => api('/admin/deployments/history', { params: { since: ctx.range } }), (body, d) => {
        const names = Object.keys(d.deployments || {});
        if (!names.length) return body.append(notice('No history recorded yet.'));
        // The history is a ring buffer in memory: draw the part of the range it covers.
        const t1 = Date.now() / 1000;
        const first = Math.min(...names.flatMap((n) => d.deployments[n].map((p) => p.t)));
        const t0 = Math.max(t1 - ctx.seconds, Number.isFinite(first) ? first - d.interval_s : t1 - ctx.seconds);
        body.append(h('p', { class: 'muted' }, 'Sampled every ' + d.interval_s + ' s since ' + f.time(t0) + '; circuit: green closed, amber half-open, red open.'));
        for (const name of names) {
          const pts = d.deployments[name];
          const series = (k, scale = 1) => pts.map((p) => [p.t, p[k] === null ? null : p[k] * scale]);
          body.append(h('h3', {}, name),
            h('p', { class: 'muted strip-label' }, 'Circuit'),
            stateStrip({ label: 'Circuit of ' + name, t0, t1, points: pts.map((p) => [p.t, p.circuit]) }),
            h('div', { class: 'grid3' },
              timeChart({ label: 'Error rate of ' + name, t0, t1, height: 130, yMax: 1, yFormat: f.pct,
                series: [{ name: 'error rate', kind: 'area', points: series('error_rate') }] }),
              timeChart({ label: 'Latency of ' + name, t0, t1, height: 130, yFormat: f.ms,
                series: [{ name: 'p50', points: series('p50_ms') }, { name: 'p95', points: series('p95_ms') }] }),
              timeChart({ label: 'Requests in flight at ' + name, t0, t1, height: 130, yFormat: (v) => f.dec(v, 1),
                series: [{ name: 'in flight', kind: 'area', points: series('in_flight') }] })));
        }
      });
    };
    refresh();
    return refresh;
  },
};
