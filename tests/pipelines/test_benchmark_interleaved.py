"""Benchmarks measured as comparisons: targets timed together in round-robin windows, loops for
sub-millisecond calls, the input's ancestors in the same run, and speedups against the parent and
the upload (never a 50x that was a broken measurement)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from pipelines.core import Artifact, BenchmarkRow, PipelineContext
from pipelines.latency import measure_interleaved, measure_windows
from pipelines.speedups import speedups_of as _speedups
from pipelines.stages import Benchmark
from tests.pipelines.conftest import ModelFile

# Windows agree easily (within 100%), so the rows are steady on a busy test machine too.
EASY = {"warmup": 2, "iterations": 5, "min_seconds": 0.0, "agreement": 1.0, "max_windows": 6}


def noop(fraction: float, message: str) -> None:
    pass


def test_it_times_targets_in_round_robin_windows_rotating_the_order() -> None:
    log: list[str] = []
    targets = {name: (lambda name=name: log.append(name)) for name in "abc"}

    stats = measure_interleaved(
        targets, warmup=1, iterations=3, agreement=10.0, max_windows=3, min_sample_seconds=0.0
    )

    assert log[:3] == ["a", "b", "c"]  # each warmed up once
    windows = [name for name, _ in itertools.groupby(log[3:])]
    assert windows == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # one window each per round
    assert all(len(list(calls)) == 3 for _, calls in itertools.groupby(log[3:]))
    assert {n: (s.windows, s.converged, s.iterations) for n, s in stats.items()} == {
        n: (3, True, 9) for n in "abc"
    }


def test_rounds_go_on_until_every_target_agrees() -> None:
    calls = itertools.count()

    def slowing() -> None:  # each call 30% slower than the one before: its windows never agree
        # Geometric, from 2 ms (one call a sample): three windows apart the p50 differs by far
        # more than a busy machine's sleep overshoot, which made a linear ramp's windows agree.
        time.sleep(min(0.002 * 1.3 ** next(calls), 0.5))

    stats = measure_interleaved(
        {"steady": lambda: time.sleep(0.001), "slowing": slowing},
        warmup=0,
        iterations=3,
        max_windows=5,
        agreement=0.5,
    )

    assert stats["slowing"].windows == stats["steady"].windows == 5  # the steady one waited
    assert not stats["slowing"].converged and stats["slowing"].spread > 0.5


def _spin_20us() -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < 20e-6:
        pass


def test_sub_millisecond_calls_are_timed_in_loops_long_enough_for_the_timer() -> None:
    stats = measure_windows(_spin_20us, warmup=5, iterations=10, min_seconds=0.01, max_windows=4)

    assert stats.calls_per_sample >= 20  # a sample of >= 1 ms holds fifty 20 us calls
    assert 0.015 <= stats.p50_ms <= 0.5  # not reported as 0.0 (nor as the whole loop)
    assert stats.iterations >= 10 * min(stats.windows, 3) * stats.calls_per_sample
    assert stats.throughput(1) < 1 / 15e-6  # throughput counts calls, not samples

    nothing = measure_windows(lambda: None, warmup=1, iterations=5, max_windows=3)
    assert nothing.p50_ms > 0 and nothing.calls_per_sample > 1


def _lineage_ctx(model: ModelFile, workdir: Path) -> PipelineContext:
    """The input (v3) made from v2, made from v1 (the upload)."""
    ctx = PipelineContext.start(workdir, model.fresh_artifact())
    ancestors: dict[str, Artifact] = {}
    for pk, parent in ((2, 1), (1, None)):  # nearest first, as the runner gives them
        ancestor = model.fresh_artifact()
        ancestor.key = f"version-{pk}"
        ancestor.parent = f"version-{parent}" if parent else None
        ancestors[ancestor.key] = ancestor
    ctx.ancestors = ancestors
    ctx.artifacts["input"].parent = "version-2"
    return ctx


def test_it_measures_the_input_and_its_ancestors_together_with_speedups_vs_parent_and_upload(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    workdir = tmp_path / "job"
    workdir.mkdir()
    ctx = _lineage_ctx(onnx_mlp, workdir)

    result = Benchmark().run(ctx, "01-benchmark", {"batch_sizes": [1, 4], **EASY}, noop)

    # The upload first, down the lineage to the input, each at each batch size.
    assert [(r.artifact, r.batch_size) for r in ctx.benchmarks] == [
        (key, b) for key in ("version-1", "version-2", "input") for b in (1, 4)
    ]
    for batch in (1, 4):
        rows = [r for r in ctx.benchmarks if r.batch_size == batch]
        # Timed in the same rounds: every target has as many windows as the others.
        assert len({r.windows for r in rows}) == 1
        assert {tuple(r.shapes["x"]) for r in rows} == {(batch, 64)}
        by = {r.artifact: r for r in rows}
        steady = all(r.converged for r in rows)
        vs_parent = result.metrics.get(f"speedup_vs_parent.input.b{batch}")
        vs_upload = result.metrics.get(f"speedup_vs_upload.input.b{batch}")
        if steady:
            # Claimed only when the per-round ratio held; otherwise the message names the pair
            # (a busy machine's rounds can move it more than the agreement).
            for ratio, ref in ((vs_parent, "version-2"), (vs_upload, "version-1")):
                if ratio is None:
                    assert f"input vs {ref} at batch {batch}" in result.message
                else:
                    assert ratio == by[ref].p50_ms / by["input"].p50_ms
            older = result.metrics.get(f"speedup_vs_parent.version-2.b{batch}")
            assert (older or 0) > 0 or f"version-2 vs version-1 at batch {batch}" in result.message
        assert f"speedup_vs_upload.version-1.b{batch}" not in result.metrics  # it is the upload
    assert "3 models timed together" in result.message


def test_current_targets_keep_the_parent_and_the_upload_and_skip_a_missing_ancestor(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    workdir = tmp_path / "job"
    workdir.mkdir()
    ctx = _lineage_ctx(onnx_mlp, workdir)
    ctx.ancestors["version-2"].path = str(tmp_path / "gone.onnx")

    result = Benchmark().run(
        ctx, "01-benchmark", {"batch_sizes": [2], "targets": "current", **EASY}, noop
    )

    assert [r.artifact for r in ctx.benchmarks] == ["version-1", "input"]
    assert "version-2: skipped, its file is missing" in result.message


def _row(artifact: str, p50: float, converged: bool = True) -> BenchmarkRow:
    return BenchmarkRow(
        artifact=artifact,
        backend="onnxruntime",
        batch_size=8,
        p50_ms=p50,
        p95_ms=p50,
        p99_ms=p50,
        throughput=8000 / p50,
        iterations=30,
        converged=converged,
        shapes={"x": [8, 64]},
    )


def test_a_speedup_over_50x_is_unsteady_and_not_reported(onnx_mlp: ModelFile, tmp_path: Path):
    ctx = PipelineContext.start(tmp_path, onnx_mlp.fresh_artifact())
    for key, parent in (("01-compile", "input"), ("02-quantize", "input")):
        made = onnx_mlp.fresh_artifact()
        made.key, made.parent = key, parent
        ctx.add_artifact(made)
    rows = [_row("input", 20.0), _row("01-compile", 0.012), _row("02-quantize", 10.0)]

    metrics, suspicious = _speedups(rows, ctx)

    assert suspicious == ["01-compile vs input at batch 8 (1667x)"]
    assert not any(k.endswith("01-compile.b8") for k in metrics)  # no 1667x anywhere
    assert metrics["speedup_vs_parent.02-quantize.b8"] == 2.0
    assert metrics["speedup_vs_upload.02-quantize.b8"] == 2.0 == metrics["speedup.02-quantize.b8"]

    rows[2] = _row("02-quantize", 10.0, converged=False)  # an unsteady row makes no claim
    assert _speedups(rows, ctx)[0] == {}


def test_a_speedup_whose_ratio_moved_between_rounds_is_not_claimed(
    onnx_mlp: ModelFile, tmp_path: Path
):
    """Each row steady on its own (windows within 10%), but a neighbour slowed one of them in
    one round and the other in the next: the per-round ratio moved 19%, so no claim."""
    ctx = PipelineContext.start(tmp_path, onnx_mlp.fresh_artifact())
    made = onnx_mlp.fresh_artifact()
    made.key, made.parent = "01-quantize", "input"
    ctx.add_artifact(made)
    base, child = _row("input", 10.4), _row("01-quantize", 5.2)
    base.window_p50_ms, child.window_p50_ms = [10.0, 10.9, 10.0], [5.45, 5.0, 5.0]

    metrics, suspicious = _speedups([base, child], ctx)

    assert metrics == {}
    assert suspicious == [
        "01-quantize vs input at batch 8 (2.00x, its ratio moved 19% between rounds)"
    ]

    child.window_p50_ms = [5.0, 5.45, 5.0]  # slowed in the same round as its parent: it holds
    metrics, suspicious = _speedups([base, child], ctx)
    assert suspicious == [] and metrics["speedup_vs_parent.01-quantize.b8"] == 2.0
