"""The tensor family: ONNX, TorchScript, AOTInductor and TensorRT engines.

A tensor engine takes named arrays and returns named arrays. Two ways to call one:

* :meth:`Engine.run` checks the feeds against the engine's inputs (names, rank, fixed dims, dtype,
  the batch range; :mod:`pipelines.engines.feeds`) and returns every output as a numpy array on
  the CPU, keyed by name. A feed that does not fit raises ``EngineInputError`` saying what was
  expected: a model is never handed an input it was not declared to take.
* :meth:`Engine.prepare` checks the feeds the same way once and returns a zero-argument callable
  that runs the model on them, with nothing else in the loop: what latency is measured on. Call
  it inside :meth:`Engine.context`.

Rows of a dataset go through :func:`pipelines.engines.run_rows`, which batches and pads for the
engine. Engines that cannot run on this worker (a TensorRT engine without a GPU, an AOTInductor
package compiled for CUDA on a CPU worker) raise ``EngineUnavailable`` with the reason. torch,
onnxruntime and tensorrt are imported when an engine is loaded, never when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import Artifact, ModelFormat, PipelineError, TensorSpec
from pipelines.engines.base import (
    BaseEngine,
    EngineOptions,
    EngineUnavailable,
    cuda_available,
    register_engine,
)
from pipelines.engines.feeds import check_feeds
from pipelines.onnx_io import (
    CPU_PROVIDERS,
    describe_inputs,
    first_error_line,
    fixed_batch,
    read_tensor_specs,
)

TENSOR = "tensor"


def input_specs(artifact: Artifact) -> list[TensorSpec]:
    """The inputs a model takes: read from the file for ONNX (an upload may declare them
    loosely), the artifact's declared inputs otherwise."""
    if artifact.format == ModelFormat.ONNX.value:
        return read_tensor_specs(artifact.path)[0]
    return list(artifact.inputs)


class Engine(BaseEngine):
    """A loaded tensor model: its inputs, output names, accepted batch range, and how to run it.

    ``batch_range`` is the batch sizes it takes: a TensorRT engine's optimisation profile, (n, n)
    for a model whose batch dim is fixed at n, else None (any), which a caller may narrow (the
    certification suite sets the range it certifies). ``device`` is where it actually runs.
    """

    family = TENSOR

    def __init__(self, artifact: Artifact, device: str, inputs: list[TensorSpec]) -> None:
        super().__init__(artifact, device)
        self.inputs = inputs
        self.output_names: list[str] = [s.name for s in artifact.outputs]
        fixed = fixed_batch(inputs)
        self.batch_range: tuple[int, int] | None = None if fixed is None else (fixed, fixed)

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as the engine takes them; EngineInputError says what does not fit."""
        return check_feeds(self.inputs, feeds, self.batch_range)

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

    def batch_problem(self, batch_size: int) -> str | None:
        """Why this engine cannot take ``batch_size`` (None: it can)."""
        if self.batch_range and not self.batch_range[0] <= batch_size <= self.batch_range[1]:
            return f"outside the engine's batch range {self.batch_range[0]}-{self.batch_range[1]}"
        return None

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

    def __init__(self, artifact: Artifact, device: str, options: EngineOptions) -> None:
        # onnxruntime applies its default (full) graph optimisations when it loads a model, so
        # every ONNX artifact runs as it would be served, compiled or not.
        providers = list(CPU_PROVIDERS)
        if device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", *CPU_PROVIDERS]
        self.session = _onnx_session(artifact.path, providers, options)
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

    def __init__(self, artifact: Artifact, device: str, options: EngineOptions) -> None:
        super().__init__(artifact, device)
        self.model = self.torch.jit.load(artifact.path, map_location=device).eval()


class _AotiEngine(_TorchEngine):
    backend = "aotinductor"

    def __init__(self, artifact: Artifact, device: str, options: EngineOptions) -> None:
        # A package runs on the device it was compiled for, whatever was asked.
        compiled_for = str(artifact.meta.get("device", "cpu"))
        if compiled_for == "cuda" and not cuda_available():
            raise EngineUnavailable("compiled for cuda and this worker has no CUDA GPU")
        super().__init__(artifact, compiled_for)
        from pipelines.backends.aotinductor import load_package

        # Loading extracts the kernels into Inductor's cache: the platform's, not /tmp.
        self.model = load_package(
            artifact.path,
            None if options.cache_root is None else Path(options.cache_root) / "inductor",
        )


class _TensorRTEngine(Engine):
    backend = "tensorrt"
    torch_cuda = True

    def __init__(self, artifact: Artifact, device: str, options: EngineOptions) -> None:
        from pipelines.backends import tensorrt_reason

        reason = tensorrt_reason()
        if reason is not None:
            raise EngineUnavailable(f"TensorRT engines need a CUDA GPU with TensorRT ({reason})")
        from pipelines.backends.tensorrt_engine import TensorRTEngine

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


def _onnx_session(path: str, providers: list[str], options: EngineOptions) -> Any:
    """An onnxruntime session; a CUDA provider that fails to start falls back to the CPU."""
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3  # errors only: no per-node warnings in worker logs
    session_options.intra_op_num_threads = options.thread_count()
    if options.optimization == "none":
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    except Exception:
        if providers == list(CPU_PROVIDERS):
            raise
        return ort.InferenceSession(
            str(path), sess_options=session_options, providers=list(CPU_PROVIDERS)
        )


register_engine(ModelFormat.ONNX.value, TENSOR, _OnnxEngine)
register_engine(ModelFormat.TORCHSCRIPT.value, TENSOR, _TorchScriptEngine)
register_engine(ModelFormat.AOTINDUCTOR.value, TENSOR, _AotiEngine)
register_engine(ModelFormat.TENSORRT.value, TENSOR, _TensorRTEngine)
