// DOM building without innerHTML: every value from the API becomes a text node, never markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function panel(title, ...children) {
  const id = 'p-' + title.toLowerCase().replace(/[^a-z0-9]+/g, '-');
  return h('section', { class: 'panel', 'aria-labelledby': id }, h('h2', { id }, title), ...children);
}

// A table: columns [{label, key | value(row), num, format}], rows of objects.
export function table(columns, rows, opts = {}) {
  const head = h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)));
  const body = rows.map((r) =>
    h('tr', opts.rowAttrs ? opts.rowAttrs(r) : {},
      columns.map((c) => {
        const raw = c.value ? c.value(r) : r[c.key];
        const shown = c.format ? c.format(raw, r) : raw;
        const attrs = { class: c.num ? 'num' : c.wrap ? 'wrap' : null };
        if (c.key && (typeof raw === 'number')) attrs['data-value'] = String(raw);
        if (c.field) attrs['data-field'] = c.field;
        return h('td', attrs, shown === null || shown === undefined ? '–' : shown);
      })));
  const t = h('table', {}, opts.caption ? h('caption', { class: 'sr-only' }, opts.caption) : null,
    h('thead', {}, head), h('tbody', {}, body));
  return h('div', { class: 'tablewrap' }, t);
}

export function notice(text, kind) {
  return h('p', { class: 'notice' + (kind ? ' ' + kind : ''), role: kind === 'error' ? 'alert' : null }, text);
}

export function kpi(label, value, raw, field) {
  return h('li', { class: 'kpi' },
    h('span', { class: 'label' }, label),
    h('span', { class: 'value', 'data-field': field, 'data-value': raw === null || raw === undefined ? '' : String(raw) }, value));
}

export function meter(fraction, label) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const m = h('div', { class: 'meter' + (f >= 1 ? ' bad' : f >= 0.8 ? ' warn' : ''), role: 'meter',
    'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': String(Math.round(f * 100)), 'aria-label': label });
  const bar = h('span');
  bar.style.width = (f * 100).toFixed(1) + '%';
  m.append(bar);
  return m;
}

export function announce(text) {
  const s = document.getElementById('status');
  if (s) s.textContent = text;
}
