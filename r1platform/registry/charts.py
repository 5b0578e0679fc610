"""Server-rendered SVG charts for the dashboard: no JavaScript, no external assets.

:func:`latency_chart_svg` draws a version's benchmark rows as two small line charts side by side,
latency (p50, with p99 as a lighter dashed line) and throughput against batch size. Batch sizes
are spaced by their index, which is log2 spacing for the usual 1, 2, 4, 8... sweeps. Every piece
of text is escaped, so the markup is safe to put in a page as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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

# One hue per backend; p99 is the same hue, lighter and dashed.
PALETTE = ("#3b5bdb", "#2b8a3e", "#e8590c", "#9c36b5", "#0c8599", "#c2255c")


def _get(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, dict) else getattr(row, name, None)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base * (1 + 1e-9):
            return step * base
    return 10 * base


def _fmt(value: float) -> str:
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


def _series(rows: Iterable[Any]) -> tuple[list[int], dict[str, dict[int, dict[str, float]]]]:
    """Batch sizes (sorted) and, per backend, the values at each batch size.

    A backend measured twice at one batch size keeps its first row (callers pass one job's rows).
    """
    batches: set[int] = set()
    by_backend: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        batch = _get(row, "batch_size")
        if batch is None:
            continue
        values = {k: _number(_get(row, k)) for k in ("p50_ms", "p99_ms", "throughput")}
        if values["p50_ms"] is None and values["throughput"] is None:
            continue
        backend = str(_get(row, "backend") or "")
        points = by_backend.setdefault(backend, {})
        if int(batch) in points:
            continue
        points[int(batch)] = values
        batches.add(int(batch))
    return sorted(batches), by_backend


def _panel(
    *,
    x0: float,
    title: str,
    y_label: str,
    batches: list[int],
    lines: list[dict],
    unit: str,
) -> list[str]:
    """One chart: frame, grid, ticks, labels and its lines. ``lines`` carry their points."""
    plot_w = PANEL_W - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM
    left, top = x0 + MARGIN_LEFT, MARGIN_TOP
    bottom = top + plot_h
    highest = max((v for line in lines for _, v in line["points"]), default=0.0)
    y_max = _nice_max(highest)

    def x_at(index: int) -> float:
        if len(batches) == 1:
            return left + plot_w / 2
        pad = plot_w * 0.06
        return left + pad + index * (plot_w - 2 * pad) / (len(batches) - 1)

    def y_at(value: float) -> float:
        return bottom - (value / y_max) * plot_h

    out = [f'<g class="chart-panel" data-chart="{escape(title.lower())}">']
    out.append(
        f'<text class="chart-title" x="{left:.1f}" y="{top - 12:.1f}">{escape(title)}</text>'
    )
    for i in range(Y_TICKS + 1):
        value = y_max * i / Y_TICKS
        y = y_at(value)
        out.append(
            f'<line class="chart-grid" x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_w:.1f}" '
            f'y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="chart-tick" x="{left - 6:.1f}" y="{y + 3.5:.1f}" '
            f'text-anchor="end">{escape(_fmt(value))}</text>'
        )
    out.append(
        f'<line class="chart-axis" x1="{left:.1f}" y1="{bottom:.1f}" x2="{left + plot_w:.1f}" '
        f'y2="{bottom:.1f}"/>'
    )
    out.append(
        f'<line class="chart-axis" x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" '
        f'y2="{bottom:.1f}"/>'
    )
    for index, batch in enumerate(batches):
        x = x_at(index)
        out.append(
            f'<line class="chart-axis" x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" '
            f'y2="{bottom + 4:.1f}"/>'
        )
        out.append(
            f'<text class="chart-tick chart-xtick" x="{x:.1f}" y="{bottom + 16:.1f}" '
            f'text-anchor="middle">{batch}</text>'
        )
    out.append(
        f'<text class="chart-label" x="{left + plot_w / 2:.1f}" y="{PANEL_H - 6:.1f}" '
        f'text-anchor="middle">batch size</text>'
    )
    mid = top + plot_h / 2
    out.append(
        f'<text class="chart-label" x="{x0 + 14:.1f}" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 14:.1f} {mid:.1f})">{escape(y_label)}</text>'
    )
    index_of = {b: i for i, b in enumerate(batches)}
    for line in lines:
        coords = [(x_at(index_of[b]), y_at(v), b, v) for b, v in line["points"]]
        if not coords:
            continue
        color = escape(line["color"])
        dash = ' stroke-dasharray="4 3"' if line["light"] else ""
        opacity = ' stroke-opacity="0.45"' if line["light"] else ""
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords)
            out.append(
                f'<polyline class="chart-line" data-series="{escape(line["series"])}" '
                f'fill="none" stroke="{color}" stroke-width="2"{dash}{opacity} points="{path}"/>'
            )
        fill_opacity = ' fill-opacity="0.45"' if line["light"] else ""
        radius = 2.5 if line["light"] else 3.5
        for x, y, batch, value in coords:
            tooltip = f"{line['name']} · batch {batch}: {_fmt(value)} {unit}"
            out.append(
                f'<circle class="chart-point" data-series="{escape(line["series"])}" '
                f'data-batch="{batch}" cx="{x:.1f}" cy="{y:.1f}" r="{radius}" '
                f'fill="{color}"{fill_opacity}><title>{escape(tooltip)}</title></circle>'
            )
    out.append("</g>")
    return out


def latency_chart_svg(rows: Iterable[Any]) -> str:
    """Latency and throughput against batch size as one SVG document; "" without rows.

    ``rows`` are BenchmarkResult objects (or dicts) with batch_size, backend, p50_ms, p99_ms and
    throughput. Each backend is one colour: a solid p50 line with a lighter dashed p99 line on the
    left chart, its throughput on the right. Every point is a <circle> carrying ``data-series``
    (``p50``, ``p99`` or ``throughput``, suffixed with ``:backend`` when there are several) and
    ``data-batch``, with a <title> tooltip.
    """
    batches, by_backend = _series(rows)
    if not batches:
        return ""
    several = len(by_backend) > 1
    latency: list[dict] = []
    throughput: list[dict] = []
    legend: list[tuple[str, str]] = []
    for i, (backend, points) in enumerate(sorted(by_backend.items())):
        color = PALETTE[i % len(PALETTE)]
        suffix = f":{backend}" if several else ""
        prefix = f"{backend} " if several and backend else ""
        ordered = [(b, points[b]) for b in batches if b in points]
        for key, light, name in (("p50_ms", False, "p50"), ("p99_ms", True, "p99")):
            latency.append(
                {
                    "series": name + suffix,
                    "name": prefix + name,
                    "color": color,
                    "light": light,
                    "points": [(b, v[key]) for b, v in ordered if v[key] is not None],
                }
            )
        throughput.append(
            {
                "series": "throughput" + suffix,
                "name": prefix + "throughput",
                "color": color,
                "light": False,
                "points": [(b, v["throughput"]) for b, v in ordered if v["throughput"] is not None],
            }
        )
        legend.append((color, backend or "benchmark"))

    width = 2 * PANEL_W + GAP
    legend_h = 18
    height = PANEL_H + legend_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bench-chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMinYMin meet" data-testid="latency-chart">',
        "<title>Latency (p50 and p99) and throughput by batch size</title>",
    ]
    out += _panel(x0=0, title="Latency", y_label="ms", batches=batches, lines=latency, unit="ms")
    out += _panel(
        x0=PANEL_W + GAP,
        title="Throughput",
        y_label="samples/s",
        batches=batches,
        lines=throughput,
        unit="samples/s",
    )
    # Legend: one swatch per backend, then what the line styles mean.
    x, y = MARGIN_LEFT, PANEL_H + 10
    out.append('<g class="chart-legend">')
    for color, label in legend:
        out.append(
            f'<rect x="{x}" y="{y - 8}" width="10" height="10" rx="2" fill="{escape(color)}"/>'
        )
        out.append(f'<text x="{x + 14}" y="{y + 1}">{escape(label)}</text>')
        x += 24 + 7 * len(label)
    out.append(
        f'<text x="{x}" y="{y + 1}" class="chart-note">solid: p50 · dashed, lighter: p99</text>'
    )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)
