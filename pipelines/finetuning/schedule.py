"""The fine-tune learning-rate schedule: linear warm-up, then a cosine down to 0, and the one
optimizer step both trainers take (the tensor fine-tune and LoRA).

torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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


def optimizer_step(
    scaler: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> tuple[float, bool]:
    """One step over the accumulated gradients: unscaled and clipped to ``max_grad_norm`` (0: no
    clipping), the scaler's step, zeroed gradients, then the schedule's step. Returns the
    learning rate the step used and whether its gradients were clipped."""
    import torch

    clipped = False
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        clipped = float(norm) > max_grad_norm
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = float(scheduler.get_last_lr()[0])
    scheduler.step()
    return lr, clipped
