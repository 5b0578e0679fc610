"""Where a fine-tune run computes and in which precision: the device and the autocast plan.

torch is imported inside the functions, when a run resolves its settings on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.core import PipelineError


@dataclass(frozen=True)
class PrecisionPlan:
    """How a run computes: ``autocast_dtype`` None means plain fp32."""

    device: str  # "cpu" or "cuda"
    mode: str  # "no", "bf16" or "fp16": what mixed_precision resolved to
    autocast_dtype: Any  # torch.dtype | None
    use_grad_scaler: bool

    def autocast(self) -> Any:
        """A context manager that runs the forward pass (and loss) in the plan's precision."""
        import torch

        if self.autocast_dtype is None:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.autocast_dtype)


def resolve_device(device: str) -> str:
    """The device a setting names, "cpu" or "cuda"; a PipelineError if CUDA is absent."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            'device "cuda" was asked for but this worker has no CUDA GPU: use "auto" or "cpu"'
        )
    return device


def resolve_precision(mixed_precision: str, device: str) -> PrecisionPlan:
    """The precision plan for a mixed_precision setting on ``device``.

    auto: bf16 autocast on CPU; on CUDA bf16 when the GPU supports it, else fp16 with a
    GradScaler. fp16 on CPU is refused: CPU kernels for fp16 are slow or missing and there is no
    loss scaling there, so bf16 is the mixed precision a CPU can run.
    """
    import torch

    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device == "cpu" or cuda_bf16 else "fp16"
    if mixed_precision == "no":
        return PrecisionPlan(device, "no", None, False)
    if mixed_precision == "bf16":
        if device == "cuda" and not cuda_bf16:
            raise PipelineError(
                'mixed_precision "bf16" needs a GPU with bfloat16 support (Ampere or newer); '
                'use "fp16" or "auto" on this GPU'
            )
        return PrecisionPlan(device, "bf16", torch.bfloat16, False)
    if mixed_precision == "fp16":
        if device != "cuda":
            raise PipelineError(
                'mixed_precision "fp16" needs a CUDA GPU (fp16 training on the CPU has no loss '
                'scaling and slow kernels): use "bf16", "auto" or "no" on the CPU'
            )
        return PrecisionPlan(device, "fp16", torch.float16, True)
    raise PipelineError(f"unknown mixed_precision {mixed_precision!r}")
