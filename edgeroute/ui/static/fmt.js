// Number and time formats used by every page (and by the browser tests to compare with the API).

const nf = (d) => new Intl.NumberFormat('en-US', { maximumFractionDigits: d, minimumFractionDigits: 0 });
const N0 = nf(0), N1 = nf(1), N2 = nf(2);

export function num(v) { return v === null || v === undefined ? '–' : N0.format(v); }
export function dec(v, d = 2) { return v === null || v === undefined ? '–' : nf(d).format(v); }
export function pct(v) { return v === null || v === undefined ? '–' : N1.format(v * 100) + '%'; }
export function ms(v) {
  if (v === null || v === undefined) return '–';
  if (v >= 10000) return N1.format(v / 1000) + ' s';
  return (v < 10 && v !== 0 ? N1 : N0).format(v) + ' ms';
}
export function usd(v) {
  if (v === null || v === undefined) return '–';
  const a = Math.abs(v);
  const d = a === 0 ? 2 : a < 0.01 ? 6 : a < 1 ? 4 : 2;
  return (v < 0 ? '-$' : '$') + a.toFixed(d);
}
export function rate(v) {
  if (v === null || v === undefined) return '–';
  return (v >= 10 ? N1.format(v) : v >= 0.1 ? N2.format(v) : Number(v.toPrecision(2)).toString()) + '/s';
}

export function time(ts) {
  if (!ts) return '–';
  const d = new Date(ts * 1000);
  return d.toISOString().replace('T', ' ').slice(0, 19) + 'Z';
}

export function durationLabel(s) {
  if (s < 120) return Math.round(s) + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  if (s < 172800) return Math.round(s / 3600) + ' h';
  return Math.round(s / 86400) + ' d';
}

export const RANGES = { '15m': 900, '1h': 3600, '6h': 21600, '24h': 86400, '7d': 604800, '30d': 2592000 };

// A bucket width giving roughly 60 points over the range.
export function bucketFor(seconds) {
  const steps = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400];
  return steps.find((s) => seconds / s <= 90) || 86400;
}
