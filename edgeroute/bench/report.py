"""Results as a text table, JSON, and a self-contained HTML percentile plot (inline SVG, no scripts)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import orjson

from edgeroute.bench.loadgen import PERCENTILES, Stats, merge_percentiles

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def table(stats: list[Stats], metric: str = "latency_ms") -> str:
    """One row per target: counts, req/s and the percentiles of `metric` in ms."""
    cols = ["target", "ok", "failed", "req/s"] + [f"p{p:g}" for p in PERCENTILES] + ["max"]
    rows = [cols]
    for s in stats:
        d = s.summary()
        m = d[metric] or {}
        rows.append(
            [s.name, str(s.ok), str(s.failed), f"{s.rps:.0f}"]
            + [_fmt(m.get(f"p{p:g}")) for p in PERCENTILES]
            + [_fmt(m.get("max"))]
        )
    return render_rows(rows, title=f"{metric} (ms, from intended send time)")


def render_rows(rows: list[list[str]], title: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def svg_plot(series: dict[str, list[tuple[float, float]]], title: str, width: int = 760, height: int = 380) -> str:
    """Latency by percentile; x on a log scale of 1/(1-p) (the classic HdrHistogram plot)."""
    ml, mr, mt, mb = 60, 20, 30, 50
    pw, ph = width - ml - mr, height - mt - mb
    xmax = 5.0  # up to 99.999
    ymax = max((v for pts in series.values() for _, v in pts), default=1.0) or 1.0
    ymax = 10 ** math.ceil(math.log10(ymax)) if ymax > 0 else 1.0
    if ymax / 2 >= max((v for pts in series.values() for _, v in pts), default=0.0):
        ymax /= 2

    def x(p: float) -> float:
        k = -math.log10(max(1e-9, 1 - p / 100))
        return ml + pw * min(k, xmax) / xmax

    def y(v: float) -> float:
        return mt + ph * (1 - min(v, ymax) / ymax)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for k, label in enumerate(["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]):
        xx = ml + pw * k / xmax
        out.append(f'<line x1="{xx}" y1="{mt}" x2="{xx}" y2="{mt + ph}" stroke="#eee"/>')
        out.append(f'<text x="{xx}" y="{mt + ph + 15}" text-anchor="middle">{label}</text>')
    for i in range(6):
        v = ymax * i / 5
        yy = y(v)
        out.append(f'<line x1="{ml}" y1="{yy}" x2="{ml + pw}" y2="{yy}" stroke="#eee"/>')
        out.append(f'<text x="{ml - 5}" y="{yy + 4}" text-anchor="end">{v:g}</text>')
    out.append(
        f'<text x="15" y="{mt + ph / 2}" transform="rotate(-90 15 {mt + ph / 2})" text-anchor="middle">ms</text>'
    )
    out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle">percentile</text>')
    for i, (name, pts) in enumerate(series.items()):
        c = _COLORS[i % len(_COLORS)]
        if pts:
            d = " ".join(f"{x(p):.1f},{y(v):.1f}" for p, v in pts)
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        out.append(f'<rect x="{ml + 10}" y="{mt + 8 + 16 * i}" width="12" height="4" fill="{c}"/>')
        out.append(f'<text x="{ml + 28}" y="{mt + 13 + 16 * i}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def latency_svg(stats: list[Stats], title: str) -> str:
    """The latency percentile plot of a run (the HTML report's first plot), on its own."""
    return svg_plot({s.name: merge_percentiles(s.total) for s in stats}, f"{title}: latency")


def write_html(path: str | Path, title: str, stats: list[Stats], extra: dict[str, Any] | None = None) -> None:
    """A self-contained page: plots of total latency (and TTFT when streaming), the table, the JSON."""
    plots = [svg_plot({s.name: merge_percentiles(s.total) for s in stats}, f"{title}: latency")]
    if any(s.ttft.get_total_count() for s in stats):
        plots.append(svg_plot({s.name: merge_percentiles(s.ttft) for s in stats}, f"{title}: time to first token"))
    data = {"stats": [s.summary() for s in stats], **(extra or {})}
    body = "\n".join(plots)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>{body}"
        f"<pre>{html.escape(table(stats))}</pre>"
        f"<pre>{html.escape(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())}</pre></body></html>"
    )
    Path(path).write_text(page)
