// What every page uses: loading a section, links between pages, the role ladder.

import { ApiError, describe } from './api.js';
import { clear, h, notice } from './dom.js';

export function link(name, arg, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== '') q.set(k, String(v));
  const qs = q.toString();
  return '#/' + name + (arg ? '/' + encodeURIComponent(arg) : '') + (qs ? '?' + qs : '');
}

// A section of a page that loads data: shows loading, the result, or why there is none.
// `needs` names the admin routes it calls ("GET /admin/stats"): when the server lacks one
// (or the key may not call it) the section says so without calling it.
export async function load(body, ctx, needs, fetcher, draw) {
  const missing = needs.filter((r) => !ctx.has(r));
  if (missing.length) {
    clear(body);
    const withheld = missing.filter((r) => ctx.everyTeam(r)), lacking = missing.filter((r) => !ctx.everyTeam(r));
    if (withheld.length) {
      body.append(notice(withheld.join(', ') + ': covers every team, so a key of team ' + ctx.team + ' may not see it (sign in with a key without a team).'));
    }
    if (lacking.length) {
      body.append(notice(lacking.join(', ') + ': not available on this server' + (ctx.can('admin') ? '.' : ' (or not to your role).')));
    }
    return;
  }
  if (!body.firstChild) body.append(h('p', { class: 'muted' }, 'Loading…'));
  try {
    const data = await fetcher();
    if (!ctx.alive()) return;
    clear(body);
    draw(body, data);
  } catch (e) {
    if (!ctx.alive()) return;
    clear(body);
    const d = describe(e);
    body.append(notice(d.text, d.kind === 'error' ? 'error' : null));
    if (!(e instanceof ApiError)) console.warn(e);
  }
}

