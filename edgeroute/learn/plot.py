"""A dependency-free SVG of cost-quality curves (``router eval --plot FILE.svg``)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

W, H, PAD = 640, 420, 56
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f")


def svg(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    x_label: str = "cost (fraction of the best model's cost)",
    y_label: str = "mean quality",
) -> str:
    """Each series is (name, x, y); one point draws a marker, several a line with markers."""
    xs = [v for _, x, _ in series for v in x] or [0.0, 1.0]
    ys = [v for _, _, y in series for v in y] or [0.0, 1.0]
    x0, x1 = min(0.0, min(xs)), max(xs) * 1.02 or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad_y = (y1 - y0) * 0.05
    y0, y1 = y0 - pad_y, y1 + pad_y

    def px(v: float) -> float:
        return PAD + (v - x0) / (x1 - x0) * (W - 2 * PAD)

    def py(v: float) -> float:
        return H - PAD - (v - y0) / (y1 - y0) * (H - 2 * PAD)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 14}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">{escape(y_label)}</text>',
    ]
    for i in range(6):
        vx = x0 + (x1 - x0) * i / 5
        vy = y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{px(vx):.1f}" y="{H - PAD + 14}" text-anchor="middle">{vx:.2f}</text>')
        out.append(f'<text x="{PAD - 6}" y="{py(vy) + 4:.1f}" text-anchor="end">{vy:.3f}</text>')
    for k, (name, x, y) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y, strict=True))
        if len(x) > 1:
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for a, b in zip(x, y, strict=True):
            out.append(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{colour}"/>')
        ly = PAD + 14 * k
        out.append(f'<rect x="{W - PAD - 150}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{W - PAD - 136}" y="{ly + 1}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
