"""compile's settings, below both the stage and the backends that read them.

The backends (``pipelines.backends.*``) take a ``CompileSettings``; keeping it here, not in
``pipelines.stages.compile``, lets them import it without importing the stage that imports them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipelines.backends.catalog import AUTO
from pipelines.core import StageSettings

__all__ = ["BackendName", "CompileSettings", "Device"]

GraphOptimizationLevel = Literal["basic", "extended", "all"]


BackendName = Literal["auto", "onnxruntime", "aotinductor", "tensorrt"]
Device = Literal["auto", "cpu", "cuda"]
BatchBound = Annotated[int, Field(ge=1, le=65_536)]
DimRange = Annotated[
    list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(min_length=3, max_length=3)
]

# Settings that only mean something to some backends; set to anything but their default with
# another backend, they are refused (a typo'd backend should not silently drop fp16).
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "graph_optimization_level": ("onnxruntime", AUTO),
    "intra_op_threads": ("onnxruntime", AUTO),
    "providers": ("onnxruntime", AUTO),
    "device": ("aotinductor",),
    "dim_ranges": ("aotinductor", "tensorrt", AUTO),
    "fp16": ("tensorrt",),
    "int8": ("tensorrt",),
    "min_batch": ("tensorrt",),
    "opt_batch": ("tensorrt",),
    "max_batch": ("tensorrt",),
    "workspace_mb": ("tensorrt",),
    "version_compatible": ("tensorrt",),
    "hardware_compatible": ("tensorrt",),
}


class CompileSettings(StageSettings):
    """Settings of compile."""

    backend: BackendName = Field(
        default="auto",
        description=(
            "Runtime to compile for. auto: the best this worker has (tensorrt on a GPU with "
            "TensorRT, else onnxruntime); onnxruntime: a graph-optimised ONNX model (ONNX in); "
            "aotinductor: a .pt2 package compiled by torch's AOTInductor (TorchScript in); "
            "tensorrt: a TensorRT engine for this GPU model (ONNX in, GPU workers only)."
        ),
    )
    # "all" adds layout optimisations (NCHWc convolutions and the like) that are chosen for the
    # CPU doing the compiling; saved into the model, they only load on CPUs with the same
    # instruction set, so a version compiled on one worker could fail on a serving node.
    # "extended" (the fusions: Gemm+activation, attention, layer norm, ...) is portable.
    graph_optimization_level: GraphOptimizationLevel = Field(
        default="extended",
        description=(
            "onnxruntime: how far it optimises the graph. basic: constant folding and "
            "redundant-node removal; extended: also operator fusions; all: also CPU-layout "
            "optimisations, which tie the saved model to CPUs like the one that compiled it."
        ),
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="onnxruntime: threads inside one operator; 0: one per core.",
    )
    providers: Device = Field(
        default="auto",
        description=(
            "onnxruntime: execution provider the graph is optimised for. auto: CUDA where this "
            "worker's onnxruntime has the CUDA provider and a GPU, else CPU; cpu; cuda (refused "
            "where there is none). A CUDA-optimised graph may only load with the CUDA provider."
        ),
    )
    device: Device = Field(
        default="auto",
        description=(
            "aotinductor: device the package is compiled for. auto: cuda when this worker has a "
            "GPU, else cpu. A cuda package only runs on a GPU."
        ),
    )
    dim_ranges: dict[str, DimRange] = Field(
        default_factory=dict,
        description=(
            'Ranges of named dynamic dims other than the batch, [min, opt, max], e.g. {"seq": '
            "[1, 128, 512]}. tensorrt: required for each such dim (the optimisation profile); "
            "aotinductor: the dim's allowed range, opt being the example size (unlisted dims "
            "are dynamic from 1 up, example size 8)."
        ),
    )
    fp16: bool = Field(
        default=False,
        description="tensorrt: allow fp16 kernels (faster on tensor cores; outputs move ~1e-3).",
    )
    int8: bool = Field(
        default=False,
        description=(
            "tensorrt: build the model's explicit int8 quantization. Needs QuantizeLinear/"
            "DequantizeLinear nodes (quantize with mode int8_static first); refused otherwise."
        ),
    )
    min_batch: BatchBound = Field(
        default=1, description="tensorrt: smallest batch the engine takes."
    )
    opt_batch: BatchBound = Field(
        default=8, description="tensorrt: the batch size TensorRT tunes its kernels for."
    )
    max_batch: BatchBound = Field(
        default=32, description="tensorrt: largest batch the engine takes (more costs GPU memory)."
    )
    workspace_mb: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description=(
            "tensorrt: scratch memory the builder may give a layer, in MiB; unset: TensorRT's "
            "default (the GPU's memory)."
        ),
    )
    version_compatible: bool = Field(
        default=False,
        description=(
            "tensorrt: build an engine later TensorRT 10 runtimes can load (it embeds a lean "
            "runtime; loaders must allow engine host code). A little slower."
        ),
    )
    hardware_compatible: bool = Field(
        default=False,
        description=(
            "tensorrt: build an engine for every GPU of compute capability 8.0 or newer "
            "(AMPERE_PLUS), not only this GPU model. A little slower."
        ),
    )

    min_agreement: float = Field(
        default=0.99,
        ge=0.0,
        le=1.0,
        description=(
            "Every backend, classifiers: the least share of judged rows on which the compiled "
            "model's top-1 class must match the model it was compiled from for it to be "
            "registered (rows generated from the declared input shapes)."
        ),
    )
    min_cosine: float = Field(
        default=0.999,
        ge=-1.0,
        le=1.0,
        description=(
            "Every backend, other tasks: the least cosine similarity between the compiled "
            "model's outputs and its source's, on every judged row, for it to be registered. "
            "A compile changes the order of float operations, not the answer: keep it high."
        ),
    )
    keep_below_threshold: bool = Field(
        default=False,
        description="Register the compiled model even when it is under min_agreement/min_cosine.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CompileSettings:
        problems: list[str] = []
        for name, backends in _ONLY_FOR.items():
            if self.backend in backends:
                continue
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if getattr(self, name) != default:
                owners = " or ".join(b for b in backends if b != AUTO)
                problems.append(f"{name} applies to backend {owners}, not {self.backend}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            problems.append(
                f"the batch sizes must satisfy min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        for dim, (low, opt, high) in self.dim_ranges.items():
            if not low <= opt <= high:
                problems.append(
                    f"dim_ranges[{dim!r}] must be [min, opt, max] with min <= opt <= max"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self
