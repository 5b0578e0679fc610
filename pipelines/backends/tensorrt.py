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

Nothing here imports tensorrt at import time; the pure functions (profiles, Q/DQ checks, the
child's command line and reproduce.sh) are tested without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.backends.catalog import CompiledModel
from pipelines.core import Artifact, ModelFormat, PipelineError, ProgressFn, TensorSpec
from pipelines.onnx_io import read_tensor_specs

if TYPE_CHECKING:
    from pipelines.backends.settings import CompileSettings

ENGINE_FILENAME = "model.engine"
BUILD_CONFIG_FILENAME = "build.json"
ENGINE_META_FILENAME = "engine.json"
REPRODUCE_FILENAME = "reproduce.sh"
BUILD_LOG_FILENAME = "build.log"
BUILD_MODULE = "pipelines.backends.tensorrt_build"
# A build past this is stuck (a big model on a big GPU takes minutes, not hours).
BUILD_TIMEOUT_S = 3 * 3600
# The child writes "progress <fraction> <message>" lines on stdout; the rest is its log.
PROGRESS_PREFIX = "progress "
ERROR_PREFIX = "error: "

# Ops that only appear in dynamically or operator-quantized graphs; TensorRT runs none of them.
_NON_QDQ_QUANT_OPS = re.compile(r"Integer$|^DynamicQuantize|^QLinear|^Q(Gemm|Attention|Ordered)")


# -- pure functions (no tensorrt, no GPU) ---------------------------------------------------------


@dataclass
class QuantInfo:
    """How an ONNX graph is quantized, as TensorRT sees it."""

    quantize_linear: int = 0
    dequantize_linear: int = 0
    other_quantized_ops: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def has_qdq(self) -> bool:
        return self.quantize_linear > 0 and self.dequantize_linear > 0


def onnx_quantization(path: str | Path) -> QuantInfo:
    """Count the Q/DQ nodes of an ONNX file and list what TensorRT's explicit INT8 cannot take.

    TensorRT wants int8 (or fp8) Q/DQ with zero points of 0: a uint8 or non-zero zero point
    (onnxruntime's default asymmetric activations) is listed in ``problems``, and so are biases
    quantized to int32 (onnxruntime's default, ``QuantizeBias``), which its parser rejects.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    constants = {
        node.output[0]: attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    }
    info = QuantInfo()
    other: set[str] = set()
    bad_zero_points: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            info.quantize_linear += 1
        elif node.op_type == "DequantizeLinear":
            info.dequantize_linear += 1
        elif _NON_QDQ_QUANT_OPS.search(node.op_type):
            other.add(node.op_type)
            continue
        else:
            continue
        if node.op_type == "DequantizeLinear":
            source = initializers.get(node.input[0]) or constants.get(node.input[0])
            if source is not None and source.data_type == onnx.TensorProto.INT32:
                # onnxruntime's quantize_static quantizes biases to int32 unless told not to;
                # TensorRT's parser refuses a DequantizeLinear of anything but activations.
                bad_zero_points.add("int32-quantized biases (QuantizeBias must be off)")
        if len(node.input) < 3 or not node.input[2]:
            continue
        zero_point = initializers.get(node.input[2]) or constants.get(node.input[2])
        if zero_point is None:
            continue
        values = numpy_helper.to_array(zero_point)
        if values.dtype == np.uint8:
            bad_zero_points.add("uint8 zero points (asymmetric activations)")
        elif np.issubdtype(values.dtype, np.integer) and np.any(values != 0):
            bad_zero_points.add("non-zero zero points")
    info.other_quantized_ops = sorted(other)
    info.problems = sorted(bad_zero_points)
    return info


def check_int8(info: QuantInfo, int8: bool) -> None:
    """A PipelineError when the int8 setting and the graph's quantization do not fit TensorRT."""
    remedy = (
        "quantize with mode int8_static (symmetric int8 QuantizeLinear/DequantizeLinear pairs) "
        "before compiling for TensorRT"
    )
    if info.other_quantized_ops:
        raise PipelineError(
            f"the model is quantized with {', '.join(info.other_quantized_ops)}, which TensorRT "
            f"does not run: compile the fp32 model, or {remedy}"
        )
    if int8 and not info.has_qdq:
        raise PipelineError(
            "int8 needs an explicitly quantized model (QuantizeLinear/DequantizeLinear nodes) and "
            f"this one has none: {remedy}, or leave int8 off (fp16 needs no calibration)"
        )
    if info.has_qdq and not int8:
        raise PipelineError(
            "the model has QuantizeLinear/DequantizeLinear nodes: set int8 true to build it "
            "(TensorRT runs them as int8)"
        )
    if info.has_qdq and info.problems:
        raise PipelineError(
            "TensorRT needs symmetric int8 Q/DQ of weights and activations only, but the model "
            f"has {' and '.join(info.problems)}: {remedy}"
        )


def profile_shapes(
    specs: Sequence[TensorSpec],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    dim_ranges: Mapping[str, Sequence[int]],
) -> dict[str, list[list[int]]]:
    """The optimisation profile: input name -> [min shape, opt shape, max shape].

    A named first dim (and that name anywhere) is the batch; other named dims take
    ``dim_ranges[name]`` = [min, opt, max], and a PipelineError lists any without one.
    """
    batch = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    missing = sorted(
        {
            d
            for s in specs
            for i, d in enumerate(s.shape)
            if isinstance(d, str) and i > 0 and d not in batch and d not in dim_ranges
        }
    )
    if missing:
        example = ", ".join(f'"{name}": [1, 128, 512]' for name in missing)
        raise PipelineError(
            f"TensorRT needs a range for every dynamic dim: set dim_ranges for "
            f"{', '.join(missing)}, e.g. {{{example}}} (min, opt, max)"
        )
    profiles: dict[str, list[list[int]]] = {}
    for spec in specs:
        rows: list[list[int]] = [[], [], []]
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                sizes = [dim, dim, dim]
            elif i == 0 or dim in batch:
                sizes = [min_batch, opt_batch, max_batch]
            else:
                sizes = [int(v) for v in dim_ranges[dim]]
            for row, size in zip(rows, sizes, strict=True):
                row.append(int(size))
        profiles[spec.name] = rows
    return profiles


def sanitize(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``: safe in a file name."""
    cleaned = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")
    return cleaned or "unknown"


def timing_cache_filename(gpu: str, compute_capability: str, trt_version: str) -> str:
    """The timing cache's file name for one device profile: ``<gpu>-<cc>-trt<version>.cache``."""
    return sanitize(f"{gpu}-{compute_capability}-trt{trt_version}") + ".cache"


def timing_cache_path(
    cache_root: Path, gpu: str, compute_capability: str, trt_version: str
) -> Path:
    return (
        Path(cache_root) / "tensorrt" / timing_cache_filename(gpu, compute_capability, trt_version)
    )


def build_config(
    onnx_path: str | Path,
    profiles: Mapping[str, list[list[int]]],
    *,
    fp16: bool,
    int8: bool,
    workspace_mb: int | None,
    version_compatible: bool,
    hardware_compatible: bool,
    timing_cache: str | Path | None,
    verify: bool = True,
) -> dict[str, Any]:
    """The child's build.json: everything the build depends on, and nothing else.

    Relative paths (the engine, engine.json) are relative to the folder build.json is in.
    """
    return {
        "onnx": str(Path(onnx_path).resolve()),
        "engine": ENGINE_FILENAME,
        "meta": ENGINE_META_FILENAME,
        "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
        "fp16": bool(fp16),
        "int8": bool(int8),
        "workspace_mb": workspace_mb,
        "version_compatible": bool(version_compatible),
        "hardware_compatible": bool(hardware_compatible),
        "timing_cache": str(Path(timing_cache).resolve()) if timing_cache else None,
        "verify": bool(verify),
    }


def source_root() -> Path:
    """The folder holding the ``pipelines`` package (what PYTHONPATH needs for ``-m``)."""
    return Path(__file__).resolve().parents[2]


def child_command(config_path: str | Path, python: str | None = None) -> list[str]:
    """The command that builds an engine from ``config_path`` in a child process."""
    return [python or sys.executable, "-m", BUILD_MODULE, "--config", str(config_path)]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the worker's, with this source tree first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    root = str(source_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in parts if p != root]])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def reproduce_script(config: Mapping[str, Any], python: str | None = None) -> str:
    """reproduce.sh: writes the exact build.json and runs the exact child command on it.

    The engine is rebuilt into ``./reproduced`` beside the script (or the folder given as its
    first argument), so running it never overwrites the engine it documents.
    """
    body = json.dumps(config, indent=2, sort_keys=True)
    marker = "R1_BUILD_JSON"
    if marker in body:  # cannot happen with real paths; refuse rather than write a broken script
        raise ValueError("the build config contains the heredoc marker")
    command = " ".join(shlex.quote(part) for part in child_command(BUILD_CONFIG_FILENAME, python))
    root = shlex.quote(str(source_root()))
    return (
        "#!/bin/sh\n"
        "# Rebuild this TensorRT engine exactly as r1platform's compile stage built it.\n"
        "# Usage: sh reproduce.sh [output folder]   (default: ./reproduced beside this script)\n"
        "# Needs tensorrt and a GPU of the same model (see engine.json); the timing cache path\n"
        "# below is read if it exists and updated after the build.\n"
        "set -eu\n"
        'here="$(cd "$(dirname "$0")" && pwd)"\n'
        'out="${1:-$here/reproduced}"\n'
        'mkdir -p "$out"\n'
        'cd "$out"\n'
        f"cat > {BUILD_CONFIG_FILENAME} <<'{marker}'\n"
        f"{body}\n"
        f"{marker}\n"
        f'export PYTHONPATH={root}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f"exec {command}\n"
    )


def parse_child_line(line: str) -> tuple[float, str] | None:
    """(fraction, message) of a child's progress line, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    parts = line[len(PROGRESS_PREFIX) :].strip().split(" ", 1)
    try:
        fraction = float(parts[0])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), (parts[1] if len(parts) > 1 else "")


# -- device description (needs torch; pynvml optional) --------------------------------------------


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version (pynvml, else /proc/driver/nvidia/version), if known."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else None


def device_info(index: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, CUDA runtime and driver versions of CUDA device ``index``."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "cuda_runtime": torch.version.cuda,
        "nvidia_driver": nvidia_driver_version(),
    }


# -- running engines ------------------------------------------------------------------------------


def _torch_dtype(trt: Any, torch: Any, dtype: Any) -> Any:
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise PipelineError(f"the engine has a tensor of type {dtype}, which torch cannot hold")


class TensorRTEngine:
    """A deserialized engine and one execution context; I/O buffers are torch CUDA tensors."""

    def __init__(self, path: str | Path, allow_host_code: bool = True) -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        if allow_host_code and hasattr(self.runtime, "engine_host_code_allowed"):
            # A version-compatible engine carries its lean runtime as host code.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise PipelineError(
                f"TensorRT could not deserialize {Path(path).name}: built for another TensorRT "
                "version or GPU?"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def dtype(self, name: str) -> Any:
        return _torch_dtype(self.trt, self.torch, self.engine.get_tensor_dtype(name))

    def prepare(self, inputs: Mapping[str, Any]) -> tuple[Callable[[], None], dict[str, Any]]:
        """Bind ``inputs`` (numpy arrays or tensors) and fresh output tensors to the context.

        Returns ``(run_once, outputs)``: ``run_once()`` enqueues the engine on the engine's CUDA
        stream and waits for it, leaving the results in ``outputs`` (name -> CUDA tensor).
        """
        torch = self.torch
        bound: dict[str, Any] = {}
        for name in self.input_names:
            if name not in inputs:
                raise PipelineError(f"the engine needs input {name!r}; given {sorted(inputs)}")
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            tensor = tensor.to(device="cuda", dtype=self.dtype(name)).contiguous()
            bound[name] = tensor
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise PipelineError(
                    f"input {name!r} of shape {list(tensor.shape)} is outside the engine's "
                    "optimisation profile"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs: dict[str, Any] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise PipelineError(f"output {name!r} has a data-dependent shape {list(shape)}")
            outputs[name] = torch.empty(shape, dtype=self.dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        # The buffers were filled on torch's current stream; the engine runs on its own (enqueueV3
        # on the default stream costs an extra synchronisation per call).
        torch.cuda.current_stream().synchronize()
        stream = self.stream
        context = self.context

        def run() -> None:
            _ = bound  # referenced so the input buffers live as long as this callable
            if not context.execute_async_v3(stream.cuda_stream):
                raise PipelineError("TensorRT failed to enqueue the engine")
            stream.synchronize()

        return run, outputs

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run once; name -> output CUDA tensor."""
        run, outputs = self.prepare(inputs)
        run()
        return outputs

    @property
    def device_memory_bytes(self) -> int:
        """Scratch memory the context holds (activations), outside torch's allocator."""
        for attr in ("device_memory_size_v2", "device_memory_size"):
            value = getattr(self.engine, attr, None)
            if isinstance(value, int):
                return value
        return 0


# -- the compile step (parent side) ---------------------------------------------------------------


def _tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def _run_child(
    command: list[str],
    cwd: Path,
    progress: ProgressFn,
    log_path: Path,
    timeout_s: float = BUILD_TIMEOUT_S,
) -> None:
    """Run the builder child, relay its progress, keep its output in ``log_path``.

    A progress callback that raises (Cancelled) stops the child before the exception goes on.
    """
    process = subprocess.Popen(
        command,
        cwd=str(cwd),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="tensorrt-build-output", daemon=True)
    reader.start()
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        with log_path.open("w") as log:
            while not finished:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"the TensorRT build ran past {timeout_s / 60:.0f} minutes and was stopped"
                    )
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                if line is None:
                    finished = True
                    continue
                log.write(line + "\n")
                log.flush()
                parsed = parse_child_line(line)
                if parsed is not None:
                    fraction, message = parsed
                    progress(0.1 + 0.85 * fraction, message)
                else:
                    tail = (tail + [line])[-20:]
        returncode = process.wait(timeout=60)
    except BaseException:
        _stop(process)
        raise
    if returncode != 0:
        raise PipelineError(_child_failure(returncode, tail))


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the child started by _run_child: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _child_failure(returncode: int, tail: Sequence[str]) -> str:
    errors = [line[len(ERROR_PREFIX) :] for line in tail if line.startswith(ERROR_PREFIX)]
    if errors:
        return f"TensorRT could not build the engine: {errors[-1]}"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        last = f"; its last output: {tail[-1]}" if tail else ""
        return (
            f"the TensorRT builder crashed ({name}); the worker was not affected. Rebuild with "
            f"reproduce.sh to debug{last}"
        )
    last = "; ".join(tail[-3:]) or "no output"
    return f"the TensorRT builder exited with status {returncode}: {last}"


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
    _run_child(
        child_command(BUILD_CONFIG_FILENAME), out_dir, progress, out_dir / BUILD_LOG_FILENAME
    )
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
