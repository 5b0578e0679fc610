"""One way to load and run any model artifact: ONNX, TorchScript, AOTInductor or TensorRT.

:func:`load_engine` turns an :class:`~pipelines.core.Artifact` into an :class:`Engine`; benchmark
times it, certification judges it, and serving will answer requests with it. Two ways to call one:

* :meth:`Engine.run` checks the feeds against the engine's inputs (names, rank, fixed dims, dtype,
  the batch range) and returns every output as a numpy array on the CPU, keyed by name. A feed
  that does not fit raises :class:`EngineInputError` saying what was expected: a model is never
  handed an input it was not declared to take.
* :meth:`Engine.prepare` checks the feeds the same way once and returns a zero-argument callable
  that runs the model on them, with nothing else in the loop: what latency is measured on. Call
  it inside :meth:`Engine.context`.

Dtypes are not converted silently: a float feed for an int input (or the reverse) and bool
mismatches are refused. Casts that keep every value are made: an int feed for another int width
when every value fits it, and a float feed for another float width (a JSON payload parses to
float64 for a float32 model) unless a finite value would overflow to inf.

Engines that cannot run on this worker (a TensorRT engine without a GPU, an AOTInductor package
compiled for CUDA on a CPU worker, a CUDA device asked for where there is none) raise
:class:`EngineUnavailable` with the reason. torch, onnxruntime and tensorrt are imported when an
engine is loaded, never when this module is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import Artifact, ModelFormat, PipelineError, TensorSpec
from pipelines.onnx_io import (
    CPU_PROVIDERS,
    cpu_session,
    describe_inputs,
    first_error_line,
    fixed_batch,
    read_tensor_specs,
)

__all__ = [
    "ENGINE_FORMATS",
    "Engine",
    "EngineInputError",
    "EngineUnavailable",
    "cuda_available",
    "input_specs",
    "load_engine",
    "resolve_device",
]


class EngineInputError(PipelineError):
    """A feed that does not fit the engine's inputs; nothing was run."""


class EngineUnavailable(PipelineError):
    """This engine cannot run on this worker; the message says why."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU; torch is not imported where no NVIDIA driver is loaded."""
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_device(requested: str) -> str:
    """ "cpu" or "cuda" for a device setting ("auto": the GPU when there is one).

    EngineUnavailable for "cuda" on a worker without a CUDA GPU.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"unknown device {requested!r}; use auto, cpu or cuda")
    has_cuda = cuda_available()
    if requested == "cuda" and not has_cuda:
        raise EngineUnavailable("device cuda was asked for but this worker has no CUDA GPU")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


def input_specs(artifact: Artifact) -> list[TensorSpec]:
    """The inputs a model takes: read from the file for ONNX (an upload may declare them
    loosely), the artifact's declared inputs otherwise."""
    if artifact.format == ModelFormat.ONNX.value:
        return read_tensor_specs(artifact.path)[0]
    return list(artifact.inputs)


# -- feed checks -----------------------------------------------------------------------------------


def _shape_text(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def _conform_dtype(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` in the input's dtype when that keeps every value; else EngineInputError."""
    try:
        wanted = np.dtype(spec.dtype)
    except TypeError:  # a dtype numpy cannot name (bfloat16): the runtime judges the feed
        return array
    given = array.dtype
    if given == wanted:
        return array
    refused = EngineInputError(
        f"input {spec.name!r} is {given} but the model takes {wanted}; int, float and bool "
        f"feeds are not converted into one another: send {wanted}"
    )
    if given.kind == "f" and wanted.kind == "f":
        with np.errstate(over="ignore"):
            cast = array.astype(wanted)
        if np.array_equal(np.isfinite(array), np.isfinite(cast)):
            return cast
        raise EngineInputError(
            f"input {spec.name!r} has {given} values beyond the range of {wanted} (they would "
            "become inf); send values the model's dtype can hold"
        )
    if given.kind in "iu" and wanted.kind in "iu":
        if array.size == 0 or np.can_cast(given, wanted, "safe"):
            return array.astype(wanted)
        info = np.iinfo(wanted)
        low, high = int(array.min()), int(array.max())
        if info.min <= low and high <= info.max:
            return array.astype(wanted)
        raise EngineInputError(
            f"input {spec.name!r} has values {low}..{high}, outside the {wanted} it takes"
        )
    raise refused


def _check_feeds(
    specs: list[TensorSpec],
    feeds: Mapping[str, Any],
    batch_range: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """``feeds`` as contiguous arrays in the inputs' order and dtypes, or EngineInputError."""
    names = [s.name for s in specs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        raise EngineInputError(f"{' and '.join(parts)}; the model takes {names}")
    arrays = {spec.name: np.asarray(feeds[spec.name]) for spec in specs}
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise EngineInputError(
                f"input {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}) but the "
                f"model takes rank {len(spec.shape)}: {_shape_text(spec)}"
            )
    batched = [a for a in arrays.values() if a.ndim]
    if batch_range is not None and batched:
        batch, (low, high) = batched[0].shape[0], batch_range
        if not low <= batch <= high:
            span = f"batch size {low}" if low == high else f"batch sizes {low}..{high}"
            raise EngineInputError(f"a batch of {batch} is outside what this engine takes ({span})")
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array = arrays[spec.name]
        for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise EngineInputError(
                        f"dim {axis} of input {spec.name!r} is {size} but the model fixes it at "
                        f"{dim}: {_shape_text(spec)}"
                    )
                continue
            first = seen.setdefault(dim, (size, spec.name))
            if first[0] != size:
                raise EngineInputError(
                    f"dim {dim!r} is {first[0]} in input {first[1]!r} but {size} in "
                    f"{spec.name!r}; one name is one size"
                )
        arrays[spec.name] = np.ascontiguousarray(_conform_dtype(spec, array))
    return arrays


# -- engines ---------------------------------------------------------------------------------------


class Engine:
    """A loaded model: its inputs, output names, accepted batch range, and how to run it.

    ``batch_range`` is the batch sizes it takes: a TensorRT engine's optimisation profile, (n, n)
    for a model whose batch dim is fixed at n, else None (any), which a caller may narrow (the
    certification suite sets the range it certifies). ``device`` is where it actually runs.
    """

    backend: str = ""
    # Whether the engine allocates CUDA memory through torch (its peak is then measurable).
    torch_cuda: bool = False

    def __init__(self, artifact: Artifact, device: str, inputs: list[TensorSpec]) -> None:
        self.key = artifact.key
        self.format = artifact.format
        self.device = device
        self.inputs = inputs
        self.output_names: list[str] = [s.name for s in artifact.outputs]
        fixed = fixed_batch(inputs)
        self.batch_range: tuple[int, int] | None = None if fixed is None else (fixed, fixed)

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as the engine takes them; EngineInputError says what does not fit."""
        return _check_feeds(self.inputs, feeds, self.batch_range)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every output, name -> numpy array on the CPU, for checked ``feeds``."""
        arrays = self.validate(feeds)
        try:
            with self.context():
                return self._forward(arrays)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"{self.key} ({self.format}) fails on an input of shape "
                f"{describe_inputs(arrays)}: {first_error_line(exc)}"
            ) from exc

    def prepare(self, arrays: Mapping[str, Any]) -> Callable[[], object]:
        """A zero-argument call of the model on ``arrays`` (checked once, here), for timing."""
        return self._prepare(self.validate(arrays))

    def context(self) -> AbstractContextManager[Any]:
        """What the calls run inside (no autograd for torch); enter it once around a loop."""
        return contextlib.nullcontext()

    def batch_problem(self, batch_size: int) -> str | None:
        """Why this engine cannot take ``batch_size`` (None: it can)."""
        if self.batch_range and not self.batch_range[0] <= batch_size <= self.batch_range[1]:
            return f"outside the engine's batch range {self.batch_range[0]}-{self.batch_range[1]}"
        return None

    def extra_gpu_bytes(self) -> int:
        """CUDA memory the engine holds outside torch's allocator."""
        return 0

    def _prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        raise NotImplementedError

    def _forward(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a CPU numpy array; bfloat16 (which numpy lacks) becomes float32."""
    if not hasattr(tensor, "detach"):
        raise PipelineError(f"the model returned a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    return np.asarray(tensor.cpu().numpy())


class _OnnxEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, artifact: Artifact, device: str, cache_root: Path | None) -> None:
        # onnxruntime applies its default (full) graph optimisations when it loads a model, so
        # every ONNX artifact runs as it would be served, compiled or not.
        session = None
        if device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                session = ort.InferenceSession(
                    str(artifact.path), providers=["CUDAExecutionProvider", *CPU_PROVIDERS]
                )
        self.session = session if session is not None else cpu_session(artifact.path)
        # A CUDA provider that fails to start leaves the CPU one: say where it really runs.
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        super().__init__(artifact, "cuda" if on_cuda else "cpu", input_specs(artifact))
        if on_cuda:
            self.backend = "onnxruntime-cuda"
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        session = self.session
        return lambda: session.run(None, arrays)

    def _forward(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, arrays)
        return {name: np.asarray(v) for name, v in zip(self.output_names, values, strict=True)}


class _TorchEngine(Engine):
    """Shared by TorchScript and AOTInductor: positional tensors in, tensors (or tuples) out."""

    model: Any

    def __init__(self, artifact: Artifact, device: str) -> None:
        import torch

        self.torch = torch
        super().__init__(artifact, device, list(artifact.inputs))
        if not self.inputs:
            raise PipelineError(f"{artifact.key} ({artifact.format}) declares no inputs")
        self.declared_outputs = [s.name for s in artifact.outputs]
        if device == "cuda":
            self.backend, self.torch_cuda = f"{self.backend}-cuda", True

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
        # Positional, in declared order: that is how the artifact's inputs map to forward().
        torch, device = self.torch, self.device
        return tuple(torch.from_numpy(arrays[spec.name]).to(device) for spec in self.inputs)

    def _prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        return _call(self.model, self._tensors(arrays), self.torch if self.torch_cuda else None)

    def context(self) -> AbstractContextManager[Any]:
        # No autograd bookkeeping, as when served; entered once around the loop, not per call.
        return self.torch.inference_mode()

    def _forward(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        value = self.model(*self._tensors(arrays))
        if isinstance(value, dict):
            keys, tensors = [str(k) for k in value], list(value.values())
        elif isinstance(value, list | tuple):
            keys, tensors = [], list(value)
        else:
            keys, tensors = [], [value]
        if self.declared_outputs and len(self.declared_outputs) == len(tensors):
            names = self.declared_outputs
        elif keys:
            names = keys
        else:
            # As export_onnx and compile name them, so a child's outputs match by name.
            names = (
                ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
            )
        self.output_names = list(names)
        return {name: _to_numpy(t) for name, t in zip(names, tensors, strict=True)}


class _TorchScriptEngine(_TorchEngine):
    backend = "torch"

    def __init__(self, artifact: Artifact, device: str, cache_root: Path | None) -> None:
        super().__init__(artifact, device)
        self.model = self.torch.jit.load(artifact.path, map_location=device).eval()


class _AotiEngine(_TorchEngine):
    backend = "aotinductor"

    def __init__(self, artifact: Artifact, device: str, cache_root: Path | None) -> None:
        # A package runs on the device it was compiled for, whatever was asked.
        compiled_for = str(artifact.meta.get("device", "cpu"))
        if compiled_for == "cuda" and not cuda_available():
            raise EngineUnavailable("compiled for cuda and this worker has no CUDA GPU")
        super().__init__(artifact, compiled_for)
        from pipelines.backends.aotinductor import load_package

        # Loading extracts the kernels into Inductor's cache: the platform's, not /tmp.
        self.model = load_package(
            artifact.path, None if cache_root is None else Path(cache_root) / "inductor"
        )


class _TensorRTEngine(Engine):
    backend = "tensorrt"
    torch_cuda = True

    def __init__(self, artifact: Artifact, device: str, cache_root: Path | None) -> None:
        from pipelines.backends import _tensorrt_reason

        reason = _tensorrt_reason()
        if reason is not None:
            raise EngineUnavailable(f"TensorRT engines need a CUDA GPU with TensorRT ({reason})")
        from pipelines.backends.tensorrt import TensorRTEngine

        flags = artifact.meta.get("flags") or {}
        self.engine = TensorRTEngine(
            artifact.path, allow_host_code=bool(flags.get("version_compatible", True))
        )
        super().__init__(artifact, "cuda", list(artifact.inputs))
        self.output_names = list(self.engine.output_names)
        low_high = artifact.meta.get("batch_range")
        if low_high:
            self.batch_range = (int(low_high[0]), int(low_high[1]))

    def _prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        run, _ = self.engine.prepare(arrays)
        return run

    def _forward(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run, outputs = self.engine.prepare(arrays)
        run()
        return {name: _to_numpy(outputs[name]) for name in self.output_names}

    def extra_gpu_bytes(self) -> int:
        return self.engine.device_memory_bytes


def _call(model: Any, tensors: tuple[Any, ...], cuda_torch: Any) -> Callable[[], object]:
    """``model(*tensors)``; on CUDA, waits for the GPU so the timing covers the work."""
    if cuda_torch is None:
        return lambda: model(*tensors)
    synchronize = cuda_torch.cuda.synchronize

    def run() -> object:
        out = model(*tensors)
        synchronize()
        return out

    return run


_ENGINES: dict[str, Callable[[Artifact, str, Path | None], Engine]] = {
    ModelFormat.ONNX.value: _OnnxEngine,
    ModelFormat.TORCHSCRIPT.value: _TorchScriptEngine,
    ModelFormat.AOTINDUCTOR.value: _AotiEngine,
    ModelFormat.TENSORRT.value: _TensorRTEngine,
}

# The formats an engine can be loaded for.
ENGINE_FORMATS: tuple[str, ...] = tuple(_ENGINES)


def load_engine(artifact: Artifact, device: str = "auto", cache_root: Path | None = None) -> Engine:
    """Load ``artifact`` to run on ``device`` ("auto", "cpu" or "cuda").

    TorchScript and ONNX run on the device asked for (ONNX on the CPU where onnxruntime has no
    CUDA provider: ``engine.device`` says); AOTInductor packages on the device they were compiled
    for; TensorRT engines on the GPU. ``cache_root`` is the platform's compile cache folder
    (AOTInductor packages extract their kernels under it). EngineUnavailable when it cannot run
    on this worker, PipelineError when the file is missing or does not load.
    """
    factory = _ENGINES.get(artifact.format)
    if factory is None:
        known = ", ".join(ENGINE_FORMATS)
        raise EngineUnavailable(f"no engine runs {artifact.format} models (engines run {known})")
    if not Path(artifact.path).is_file():
        raise PipelineError(f"cannot load {artifact.key}: its file {artifact.path} is missing")
    where = resolve_device(device)
    try:
        return factory(artifact, where, cache_root)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(
            f"cannot load {artifact.key} ({artifact.format}): {first_error_line(exc)}"
        ) from exc
