"""A serving pool's traffic, errors and latency against time, with the version changes marked."""

from __future__ import annotations

import math
from datetime import datetime
from html import escape

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
    fmt,
    frame,
    legend,
    nice_max,
    x_tick,
)

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
    y_max = nice_max(highest)

    def x_at(t: datetime) -> float:
        return left + min(max((t - start).total_seconds() / span, 0.0), 1.0) * plot_w

    def y_at(value: float) -> float:
        return bottom - (value / y_max) * plot_h

    out = frame(title, left, top, bottom, plot_w, y_max)
    # At most four labels: three panels share the page width, and "13:12:30" is wide.
    step = next((s for s in TIME_STEPS if span / s <= 4), TIME_STEPS[-1])
    pattern = "%H:%M" if step >= 60 else "%H:%M:%S"
    tick = math.ceil(start.timestamp() / step) * step
    while tick <= end.timestamp():
        at = datetime.fromtimestamp(tick, start.tzinfo)
        out += x_tick(x_at(at), bottom, at.strftime(pattern))
        tick += step
    zone = start.tzname() or ""
    out += axis_labels(
        x0, left, plot_w, top, f"time{escape(f' ({zone})' if zone else '')}", y_label
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
            tooltip = f"{line['name']} · {at.strftime('%H:%M:%S')}: {fmt(value)} {unit}"
            out.append(
                f'<circle class="chart-point" data-series="{escape(line["series"])}" '
                f'data-time="{at.isoformat()}" data-value="{fmt(value)}" '
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
    out = document(
        width,
        PANEL_H + 18,
        "bench-chart serving-chart",
        "serving-chart",
        "Requests per minute, errors per minute and latency over time",
    )
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
    out += legend(
        [(blue, "requests, p50"), (red, "5xx")],
        PANEL_H + 10,
        "lighter dashed: 4xx, p99 · dotted lines: version changes",
    )
    out.append("</svg>")
    return "\n".join(out)
