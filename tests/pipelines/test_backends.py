"""Compile backends (AOTInductor, backend choice, the validate hook) and benchmark rigour.

AOTInductor compiles take tens of seconds on a small CPU, so each model is compiled once per
module (the ``aoti_mlp`` / ``aoti_cnn`` fixtures) and the tests read what it made.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.backends import (
    BACKEND_INFO,
    available_backends,
    backends_accepting,
    resolve_backend,
)
from pipelines.backends.aotinductor import inductor_cache_env, load_package
from pipelines.backends.settings import CompileSettings
from pipelines.core import (
    BenchmarkRow,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageResult,
)
from pipelines.latency import measure_latency, measure_windows, p50_spread
from pipelines.stages import Benchmark, Compile, validate_pipeline
from pipelines.stages.compile import choose_backend, onnxruntime_providers

from .conftest import ModelFile

QUICK = {"warmup": 2, "iterations": 5, "min_seconds": 0.0, "max_windows": 4}
HAS_CUDA = torch.cuda.is_available()


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


@dataclass
class Compiled:
    """A context whose input was compiled with AOTInductor, and what the compile reported."""

    ctx: PipelineContext
    result: StageResult
    calls: list[tuple[float, str]]
    jobs: Path  # the folder the job's workdir is in (its cache folder is beside it)
    env_before: dict[str, str | None]


def _compile_aoti(model: ModelFile, root: Path) -> Compiled:
    workdir = root / "jobs" / "job-1"
    workdir.mkdir(parents=True)
    ctx = PipelineContext.start(workdir, model.fresh_artifact())
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    env_before = {name: os.environ.get(name) for name in names}
    calls: list[tuple[float, str]] = []
    result = Compile().run(
        ctx, "01-compile", {"backend": "aotinductor"}, lambda f, m: calls.append((f, m))
    )
    return Compiled(ctx, result, calls, root / "jobs", env_before)


@pytest.fixture(scope="module")
def aoti_mlp(ts_mlp: ModelFile, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return _compile_aoti(ts_mlp, tmp_path_factory.mktemp("aoti-mlp"))


@pytest.fixture(scope="module")
def aoti_cnn(ts_cnn: ModelFile, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return _compile_aoti(ts_cnn, tmp_path_factory.mktemp("aoti-cnn"))


def _check_against_torchscript(
    compiled: Compiled, model: ModelFile, shape: tuple[int, ...], batches: tuple[int, int]
) -> None:
    artifact = compiled.ctx.current_artifact
    device = artifact.meta["device"]  # cuda where this machine has a GPU, else cpu
    package = load_package(artifact.path, compiled.jobs / "cache" / "inductor")
    scripted = torch.jit.load(str(model.path), map_location=device).eval()
    for batch in batches:
        x = torch.from_numpy(
            np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        ).to(device)
        with torch.inference_mode():
            got = package(x)
            expected = scripted(x)
        got = got[0] if isinstance(got, list | tuple) else got
        assert got.device.type == device
        assert got.shape == expected.shape == (batch, 10)
        torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=1e-3, atol=1e-4)


# -- AOTInductor ----------------------------------------------------------------------------------


def test_it_compiles_a_scripted_mlp_to_a_pt2_that_loads_and_matches(
    aoti_mlp: Compiled, ts_mlp: ModelFile
) -> None:
    artifact = aoti_mlp.ctx.current_artifact
    assert aoti_mlp.ctx.current == "01-compile" and artifact.parent == "input"
    assert artifact.format == "aotinductor" and artifact.backend == "aotinductor"
    assert artifact.precision == "fp32"
    assert Path(artifact.path).name == "model.pt2" and Path(artifact.path).is_file()
    assert artifact.meta["torch_version"] == torch.__version__
    assert artifact.meta["device"] == ("cuda" if HAS_CUDA else "cpu")
    assert artifact.meta["dynamic_dims"] == {"batch": [1, None]}
    assert artifact.meta["settings"]["backend"] == "aotinductor"
    assert [(s.name, s.shape) for s in artifact.inputs] == [("x", ["batch", 64])]
    assert [(s.name, s.shape, s.dtype) for s in artifact.outputs] == [
        ("output", ["batch", 10], "float32")
    ]
    assert 0.0 <= aoti_mlp.result.metrics["max_abs_diff"] < 1e-4
    assert artifact.metrics["size_bytes"] == Path(artifact.path).stat().st_size
    assert "compiled for aotinductor" in aoti_mlp.result.message
    # Progress is reported before and after each phase, in order, ending at 1.
    fractions = [f for f, _ in aoti_mlp.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = " | ".join(m for _, m in aoti_mlp.calls)
    for phase in ("loading the TorchScript", "ExportedProgram", "compiling with AOTInductor"):
        assert phase in messages
    # The batch is dynamic: two batch sizes other than the example's run and match TorchScript.
    _check_against_torchscript(aoti_mlp, ts_mlp, (64,), (1, 7))


def test_it_compiles_a_small_cnn_with_a_dynamic_batch(
    aoti_cnn: Compiled, ts_cnn: ModelFile
) -> None:
    artifact = aoti_cnn.ctx.current_artifact
    assert artifact.format == "aotinductor"
    assert artifact.inputs[0].shape == ["batch", 1, 8, 8]
    assert artifact.outputs[0].shape == ["batch", 10]
    assert artifact.meta["checked_batch_sizes"] == [2, 5]
    _check_against_torchscript(aoti_cnn, ts_cnn, (1, 8, 8), (3, 16))


def test_it_keeps_inductor_caches_under_the_jobs_cache_folder(aoti_mlp: Compiled) -> None:
    cache = aoti_mlp.jobs / "cache" / "inductor"
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files, "Inductor wrote nothing under the platform's cache folder"
    # The compiled kernels and wrapper are there (C++ sources and their objects).
    assert any(p.suffix in {".cpp", ".so", ".o", ".h", ".json"} for p in files)
    # The environment is as it was before the compile, so nothing later writes there by accident.
    for name, value in aoti_mlp.env_before.items():
        assert os.environ.get(name) == value


def test_it_extracts_a_loaded_package_into_the_platforms_cache_too(
    aoti_cnn: Compiled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "default-inductor-cache"  # stands for /tmp/torchinductor_<user>
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(elsewhere))

    package = load_package(aoti_cnn.ctx.current_artifact.path, tmp_path / "cache" / "inductor")

    with torch.inference_mode():
        x = torch.zeros(2, 1, 8, 8, device=aoti_cnn.ctx.current_artifact.meta["device"])
        assert tuple(package(x).shape) == (2, 10)
    # torch's package loader picks its extraction folder once per process, at its first load:
    # here the compile's own check, inside the jobs cache. Nothing lands in the default folder.
    assert not elsewhere.exists()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(elsewhere)
    extracted = [p.name for p in aoti_cnn.jobs.parent.parent.rglob("*.so")]
    assert extracted


def test_it_restores_the_inductor_environment_after_an_error(tmp_path: Path) -> None:
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(RuntimeError), inductor_cache_env(tmp_path / "c"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "c").resolve())
        assert os.environ["TRITON_CACHE_DIR"] == str((tmp_path / "c" / "triton").resolve())
        raise RuntimeError("compile failed")
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before


def test_it_refuses_to_compile_onnx_with_aotinductor_at_run_time(
    onnx_mlp: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(onnx_mlp)
    with pytest.raises(PipelineError, match="needs a torchscript model"):
        Compile().run(ctx, "01-compile", {"backend": "aotinductor"}, noop)
    assert ctx.current == "input"


# -- choosing a backend ---------------------------------------------------------------------------


def test_it_lists_every_backend_with_none_or_the_reason_it_cannot_run() -> None:
    status = available_backends()
    assert set(status) == set(BACKEND_INFO) == {"onnxruntime", "aotinductor", "tensorrt"}
    assert status["onnxruntime"] is None
    assert status["aotinductor"] is None  # torch and g++ are installed here
    for name, reason in status.items():
        assert reason is None or reason.startswith(f"{name}: ")


@pytest.mark.skipif(HAS_CUDA, reason="checks the choice on a CPU-only worker")
def test_it_picks_onnxruntime_for_auto_on_this_cpu_worker(onnx_mlp: ModelFile, make_ctx) -> None:
    assert resolve_backend("auto") == "onnxruntime"
    ctx = make_ctx(onnx_mlp)
    result = Compile().run(ctx, "01-compile", {}, noop)

    artifact = ctx.current_artifact
    assert artifact.backend == "onnxruntime" and artifact.format == "onnx"
    assert artifact.meta["settings"]["backend"] == "auto"
    assert artifact.meta["backend_choice"].startswith("auto picked onnxruntime (tensorrt: ")
    assert artifact.meta["providers"] == ["CPUExecutionProvider"]
    assert "auto picked onnxruntime" in result.message


def test_it_picks_tensorrt_for_auto_where_it_can_run_and_suits_the_model(
    onnx_mlp: ModelFile, make_ctx, tmp_path: Path
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    everything: dict[str, str | None] = {"onnxruntime": None, "aotinductor": None, "tensorrt": None}
    ctx = make_ctx(onnx_mlp)
    name, settings, note = choose_backend(ctx.current_artifact, CompileSettings(), everything)
    assert (name, settings.int8, note) == ("tensorrt", False, "auto picked tensorrt")

    # A dynamically quantized model is not something TensorRT runs: auto falls back, and says why.
    dynamic = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(onnx_mlp.path), str(dynamic), weight_type=QuantType.QInt8)
    artifact = ctx.current_artifact
    artifact.path = str(dynamic)
    name, _, note = choose_backend(artifact, CompileSettings(), everything)
    assert name == "onnxruntime"
    assert "MatMulInteger" in note and "int8_static" in note

    # A named backend is taken as asked, or refused with the reason.
    assert choose_backend(artifact, CompileSettings(backend="onnxruntime"), everything)[0] == (
        "onnxruntime"
    )
    gone = {**everything, "tensorrt": "tensorrt: no CUDA GPU on this worker"}
    with pytest.raises(PipelineError) as caught:
        choose_backend(artifact, CompileSettings(backend="tensorrt"), gone)
    assert str(caught.value) == (
        "backend tensorrt is not available: tensorrt: no CUDA GPU on this worker; this worker "
        "can run onnxruntime, aotinductor"
    )


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_it_refuses_cuda_providers_without_a_cuda_provider() -> None:
    assert onnxruntime_providers("auto") == ["CPUExecutionProvider"]
    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(PipelineError, match="providers cuda was asked for but"):
        onnxruntime_providers("cuda")


# -- the pipeline check ---------------------------------------------------------------------------


def test_it_refuses_aotinductor_on_onnx_and_tensorrt_on_torchscript() -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline("onnx", [{"name": "compile", "settings": {"backend": "aotinductor"}}])
    message = str(caught.value)
    assert message.startswith(
        "stage 1 (compile) needs a torchscript model but the model is onnx at that point"
    )
    assert "backend aotinductor takes torchscript" in message

    with pytest.raises(StageConfigError) as caught:
        validate_pipeline("torchscript", [{"name": "compile", "settings": {"backend": "tensorrt"}}])
    message = str(caught.value)
    assert message.startswith(
        "stage 1 (compile) needs an onnx model but the model is torchscript at that point: add "
        "export_onnx"
    )
    assert "backend onnxruntime and tensorrt take onnx" in message


def test_it_follows_each_backends_output_format_through_the_pipeline() -> None:
    planned = validate_pipeline(
        "torchscript",
        [
            {"name": "compile", "settings": {"backend": "aotinductor"}},
            {"name": "benchmark"},
        ],
    )
    assert [p.name for p in planned] == ["compile", "benchmark"]
    validate_pipeline(
        "torchscript",
        [
            {"name": "export_onnx"},
            {"name": "compile", "settings": {"backend": "tensorrt", "fp16": True}},
            {"name": "benchmark"},
        ],
    )
    # What a backend makes is not ONNX: a stage that needs ONNX after it is refused.
    with pytest.raises(
        StageConfigError,
        match=r"stage 2 \(quantize\) needs an onnx model but "
        r"the model is aotinductor at that point",
    ):
        validate_pipeline(
            "torchscript",
            [{"name": "compile", "settings": {"backend": "aotinductor"}}, {"name": "quantize"}],
        )
    # auto decides on the worker (onnx or tensorrt). A later stage that takes only onnx pins it
    # to onnxruntime in the plan (so the stored job says what runs), unless its settings cannot be
    # onnxruntime's; then the pipeline is refused.
    planned = validate_pipeline("onnx", [{"name": "compile"}, {"name": "quantize"}])
    assert planned[0].settings.backend == "onnxruntime"  # type: ignore[attr-defined]
    assert planned[0].to_dict()["settings"]["backend"] == "onnxruntime"
    kept = validate_pipeline("onnx", [{"name": "compile"}, {"name": "benchmark"}])
    assert kept[0].settings.backend == "auto"  # type: ignore[attr-defined]
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline(
            "onnx",
            [
                {"name": "compile", "settings": {"dim_ranges": {"seq": [1, 64, 128]}}},
                {"name": "quantize"},
            ],
        )
    assert str(caught.value) == (
        "stage 2 (quantize) needs an onnx model but the model is onnx or tensorrt at that point: "
        "the format after compile depends on the worker; set compile's backend so it is known"
    )


def test_it_declares_what_each_backend_takes_and_makes() -> None:
    assert Compile.accepts_for(CompileSettings(backend="aotinductor")) == ("torchscript",)
    assert Compile.produces_for(CompileSettings(backend="aotinductor")) == "aotinductor"
    assert Compile.accepts_for(CompileSettings(backend="tensorrt")) == ("onnx",)
    assert Compile.produces_for(CompileSettings(backend="tensorrt")) == "tensorrt"
    assert Compile.accepts_for(CompileSettings()) == ("onnx",)
    assert set(Compile.produces_for(CompileSettings())) == {"onnx", "tensorrt"}
    assert backends_accepting("torchscript") == ["aotinductor"]
    assert set(Compile.accepts) == {"onnx", "torchscript"}


# -- windowed latency -----------------------------------------------------------------------------


def test_it_measures_windows_until_three_agree_on_a_stable_callable() -> None:
    calls = itertools.count()

    def steady() -> None:
        next(calls)
        time.sleep(0.002)

    stats = measure_windows(steady, warmup=2, iterations=10, min_seconds=0.0, max_windows=10)

    assert stats.converged
    assert 3 <= stats.windows <= 10
    assert len(stats.window_p50_ms) == stats.windows
    assert p50_spread(stats.window_p50_ms[-3:]) <= 0.10 and stats.spread <= 0.10
    # The reported numbers pool the last three windows.
    assert stats.iterations == 30
    assert next(calls) == 2 + 10 * stats.windows
    assert 2.0 <= stats.p50_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.throughput(4) == pytest.approx(4 * 30 / stats.total_s)


def test_it_stops_at_max_windows_and_says_the_windows_disagreed() -> None:
    calls = itertools.count()

    def slowing() -> None:  # each window of 5 calls is twice as slow as the one before
        time.sleep(0.0005 * 2 ** (next(calls) // 5))

    stats = measure_windows(slowing, warmup=0, iterations=5, min_seconds=0.0, max_windows=4)

    assert not stats.converged
    assert stats.windows == 4 and len(stats.window_p50_ms) == 4
    assert stats.spread > 0.10
    with pytest.raises(ValueError):
        measure_windows(lambda: None, warmup=0, iterations=5, max_windows=0)


def test_it_keeps_measure_latency_working_with_p90() -> None:
    stats = measure_latency(lambda: None, 1, 20, min_seconds=0.0)
    assert stats.iterations == 20
    assert stats.p50_ms <= stats.p90_ms <= stats.p95_ms


# -- benchmark ------------------------------------------------------------------------------------


def test_it_benchmarks_aotinductor_beside_the_eager_baseline_with_memory_and_speedups(
    aoti_mlp: Compiled,
) -> None:
    ctx = aoti_mlp.ctx
    calls: list[float] = []
    result = Benchmark().run(
        ctx,
        "02-benchmark",
        {"batch_sizes": [1, 4], "targets": "current", **QUICK},
        lambda f, m: calls.append(f),
    )

    rows = {(r.artifact, r.batch_size): r for r in ctx.benchmarks}
    assert set(rows) == {(a, b) for a in ("input", "01-compile") for b in (1, 4)}
    eager = "torch-cuda" if HAS_CUDA else "torch"
    compiled = "aotinductor-cuda" if HAS_CUDA else "aotinductor"
    assert rows[("input", 1)].backend == eager and rows[("01-compile", 1)].backend == compiled
    for row in rows.values():
        assert 0 < row.p50_ms <= row.p90_ms <= row.p95_ms <= row.p99_ms
        assert 1 <= row.windows <= 4
        assert row.iterations % (5 * min(row.windows, 3)) == 0  # loops of calls count each
        assert row.peak_rss_mb > 0 and row.model_rss_mb >= 0
        assert (row.gpu_mem_mb is not None) == HAS_CUDA
    for batch in (1, 4):
        base, made = rows[("input", batch)], rows[("01-compile", batch)]
        # Speedups come only from steady rows (both sides' windows agreed), never over 50x;
        # a steady pair whose per-round ratio moved is left out too (tests of speedups.py), so
        # a claim here is never made without those conditions, and when made it is the ratio.
        claim = base.converged and made.converged and base.p50_ms / made.p50_ms <= 50
        for name in ("speedup", "speedup_vs_parent", "speedup_vs_upload"):
            speedup = result.metrics.get(f"{name}.01-compile.b{batch}")
            if not claim:
                assert speedup is None
            elif speedup is not None:
                assert speedup == pytest.approx(base.p50_ms / made.p50_ms)
            else:
                assert f"01-compile vs input at batch {batch}" in result.message, result.message
        assert result.metrics[f"01-compile.b{batch}.p90_ms"] == rows[("01-compile", batch)].p90_ms
        assert result.metrics[f"input.b{batch}.peak_rss_mb"] > 0
    assert "speedup.input.b1" not in result.metrics
    assert len(calls) == 4 and calls[-1] == 1.0

    # The new row fields survive the context's save and load.
    ctx.save()
    again = PipelineContext.load(ctx.workdir)
    assert again is not None and again.benchmarks == ctx.benchmarks


def test_it_loads_a_context_saved_before_the_new_benchmark_fields(tmp_path: Path) -> None:
    old_row: dict[str, Any] = {
        "artifact": "input",
        "backend": "torch",
        "batch_size": 1,
        "p50_ms": 1.0,
        "p95_ms": 2.0,
        "p99_ms": 3.0,
        "throughput": 1000.0,
        "iterations": 50,
    }
    context = {
        "current": "input",
        "artifacts": {
            "input": {
                "key": "input",
                "path": str(tmp_path / "m.pt"),
                "format": "torchscript",
                "precision": "fp32",
                "inputs": [],
                "outputs": [],
            }
        },
        "results": {},
        "benchmarks": [old_row],
    }
    (tmp_path / "context.json").write_text(json.dumps(context))

    loaded = PipelineContext.load(tmp_path)

    assert loaded is not None
    assert loaded.benchmarks == [
        BenchmarkRow(**old_row, p90_ms=0.0, windows=1, converged=False, gpu_mem_mb=None)
    ]


def test_it_skips_a_tensorrt_engine_where_tensorrt_cannot_run(
    onnx_mlp: ModelFile, make_ctx: Callable[[ModelFile], PipelineContext]
) -> None:
    if available_backends()["tensorrt"] is None:
        pytest.skip("this worker runs TensorRT engines")
    ctx = make_ctx(onnx_mlp)
    engine = ctx.stage_dir("01-compile") / "model.engine"
    engine.write_bytes(b"not really an engine")
    artifact = ctx.current_artifact
    ctx.add_artifact(
        type(artifact)(
            key="01-compile",
            path=str(engine),
            format="tensorrt",
            precision="fp32",
            inputs=artifact.inputs,
            outputs=artifact.outputs,
            parent="input",
            backend="tensorrt",
        )
    )

    result = Benchmark().run(ctx, "02-benchmark", {"batch_sizes": [2], **QUICK}, noop)

    assert [(r.artifact, r.backend) for r in ctx.benchmarks] == [("input", "onnxruntime")]
    assert "01-compile: skipped, TensorRT engines need a CUDA GPU with TensorRT" in result.message
    assert not any(key.startswith("speedup.") for key in result.metrics)
