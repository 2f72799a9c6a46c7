// Configuration: the running config (secrets masked by the server), its version history
// with a diff between any two versions and, for operators, rollback; and a check of a
// pasted config that reports its errors without applying it.

import { api } from '../api.js';
import { h, clear, notice, panel, table } from '../dom.js';
import * as f from '../fmt.js';
import { load } from '../page.js';

function diffView(text) {
  const pre = h('pre', { class: 'diff', 'data-field': 'diff' });
  for (const line of String(text).split('\n')) {
    const cls = line.startsWith('@@') ? 'hunk' : line.startsWith('+') && !line.startsWith('+++') ? 'add' : line.startsWith('-') && !line.startsWith('---') ? 'del' : null;
    pre.append(h('span', { class: cls }, line + '\n'));
  }
  return pre;
}

export default {
  title: () => 'Configuration',
  mount(main, ctx) {
    const running = h('div'), versions = h('div'), check = h('div'), keys = h('div'), audit = h('div');
    main.append(panel('Running configuration', running), panel('Versions', versions), panel('Check a configuration', check));
    // Key management is for admins only: other roles do not see the section at all.
    if (ctx.can('admin')) main.append(panel('Keys', keys));
    main.append(panel('Audit log', audit));
    load(running, ctx, ['GET /admin/config'], () => api('/admin/config'), (body, d) => {
      const cfg = d && typeof d === 'object' && 'config' in d ? d.config : d;
      body.append(h('p', { class: 'muted' },
        d && d.version !== undefined && d.version !== null ? `Version ${d.version}` : 'Unversioned',
        d && d.source ? ` from ${d.source}` : '', '. Secrets are masked by the server.'),
      h('pre', { 'data-field': 'config' }, typeof cfg === 'string' ? cfg : JSON.stringify(cfg, null, 2)));
    });
    load(versions, ctx, ['GET /admin/config/versions'], () => api('/admin/config/versions'), (body, d) => {
      const vs = d.versions || [];
      if (!vs.length) return body.append(notice('No versions recorded yet.'));
      const out = h('div');
      const canRollback = ctx.can('operator') && ctx.has('POST /admin/config/rollback');
      const pick = (name, i) => h('select', { id: 'diff-' + name, 'aria-label': name === 'from' ? 'Diff from version' : 'Diff to version' },
        vs.map((v, k) => h('option', { value: v.version, selected: k === i ? true : null }, String(v.version))));
      const from = pick('from', Math.min(1, vs.length - 1)), to = pick('to', 0);
      const diffBtn = h('button', { type: 'button', id: 'show-diff', class: 'secondary' }, 'Show diff');
      diffBtn.addEventListener('click', () => load(clear(out), ctx, ['GET /admin/config/diff'],
        () => api('/admin/config/diff', { params: { from: from.value, to: to.value } }), (b, r) => b.append(r.diff ? diffView(r.diff) : notice('The two versions are the same.'))));
      const cols = [
        { label: 'Version', key: 'version', field: 'version' },
        { label: 'Created', key: 'created_at', format: (v) => (typeof v === 'number' ? f.time(v) : v) },
        { label: 'Source', key: 'source' },
        { label: 'Applied by', key: 'applied_by' },
        { label: 'Hash', key: 'hash', format: (v) => (v ? String(v).slice(0, 12) : '–') },
        { label: 'Active', key: 'active', format: (v) => (v ? h('span', { class: 'badge ok' }, 'active') : '') },
      ];
      if (canRollback) {
        cols.push({ label: 'Action', value: (v) => v, format: (v) => (v.active ? '' : h('button', { type: 'button', class: 'danger rollback', 'data-version': v.version,
          onclick: async (ev) => {
            if (!window.confirm('Roll the running configuration back to version ' + v.version + '?')) return;
            ev.target.disabled = true;
            try {
              await api('/admin/config/rollback', { method: 'POST', body: { version: v.version } });
              ctx.go(ctx.link('config', null, { at: Date.now() }));
            } catch (e) {
              out.replaceChildren(notice('Rollback refused: ' + e.message, 'error'));
              ev.target.disabled = false;
            }
          } }, 'Roll back to this')) });
      }
      body.append(table(cols, vs, { caption: 'Configuration versions' }),
        h('div', { class: 'actions' }, h('label', {}, 'From ', from), h('label', {}, 'To ', to), diffBtn), out);
    });
    load(check, ctx, ['POST /admin/config/check'], async () => null, (body) => {
      const ta = h('textarea', { id: 'check-text', 'aria-label': 'Configuration (YAML) to check', spellcheck: 'false' });
      const result = h('div', { role: 'status' });
      const btn = h('button', { type: 'button', id: 'check' }, 'Check');
      btn.addEventListener('click', async () => {
        btn.disabled = true;
        try {
          const r = await api('/admin/config/check', { method: 'POST', body: ta.value, contentType: 'application/yaml' });
          result.replaceChildren(r.ok ? h('p', { class: 'badge ok', 'data-field': 'check-ok' }, 'No errors.')
            : h('ul', { class: 'check-errors', 'aria-label': 'Errors' }, r.errors.map((e) => h('li', {}, e))));
        } catch (e) {
          result.replaceChildren(notice(e.message, 'error'));
        } finally {
          btn.disabled = false;
        }
      });
      body.append(h('p', { class: 'muted' }, 'Paste a configuration to check it the way `edgeroute check` does; nothing is applied.'), ta, h('p', {}, btn), result);
    });
    if (ctx.can('admin')) {
      load(keys, ctx, ['GET /admin/keys'], () => api('/admin/keys'), (body, d) => drawKeys(body, ctx, d));
    }
    load(audit, ctx, ['GET /admin/audit'], () => api('/admin/audit', { params: { since: ctx.range } }), (body, d) => {
      const rows = d.entries || d.events || d.data || d.audit || [];
      if (!rows.length) return body.append(notice('No audited action in this range.'));
      body.append(table(columnsOf(rows), rows, { caption: 'Audit log' }));
    });
    return null;
  },
};

// Columns for rows whose fields this page does not know in advance (times shown as times).
function columnsOf(rows) {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return keys.map((k) => ({ label: k.replace(/_/g, ' '), key: k, format: (v) => {
    if (v === null || v === undefined) return '–';
    if (typeof v === 'number' && /(_at|^ts|time)$/.test(k)) return f.time(v);
    return typeof v === 'object' ? JSON.stringify(v) : String(v);
  } }));
}

function drawKeys(body, ctx, d) {
  const rows = d.keys || d.data || [];
  if (!rows.length) return body.append(notice('No managed keys.'));
  const cols = columnsOf(rows).filter((c) => !/token|secret|hash/.test(c.key));
  if (ctx.has('DELETE /admin/keys/{id}')) {
    // Keys from the config file are read-only here (the server answers 409 for them).
    cols.push({ label: 'Action', value: (k) => k, format: (k) => (k.source === 'config' || (k.status && k.status !== 'active') ? '' : h('button', { type: 'button', class: 'danger revoke', 'data-key': k.id,
      onclick: async (ev) => {
        if (!window.confirm('Revoke key ' + k.id + '? Clients using it will be refused at once.')) return;
        ev.target.disabled = true;
        try {
          await api('/admin/keys/' + encodeURIComponent(k.id), { method: 'DELETE' });
          ev.target.replaceWith(h('span', { class: 'badge bad' }, 'revoked'));
        } catch (e) {
          ev.target.after(notice('Revoke refused: ' + e.message, 'error'));
          ev.target.disabled = false;
        }
      } }, 'Revoke')) });
  }
  body.append(table(cols, rows, { caption: 'Managed keys' }));
}
