"""Latency measurement shared by the benchmark stage, benchmarks/ scripts and certification.

It knows nothing about models: it times a zero-argument callable, so the same numbers come out for
an onnxruntime session, a TorchScript module or a TensorRT engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of ``iterations`` timed calls, after warm-up."""

    iterations: int
    total_s: float  # wall time of the timed loop
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def throughput(self, batch_size: int) -> float:
        """Samples per second when every call processes ``batch_size`` samples."""
        if self.total_s <= 0:
            return float("inf")
        return batch_size * self.iterations / self.total_s


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
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"warmup cannot be negative, got {warmup}")
    for _ in range(warmup):
        run_once()
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
    total_s = clock() - loop_start
    ms = np.asarray(latencies, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return LatencyStats(
        iterations=len(latencies),
        total_s=total_s,
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
    )
