"""Training helpers the fine-tune stage uses: LR schedule, device and precision, checkpoints.

Nothing here imports torch at module level: the helpers that need it import it when called, so
``import pipelines.stages`` stays light enough for the web process.

Checkpoints are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
they hold only tensors, numbers, strings, bools, None and lists / dicts / tuples of those, so
loading one never runs code from the file (no pickle of arbitrary objects).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core import PipelineError

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILENAME = "checkpoint.pt"


# -- learning-rate schedule -----------------------------------------------------------------------


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """The number of warm-up steps: ``warmup_ratio`` of the run, rounded, at most all of it."""
    if total_steps <= 0 or warmup_ratio <= 0:
        return 0
    return min(total_steps, max(1, round(total_steps * warmup_ratio)))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine to 0.

    During warm-up the multiplier rises linearly, (step + 1) / (warmup_steps + 1), so no step is
    wasted at LR 0; from ``warmup_steps`` on it follows half a cosine from 1 at the end of warm-up
    to 0 at ``total_steps`` (the step after the last one), so the last step's LR is close to 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """``warmup_cosine`` bound to a run's length, for ``torch.optim.lr_scheduler.LambdaLR``."""
    warmup = warmup_steps_for(total_steps, warmup_ratio)

    def multiplier(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup)

    return multiplier


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with linear warm-up then cosine decay to 0 over ``total_steps`` steps.

    The lambda is a plain closure, so the scheduler's state_dict stores only numbers (it saves the
    ``__dict__`` of callable objects, never functions) and a checkpoint of it loads with
    ``weights_only=True``.
    """
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda(total_steps, warmup_ratio))


def optimizer_steps_per_epoch(rows: int, batch_size: int, accumulation_steps: int) -> int:
    """Optimizer steps in one pass over ``rows``: one per ``accumulation_steps`` micro-batches.

    A last, incomplete group of micro-batches still makes a step, so no row is left out.
    """
    micro_batches = math.ceil(rows / batch_size)
    return math.ceil(micro_batches / accumulation_steps)


# -- device and mixed precision -------------------------------------------------------------------


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


# -- random state ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU, and every CUDA device when there is one) as uint8 tensors."""
    import torch

    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned (the CUDA part only where CUDA is present)."""
    import torch

    torch.set_rng_state(state["cpu"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


# -- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically: a killed worker leaves the old one whole.

    The file is written next to its final name, flushed to disk, then renamed over it.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint :func:`save_checkpoint` wrote, loaded with ``weights_only=True``."""
    import torch

    try:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PipelineError(f"the checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(payload, dict):
        raise PipelineError(f"the checkpoint {path} does not hold a dict")
    return payload


def clone_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict, so later training steps do not change it."""
    return {key: value.detach().clone() for key, value in state.items()}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file; ``hashlib.file_digest`` streams it (model files can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
