"""Benchmark charts: latency and throughput against batch size, and against version number.

:func:`latency_chart_svg` draws a version's benchmark rows as two small line charts side by side,
latency (p50, with p99 as a lighter dashed line) and throughput against batch size. Batch sizes
are spaced by their index, which is log2 spacing for the usual 1, 2, 4, 8... sweeps.
:func:`version_history_svg` draws the same two charts against version number (one line per batch
size).
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

from r1platform.core.charts.svg import (
    GAP,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    PALETTE,
    PANEL_H,
    PANEL_W,
    axis_labels,
    document,
    field,
    fmt,
    frame,
    legend,
    nice_max,
    number,
    x_tick,
)


def _series(rows: Iterable[Any]) -> tuple[list[int], dict[str, dict[int, dict[str, float]]]]:
    """Batch sizes (sorted) and, per backend, the values at each batch size.

    A backend measured twice at one batch size keeps its first row (callers pass one job's rows).
    """
    batches: set[int] = set()
    by_backend: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        batch = field(row, "batch_size")
        if batch is None:
            continue
        values = {k: number(field(row, k)) for k in ("p50_ms", "p99_ms", "throughput")}
        if values["p50_ms"] is None and values["throughput"] is None:
            continue
        backend = str(field(row, "backend") or "")
        points = by_backend.setdefault(backend, {})
        if int(batch) in points:
            continue
        points[int(batch)] = values  # type: ignore[assignment]
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
    y_max = nice_max(highest)

    def x_at(index: int) -> float:
        if len(batches) == 1:
            return left + plot_w / 2
        pad = plot_w * 0.06
        return left + pad + index * (plot_w - 2 * pad) / (len(batches) - 1)

    def y_at(value: float) -> float:
        return bottom - (value / y_max) * plot_h

    out = frame(title, left, top, bottom, plot_w, y_max)
    for index, batch in enumerate(batches):
        out += x_tick(x_at(index), bottom, f"{tick_prefix}{batch}")
    out += axis_labels(x0, left, plot_w, top, escape(x_label), y_label)
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
            tooltip = f"{line['name']} · {x_name} {tick_prefix}{batch}: {fmt(value)} {unit}"
            out.append(
                f'<circle class="chart-point" data-series="{escape(line["series"])}" '
                f'data-{x_name}="{batch}" data-value="{fmt(value)}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="{radius}" fill="{color}"{fill_opacity}>'
                f"<title>{escape(tooltip)}</title></circle>"
            )
    out.append("</g>")
    return out


def _two_panels(
    testid: str,
    title: str,
    latency_title: str,
    latency: list[dict],
    throughput: list[dict],
    **axis: Any,
) -> list[str]:
    """The opening <svg>, the latency panel on the left and the throughput panel on the right."""
    width = 2 * PANEL_W + GAP
    out = document(width, PANEL_H + 18, "bench-chart", testid, title)
    out += _panel(x0=0, title=latency_title, y_label="ms", lines=latency, unit="ms", **axis)
    out += _panel(
        x0=PANEL_W + GAP,
        title="Throughput",
        y_label="samples/s",
        lines=throughput,
        unit="samples/s",
        **axis,
    )
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
    swatches: list[tuple[str, str]] = []
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
        swatches.append((color, backend or "benchmark"))

    title = "Latency (p50 and p99) and throughput by batch size"
    out = _two_panels("latency-chart", title, "Latency", latency, throughput, batches=batches)
    out += legend(swatches, PANEL_H + 10, "solid: p50 · dashed, lighter: p99")
    out.append("</svg>")
    return "\n".join(out)


def version_history_svg(rows: Iterable[Any]) -> str:
    """p50 latency and throughput against version number, one line per batch size; "" if none.

    ``rows`` have ``version`` (the number), batch_size, device, p50_ms and throughput: one row per
    (version, batch size, device). A device other than the first adds its name to the series.
    Points are <circle>s with ``data-series`` (``b<batch>`` and ``@device`` when several),
    ``data-version`` and ``data-value``.
    """
    rows = [r for r in rows if field(r, "version") is not None and field(r, "batch_size")]
    if not rows:
        return ""
    versions = sorted({int(field(r, "version")) for r in rows})
    devices = sorted({str(field(r, "device") or "") for r in rows})
    keys = sorted({(int(field(r, "batch_size")), str(field(r, "device") or "")) for r in rows})
    latency: list[dict] = []
    throughput: list[dict] = []
    swatches: list[tuple[str, str]] = []
    for i, (batch, device) in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        name = f"batch {batch}" + (f" @ {device}" if len(devices) > 1 else "")
        series = f"b{batch}" + (f"@{device}" if len(devices) > 1 else "")
        mine = sorted(
            (int(field(r, "version")), r)
            for r in rows
            if int(field(r, "batch_size")) == batch and str(field(r, "device") or "") == device
        )
        for target, key in ((latency, "p50_ms"), (throughput, "throughput")):
            points = [(v, n) for v, r in mine if (n := number(field(r, key))) is not None]
            target.append(
                {"series": series, "name": name, "color": color, "light": False, "points": points}
            )
        swatches.append((color, name))

    title = "p50 latency and throughput of each version, by batch size"
    out = _two_panels(
        "history-chart",
        title,
        "p50 latency",
        latency,
        throughput,
        batches=versions,
        x_label="version",
        x_name="version",
    )
    out += legend(swatches, PANEL_H + 10)
    out.append("</svg>")
    return "\n".join(out)
