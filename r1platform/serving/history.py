"""A model's serving history for its page: per pool, the production traffic of the last hours.

The windows a serving process wrote (``ServingWindow``) are added up into at most ``MAX_POINTS``
time buckets per pool, so a day of one-minute windows draws as 288 five-minute points. Rates are
per minute of the time the bucket's windows covered; percentiles come from the buckets' merged
latency histograms, so they are exact to a histogram bucket however many windows fall in one. A
bucket with no window where one was expected (the process was down) breaks the lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from r1platform.core.charts.serving import serving_chart_svg
from r1platform.deployments.models import Stage
from r1platform.registry.models import RegisteredModel
from r1platform.serving.models import ServingWindow
from r1platform.serving.stats import histogram_quantile, merge_histograms

HOURS = 24
MAX_POINTS = 288
WINDOW_FIELDS = (
    "started_at",
    "seconds",
    "requests",
    "errors_4xx",
    "errors_5xx",
    "batches",
    "batch_rows",
    "latency_histogram",
)


@dataclass
class PoolHistory:
    pool: str
    start: datetime
    end: datetime
    points: list[dict] = field(default_factory=list)
    markers: list[tuple[datetime, str]] = field(default_factory=list)
    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    version: int | None = None  # the version the newest window served
    chart: str = ""  # markup from serving_chart_svg, which escapes all its text

    @property
    def error_percent(self) -> float:
        return 100 * (self.errors_4xx + self.errors_5xx) / self.requests if self.requests else 0.0


def serving_history(
    model: RegisteredModel, *, hours: int = HOURS, now: datetime | None = None
) -> list[PoolHistory]:
    """The model's production serving history per pool, over the last ``hours``; [] if none."""
    now = now or timezone.now()
    windows = list(
        ServingWindow.objects.filter(
            model=model, stage=Stage.PRODUCTION, started_at__gte=now - timedelta(hours=hours)
        )
        .select_related("pool", "version")
        # A day is some 1,440 windows per pool: none of the versions' JSON columns.
        .only(*WINDOW_FIELDS, "pool__name", "version__number")
        .order_by("pool__name", "started_at", "pk")
    )
    by_pool: dict[str, list[ServingWindow]] = {}
    for window in windows:
        by_pool.setdefault(window.pool.name, []).append(window)
    return [_pool_history(name, rows, now) for name, rows in by_pool.items()]


def _pool_history(pool: str, windows: list[ServingWindow], now: datetime) -> PoolHistory:
    start = windows[0].started_at
    end = max(now, max(_end(w) for w in windows))
    bucket_s = max((end - start).total_seconds() / MAX_POINTS, min(w.seconds for w in windows))
    buckets: dict[int, list[ServingWindow]] = {}
    for window in windows:
        index = int((window.started_at - start).total_seconds() // max(bucket_s, 1e-6))
        buckets.setdefault(index, []).append(window)

    history = PoolHistory(pool=pool, start=start, end=end)
    previous: int | None = None
    for index in sorted(buckets):
        if previous is not None and index > previous + 1:
            history.points.append({"at": None})  # no window for a while: not serving
        history.points.append(_point(buckets[index]))
        previous = index
    history.markers = _version_changes(windows)
    history.requests = sum(w.requests for w in windows)
    history.errors_4xx = sum(w.errors_4xx for w in windows)
    history.errors_5xx = sum(w.errors_5xx for w in windows)
    merged = merge_histograms(w.latency_histogram for w in windows)
    history.p50_ms = histogram_quantile(merged, 0.50)
    history.p99_ms = histogram_quantile(merged, 0.99)
    batches = sum(w.batches for w in windows)
    history.mean_batch = sum(w.batch_rows for w in windows) / batches if batches else None
    history.version = windows[-1].version.number
    if history.requests:
        history.chart = serving_chart_svg(history.points, history.markers, start, end)
    return history


def _end(window: ServingWindow) -> datetime:
    return window.started_at + timedelta(seconds=window.seconds)


def _point(windows: list[ServingWindow]) -> dict:
    """One bucket: rates per minute of the time its windows covered, percentiles of them all."""
    first = min(w.started_at for w in windows)
    covered = max((max(_end(w) for w in windows) - first).total_seconds(), 1e-3)
    per_minute = 60.0 / covered
    merged = merge_histograms(w.latency_histogram for w in windows)
    return {
        "at": max(_end(w) for w in windows),
        "requests": sum(w.requests for w in windows) * per_minute,
        "errors_4xx": sum(w.errors_4xx for w in windows) * per_minute,
        "errors_5xx": sum(w.errors_5xx for w in windows) * per_minute,
        "p50_ms": histogram_quantile(merged, 0.50),
        "p99_ms": histogram_quantile(merged, 0.99),
    }


def _version_changes(windows: list[ServingWindow]) -> list[tuple[datetime, str]]:
    """Where another version started serving, with the first version where the history starts.

    Windows of one flush share a start, and a process writes a window for every model it serves
    at each flush. A version in a flush that was not in the flush before it has just arrived (a
    swap leaves the old version and the new in one flush; the old one then drains away), so it is
    the one now serving. Several arriving at once: the busiest."""
    flushes: dict[datetime, dict[int, int]] = {}
    for w in windows:
        versions = flushes.setdefault(w.started_at, {})
        versions[w.version.number] = versions.get(w.version.number, 0) + w.requests
    markers: list[tuple[datetime, str]] = []
    before: set[int] = set()
    for at in sorted(flushes):
        arrived = {v: n for v, n in flushes[at].items() if v not in before}
        if arrived:
            serving = max(arrived, key=lambda v: (arrived[v], v))
            markers.append((at, f"v{serving}"))
        before = set(flushes[at])
    return markers
