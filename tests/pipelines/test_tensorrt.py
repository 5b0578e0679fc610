"""The TensorRT backend.

Without a GPU: the settings check, the unavailable-backend message, the Q/DQ checks behind int8,
the optimisation profile, the timing cache's name, the child process (command line, environment,
progress relay, a crash, a cancel) and reproduce.sh. With a CUDA GPU and tensorrt (``gpu``
marker): real engine builds (fp16 and a Q/DQ int8 model) run with torch CUDA tensors as buffers
and compared with onnxruntime, engine.json, the timing cache and its reuse, reproduce.sh rebuilding
the engine, and the benchmark of an engine.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import pipelines.backends.catalog as backends
from pipelines.backends import available_backends
from pipelines.backends.settings import CompileSettings
from pipelines.backends.tensorrt_build import main as build_main
from pipelines.backends.tensorrt_child import (
    BUILD_MODULE,
    build_config,
    child_command,
    child_env,
    child_failure,
    parse_child_line,
    reproduce_script,
    run_child,
    source_root,
)
from pipelines.backends.tensorrt_device import timing_cache_filename
from pipelines.backends.tensorrt_graph import (
    QuantInfo,
    check_int8,
    onnx_quantization,
    profile_shapes,
)
from pipelines.core import Cancelled, PipelineContext, PipelineError, TensorSpec
from pipelines.stages import Benchmark, Compile

from .conftest import ModelFile, _onnx, export_onnx, make_cnn


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def _tensorrt_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


needs_tensorrt = pytest.mark.skipif(
    not _tensorrt_ready(), reason="needs a CUDA GPU and the tensorrt package"
)


def quantize_qdq(
    source: Path,
    target: Path,
    input_name: str,
    shape: tuple[int, ...],
    symmetric: bool,
    quantize_bias: bool = False,
) -> Path:
    """A static Q/DQ int8 model calibrated on random data.

    Symmetric int8 with float biases is what TensorRT takes; onnxruntime's defaults (asymmetric
    uint8 activations, int32 biases) are what it refuses.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {input_name: rng.standard_normal((4, *shape)).astype(np.float32)}
                    for _ in range(8)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=symmetric,
        extra_options={
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": quantize_bias,
        },
    )
    return target


@pytest.fixture(scope="module")
def onnx_cnn(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    """ONNX CNN, input image [batch, 1, 8, 8] -> [batch, 10], dynamic batch."""
    torch.manual_seed(5)
    module = make_cnn()
    path = tmp_path_factory.mktemp("trt-models") / "cnn.onnx"
    export_onnx(module, (torch.randn(2, 1, 8, 8),), path, ["image"], True)
    return _onnx(module, path)


@pytest.fixture(scope="module")
def qdq_cnn(onnx_cnn: ModelFile) -> ModelFile:
    path = quantize_qdq(
        onnx_cnn.path, onnx_cnn.path.with_name("cnn.qdq.onnx"), "image", (1, 8, 8), True
    )
    model = _onnx(onnx_cnn.module, path)
    model.artifact.precision = "int8"
    return model


# -- settings -------------------------------------------------------------------------------------


def test_it_takes_every_tensorrt_setting_together() -> None:
    settings = CompileSettings(
        backend="tensorrt",
        fp16=True,
        int8=True,
        min_batch=1,
        opt_batch=4,
        max_batch=16,
        dim_ranges={"seq": [1, 64, 128]},
        workspace_mb=1024,
        version_compatible=True,
        hardware_compatible=True,
    )
    assert settings.dim_ranges == {"seq": [1, 64, 128]}
    assert CompileSettings(backend="tensorrt").model_dump()["max_batch"] == 32


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "tensorrt", "min_batch": 8, "opt_batch": 4}, "min_batch <= opt_batch"),
        ({"backend": "tensorrt", "opt_batch": 64}, "min_batch <= opt_batch <= max_batch"),
        ({"backend": "tensorrt", "dim_ranges": {"seq": [64, 1, 128]}}, "dim_ranges['seq']"),
        ({"backend": "tensorrt", "dim_ranges": {"seq": [1, 128]}}, "at least 3 items"),
        ({"backend": "onnxruntime", "int8": True}, "int8 applies to backend tensorrt"),
        ({"int8": True}, "int8 applies to backend tensorrt, not auto"),
        ({"backend": "aotinductor", "fp16": True}, "fp16 applies to backend tensorrt"),
        ({"backend": "tensorrt", "device": "cuda"}, "device applies to backend aotinductor"),
        ({"backend": "tensorrt", "providers": "cuda"}, "providers applies to backend onnxruntime"),
        ({"backend": "onnxruntime", "dim_ranges": {"s": [1, 2, 3]}}, "dim_ranges applies to"),
        ({"backend": "tensorrt", "workspace_mb": 8}, "greater than or equal to 16"),
        ({"backend": "tensorrt", "max_batch": 0}, "greater than or equal to 1"),
    ],
)
def test_it_refuses_tensorrt_settings_that_cannot_build(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        CompileSettings.model_validate(values)


# -- availability ---------------------------------------------------------------------------------


def test_it_says_why_tensorrt_is_not_available_here(onnx_cnn: ModelFile, make_ctx) -> None:
    reason = available_backends()["tensorrt"]
    if reason is None:
        pytest.skip("TensorRT runs on this worker")
    from pipelines.backends.catalog import cuda_reason

    if cuda_reason() is not None:
        # No install advice on a machine where TensorRT could not run anyway.
        assert "pip install" not in reason
        assert reason.endswith("(TensorRT runs only on NVIDIA GPUs)")
    elif "not installed" in reason:
        assert reason == (
            "tensorrt: not installed (it is the optional extra: pip install 'r1platform[trt]')"
        )
    ctx = make_ctx(onnx_cnn)
    with pytest.raises(PipelineError) as caught:
        Compile().run(ctx, "01-compile", {"backend": "tensorrt"}, noop)
    assert str(caught.value).startswith(f"backend tensorrt is not available: {reason}")
    assert "this worker can run onnxruntime, aotinductor" in str(caught.value)
    assert ctx.current == "input"
    assert not (ctx.workdir / "01-compile" / "model.engine").exists()


def test_it_says_no_cuda_gpu_when_tensorrt_is_installed_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(backends, "cuda_reason", lambda: "no CUDA GPU on this worker")

    assert available_backends()["tensorrt"] == (
        "tensorrt: no CUDA GPU on this worker (TensorRT runs only on NVIDIA GPUs)"
    )
    with pytest.raises(PipelineError, match="tensorrt: no CUDA GPU on this worker"):
        backends.resolve_backend("tensorrt")


# -- what the model must be for int8 --------------------------------------------------------------


def test_it_detects_qdq_nodes_and_what_int8_refuses(onnx_mlp: ModelFile, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = onnx_quantization(onnx_mlp.path)
    assert plain == QuantInfo() and not plain.has_qdq
    check_int8(plain, int8=False)  # an fp32 model builds without int8
    with pytest.raises(PipelineError) as caught:
        check_int8(plain, int8=True)
    assert "int8 needs an explicitly quantized model" in str(caught.value)
    assert "quantize with mode int8_static" in str(caught.value)

    symmetric = onnx_quantization(
        quantize_qdq(onnx_mlp.path, tmp_path / "s.onnx", "x", (64,), True)
    )
    assert symmetric.has_qdq and symmetric.quantize_linear > 0 and symmetric.dequantize_linear > 0
    assert symmetric.problems == [] and symmetric.other_quantized_ops == []
    check_int8(symmetric, int8=True)
    with pytest.raises(PipelineError, match="set int8 true"):
        check_int8(symmetric, int8=False)

    asymmetric = onnx_quantization(
        quantize_qdq(onnx_mlp.path, tmp_path / "a.onnx", "x", (64,), False)
    )
    assert (
        asymmetric.has_qdq and "uint8 zero points (asymmetric activations)" in asymmetric.problems
    )
    with pytest.raises(PipelineError, match="TensorRT needs symmetric int8 Q/DQ"):
        check_int8(asymmetric, int8=True)

    int32_bias = onnx_quantization(
        quantize_qdq(onnx_mlp.path, tmp_path / "b.onnx", "x", (64,), True, quantize_bias=True)
    )
    assert int32_bias.problems == ["int32-quantized biases (QuantizeBias must be off)"]
    with pytest.raises(
        PipelineError, match="weights and activations only, but the model has int32"
    ):
        check_int8(int32_bias, int8=True)

    dynamic_path = tmp_path / "d.onnx"
    quantize_dynamic(str(onnx_mlp.path), str(dynamic_path), weight_type=QuantType.QInt8)
    dynamic = onnx_quantization(dynamic_path)
    assert "MatMulInteger" in dynamic.other_quantized_ops
    with pytest.raises(PipelineError, match="which TensorRT does not run"):
        check_int8(dynamic, int8=False)


# -- profile, cache name, config ------------------------------------------------------------------


def test_it_describes_the_optimisation_profile() -> None:
    specs = [
        TensorSpec("ids", ["batch", "seq"], "int64"),
        TensorSpec("mask", ["batch", "seq", 4], "float32"),
        TensorSpec("table", [3, 4], "float32"),
    ]
    assert profile_shapes(specs, 1, 8, 32, {"seq": [16, 64, 128]}) == {
        "ids": [[1, 16], [8, 64], [32, 128]],
        "mask": [[1, 16, 4], [8, 64, 4], [32, 128, 4]],
        "table": [[3, 4], [3, 4], [3, 4]],
    }
    with pytest.raises(PipelineError) as caught:
        profile_shapes(specs, 1, 8, 32, {})
    assert "set dim_ranges for seq" in str(caught.value)
    assert '{"seq": [1, 128, 512]}' in str(caught.value)


def test_it_names_the_timing_cache_after_the_device_profile() -> None:
    assert (
        timing_cache_filename("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")
        == "NVIDIA-H100-80GB-HBM3-9.0-trt10.3.0.cache"
    )
    assert timing_cache_filename("GeForce RTX 4090/../x", "8.9", "10.7.0.post1") == (
        "GeForce-RTX-4090-..-x-8.9-trt10.7.0.post1.cache"
    )
    assert "/" not in timing_cache_filename("a/b", "1.0", "10")


def test_it_builds_the_child_command_line_and_environment() -> None:
    assert child_command("build.json", python="/opt/py/bin/python") == [
        "/opt/py/bin/python",
        "-m",
        "pipelines.backends.tensorrt_build",
        "--config",
        "build.json",
    ]
    assert child_command("b.json")[0] == sys.executable
    assert BUILD_MODULE == "pipelines.backends.tensorrt_build"
    root = source_root()
    assert (root / "pipelines" / "backends" / "tensorrt_build.py").is_file()
    env = child_env({"PYTHONPATH": f"/a{os.pathsep}{root}", "HOME": "/h"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(root), "/a"])
    assert env["HOME"] == "/h" and env["PYTHONUNBUFFERED"] == "1"


def test_it_writes_a_reproduce_script_that_reruns_the_exact_build(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    config = build_config(
        onnx_mlp.path,
        {"x": [[1, 64], [8, 64], [32, 64]]},
        fp16=True,
        int8=False,
        workspace_mb=512,
        version_compatible=False,
        hardware_compatible=True,
        timing_cache=tmp_path / "cache" / "tensorrt" / "gpu-9.0-trt10.cache",
    )
    assert config["onnx"] == str(onnx_mlp.path.resolve())
    assert config["engine"] == "model.engine" and config["meta"] == "engine.json"
    assert config["timing_cache"].endswith("cache/tensorrt/gpu-9.0-trt10.cache")

    # A stand-in for python that records what it was run with.
    record = tmp_path / "record.json"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        f'printf \'{{"args": "%s", "cwd": "%s", "pythonpath": "%s"}}\' "$*" "$(pwd)" '
        f'"$PYTHONPATH" > {record}\n'
    )
    fake_python.chmod(0o755)
    script_dir = tmp_path / "stage"
    script_dir.mkdir()
    script = script_dir / "reproduce.sh"
    script.write_text(reproduce_script(config, python=str(fake_python)))

    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"exec {fake_python} -m pipelines.backends.tensorrt_build --config build.json" in text
    subprocess.run(["sh", str(script)], check=True, env={**os.environ, "PYTHONPATH": "/extra"})

    out = script_dir / "reproduced"  # the default: never over the engine it documents
    assert json.loads((out / "build.json").read_text()) == config
    ran = json.loads(record.read_text())
    assert ran["args"] == "-m pipelines.backends.tensorrt_build --config build.json"
    assert ran["cwd"] == str(out.resolve())
    assert ran["pythonpath"] == f"{source_root()}:/extra"

    other = tmp_path / "elsewhere"
    subprocess.run(["sh", str(script), str(other)], check=True)
    assert json.loads((other / "build.json").read_text()) == config


# -- the child process ----------------------------------------------------------------------------


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_it_relays_child_progress_and_reports_its_error(tmp_path: Path) -> None:
    calls: list[tuple[float, str]] = []
    code = (
        "print('progress 0.5 building the engine (10 s)', flush=True)\n"
        "print('some TensorRT log line')\n"
        "print('error: the ONNX parser failed: unsupported op Foo', flush=True)\n"
        "raise SystemExit(2)\n"
    )
    with pytest.raises(PipelineError) as caught:
        run_child(_child(code), tmp_path, lambda f, m: calls.append((f, m)), tmp_path / "log")

    assert str(caught.value) == (
        "TensorRT could not build the engine: the ONNX parser failed: unsupported op Foo"
    )
    assert calls == [(pytest.approx(0.1 + 0.85 * 0.5), "building the engine (10 s)")]
    assert "some TensorRT log line" in (tmp_path / "log").read_text()
    assert parse_child_line("progress 1 done") == (1.0, "done")
    assert parse_child_line("progress x y") is None and parse_child_line("hello") is None


def test_it_survives_a_builder_that_crashes(tmp_path: Path) -> None:
    code = "import os, signal\nprint('parsing', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    with pytest.raises(PipelineError) as caught:
        run_child(_child(code), tmp_path, noop, tmp_path / "log")
    message = str(caught.value)
    assert message.startswith("the TensorRT builder crashed (SIGSEGV); the worker was not affected")
    assert "reproduce.sh" in message and "parsing" in message
    assert child_failure(3, ["a", "b"]) == "the TensorRT builder exited with status 3: a; b"


def test_it_stops_the_builder_when_the_job_is_cancelled(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = (
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('progress 0.2 building', flush=True)\ntime.sleep(60)\n"
    )

    def cancel(fraction: float, message: str) -> None:
        raise Cancelled()

    started = time.monotonic()
    with pytest.raises(Cancelled):
        run_child(_child(code), tmp_path, cancel, tmp_path / "log")
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_it_fails_the_builder_cleanly_on_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "build.json"
    config.write_text(json.dumps({"engine": "model.engine"}))
    assert build_main(["--config", str(config)]) == 2
    assert "error: build.json has no 'onnx'" in capsys.readouterr().out


# -- on a GPU with TensorRT -----------------------------------------------------------------------


def _compile(
    model: ModelFile, jobs: Path, job: str, settings: dict, calls: list | None = None
) -> PipelineContext:
    workdir = jobs / job
    workdir.mkdir(parents=True)
    ctx = PipelineContext.start(workdir, model.fresh_artifact())
    progress: Callable[[float, str], None] = (
        (lambda f, m: calls.append((f, m))) if calls is not None else noop
    )
    Compile().run(ctx, "01-compile", {"backend": "tensorrt", **settings}, progress)
    return ctx


@pytest.fixture(scope="module")
def trt_jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt") / "jobs"


@pytest.fixture(scope="module")
def fp16_engine(onnx_mlp: ModelFile, trt_jobs: Path) -> tuple[PipelineContext, list]:
    calls: list[tuple[float, str]] = []
    return _compile(onnx_mlp, trt_jobs, "job-1", {"fp16": True}, calls), calls


def _onnxruntime(path: str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from pipelines.onnx_io import cpu_session

    return cpu_session(path).run(None, feeds)


@pytest.mark.gpu
@needs_tensorrt
def test_it_builds_an_fp16_engine_that_matches_onnxruntime(
    fp16_engine: tuple[PipelineContext, list], onnx_mlp: ModelFile
) -> None:
    import tensorrt as trt

    from pipelines.backends.tensorrt_engine import TensorRTEngine

    ctx, calls = fp16_engine
    artifact = ctx.current_artifact
    assert artifact.format == "tensorrt" and artifact.backend == "tensorrt"
    assert artifact.precision == "fp16" and Path(artifact.path).name == "model.engine"
    stage = Path(artifact.path).parent
    for name in ("engine.json", "build.json", "reproduce.sh", "build.log"):
        assert (stage / name).is_file(), name
    assert any("building the engine" in m for _, m in calls)

    meta = json.loads((stage / "engine.json").read_text())
    major, minor = torch.cuda.get_device_capability(0)
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["gpu"] == torch.cuda.get_device_name(0)
    assert meta["compute_capability"] == f"{major}.{minor}"
    assert meta["cuda_runtime"] == torch.version.cuda
    assert "nvidia_driver" in meta
    assert meta["profiles"] == {"x": [[1, 64], [8, 64], [32, 64]]}
    assert meta["flags"]["fp16"] is True and meta["flags"]["int8"] is False
    assert meta["hardware_compatibility_level"] == "NONE"
    assert meta["sha256"] == hashlib.sha256(Path(artifact.path).read_bytes()).hexdigest()
    assert meta["verify"]["outputs_finite"] is True
    assert meta["verify"]["max_abs_diff"] < 0.05
    assert artifact.meta["sha256"] == meta["sha256"]

    engine = TensorRTEngine(artifact.path)
    assert engine.input_names == ["x"] and engine.output_names == ["output"]
    for batch in (1, 32):
        x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
        got = engine({"x": torch.from_numpy(x).cuda()})["output"]
        assert got.is_cuda and tuple(got.shape) == (batch, 10)
        (expected,) = _onnxruntime(onnx_mlp.path, {"x": x})
        np.testing.assert_allclose(got.float().cpu().numpy(), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(PipelineError, match="outside the engine's optimisation profile"):
        engine({"x": torch.zeros(33, 64, device="cuda")})


@pytest.mark.gpu
@needs_tensorrt
def test_it_keeps_and_reuses_the_timing_cache_per_device_profile(
    fp16_engine: tuple[PipelineContext, list], onnx_mlp: ModelFile, trt_jobs: Path
) -> None:
    import tensorrt as trt

    ctx, _ = fp16_engine
    major, minor = torch.cuda.get_device_capability(0)
    cache = (
        trt_jobs
        / "cache"
        / "tensorrt"
        / timing_cache_filename(torch.cuda.get_device_name(0), f"{major}.{minor}", trt.__version__)
    )
    assert cache.is_file() and cache.stat().st_size > 0
    first = json.loads((Path(ctx.current_artifact.path).parent / "engine.json").read_text())
    assert first["timing_cache"]["path"] == str(cache.resolve())
    assert first["timing_cache"]["reused"] is False  # a fresh jobs folder
    assert first["timing_cache"]["saved_bytes"] == cache.stat().st_size

    again = _compile(onnx_mlp, trt_jobs, "job-2", {"fp16": True})
    second = json.loads((Path(again.current_artifact.path).parent / "engine.json").read_text())
    assert second["timing_cache"]["reused"] is True
    assert second["timing_cache"]["loaded_bytes"] > 0


@pytest.mark.gpu
@needs_tensorrt
def test_it_builds_a_qdq_int8_engine_that_agrees_with_onnxruntime(
    qdq_cnn: ModelFile, trt_jobs: Path
) -> None:
    from pipelines.backends.tensorrt_engine import TensorRTEngine

    ctx = _compile(qdq_cnn, trt_jobs, "job-int8", {"int8": True, "fp16": True, "max_batch": 64})
    artifact = ctx.current_artifact
    assert artifact.precision == "int8"
    meta = json.loads((Path(artifact.path).parent / "engine.json").read_text())
    assert meta["flags"]["int8"] is True
    assert meta["profiles"]["image"] == [[1, 1, 8, 8], [8, 1, 8, 8], [64, 1, 8, 8]]

    x = np.random.default_rng(3).standard_normal((64, 1, 8, 8)).astype(np.float32)
    got = TensorRTEngine(artifact.path)({"image": torch.from_numpy(x).cuda()})["output"]
    got_np = got.float().cpu().numpy()
    (expected,) = _onnxruntime(qdq_cnn.path, {"image": x})
    # Both run int8 with the same scales; rounding and fusion order differ a little.
    assert np.max(np.abs(got_np - expected)) <= 0.1 * np.max(np.abs(expected)) + 1e-3
    assert np.mean(got_np.argmax(axis=1) == expected.argmax(axis=1)) >= 0.9


@pytest.mark.gpu
@needs_tensorrt
def test_it_refuses_int8_for_a_model_without_qdq_on_the_gpu(onnx_cnn: ModelFile, make_ctx) -> None:
    ctx = make_ctx(onnx_cnn)
    with pytest.raises(PipelineError, match="quantize with mode int8_static"):
        Compile().run(ctx, "01-compile", {"backend": "tensorrt", "int8": True}, noop)
    assert ctx.current == "input"


@pytest.mark.gpu
@needs_tensorrt
def test_it_builds_portable_engines_that_load_with_host_code_allowed(
    onnx_cnn: ModelFile, trt_jobs: Path
) -> None:
    from pipelines.backends.tensorrt_engine import TensorRTEngine

    major, _ = torch.cuda.get_device_capability(0)
    settings = {"version_compatible": True, "hardware_compatible": major >= 8}
    ctx = _compile(onnx_cnn, trt_jobs, "job-portable", settings)
    meta = json.loads((Path(ctx.current_artifact.path).parent / "engine.json").read_text())
    assert meta["flags"]["version_compatible"] is True
    assert meta["hardware_compatibility_level"] == ("AMPERE_PLUS" if major >= 8 else "NONE")
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    got = TensorRTEngine(ctx.current_artifact.path, allow_host_code=True)({"image": x})["output"]
    (expected,) = _onnxruntime(onnx_cnn.path, {"image": x})
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_tensorrt
def test_it_rebuilds_the_engine_with_reproduce_sh(
    fp16_engine: tuple[PipelineContext, list], tmp_path: Path
) -> None:
    ctx, _ = fp16_engine
    stage = Path(ctx.current_artifact.path).parent
    out = tmp_path / "again"
    subprocess.run(["sh", str(stage / "reproduce.sh"), str(out)], check=True, timeout=900)
    meta = json.loads((out / "engine.json").read_text())
    original = json.loads((stage / "engine.json").read_text())
    assert (out / "model.engine").is_file()
    assert meta["profiles"] == original["profiles"] and meta["flags"] == original["flags"]
    assert meta["timing_cache"]["reused"] is True


@pytest.mark.gpu
@needs_tensorrt
def test_it_benchmarks_an_engine_beside_the_onnx_baseline(
    fp16_engine: tuple[PipelineContext, list],
) -> None:
    ctx, _ = fp16_engine
    result = Benchmark().run(
        ctx,
        "02-benchmark",
        {"batch_sizes": [1, 32, 64], "warmup": 3, "iterations": 10, "min_seconds": 0.0},
        noop,
    )
    rows = {(r.artifact, r.batch_size): r for r in ctx.benchmarks}
    engine_row = rows[("01-compile", 32)]
    assert engine_row.backend == "tensorrt"
    assert engine_row.gpu_mem_mb is not None and engine_row.gpu_mem_mb > 0
    assert engine_row.p50_ms <= engine_row.p90_ms
    assert ("01-compile", 64) not in rows  # outside the engine's batch range
    assert "skipped batch size 64, outside the engine's batch range 1-32" in result.message
    assert result.metrics["speedup.01-compile.b32"] == pytest.approx(
        rows[("input", 32)].p50_ms / engine_row.p50_ms
    )
