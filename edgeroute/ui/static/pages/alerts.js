// Alerts: what is firing now and what fired recently, each with a link to the requests
// around it (five minutes either side, on the alert's deployment when it names one).

import { api } from '../api.js';
import { h, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

const MARGIN = 300;
const SEVERITY = { critical: 'bad', error: 'bad', warning: 'warn', info: 'ok' };

function columns(ctx, deployments) {
  return [
    { label: 'Severity', key: 'severity', format: (v) => h('span', { class: 'badge ' + (SEVERITY[v] || 'warn') }, v) },
    { label: 'Rule', key: 'rule', field: 'rule' },
    { label: 'Subject', key: 'subject' },
    { label: 'Requests', value: (a) => a, format: (a) => {
      const until = Math.ceil((a.resolved_at || Date.now() / 1000) + MARGIN);
      const p = { since: Math.floor(a.started_at - MARGIN), until };
      if (deployments.has(a.subject)) p.deployment = a.subject;
      return h('a', { href: ctx.link('requests', null, p), class: 'around' }, 'requests around');
    } },
    { label: 'Value', key: 'value', num: true, format: (v) => f.dec(v, 4) },
    { label: 'Threshold', key: 'threshold', num: true, format: (v) => f.dec(v, 4) },
    { label: 'Started', key: 'started_at', format: f.time },
    { label: 'Resolved', key: 'resolved_at', format: (v) => (v ? f.time(v) : 'firing') },
    { label: 'Message', key: 'message', wrap: true },
  ];
}

export default {
  title: () => 'Alerts',
  mount(main, ctx) {
    const firing = h('div'), recent = h('div');
    main.append(panel('Firing', firing), panel('Recent', recent));
    const refresh = () => {
      load(firing, ctx, ['GET /admin/alerts'], async () => {
        const [alerts, deps] = await Promise.all([api('/admin/alerts'),
          ctx.has('GET /admin/deployments') ? api('/admin/deployments') : { deployments: [] }]);
        return { alerts, names: new Set(deps.deployments.map((d) => d.name)) };
      }, (body, { alerts, names }) => {
        if (!alerts.firing.length) body.append(notice('Nothing is firing.'));
        else body.append(table(columns(ctx, names), alerts.firing, { caption: 'Firing alerts', rowAttrs: (a) => ({ 'data-alert': a.id }) }));
        recent.replaceChildren(alerts.recent.length
          ? table(columns(ctx, names), alerts.recent, { caption: 'Recent alerts', rowAttrs: (a) => ({ 'data-alert': a.id }) })
          : notice('No alert in the recent history.'));
      });
      if (!ctx.has('GET /admin/alerts')) recent.replaceChildren();
    };
    refresh();
    return refresh;
  },
};
