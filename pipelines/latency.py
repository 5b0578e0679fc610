"""Latency measurement shared by the benchmark stage, benchmarks/ scripts and certification.

It knows nothing about models: it times a zero-argument callable, so the same numbers come out for
an onnxruntime session, a TorchScript module, an AOTInductor package or a TensorRT engine.

Two entry points:

* :func:`measure_latency`: warm-up, then one timed window (at least ``iterations`` calls and at
  least ``min_seconds``).
* :func:`measure_windows`: warm-up, then timed windows one after another until the p50 of the last
  three agree (within ``agreement``, 10 % by default) or ``max_windows`` were timed. A CPU that is
  still ramping its clock, a neighbour process that stops halfway or a JIT that re-optimises after
  the warm-up all show up as windows that disagree; one window alone cannot tell them from a
  steady state.

:class:`WindowSettings` holds the windows the platform measures with (``BENCHMARK_WINDOWS``: the
benchmark stage's defaults); the benchmark stage and certification's performance check both read
it, so their numbers compare and neither reaches into the other.

Process memory is read from ``/proc/self/status`` (Linux): :func:`rss_mb` (VmRSS, now) and
:func:`peak_rss_mb` (VmHWM, the high-water mark), which :func:`reset_peak_rss` resets where the
kernel allows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Windows whose p50 are compared for agreement, and pooled for the reported statistics.
AGREEING_WINDOWS = 3

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of ``iterations`` timed calls, after warm-up."""

    iterations: int
    total_s: float  # wall time of the timed loop(s)
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p90_ms: float = 0.0

    def throughput(self, batch_size: int) -> float:
        """Samples per second when every call processes ``batch_size`` samples."""
        if self.total_s <= 0:
            return float("inf")
        return batch_size * self.iterations / self.total_s


@dataclass(frozen=True)
class WindowedStats(LatencyStats):
    """:class:`LatencyStats` of the last (up to) three windows pooled, and how they were found.

    ``windows`` is how many windows were timed in all; ``converged`` whether the last three
    windows' p50 agreed within the asked ``agreement`` before ``max_windows`` ran out;
    ``window_p50_ms`` the p50 of every window, in order; ``spread`` the relative spread
    ``(max - min) / min`` of the last three windows' p50.
    """

    windows: int = 1
    converged: bool = False
    window_p50_ms: tuple[float, ...] = ()
    spread: float = 0.0


def _check_counts(warmup: int, iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"warmup cannot be negative, got {warmup}")


def _time_window(
    run_once: Callable[[], object], iterations: int, min_seconds: float, max_iterations: int
) -> tuple[list[float], float]:
    """Per-call seconds of one window (>= ``iterations`` calls and >= ``min_seconds``)."""
    latencies: list[float] = []
    clock = time.perf_counter
    loop_start = clock()
    deadline = loop_start + min_seconds
    while len(latencies) < max_iterations:
        start = clock()
        run_once()
        end = clock()
        latencies.append(end - start)
        if len(latencies) >= iterations and end >= deadline:
            break
    return latencies, clock() - loop_start


def _stats(latencies: Sequence[float], total_s: float) -> LatencyStats:
    ms = np.asarray(latencies, dtype=np.float64) * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return LatencyStats(
        iterations=len(latencies),
        total_s=total_s,
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        p90_ms=float(p90),
    )


def measure_latency(
    run_once: Callable[[], object],
    warmup: int = 10,
    iterations: int = 50,
    min_seconds: float = 0.0,
    max_iterations: int = 1_000_000,
) -> LatencyStats:
    """Call ``run_once`` ``warmup`` times untimed, then time at least ``iterations`` calls.

    Timing goes on until ``min_seconds`` have also passed (up to ``max_iterations`` calls): a small
    model answers in microseconds, and 50 calls would then be a window of half a millisecond in
    which one scheduler hiccup moves the throughput tenfold.

    Warm-up matters: the first calls of onnxruntime allocate arenas and TorchScript's profiling
    executor re-optimises the graph on its first runs, neither of which a served model pays again.
    Each call is timed with ``time.perf_counter``; percentiles use numpy's linear interpolation.
    """
    _check_counts(warmup, iterations)
    for _ in range(warmup):
        run_once()
    latencies, total_s = _time_window(run_once, iterations, min_seconds, max_iterations)
    return _stats(latencies, total_s)


def p50_spread(p50s: Sequence[float]) -> float:
    """``(max - min) / min`` of some windows' p50: 0.1 means the slowest is 10 % slower."""
    low, high = min(p50s), max(p50s)
    if low <= 0:
        return 0.0 if high <= 0 else float("inf")
    return (high - low) / low


@dataclass(frozen=True)
class WindowSettings:
    """How :func:`measure_windows` times a model: one place for the benchmark and certification.

    The defaults are the benchmark stage's (its settings' defaults read them): 10 untimed calls,
    then windows of at least 30 calls and 0.1 s, until three agree within 10 % or 10 were timed.
    """

    warmup: int = 10
    iterations: int = 30
    min_seconds: float = 0.1
    agreement: float = 0.10
    max_windows: int = 10

    def measure(self, run_once: Callable[[], object]) -> WindowedStats:
        """:func:`measure_windows` of ``run_once`` with these windows."""
        return measure_windows(
            run_once,
            self.warmup,
            self.iterations,
            self.min_seconds,
            agreement=self.agreement,
            max_windows=self.max_windows,
        )


# The windows a benchmark row and certification's performance check are measured with.
BENCHMARK_WINDOWS = WindowSettings()


def measure_windows(
    run_once: Callable[[], object],
    warmup: int = 10,
    iterations: int = 50,
    min_seconds: float = 0.0,
    *,
    agreement: float = 0.10,
    max_windows: int = 10,
    max_iterations: int = 1_000_000,
) -> WindowedStats:
    """Time windows until the last three windows' p50 agree within ``agreement``.

    Each window is at least ``iterations`` calls and at least ``min_seconds`` (as
    :func:`measure_latency`); ``warmup`` untimed calls come once, before the first. The statistics
    returned are those of the last three windows' calls pooled (fewer when ``max_windows`` < 3),
    with the number of windows and whether they converged; when they did not, the numbers are
    still the last three windows', and the caller should say they are unsteady.
    """
    _check_counts(warmup, iterations)
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    if agreement < 0:
        raise ValueError(f"agreement cannot be negative, got {agreement}")
    for _ in range(warmup):
        run_once()
    windows: list[tuple[list[float], float]] = []
    p50s: list[float] = []
    converged = False
    while len(windows) < max_windows:
        latencies, total_s = _time_window(run_once, iterations, min_seconds, max_iterations)
        windows.append((latencies, total_s))
        p50s.append(float(np.percentile(np.asarray(latencies) * 1000.0, 50)))
        if len(p50s) >= AGREEING_WINDOWS and p50_spread(p50s[-AGREEING_WINDOWS:]) <= agreement:
            converged = True
            break
    last = windows[-AGREEING_WINDOWS:]
    pooled = _stats([x for lat, _ in last for x in lat], sum(t for _, t in last))
    return WindowedStats(
        **pooled.__dict__,
        windows=len(windows),
        converged=converged,
        window_p50_ms=tuple(p50s),
        spread=p50_spread(p50s[-AGREEING_WINDOWS:]),
    )


# -- process memory -------------------------------------------------------------------------------


def _status_kb(field: str) -> float | None:
    try:
        text = _STATUS.read_text()
    except OSError:  # not Linux
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return float(parts[1])
    return None


def rss_mb() -> float | None:
    """This process's resident set size now (VmRSS), in MiB; None where /proc is missing."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM), in MiB; None where /proc is missing."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False if refused.

    Without a reset the peak is the process's since it started, so a benchmark of a small model
    after a large one would report the large one's peak.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
