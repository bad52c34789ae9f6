"""Charts as inline SVG, drawn on the server: readable without JavaScript or a CDN, and allowed
by the panel's Content-Security-Policy (presentation attributes only, no inline style or script)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

# Colour-blind-safe palette (Okabe-Ito), one colour per series in turn.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")


@dataclass(frozen=True)
class Series:
    """One line: its name in the legend and its (x, y) points, x ascending."""

    name: str
    points: Sequence[tuple[float, float]]


def _nice(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_ticks: Sequence[tuple[float, str]] = (),
    y_label: str = "",
    width: int = 640,
    height: int = 240,
) -> Markup:
    """An SVG line chart of `series` (a dot per point, so a single point still shows), with four
    y gridlines, the given x tick labels and a legend; `title` is its accessible name."""
    pad_left, pad_right, pad_top, pad_bottom = 56, 12, 24, 40 + 16 * ((len(series) + 2) // 3)
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_low, y_high = min(0.0, *ys) if ys else 0.0, max(ys) if ys else 1.0
    x_span, y_span = (x_high - x_low) or 1.0, (y_high - y_low) or 1.0

    def px(x: float) -> float:
        return pad_left + plot_w * (x - x_low) / x_span

    def py(y: float) -> float:
        return pad_top + plot_h * (1 - (y - y_low) / y_span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#bbb"/>',
    ]
    for i in range(5):
        value = y_low + y_span * i / 4
        y = py(value)
        parts.append(f'<line x1="{pad_left}" x2="{pad_left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<text x="{pad_left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#444">'
            f"{escape(_nice(value))}</text>"
        )
    for x, label in x_ticks:
        parts.append(
            f'<text x="{px(x):.1f}" y="{pad_top + plot_h + 16}" text-anchor="middle" font-size="11" '
            f'fill="#444">{escape(label)}</text>'
        )
    if y_label:
        parts.append(
            f'<text x="12" y="{pad_top + plot_h / 2:.1f}" font-size="11" fill="#444" '
            f'transform="rotate(-90 12 {pad_top + plot_h / 2:.1f})" text-anchor="middle">{escape(y_label)}</text>'
        )
    if not xs:
        parts.append(
            f'<text x="{pad_left + plot_w / 2}" y="{pad_top + plot_h / 2}" text-anchor="middle" '
            f'font-size="13" fill="#777">{escape(title)}: -</text>'
        )
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        if len(s.points) > 1:
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(s.points) <= 60:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in s.points]
        lx, ly = pad_left + (n % 3) * (plot_w / 3), pad_top + plot_h + 34 + 16 * (n // 3)
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 9:.1f}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14:.1f}" y="{ly:.1f}" font-size="11" fill="#222">{escape(s.name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
