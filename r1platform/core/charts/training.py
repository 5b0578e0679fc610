"""A fine-tune's training curve: losses, and the validation metrics, against the step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    fmt,
    frame,
    legend,
    nice_max,
    number,
    x_tick,
)

MAX_POINT_MARKS = 120  # more points than this are drawn as lines only
SKIPPED = {"lr", "epoch"}  # drawn elsewhere or not a curve


def curves(history: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` from ``[{"step": s, "metrics": {...}}, ...]``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for entry in history:
        step = number(entry.get("step"))
        metrics = entry.get("metrics")
        if step is None or not isinstance(metrics, Mapping):
            continue
        for key, raw in metrics.items():
            value = number(raw)
            if value is not None and key not in SKIPPED:
                out.setdefault(str(key), []).append((step, value))
    return {k: sorted(v) for k, v in out.items()}


def _panel(x0: float, title: str, series: dict[str, list[tuple[float, float]]], colors) -> list:
    plot_w = PANEL_W - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM
    left, top = x0 + MARGIN_LEFT, MARGIN_TOP
    bottom = top + plot_h
    steps = [s for points in series.values() for s, _ in points]
    first, last = min(steps), max(steps)
    span = max(last - first, 1e-9)
    y_max = nice_max(max(v for points in series.values() for _, v in points))

    def x_at(step: float) -> float:
        return left + (step - first) / span * plot_w if last > first else left + plot_w / 2

    def y_at(value: float) -> float:
        return bottom - (value / y_max) * plot_h

    out = frame(title, left, top, bottom, plot_w, y_max)
    for step in sorted({first, (first + last) / 2, last}):
        out += x_tick(x_at(step), bottom, escape(fmt(round(step))))
    out += axis_labels(x0, left, plot_w, top, "step", title.lower())
    for name, points in series.items():
        color = escape(colors[name])
        path = " ".join(f"{x_at(s):.1f},{y_at(v):.1f}" for s, v in points)
        out.append(
            f'<polyline class="chart-line" data-series="{escape(name)}" fill="none" '
            f'stroke="{color}" stroke-width="1.6" points="{path}"/>'
        )
        if len(points) > MAX_POINT_MARKS:
            continue
        for s, v in points:
            out.append(
                f'<circle class="chart-point" data-series="{escape(name)}" data-step="{s:g}" '
                f'data-value="{fmt(v)}" cx="{x_at(s):.1f}" cy="{y_at(v):.1f}" r="2.5" '
                f'fill="{color}"><title>{escape(f"{name} at step {s:g}: {fmt(v)}")}</title>'
                "</circle>"
            )
    out.append("</g>")
    return out


def training_chart_svg(history: Iterable[Mapping[str, Any]]) -> str:
    """Loss and metric panels of one training run, as one SVG document; "" with no curve."""
    found = curves(history)
    losses = {k: v for k, v in found.items() if "loss" in k}
    metrics = {k: v for k, v in found.items() if "loss" not in k}
    panels = [(t, s) for t, s in (("Loss", losses), ("Metric", metrics)) if s]
    if not panels:
        return ""
    names = [name for _, series in panels for name in series]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    width = len(panels) * PANEL_W + (len(panels) - 1) * GAP
    height = PANEL_H + 24
    out = document(width, height, "chart training-chart", "training-chart", "Training curve")
    for i, (title, series) in enumerate(panels):
        out += _panel(i * (PANEL_W + GAP), title, series, colors)
    out += legend([(colors[n], n) for n in names], PANEL_H + 14)
    out.append("</svg>")
    return "\n".join(out)


def stage_training_charts(stage_results: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``[{"stage_id", "svg"}]`` for each stage of a job that left a training curve."""
    charts = []
    for result in stage_results:
        svg = training_chart_svg(result.get("history") or [])
        if svg:
            charts.append(
                {"stage_id": str(result.get("stage_id") or result.get("name")), "svg": svg}
            )
    return charts
