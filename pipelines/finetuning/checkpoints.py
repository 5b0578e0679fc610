"""What lets a killed fine-tune run resume: its position, the checkpoint file, its fingerprint.

Checkpoints are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
they hold only tensors, numbers, strings, bools, None and lists / dicts / tuples of those, so
loading one never runs code from the file (no pickle of arbitrary objects). torch is imported
inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core import DatasetRef, PipelineError

if TYPE_CHECKING:
    import torch

    from pipelines.finetuning.settings import FinetuneSettings

CHECKPOINT_FILENAME = "checkpoint.pt"
# Bumped when the checkpoint's layout changes: an older checkpoint is then not resumed.
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """Everything about the run's position that a checkpoint must bring back (tensors aside)."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # micro-batches of epoch ``epoch`` already trained on
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    initial_val: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs in a row without a better validation metric
    stopped_early: bool = False
    epoch_loss_sum: float = 0.0  # sum over the epoch's trained rows of their loss
    epoch_rows: int = 0
    interval_loss_sum: float = 0.0  # the same since the last checkpoint-interval history entry
    interval_rows: int = 0
    clipped_steps: int = 0
    last_lr: float = 0.0  # the learning rate of the last optimizer step
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def fingerprint(
    settings: FinetuneSettings,
    model_path: Path,
    task: str,
    ref: DatasetRef,
    train_rows: int,
    validation_rows: int,
) -> str:
    """What a checkpoint must have been made from to be resumed: settings, model, data."""
    identity = {
        "version": CHECKPOINT_VERSION,
        "settings": settings.model_dump(mode="json"),
        "model_sha256": file_sha256(model_path),
        "task": task,
        "dataset": {
            "id": ref.id,
            "format": ref.format,
            "target": ref.target,
            "splits": ref.splits,
            "train_rows": train_rows,
            "validation_rows": validation_rows,
        },
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file; ``hashlib.file_digest`` streams it (model files can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- the checkpoint of a run: its layout is CHECKPOINT_VERSION's ---------------------------------


def training_payload(
    fingerprint: str,
    state: TrainState,
    model: Any,
    best_state: dict[str, Any] | None,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
) -> dict[str, Any]:
    """Everything a run needs to go on where it was: weights, optimizer, schedule, RNG."""
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "state": asdict(state),
        "model": model.state_dict(),
        "best_state": best_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }


def restore_training(
    payload: dict[str, Any],
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    use_grad_scaler: bool,
) -> tuple[TrainState, dict[str, Any] | None]:
    """Load a :func:`training_payload` back into the run's objects; (its state, best weights)."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    # A scaler that is off saves an empty state; only a run that scales loads one.
    if use_grad_scaler and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    best_state = payload["best_state"]
    state = TrainState.from_dict(payload["state"])
    restore_rng_state(payload["rng"])
    return state, best_state


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


# -- checkpoint files -----------------------------------------------------------------------------


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
