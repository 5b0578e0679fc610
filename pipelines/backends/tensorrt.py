"""TensorRT backend: ONNX -> a serialized TensorRT engine, built in a child process.

A TensorRT build can take the process down (a builder segfault, the CUDA driver aborting on an
out-of-memory tactic), so the compile stage never builds in the worker: it writes ``build.json``
and runs ``python -m pipelines.backends.tensorrt_build --config build.json`` (see
:mod:`pipelines.backends.tensorrt_build`), relaying the child's progress lines. Beside the engine
land ``build.json``, ``reproduce.sh`` (the exact command, with the config inlined), ``engine.json``
(TensorRT/CUDA/driver versions, GPU, compute capability, profile shapes, flags, sha256) and
``build.log``.

Builder settings:

* precision: ``fp16`` lets TensorRT pick fp16 kernels; ``int8`` is explicit quantization only: the
  ONNX must carry symmetric int8 QuantizeLinear/DequantizeLinear pairs (quantize ``int8_static``).
  Dynamically quantized graphs (MatMulInteger, DynamicQuantizeLinear) are refused: TensorRT does
  not run them, and its implicit-calibration INT8 is deprecated;
* one optimisation profile: the batch dim spans ``min_batch``/``opt_batch``/``max_batch``; other
  dynamic dims need ``dim_ranges`` ``{"seq": [min, opt, max]}``;
* ``version_compatible`` (runs on later TensorRT 10 runtimes, which must allow engine host code)
  and ``hardware_compatible`` (AMPERE_PLUS: any compute capability >= 8.0 GPU).

The timing cache is kept per device profile, ``<cache>/tensorrt/<gpu>-<cc>-trt<version>.cache``,
loaded before each build and saved (merged, atomically) after it, so the second build of similar
layers on the same GPU model skips most tactic timing.

The backend is cut by concern: :mod:`.tensorrt_graph` (what TensorRT takes of the ONNX graph:
Q/DQ checks, the optimisation profile), :mod:`.tensorrt_device` (the GPU and its timing cache),
:mod:`.tensorrt_child` (the builder child's files, command, reproduce.sh and the relay),
:mod:`.tensorrt_engine` (running a built engine) and this module, the compile step that ties
them together. Nothing imports tensorrt at import time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.backends.catalog import CompiledModel
from pipelines.backends.tensorrt_child import (
    BUILD_CONFIG_FILENAME,
    BUILD_LOG_FILENAME,
    ENGINE_FILENAME,
    ENGINE_META_FILENAME,
    REPRODUCE_FILENAME,
    build_config,
    child_command,
    reproduce_script,
    run_child,
)
from pipelines.backends.tensorrt_device import device_info, timing_cache_path
from pipelines.backends.tensorrt_graph import check_int8, onnx_quantization, profile_shapes
from pipelines.core import Artifact, ModelFormat, PipelineError, ProgressFn
from pipelines.onnx_io import read_tensor_specs

if TYPE_CHECKING:
    from pipelines.backends.settings import CompileSettings


def _tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def compile_tensorrt(
    source: Artifact,
    out_dir: Path,
    settings: CompileSettings,
    progress: ProgressFn,
    *,
    cache_root: Path,
) -> CompiledModel:
    """Build a TensorRT engine of the ONNX ``source`` in a child process; see the module doc."""
    from pipelines.backends.catalog import tensorrt_reason

    reason = tensorrt_reason()
    if reason is not None:
        raise PipelineError(f"backend tensorrt is not available: {reason}")
    out_dir = Path(out_dir)

    progress(0.01, "checking the model for TensorRT")
    quant = onnx_quantization(source.path)
    check_int8(quant, settings.int8)
    inputs, outputs = read_tensor_specs(source.path)
    profiles = profile_shapes(
        inputs,
        settings.min_batch,
        settings.opt_batch,
        settings.max_batch,
        {k: list(v) for k, v in settings.dim_ranges.items()},
    )
    device = device_info()
    major = int(str(device["compute_capability"]).split(".")[0])
    if settings.hardware_compatible and major < 8:
        raise PipelineError(
            f"hardware_compatible builds AMPERE_PLUS engines, which need compute capability 8.0 "
            f"or newer; this GPU ({device['gpu']}) is {device['compute_capability']}"
        )
    version = _tensorrt_version()
    cache = timing_cache_path(cache_root, device["gpu"], device["compute_capability"], version)
    cache.parent.mkdir(parents=True, exist_ok=True)

    config = build_config(
        source.path,
        profiles,
        fp16=settings.fp16,
        int8=settings.int8,
        workspace_mb=settings.workspace_mb,
        version_compatible=settings.version_compatible,
        hardware_compatible=settings.hardware_compatible,
        timing_cache=cache,
    )
    config_path = out_dir / BUILD_CONFIG_FILENAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    script = out_dir / REPRODUCE_FILENAME
    script.write_text(reproduce_script(config))
    script.chmod(0o755)

    progress(0.1, f"building the engine with TensorRT {version} on {device['gpu']}")
    started = time.perf_counter()
    run_child(child_command(BUILD_CONFIG_FILENAME), out_dir, progress, out_dir / BUILD_LOG_FILENAME)
    build_seconds = time.perf_counter() - started

    engine_path = out_dir / ENGINE_FILENAME
    meta_path = out_dir / ENGINE_META_FILENAME
    if not engine_path.is_file() or not meta_path.is_file():
        raise PipelineError("the TensorRT builder exited without writing the engine")
    engine_meta = json.loads(meta_path.read_text())
    with open(engine_path, "rb") as f:  # hashlib reads it in chunks
        on_disk = hashlib.file_digest(f, "sha256").hexdigest()
    if engine_meta.get("sha256") != on_disk:
        raise PipelineError("the engine on disk does not match the sha256 its builder recorded")

    metrics: dict[str, float] = {"build_seconds": round(build_seconds, 3)}
    verify = engine_meta.get("verify") or {}
    if isinstance(verify.get("max_abs_diff"), int | float):
        metrics["max_abs_diff"] = float(verify["max_abs_diff"])
    precision = source.precision
    if settings.int8:
        precision = "int8"
    elif settings.fp16:
        precision = "fp16"
    flags = [f for f in ("fp16", "int8") if getattr(settings, f)] or ["fp32"]
    batch = f"batch {settings.min_batch}-{settings.max_batch} (opt {settings.opt_batch})"
    return CompiledModel(
        filename=ENGINE_FILENAME,
        format=ModelFormat.TENSORRT.value,
        backend="tensorrt",
        meta={**engine_meta, "batch_range": [settings.min_batch, settings.max_batch]},
        metrics=metrics,
        inputs=inputs,
        outputs=outputs,
        summary=f"TensorRT {version}, {'+'.join(flags)}, {batch}, {device['gpu']}",
        precision=precision,
    )
