"""The parity check's error distribution as a server-rendered SVG bar chart.

The suite records, per output, a histogram of |engine - reference| over log-spaced bins. Each
output is one panel: a bar per bin, bins evenly spaced (so each is a factor of ten or so wider
than the one before), the bin edges under it. Colours and fonts are attributes, not CSS classes,
so the chart looks the same in the dashboard, in the standalone HTML report and in the PDF.
Every piece of text is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from r1platform.core.charts.svg import fmt, nice_max

WIDTH = 680
PANEL_H = 170
MARGIN_LEFT = 56
MARGIN_RIGHT = 24
MARGIN_TOP = 26
MARGIN_BOTTOM = 40
X_LABELS = 6  # at most this many edge labels under a panel
MAX_OUTPUTS = 8
BAR = "#3b5bdb"
INK = "#1d2330"
MUTED = "#6b7385"
GRID = "#eef0f3"
AXIS = "#c8ced8"
FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _edge(value: float) -> str:
    """A bin edge: 0, 1e-06, 2.5e-04, 0.5, 3."""
    if value == 0:
        return "0"
    if 0.01 <= abs(value) < 1000:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.removesuffix(".0")
    return f"{mantissa}e{int(exponent)}"


def _histogram(data: Any) -> tuple[list[float], list[float]] | None:
    """(edges, counts) if ``data`` is a well-formed histogram, else None."""
    if not isinstance(data, dict):
        return None
    edges, counts = data.get("edges"), data.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts:
        return None
    if len(edges) != len(counts) + 1:
        return None
    try:
        edges_f = [float(e) for e in edges]
        counts_f = [float(c) for c in counts]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in edges_f + counts_f) or min(counts_f) < 0:
        return None
    return edges_f, counts_f


def _panel(y0: float, output: str, edges: list[float], counts: list[float]) -> list[str]:
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM
    left, top = MARGIN_LEFT, y0 + MARGIN_TOP
    bottom = top + plot_h
    y_max = nice_max(max(counts))
    step = plot_w / len(counts)
    total = sum(counts)
    out = [f'<g data-output="{escape(output)}">']
    out.append(
        f'<text x="{left}" y="{top - 10:.1f}" font-size="12" font-weight="bold" fill="{INK}" '
        f"{FONT}>{escape(output)}: |engine − reference| per element "
        f"({int(total):,} elements)</text>"
    )
    for i in range(5):
        value = y_max * i / 4
        y = bottom - value / y_max * plot_h
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 3.5:.1f}" text-anchor="end" font-size="10" '
            f'fill="{MUTED}" {FONT}>{escape(fmt(value))}</text>'
        )
    for i, count in enumerate(counts):
        height = count / y_max * plot_h
        x = left + i * step
        tip = f"[{_edge(edges[i])}, {_edge(edges[i + 1])}): {int(count):,}"
        out.append(
            f'<rect x="{x + 1:.1f}" y="{bottom - height:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{height:.1f}" fill="{BAR}" data-count="{int(count)}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    out.append(
        f'<line x1="{left}" y1="{bottom:.1f}" x2="{left + plot_w}" y2="{bottom:.1f}" '
        f'stroke="{AXIS}"/>'
    )
    every = max(1, math.ceil(len(edges) / X_LABELS))
    for i in range(0, len(edges), every):
        x = left + i * step
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 14:.1f}" text-anchor="middle" font-size="10" '
            f'fill="{MUTED}" {FONT}>{escape(_edge(edges[i]))}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{y0 + PANEL_H - 8:.1f}" text-anchor="middle" '
        f'font-size="10.5" fill="{MUTED}" {FONT}>absolute error (log-spaced bins)</text>'
    )
    out.append("</g>")
    return out


def parity_chart_svg(histograms: Any) -> str:
    """One bar chart per output of parity's ``{"edges": [...], "counts": [...]}``; "" if none."""
    if not isinstance(histograms, dict):
        return ""
    panels = [
        (str(name), parsed)
        for name, data in histograms.items()
        if (parsed := _histogram(data)) is not None
    ][:MAX_OUTPUTS]
    if not panels:
        return ""
    height = PANEL_H * len(panels)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" class="parity-chart" data-testid="parity-chart">',
        "<title>Parity: distribution of the absolute error against the reference</title>",
    ]
    for index, (name, (edges, counts)) in enumerate(panels):
        out += _panel(index * PANEL_H, name, edges, counts)
    out.append("</svg>")
    return "\n".join(out)
