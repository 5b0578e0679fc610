"""The SVG primitives every chart family shares: geometry, palette, numbers, frame, legend.

Charts are strings of markup built line by line; every piece of text that reaches them goes
through :func:`html.escape`, so the result can be put in a page as it is.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

# Panel geometry (SVG user units; the <svg> scales to its container through its viewBox).
PANEL_W = 340
PANEL_H = 210
GAP = 28
MARGIN_LEFT = 58
MARGIN_RIGHT = 14
MARGIN_TOP = 30
MARGIN_BOTTOM = 42
Y_TICKS = 4

# One hue per series family; a lighter variant (p99, 4xx) is the same hue, dashed.
PALETTE = ("#3b5bdb", "#2b8a3e", "#e8590c", "#9c36b5", "#0c8599", "#c2255c")


def field(row: Any, name: str) -> Any:
    """``name`` of a dict or of an object (model rows and plain dicts are both charted)."""
    return row.get(name) if isinstance(row, dict) else getattr(row, name, None)


def number(value: Any) -> float | None:
    """``value`` as a finite, non-negative float, or None (missing, bool, NaN, negative)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) and result >= 0 else None


def nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base * (1 + 1e-9):
            return step * base
    return 10 * base


def fmt(value: float) -> str:
    """A compact tick or tooltip number: 0.005, 1.25, 812, 12.5k, 3.2M."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    for threshold, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if magnitude >= threshold:
            return f"{value / scale:.3g}{suffix}"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def frame(
    title: str, left: float, top: float, bottom: float, plot_w: float, y_max: float
) -> list[str]:
    """A panel's opening: its group, title, horizontal grid with y ticks, and both axes."""
    plot_h = bottom - top
    out = [f'<g class="chart-panel" data-chart="{escape(title.lower())}">']
    out.append(
        f'<text class="chart-title" x="{left:.1f}" y="{top - 12:.1f}">{escape(title)}</text>'
    )
    for i in range(Y_TICKS + 1):
        value = y_max * i / Y_TICKS
        y = bottom - (value / y_max) * plot_h
        out.append(
            f'<line class="chart-grid" x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_w:.1f}" '
            f'y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="chart-tick" x="{left - 6:.1f}" y="{y + 3.5:.1f}" '
            f'text-anchor="end">{escape(fmt(value))}</text>'
        )
    out.append(
        f'<line class="chart-axis" x1="{left:.1f}" y1="{bottom:.1f}" x2="{left + plot_w:.1f}" '
        f'y2="{bottom:.1f}"/>'
    )
    out.append(
        f'<line class="chart-axis" x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" '
        f'y2="{bottom:.1f}"/>'
    )
    return out


def x_tick(x: float, bottom: float, label: str) -> list[str]:
    """A tick mark under the x axis at ``x`` and its label (``label`` is markup, escaped)."""
    return [
        f'<line class="chart-axis" x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" '
        f'y2="{bottom + 4:.1f}"/>',
        f'<text class="chart-tick chart-xtick" x="{x:.1f}" y="{bottom + 16:.1f}" '
        f'text-anchor="middle">{label}</text>',
    ]


def axis_labels(
    x0: float, left: float, plot_w: float, top: float, x_label: str, y_label: str
) -> list[str]:
    """The x axis's label under the panel and the y axis's, rotated, at its left edge.

    ``x_label`` is markup (already escaped); ``y_label`` is text."""
    plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM
    mid = top + plot_h / 2
    return [
        f'<text class="chart-label" x="{left + plot_w / 2:.1f}" y="{PANEL_H - 6:.1f}" '
        f'text-anchor="middle">{x_label}</text>',
        f'<text class="chart-label" x="{x0 + 14:.1f}" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 14:.1f} {mid:.1f})">{escape(y_label)}</text>',
    ]


def legend(items: list[tuple[str, str]], y: float, note: str = "") -> list[str]:
    """One swatch and label per ``(colour, label)``, then ``note`` (what the line styles mean)."""
    x = MARGIN_LEFT
    out = ['<g class="chart-legend">']
    for color, label in items:
        out.append(
            f'<rect x="{x}" y="{y - 8}" width="10" height="10" rx="2" fill="{escape(color)}"/>'
        )
        out.append(f'<text x="{x + 14}" y="{y + 1}">{escape(label)}</text>')
        x += 24 + 7 * len(label)
    if note:
        out.append(f'<text x="{x}" y="{y + 1}" class="chart-note">{escape(note)}</text>')
    out.append("</g>")
    return out


def document(width: float, height: float, css_class: str, testid: str, title: str) -> list[str]:
    """The opening <svg> of a two- or three-panel chart, scaling with its container."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMinYMin meet" data-testid="{testid}">',
        f"<title>{escape(title)}</title>",
    ]
