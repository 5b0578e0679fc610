"""Latency measurement shared by the benchmark stage, benchmarks/ scripts and certification.

It knows nothing about models: it times a zero-argument callable, so the same numbers come out for
an onnxruntime session, a TorchScript module, an AOTInductor package or a TensorRT engine.

Three entry points:

* :func:`measure_latency`: warm-up, then one timed window (at least ``iterations`` calls and at
  least ``min_seconds``).
* :func:`measure_interleaved`: several models timed *together*, in round-robin windows (each
  round times one window of every target, the order rotated each round) until every target's
  last three windows' p50 agree (within ``agreement``, 10 % by default) or ``max_windows`` rounds
  ran. A CPU that is still ramping its clock, a neighbour process that stops halfway or a JIT
  that re-optimises after the warm-up all show up as windows that disagree; one window alone
  cannot tell them from a steady state. Interleaving makes the targets share whatever the
  machine was doing, so their *ratios* hold on a busy worker even when their absolute numbers
  move from one job to the next (timing one model after another did not: an FP32 baseline's p50
  ranged 56-111 ms across six jobs on one worker).
* :func:`measure_windows`: the same for one target (certification's performance check).

Sub-millisecond calls are timed in loops: a timing *sample* is ``k`` back-to-back calls, ``k``
chosen from the fastest warm-up call so a sample lasts at least ``min_sample_seconds`` (1 ms),
and the sample's time divided by ``k`` is the per-call latency. A single 12 µs call is too short
to time alone next to the timer's and the loop's own cost; its percentiles are then those of
``k``-call means, which understates the tail of a tiny model (p99 is of means, not of calls).
``iterations`` and ``throughput`` count calls, not samples.

:class:`WindowSettings` holds the windows the platform measures with (``BENCHMARK_WINDOWS``: the
benchmark stage's defaults); the benchmark stage and certification's performance check both read
it, so their numbers compare and neither reaches into the other.

Process memory is read from ``/proc/self/status`` (Linux): :func:`rss_mb` (VmRSS, now) and
:func:`peak_rss_mb` (VmHWM, the high-water mark), which :func:`reset_peak_rss` resets where the
kernel allows it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Windows whose p50 are compared for agreement, and pooled for the reported statistics.
AGREEING_WINDOWS = 3
# A timing sample lasts at least this long: shorter calls are looped (see the module's docstring).
MIN_SAMPLE_SECONDS = 0.001
MAX_CALLS_PER_SAMPLE = 100_000
# Samples a window takes at least (when ``iterations`` asks for as many calls).
MIN_WINDOW_SAMPLES = 20
# A speedup above this is not believed without the unsteady mark: the 3309x a TorchScript
# baseline once showed was a broken measurement, not a model. Read by the benchmark stage and the
# registry's history (which never shows such a ratio as a claim).
MAX_CREDIBLE_SPEEDUP = 50.0

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
    ``(max - min) / min`` of the last three windows' p50, ``p99_spread`` and
    ``throughput_spread`` the same of their p99 and throughput; ``calls_per_sample`` how many
    back-to-back calls one timing sample held (1 unless a call is under ``min_sample_seconds``).
    """

    windows: int = 1
    converged: bool = False
    window_p50_ms: tuple[float, ...] = ()
    spread: float = 0.0
    p99_spread: float = 0.0
    throughput_spread: float = 0.0
    calls_per_sample: int = 1


def _check_counts(warmup: int, iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"warmup cannot be negative, got {warmup}")


@dataclass
class _Window:
    """One timed window: per-call seconds of each sample, its wall time, the calls it made."""

    latencies: list[float]
    total_s: float
    calls: int

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(np.asarray(self.latencies) * 1000.0, 50))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(np.asarray(self.latencies) * 1000.0, 99))

    @property
    def rate(self) -> float:
        return self.calls / self.total_s if self.total_s > 0 else 0.0


def _time_window(
    run_once: Callable[[], object],
    iterations: int,
    min_seconds: float,
    max_iterations: int,
    calls_per_sample: int = 1,
) -> _Window:
    """One window: >= ``iterations`` calls and >= ``min_seconds``; each sample times
    ``calls_per_sample`` back-to-back calls and records their mean.

    ``iterations`` counts calls, not samples, so a setting means the same work whatever the
    loop size; a window still takes at least ``MIN_WINDOW_SAMPLES`` samples (or ``iterations``,
    when fewer) for its percentiles to rest on.
    """
    latencies: list[float] = []
    clock = time.perf_counter
    k = calls_per_sample
    iterations = max(math.ceil(iterations / k), min(iterations, MIN_WINDOW_SAMPLES))
    loop_start = clock()
    deadline = loop_start + min_seconds
    while len(latencies) < max_iterations:
        start = clock()
        for _ in range(k):
            run_once()
        end = clock()
        latencies.append((end - start) / k)
        if len(latencies) >= iterations and end >= deadline:
            break
    return _Window(latencies, clock() - loop_start, len(latencies) * k)


def _stats(latencies: Sequence[float], total_s: float, calls: int | None = None) -> LatencyStats:
    ms = np.asarray(latencies, dtype=np.float64) * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return LatencyStats(
        iterations=len(latencies) if calls is None else calls,
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
    window = _time_window(run_once, iterations, min_seconds, max_iterations)
    return _stats(window.latencies, window.total_s)


def p50_spread(p50s: Sequence[float]) -> float:
    """``(max - min) / min`` of some windows' p50: 0.1 means the slowest is 10 % slower."""
    low, high = min(p50s), max(p50s)
    if low <= 0:
        return 0.0 if high <= 0 else float("inf")
    return (high - low) / low


def calls_per_sample(call_seconds: float, min_sample_seconds: float = MIN_SAMPLE_SECONDS) -> int:
    """How many back-to-back calls one timing sample needs to last ``min_sample_seconds``."""
    if call_seconds >= min_sample_seconds:
        return 1
    return min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_seconds / max(call_seconds, 1e-9)))


def _warm_up(
    run_once: Callable[[], object], warmup: int, min_sample_seconds: float = MIN_SAMPLE_SECONDS
) -> int:
    """``warmup`` untimed calls, then the calls per sample (see :func:`calls_per_sample`).

    A last warm-up call that lasted ``min_sample_seconds`` settles it at one call per sample.
    Otherwise loops of calls are timed, the loop growing until one lasts ``min_sample_seconds``
    (a few milliseconds of extra warm-up): sized on the first calls alone, a JIT's slow first
    call would make the loops too short.
    """
    clock = time.perf_counter
    last = 0.0
    for _ in range(warmup):
        start = clock()
        run_once()
        last = clock() - start
    if warmup and last >= min_sample_seconds:
        return 1
    k = 1
    while k < MAX_CALLS_PER_SAMPLE:
        start = clock()
        for _ in range(k):
            run_once()
        took = clock() - start
        if took >= min_sample_seconds:
            break
        k = max(2 * k, calls_per_sample(took / k, min_sample_seconds))
        k = min(k, MAX_CALLS_PER_SAMPLE)
    return k


@dataclass(frozen=True)
class WindowSettings:
    """How :func:`measure_windows` times a model: one place for the benchmark and certification.

    The defaults are the benchmark stage's (its settings' defaults read them): 10 untimed calls,
    then windows of at least 30 samples and 0.1 s, until three agree within 10 % or 10 were timed;
    a sample is one call, or a loop of calls lasting ``min_sample_seconds`` for a faster model.
    """

    warmup: int = 10
    iterations: int = 30
    min_seconds: float = 0.1
    agreement: float = 0.10
    max_windows: int = 10
    min_sample_seconds: float = MIN_SAMPLE_SECONDS

    def measure(self, run_once: Callable[[], object]) -> WindowedStats:
        """:func:`measure_windows` of ``run_once`` with these windows."""
        return self.measure_interleaved({"": run_once})[""]

    def measure_interleaved(
        self, targets: Mapping[str, Callable[[], object]]
    ) -> dict[str, WindowedStats]:
        """:func:`measure_interleaved` of ``targets`` with these windows."""
        return measure_interleaved(
            targets,
            self.warmup,
            self.iterations,
            self.min_seconds,
            agreement=self.agreement,
            max_windows=self.max_windows,
            min_sample_seconds=self.min_sample_seconds,
        )


# The windows a benchmark row and certification's performance check are measured with.
BENCHMARK_WINDOWS = WindowSettings()


def _settled(windows: list[_Window], agreement: float) -> bool:
    p50s = [w.p50_ms for w in windows[-AGREEING_WINDOWS:]]
    return len(p50s) >= AGREEING_WINDOWS and p50_spread(p50s) <= agreement


def _windowed(windows: list[_Window], converged: bool, k: int) -> WindowedStats:
    """The last three windows pooled, with how they were found."""
    last = windows[-AGREEING_WINDOWS:]
    pooled = _stats(
        [x for w in last for x in w.latencies],
        sum(w.total_s for w in last),
        sum(w.calls for w in last),
    )
    return WindowedStats(
        **pooled.__dict__,
        windows=len(windows),
        converged=converged,
        window_p50_ms=tuple(w.p50_ms for w in windows),
        spread=p50_spread([w.p50_ms for w in last]),
        p99_spread=p50_spread([w.p99_ms for w in last]),
        throughput_spread=p50_spread([w.rate for w in last]),
        calls_per_sample=k,
    )


def measure_interleaved(
    targets: Mapping[str, Callable[[], object]],
    warmup: int = 10,
    iterations: int = 50,
    min_seconds: float = 0.0,
    *,
    agreement: float = 0.10,
    max_windows: int = 10,
    max_iterations: int = 1_000_000,
    min_sample_seconds: float = MIN_SAMPLE_SECONDS,
) -> dict[str, WindowedStats]:
    """Time ``targets`` (name -> zero-argument call, its inputs already prepared) together.

    Each target is warmed up first (``warmup`` calls, then loops that size its samples). Then
    rounds: a round times one window of every target, the order rotated by one each round so no
    target always runs first (after an idle gap) or last. Rounds go on until
    every target's last three windows' p50 agree within ``agreement`` or ``max_windows`` rounds
    ran; a window is at least ``iterations`` samples and ``min_seconds``. Each target's statistics
    pool its last three windows; ``converged`` says whether they agreed at the end. A target
    that settled early is still timed each round, so all share the same conditions to the end.
    """
    _check_counts(warmup, iterations)
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    if agreement < 0:
        raise ValueError(f"agreement cannot be negative, got {agreement}")
    if not targets:
        return {}
    names = list(targets)
    k = {n: _warm_up(targets[n], warmup, min_sample_seconds) for n in names}
    windows: dict[str, list[_Window]] = {n: [] for n in names}
    for round_index in range(max_windows):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            windows[name].append(
                _time_window(targets[name], iterations, min_seconds, max_iterations, k[name])
            )
        if all(_settled(windows[n], agreement) for n in names):
            break
    return {n: _windowed(windows[n], _settled(windows[n], agreement), k[n]) for n in names}


def measure_windows(
    run_once: Callable[[], object],
    warmup: int = 10,
    iterations: int = 50,
    min_seconds: float = 0.0,
    *,
    agreement: float = 0.10,
    max_windows: int = 10,
    max_iterations: int = 1_000_000,
    min_sample_seconds: float = MIN_SAMPLE_SECONDS,
) -> WindowedStats:
    """Time windows of one target until the last three windows' p50 agree within ``agreement``.

    :func:`measure_interleaved` of this one target: ``warmup`` calls (one at least), then windows
    of at least ``iterations`` samples and ``min_seconds``. The statistics returned are those of
    the last three windows pooled (fewer when ``max_windows`` < 3), with the number of windows
    and whether they converged; when they did not, the caller should say they are unsteady.
    """
    return measure_interleaved(
        {"": run_once},
        warmup,
        iterations,
        min_seconds,
        agreement=agreement,
        max_windows=max_windows,
        max_iterations=max_iterations,
        min_sample_seconds=min_sample_seconds,
    )[""]


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
