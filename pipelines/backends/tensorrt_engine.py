"""A deserialized TensorRT engine, run with torch CUDA tensors as its I/O buffers.

Loaded by :mod:`pipelines.engines` (serving, benchmarks, certification) and by the builder child
to verify what it built. tensorrt and torch are imported when an engine is opened, never at
import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.core import PipelineError


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
