"""Serving history: each model's traffic, errors and latency, kept as one row per time window.

Prometheus metrics live in the serving process's memory, which the dashboard cannot read, so the
process also accumulates, per served (model, version), the requests it answered, its 4xx and 5xx
answers, a latency histogram and the batches its engine ran. A flusher thread takes the window's
counts every ``R1_SERVING_STATS_SECONDS`` (and once more at shutdown, after the engines drained)
and hands them to the source (its ``WindowSink`` side): the deployments source writes
``ServingWindow`` rows, a static source writes nothing. A write that fails (the database is down)
never reaches a request: it is logged and the counts are put back, so the next window carries
them and its duration.

The hot path pays one uncontended lock and a few integer increments per request. Latencies go
into fixed log-spaced buckets (20 a decade, about 12% wide), so a window's memory is bounded
whatever its traffic, windows add up exactly, and any percentile is read back within a bucket.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Downward only: ``source`` describes what is served and never names this module's windows.
from r1platform.serving.source import ModelSource, ModelSpec

log = logging.getLogger(__name__)

BUCKETS_PER_DECADE = 20
LOWEST_MS = 0.01  # bucket 0 holds everything at or below this
LATENCY_BUCKETS = 1 + 7 * BUCKETS_PER_DECADE  # up to 100 s; slower answers share the last one

WindowKey = tuple[int, str, int]  # team, model name, version


def latency_bucket(ms: float) -> int:
    """The histogram bucket of a latency in milliseconds."""
    if not ms > LOWEST_MS:  # also NaN
        return 0
    index = 1 + int(math.log10(ms / LOWEST_MS) * BUCKETS_PER_DECADE)
    return min(index, LATENCY_BUCKETS - 1)


def bucket_bounds(index: int) -> tuple[float, float]:
    """The latencies (ms) bucket ``index`` holds: [low, high)."""
    if index <= 0:
        return 0.0, LOWEST_MS
    return (
        LOWEST_MS * 10 ** ((index - 1) / BUCKETS_PER_DECADE),
        LOWEST_MS * 10 ** (index / BUCKETS_PER_DECADE),
    )


def histogram_quantile(histogram: Mapping[int | str, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a bucket histogram in ms, interpolated within its bucket
    geometrically (buckets are log-spaced); None when it holds nothing. JSON keys may be str."""
    counts = sorted((int(k), int(v)) for k, v in histogram.items() if int(v) > 0)
    total = sum(c for _, c in counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in counts:
        if seen + count >= rank:
            low, high = bucket_bounds(index)
            fraction = (rank - seen) / count
            if low == 0:
                return high * fraction
            return low * (high / low) ** fraction
        seen += count
    return bucket_bounds(counts[-1][0])[1]


def merge_histograms(histograms: Iterable[Mapping[int | str, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for histogram in histograms:
        for key, count in histogram.items():
            merged[int(key)] = merged.get(int(key), 0) + int(count)
    return merged


@dataclass
class Window:
    """One model version's counts from ``started`` to ``ended`` (epoch seconds)."""

    spec: ModelSpec
    started: float
    ended: float = 0.0
    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    batches: int = 0
    batch_rows: int = 0

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 0.0)

    def quantile_ms(self, q: float) -> float | None:
        return histogram_quantile(self.latency, q)

    def absorb(self, other: Window) -> None:
        """Add ``other``'s counts (an earlier window whose write failed) to this one."""
        self.started = min(self.started, other.started)
        self.requests += other.requests
        self.errors_4xx += other.errors_4xx
        self.errors_5xx += other.errors_5xx
        self.latency = merge_histograms([self.latency, other.latency])
        self.batches += other.batches
        self.batch_rows += other.batch_rows


def window_key(spec: ModelSpec) -> WindowKey:
    return spec.team_id, spec.name, spec.version


class ServingStats:
    """The open window's counts. The event loop and the engine threads add, the flusher takes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[WindowKey, Window] = {}
        self._started = clock()

    def observe(self, spec: ModelSpec, status: int, seconds: float) -> None:
        """One answered request of ``spec``'s model: its HTTP status and how long it took."""
        bucket = latency_bucket(seconds * 1000.0)
        with self._lock:
            window = self._window(spec)
            window.requests += 1
            if status >= 500:
                window.errors_5xx += 1
            elif status >= 400:
                window.errors_4xx += 1
            window.latency[bucket] = window.latency.get(bucket, 0) + 1

    def observe_batch(self, spec: ModelSpec, rows: int) -> None:
        """One engine run of ``rows`` rows (called from the engine's thread)."""
        with self._lock:
            window = self._window(spec)
            window.batches += 1
            window.batch_rows += rows

    def take(self, live: Iterable[ModelSpec] = ()) -> list[Window]:
        """Close the open window: its counts, plus an empty window for each ``live`` model that
        had no traffic (so the history tells "served, idle" from "not served")."""
        now = self._clock()
        with self._lock:
            taken, self._open = self._open, {}
            started, self._started = self._started, now
        for spec in live:
            taken.setdefault(window_key(spec), Window(spec=spec, started=started))
        for window in taken.values():
            window.ended = now
        return list(taken.values())

    def restore(self, windows: Iterable[Window]) -> None:
        """Put back windows that could not be written: the next window carries their counts."""
        with self._lock:
            for old in windows:
                key = window_key(old.spec)
                current = self._open.get(key)
                if current is None:
                    self._open[key] = old
                else:
                    current.absorb(old)

    def _window(self, spec: ModelSpec) -> Window:
        # Under the lock. The newest spec is kept: it carries the registry ids the row needs.
        key = window_key(spec)
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = Window(spec=spec, started=self._started)
        return window


class WindowSink(Protocol):
    """Where closed windows go: a model source that keeps a serving history (or drops them)."""

    def record_windows(self, windows: list[Window]) -> None:
        """Keep the serving history's closed windows; called from the flusher's thread."""
        ...

    def close(self) -> None:
        """Release what the calling thread held (a database connection)."""
        ...


class ServingSource(ModelSource, WindowSink, Protocol):
    """A model source that also keeps the windows (both of the platform's sources do)."""


class WindowFlusher:
    """A thread that hands ``stats``' windows to ``source.record_windows`` every ``seconds``."""

    def __init__(
        self,
        stats: ServingStats,
        source: WindowSink,
        seconds: float,
        live: Callable[[], Iterable[ModelSpec]] = tuple,
    ) -> None:
        self.stats, self.source, self.seconds, self.live = stats, source, seconds, live
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush once more (what the drained engines answered last) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def flush(self) -> bool:
        """Write the window now; False (counts kept for the next) when the write failed."""
        windows = self.stats.take(self.live())
        if not windows:
            return True
        try:
            self.source.record_windows(windows)
        except Exception:
            log.exception(
                "serving: could not record %d serving windows; their counts go into the next",
                len(windows),
            )
            self.stats.restore(windows)
            return False
        return True

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.seconds):
                self.flush()
            self.flush()
        finally:
            self.source.close()
