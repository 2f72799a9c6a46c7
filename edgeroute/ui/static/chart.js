// Small SVG charts drawn by our own code: time series (line, area, bars) with a time axis and
// a tooltip that follows the pointer or the arrow keys; horizontal bar lists; an attempts
// timeline. Charts redraw on resize and carry an aria-label (plus the tables beside them).

const SVG = 'http://www.w3.org/2000/svg';

function s(tag, attrs, ...kids) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const c of kids) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
}

const TIME_STEPS = [1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

function timeTicks(t0, t1, target) {
  const step = TIME_STEPS.find((st) => (t1 - t0) / st <= target) || 604800;
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { ticks, step };
}

function timeLabel(t, step) {
  const d = new Date(t * 1000);
  const p = (n) => String(n).padStart(2, '0');
  // UTC, as every time the console shows (tables, filters, the API's own).
  const hm = p(d.getUTCHours()) + ':' + p(d.getUTCMinutes());
  if (step < 60) return hm + ':' + p(d.getUTCSeconds());
  if (step < 86400) return hm;
  return p(d.getUTCMonth() + 1) + '-' + p(d.getUTCDate());
}

// Redraws `draw(width)` into `el` now and whenever the element's width changes.
function responsive(el, draw) {
  let last = -1;
  const run = () => {
    const w = Math.max(240, Math.floor(el.clientWidth || 600));
    if (w === last) return;
    last = w;
    while (el.firstChild) el.firstChild.remove();
    draw(w);
  };
  run();
  if (typeof ResizeObserver !== 'undefined') new ResizeObserver(run).observe(el);
}

function legend(series) {
  const ul = document.createElement('ul');
  ul.className = 'legend';
  series.forEach((sr, i) => {
    const li = document.createElement('li');
    const sw = document.createElement('i');
    sw.className = 'sw' + ((i % 6) + 1);
    li.append(sw, document.createTextNode(sr.name));
    ul.append(li);
  });
  return ul;
}

/**
 * A time-series chart. opts: {label, series: [{name, points: [[t, v]], kind: 'line'|'area'|'bar'}],
 * t0, t1, bucket (seconds, for bars), yMax (fixed top), yFormat, height}.
 */
export function timeChart(opts) {
  const el = document.createElement('div');
  el.className = 'chart';
  const box = document.createElement('div');
  el.append(box);
  // Named even when it draws one series: a deployment's error rate and in-flight charts were
  // two unlabelled axes beside the latency's legend.
  el.append(legend(opts.series));
  const fmt = opts.yFormat || ((v) => String(v));
  const H = opts.height || 180;
  responsive(box, (W) => {
    const m = { l: 56, r: 12, t: 10, b: 24 };
    const iw = W - m.l - m.r, ih = H - m.t - m.b;
    const all = opts.series.flatMap((sr) => sr.points);
    const t0 = opts.t0 ?? Math.min(...all.map((p) => p[0]));
    const t1 = opts.t1 ?? Math.max(...all.map((p) => p[0]));
    const span = Math.max(1, t1 - t0);
    let vmax = opts.yMax ?? Math.max(0, ...all.map((p) => p[1] ?? 0));
    if (!(vmax > 0)) vmax = 1;
    const ystep = niceStep(vmax, 4);
    const ytop = opts.yMax ?? Math.ceil(vmax / ystep) * ystep;
    const x = (t) => m.l + ((t - t0) / span) * iw;
    const y = (v) => m.t + ih - (Math.min(v, ytop) / ytop) * ih;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opts.label, tabindex: 0 });
    const grid = s('g', { class: 'grid' });
    const axis = s('g', { class: 'axis' });
    for (let v = 0; v <= ytop + 1e-9; v += ystep) {
      grid.append(s('line', { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
      axis.append(s('text', { x: m.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmt(v)));
    }
    const { ticks, step } = timeTicks(t0, t1, Math.max(2, Math.floor(iw / 80)));
    for (const t of ticks) {
      axis.append(s('line', { x1: x(t), x2: x(t), y1: m.t + ih, y2: m.t + ih + 4 }));
      axis.append(s('text', { x: x(t), y: H - 6, 'text-anchor': 'middle' }, timeLabel(t, step)));
    }
    axis.append(s('line', { x1: m.l, x2: W - m.r, y1: m.t + ih, y2: m.t + ih }));
    svg.append(grid, axis);
    const nbars = opts.series.filter((sr) => sr.kind === 'bar').length;
    let bi = 0;
    opts.series.forEach((sr, i) => {
      const cls = 'c' + ((i % 6) + 1);
      const pts = sr.points.filter((p) => p[1] !== null && p[1] !== undefined).sort((a, b) => a[0] - b[0]);
      if (sr.kind === 'bar') {
        const bw = Math.max(1, ((opts.bucket || span / 60) / span) * iw * 0.9 / nbars);
        for (const [t, v] of pts) {
          svg.append(s('rect', { class: 'bar ' + cls, x: x(t) + bi * bw, y: y(v), width: bw, height: Math.max(0, m.t + ih - y(v)) }));
        }
        bi += 1;
        return;
      }
      if (!pts.length) return;
      const d = pts.map((p, k) => (k ? 'L' : 'M') + x(p[0]).toFixed(1) + ',' + y(p[1]).toFixed(1)).join('');
      if (sr.kind === 'area') {
        const base = (m.t + ih).toFixed(1);
        svg.append(s('path', { class: 'area ' + cls, d: d + `L${x(pts[pts.length - 1][0]).toFixed(1)},${base}L${x(pts[0][0]).toFixed(1)},${base}Z` }));
      }
      svg.append(s('path', { class: 'line ' + cls, d }));
      if (pts.length === 1) svg.append(s('circle', { class: 'dot ' + cls, cx: x(pts[0][0]), cy: y(pts[0][1]), r: 3 }));
    });
    // Tooltip: nearest bucket to the pointer, or stepped with the arrow keys.
    const times = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
    const cursor = s('line', { class: 'cursor', y1: m.t, y2: m.t + ih, visibility: 'hidden' });
    svg.append(cursor);
    const tip = document.createElement('div');
    tip.className = 'tip';
    tip.hidden = true;
    box.append(svg, tip);
    let idx = -1;
    const show = (k) => {
      if (!times.length) return;
      idx = Math.max(0, Math.min(times.length - 1, k));
      const t = times[idx];
      cursor.setAttribute('x1', x(t));
      cursor.setAttribute('x2', x(t));
      cursor.setAttribute('visibility', 'visible');
      tip.textContent = '';
      const head = document.createElement('div');
      head.textContent = new Date(t * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
      tip.append(head);
      for (const sr of opts.series) {
        const p = sr.points.find((q) => q[0] === t);
        const row = document.createElement('div');
        row.textContent = sr.name + ': ' + (p && p[1] !== null ? fmt(p[1]) : '–');
        tip.append(row);
      }
      tip.hidden = false;
      const left = Math.min(x(t) + 10, W - tip.offsetWidth - 4);
      tip.style.left = Math.max(0, left) + 'px';
      tip.style.top = m.t + 'px';
    };
    const hide = () => { cursor.setAttribute('visibility', 'hidden'); tip.hidden = true; };
    svg.addEventListener('pointermove', (ev) => {
      const r = svg.getBoundingClientRect();
      const t = t0 + ((ev.clientX - r.left) * (W / r.width) - m.l) / iw * span;
      let best = 0;
      times.forEach((tt, k) => { if (Math.abs(tt - t) < Math.abs(times[best] - t)) best = k; });
      show(best);
    });
    svg.addEventListener('pointerleave', hide);
    svg.addEventListener('blur', hide);
    svg.addEventListener('keydown', (ev) => {
      if (ev.key === 'ArrowRight' || ev.key === 'ArrowLeft') {
        ev.preventDefault();
        show(idx < 0 ? times.length - 1 : idx + (ev.key === 'ArrowRight' ? 1 : -1));
      } else if (ev.key === 'Escape') hide();
    });
    if (!times.length) {
      svg.append(s('text', { class: 'val', x: m.l + iw / 2, y: m.t + ih / 2, 'text-anchor': 'middle' }, 'no data in this range'));
    }
  });
  return el;
}

/** Horizontal bars: opts {label, rows: [{label, value}], format}. */
export function barList(opts) {
  const el = document.createElement('div');
  el.className = 'chart';
  const fmt = opts.format || ((v) => String(v));
  const rows = opts.rows;
  responsive(el, (W) => {
    const rowH = 22, labelW = Math.min(180, Math.floor(W * 0.35)), valW = 90;
    const H = Math.max(rowH, rows.length * rowH) + 4;
    const max = Math.max(0, ...rows.map((r) => r.value || 0)) || 1;
    const bw = W - labelW - valW - 8;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opts.label });
    rows.forEach((r, i) => {
      const y0 = i * rowH + 2;
      const name = String(r.label ?? '–');
      svg.append(s('text', { class: 'label', x: 0, y: y0 + 15 }, name.length > 26 ? name.slice(0, 25) + '…' : name));
      const w = Math.max(1, ((r.value || 0) / max) * bw);
      svg.append(s('rect', { class: 'bar c' + ((i % 6) + 1), x: labelW, y: y0 + 3, width: w, height: rowH - 8 },
        s('title', {}, name + ': ' + fmt(r.value))));
      svg.append(s('text', { class: 'val', x: labelW + w + 6, y: y0 + 15 }, fmt(r.value)));
    });
    if (!rows.length) svg.append(s('text', { class: 'val', x: 0, y: 15 }, 'no data'));
    el.append(svg);
  });
  return el;
}

/** A state strip over time: opts {label, t0, t1, points: [[t, state]]} (each state holds until the next). */
export function stateStrip(opts) {
  const el = document.createElement('div');
  el.className = 'chart';
  responsive(el, (W) => {
    const H = 14;
    const span = Math.max(1, opts.t1 - opts.t0);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opts.label });
    const pts = opts.points;
    pts.forEach(([t, st], i) => {
      const end = i + 1 < pts.length ? pts[i + 1][0] : opts.t1;
      const xa = ((Math.max(t, opts.t0) - opts.t0) / span) * W, xb = ((end - opts.t0) / span) * W;
      svg.append(s('rect', { class: 'st-' + st, x: xa, y: 0, width: Math.max(1, xb - xa), height: H },
        s('title', {}, st + ' from ' + new Date(t * 1000).toISOString().slice(11, 19) + ' UTC')));
    });
    el.append(svg);
  });
  return el;
}

/**
 * The attempts of one request on a millisecond axis: opts {label, attempts: [{name, kind,
 * start_ms, latency_ms, ttft_ms, ok, outcome}]}.
 */
export function attemptsTimeline(opts) {
  const el = document.createElement('div');
  el.className = 'chart';
  const rows = opts.attempts;
  responsive(el, (W) => {
    const rowH = 26, labelW = Math.min(220, Math.floor(W * 0.4)), top = 4, axisH = 22;
    const H = top + rows.length * rowH + axisH;
    const end = Math.max(1, ...rows.map((a) => (a.start_ms || 0) + (a.latency_ms || 0)));
    const step = niceStep(end, Math.max(2, Math.floor((W - labelW) / 90)));
    const xmax = Math.ceil(end / step) * step;
    const iw = W - labelW - 10;
    const x = (v) => labelW + (v / xmax) * iw;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opts.label });
    const axis = s('g', { class: 'axis' });
    const ay = top + rows.length * rowH;
    axis.append(s('line', { x1: labelW, x2: W - 10, y1: ay, y2: ay }));
    // Ticks under a millisecond apart keep the decimals that tell them apart (a request of
    // 0.8 ms read "0 ms, 0 ms, 0 ms, 1 ms, 1 ms, 1 ms").
    const digits = step < 1 ? Math.ceil(-Math.log10(step) - 1e-9) : 0;
    const label = (v) => v.toFixed(digits) + ' ms';
    for (let i = 0, v = 0; v <= xmax + 1e-9; i += 1, v = i * step) {
      axis.append(s('line', { x1: x(v), x2: x(v), y1: top, y2: ay + 4 }));
      axis.append(s('text', { x: x(v), y: ay + 16, 'text-anchor': 'middle' }, label(v)));
    }
    svg.append(axis);
    rows.forEach((a, i) => {
      const y0 = top + i * rowH;
      svg.append(s('text', { class: 'label', x: 0, y: y0 + 17 }, `${i + 1}. ${a.kind || 'attempt'} → ${a.name}`));
      const xa = x(a.start_ms || 0), w = Math.max(2, x((a.start_ms || 0) + (a.latency_ms || 0)) - xa);
      const cls = a.ok ? 'ok' : a.outcome === 'cancelled' || a.outcome === 'hedge_lost' ? 'other' : 'fail';
      svg.append(s('rect', { class: cls, x: xa, y: y0 + 5, width: w, height: rowH - 10, rx: 2 },
        s('title', {}, `${a.kind || 'attempt'} ${a.name}: ${a.outcome}, starts at ${label(a.start_ms || 0)}, ${label(a.latency_ms || 0)}`)));
      if (a.ttft_ms !== null && a.ttft_ms !== undefined) {
        const xt = x((a.start_ms || 0) + a.ttft_ms);
        svg.append(s('line', { class: 'ttft', x1: xt, x2: xt, y1: y0 + 3, y2: y0 + rowH - 3 }, s('title', {}, 'first token at ' + Math.round(a.ttft_ms) + ' ms')));
      }
    });
    el.append(svg);
  });
  return el;
}
