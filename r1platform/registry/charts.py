"""Server-rendered SVG charts for the dashboard: no JavaScript, no external assets.

:func:`latency_chart_svg` draws a version's benchmark rows as two small line charts side by side,
latency (p50, with p99 as a lighter dashed line) and throughput against batch size. Batch sizes
are spaced by their index, which is log2 spacing for the usual 1, 2, 4, 8... sweeps. Every piece
of text is escaped, so the markup is safe to put in a page as it is.

:func:`version_history_svg` draws the same two charts against version number (one line per batch
size), and :func:`serving_chart_svg` a pool's traffic, errors and latency against time, with the
version changes marked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
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


def _frame(
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
    return out


def _panel(
    *,
    x0: float,
    title: str,
    y_label: str,
    batches: list[int],
    lines: list[dict],
    unit: str,
    x_label: str = "batch size",
    x_name: str = "batch",
) -> list[str]:
    """One chart: frame, grid, ticks, labels and its lines. ``lines`` carry their points.

    The x axis is categorical (``batches``, evenly spaced): batch sizes by default, or version
    numbers with ``x_name="version"`` (ticks then read v1, v2...). Points carry
    ``data-<x_name>``."""
    tick_prefix = "v" if x_name == "version" else ""
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

    out = _frame(title, left, top, bottom, plot_w, y_max)
    for index, batch in enumerate(batches):
        x = x_at(index)
        out.append(
            f'<line class="chart-axis" x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" '
            f'y2="{bottom + 4:.1f}"/>'
        )
        out.append(
            f'<text class="chart-tick chart-xtick" x="{x:.1f}" y="{bottom + 16:.1f}" '
            f'text-anchor="middle">{tick_prefix}{batch}</text>'
        )
    out.append(
        f'<text class="chart-label" x="{left + plot_w / 2:.1f}" y="{PANEL_H - 6:.1f}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
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
            tooltip = f"{line['name']} · {x_name} {tick_prefix}{batch}: {_fmt(value)} {unit}"
            out.append(
                f'<circle class="chart-point" data-series="{escape(line["series"])}" '
                f'data-{x_name}="{batch}" data-value="{_fmt(value)}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="{radius}" fill="{color}"{fill_opacity}>'
                f"<title>{escape(tooltip)}</title></circle>"
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


# --- benchmark history: one model's versions side by side ---------------------------------------


def version_history_svg(rows: Iterable[Any]) -> str:
    """p50 latency and throughput against version number, one line per batch size; "" if none.

    ``rows`` have ``version`` (the number), batch_size, device, p50_ms and throughput: one row per
    (version, batch size, device). A device other than the first adds its name to the series.
    Points are <circle>s with ``data-series`` (``b<batch>`` and ``@device`` when several),
    ``data-version`` and ``data-value``.
    """
    rows = [r for r in rows if _get(r, "version") is not None and _get(r, "batch_size")]
    if not rows:
        return ""
    versions = sorted({int(_get(r, "version")) for r in rows})
    devices = sorted({str(_get(r, "device") or "") for r in rows})
    keys = sorted({(int(_get(r, "batch_size")), str(_get(r, "device") or "")) for r in rows})
    latency: list[dict] = []
    throughput: list[dict] = []
    legend: list[tuple[str, str]] = []
    for i, (batch, device) in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        name = f"batch {batch}" + (f" @ {device}" if len(devices) > 1 else "")
        series = f"b{batch}" + (f"@{device}" if len(devices) > 1 else "")
        mine = sorted(
            (int(_get(r, "version")), r)
            for r in rows
            if int(_get(r, "batch_size")) == batch and str(_get(r, "device") or "") == device
        )
        for target, key in ((latency, "p50_ms"), (throughput, "throughput")):
            points = [(v, n) for v, r in mine if (n := _number(_get(r, key))) is not None]
            target.append(
                {"series": series, "name": name, "color": color, "light": False, "points": points}
            )
        legend.append((color, name))

    width = 2 * PANEL_W + GAP
    height = PANEL_H + 18
    common = {"batches": versions, "x_label": "version", "x_name": "version"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bench-chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMinYMin meet" data-testid="history-chart">',
        "<title>p50 latency and throughput of each version, by batch size</title>",
    ]
    out += _panel(x0=0, title="p50 latency", y_label="ms", lines=latency, unit="ms", **common)
    out += _panel(
        x0=PANEL_W + GAP,
        title="Throughput",
        y_label="samples/s",
        lines=throughput,
        unit="samples/s",
        **common,
    )
    out += _legend(legend, PANEL_H + 10)
    out.append("</svg>")
    return "\n".join(out)


def _legend(items: list[tuple[str, str]], y: float, note: str = "") -> list[str]:
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


# --- serving history: traffic, errors and latency over time ------------------------------------

# Tick spacings a time axis picks from (seconds): the first that leaves at most 6 ticks.
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
MAX_POINT_MARKS = 90  # more points than this are drawn as lines only


def _time_panel(
    *,
    x0: float,
    title: str,
    y_label: str,
    start: datetime,
    end: datetime,
    lines: list[dict],
    markers: list[tuple[datetime, str]],
    unit: str,
) -> list[str]:
    """One chart against time: ``lines`` carry (time, value or None) points, None breaking the
    line (the process was not serving); ``markers`` are labelled vertical lines (a new version).
    """
    plot_w = PANEL_W - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM
    left, top = x0 + MARGIN_LEFT, MARGIN_TOP
    bottom = top + plot_h
    span = max((end - start).total_seconds(), 1e-9)
    highest = max((v for line in lines for _, v in line["points"] if v is not None), default=0.0)
    y_max = _nice_max(highest)

    def x_at(t: datetime) -> float:
        return left + min(max((t - start).total_seconds() / span, 0.0), 1.0) * plot_w

    def y_at(value: float) -> float:
        return bottom - (value / y_max) * plot_h

    out = _frame(title, left, top, bottom, plot_w, y_max)
    # At most four labels: three panels share the page width, and "13:12:30" is wide.
    step = next((s for s in TIME_STEPS if span / s <= 4), TIME_STEPS[-1])
    pattern = "%H:%M" if step >= 60 else "%H:%M:%S"
    tick = math.ceil(start.timestamp() / step) * step
    while tick <= end.timestamp():
        at = datetime.fromtimestamp(tick, start.tzinfo)
        x = x_at(at)
        out.append(
            f'<line class="chart-axis" x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" '
            f'y2="{bottom + 4:.1f}"/>'
        )
        out.append(
            f'<text class="chart-tick chart-xtick" x="{x:.1f}" y="{bottom + 16:.1f}" '
            f'text-anchor="middle">{at.strftime(pattern)}</text>'
        )
        tick += step
    zone = start.tzname() or ""
    out.append(
        f'<text class="chart-label" x="{left + plot_w / 2:.1f}" y="{PANEL_H - 6:.1f}" '
        f'text-anchor="middle">time{escape(f" ({zone})" if zone else "")}</text>'
    )
    mid = top + plot_h / 2
    out.append(
        f'<text class="chart-label" x="{x0 + 14:.1f}" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 14:.1f} {mid:.1f})">{escape(y_label)}</text>'
    )
    for at, label in markers:
        x = x_at(at)
        out.append(
            f'<line class="chart-marker" data-marker="{escape(label)}" x1="{x:.1f}" '
            f'y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="#868e96" '
            f'stroke-dasharray="2 3"/>'
        )
        out.append(
            f'<text class="chart-tick" x="{x + 3:.1f}" y="{top + 9:.1f}">{escape(label)}</text>'
        )
    for line in lines:
        color = escape(line["color"])
        dash = ' stroke-dasharray="4 3"' if line["light"] else ""
        segments: list[list[tuple[float, float]]] = [[]]
        for at, value in line["points"]:
            if value is None:
                segments.append([])
            else:
                segments[-1].append((x_at(at), y_at(value)))
        for segment in segments:
            if len(segment) > 1:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
                out.append(
                    f'<polyline class="chart-line" data-series="{escape(line["series"])}" '
                    f'fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{path}"/>'
                )
        marked = [(t, v) for t, v in line["points"] if v is not None]
        if len(marked) > MAX_POINT_MARKS:
            continue
        for at, value in marked:
            tooltip = f"{line['name']} · {at.strftime('%H:%M:%S')}: {_fmt(value)} {unit}"
            out.append(
                f'<circle class="chart-point" data-series="{escape(line["series"])}" '
                f'data-time="{at.isoformat()}" data-value="{_fmt(value)}" '
                f'cx="{x_at(at):.1f}" cy="{y_at(value):.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(tooltip)}</title></circle>"
            )
    out.append("</g>")
    return out


def serving_chart_svg(
    points: list[dict], markers: list[tuple[datetime, str]], start: datetime, end: datetime
) -> str:
    """Traffic, errors and latency of one pool against time, as one SVG document; "" if none.

    ``points`` are dicts with ``at`` (a datetime) and the per-minute rates ``requests``,
    ``errors_4xx`` and ``errors_5xx`` and ``p50_ms``/``p99_ms`` (None when nothing was answered);
    a dict whose ``at`` is None is a gap. Series: ``requests``, ``4xx``, ``5xx``, ``p50``, ``p99``.
    """
    if not any(p["at"] is not None for p in points):
        return ""

    def line(series: str, key: str, color: str, light: bool = False) -> dict:
        values = [(p["at"], p[key] if p["at"] is not None else None) for p in points]
        return {"series": series, "name": series, "color": color, "light": light, "points": values}

    blue, red, orange = PALETTE[0], "#c92a2a", PALETTE[2]
    panels = (
        ("Traffic", "requests/min", [line("requests", "requests", blue)], "req/min"),
        (
            "Errors",
            "answers/min",
            [line("5xx", "errors_5xx", red), line("4xx", "errors_4xx", orange, True)],
            "/min",
        ),
        (
            "Latency",
            "ms",
            [line("p50", "p50_ms", blue), line("p99", "p99_ms", blue, True)],
            "ms",
        ),
    )
    width = 3 * PANEL_W + 2 * GAP
    height = PANEL_H + 18
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bench-chart serving-chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMinYMin meet" data-testid="serving-chart">',
        "<title>Requests per minute, errors per minute and latency over time</title>",
    ]
    for i, (title, y_label, lines, unit) in enumerate(panels):
        out += _time_panel(
            x0=i * (PANEL_W + GAP),
            title=title,
            y_label=y_label,
            start=start,
            end=end,
            lines=lines,
            markers=markers,
            unit=unit,
        )
    out += _legend(
        [(blue, "requests, p50"), (red, "5xx")],
        PANEL_H + 10,
        "lighter dashed: 4xx, p99 · dotted lines: version changes",
    )
    out.append("</svg>")
    return "\n".join(out)
