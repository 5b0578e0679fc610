"""finetune: train a TorchScript model further on a dataset, then export it to ONNX.

The stage trains the loaded ScriptModule itself (its parameters are trainable), validates after
every epoch, keeps the best weights by the task's primary metric and saves them. It adds two
artifacts: the fine-tuned TorchScript model (``<stage_id>.torchscript``, made from the input) and
its ONNX export (``<stage_id>``, made from the fine-tuned TorchScript), which is left current so
quantize, compile and benchmark can follow.

Training is resumable: every ``checkpoint_every_steps`` optimizer steps and at every epoch end the
whole training state goes to ``<stage dir>/checkpoint.pt`` (written atomically, read back with
``torch.load(weights_only=True)``), and its step is recorded in ``ctx.state[stage_id]``. A worker
killed mid-training, or a job cancelled and retried, continues from the last checkpoint with the
same data order, so the result is the one an uninterrupted run would have given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines import training
from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    ProgressFn,
    StageSettings,
    TensorSpec,
)
from pipelines.onnx_io import describe_inputs, first_error_line
from pipelines.stages.base import Stage, StageOutcome, settings_meta
from pipelines.stages.export_onnx import ExportOnnx, ExportOnnxSettings
from pipelines.staging import staged_output

if TYPE_CHECKING:
    import torch

    from pipelines.datasets import SplitData

logger = logging.getLogger(__name__)

TORCHSCRIPT_FILENAME = "model.pt"
TASKS = ("classification", "regression", "embedding")
# Bumped when the checkpoint's layout changes: an older checkpoint is then not resumed.
CHECKPOINT_VERSION = 1
# Share of the stage's progress bar the training takes; saving and the ONNX export take the rest.
TRAIN_SHARE = 0.9


class FinetuneSettings(StageSettings):
    """Settings of finetune."""

    dataset_id: int = Field(
        ...,
        ge=1,
        description=(
            "Id of the dataset to fine-tune on. Its train split is trained on, its validation "
            "split picks the best epoch (and drives early stopping)."
        ),
    )
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the train split.")
    batch_size: int = Field(
        32, ge=1, le=65536, description="Rows per forward/backward pass (a micro-batch)."
    )
    learning_rate: float = Field(
        1e-3,
        ge=0.0,
        le=1.0,
        description="Peak learning rate of AdamW, reached at the end of warm-up.",
    )
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW's decoupled weight decay.")
    warmup_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the optimizer steps over which the learning rate rises linearly from near "
            "0 to learning_rate; after it, the rate follows a cosine down to 0 at the last step."
        ),
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "Micro-batches whose gradients are summed before each optimizer step: the effective "
            "batch is batch_size x this, in the memory of one batch_size."
        ),
    )
    max_grad_norm: float = Field(
        1.0,
        ge=0.0,
        le=1e6,
        description="Clip the gradients' global L2 norm to this before each step; 0 disables.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Autocast precision of the forward pass. auto: bf16 on the CPU; on a GPU bf16 where "
            "supported, else fp16 with loss scaling. fp16 needs a GPU. The saved model is fp32 "
            "either way."
        ),
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Label smoothing of the cross-entropy loss (classification models only).",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        le=1000,
        description=(
            "Stop after this many epochs in a row without a better validation metric (accuracy, "
            "MSE or cosine, by task); 0 disables."
        ),
    )
    checkpoint_every_steps: int = Field(
        50,
        ge=1,
        le=1_000_000,
        description=(
            "Save a resumable checkpoint every this many optimizer steps (and at each epoch "
            "end), so a worker killed mid-training loses at most this much work."
        ),
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of the data order and of torch's RNG."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto takes the GPU when the worker has one."
    )

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> FinetuneSettings:
        if self.device == "cpu" and self.mixed_precision == "fp16":
            raise ValueError(
                'mixed_precision "fp16" needs a CUDA GPU; with device "cpu" use "bf16" or "no"'
            )
        return self


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


def _first_tensor(value: Any, torch: Any) -> Any:
    """The model's output tensor: the tensor itself, or the first of a tuple/list it returns."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise PipelineError(
        f"the model returns a {type(value).__name__}; fine-tuning needs forward to return a "
        "tensor (or a tuple whose first item is the tensor the loss applies to)"
    )


def _prepare_targets(
    task: str, targets: np.ndarray | None, output_shape: tuple[int, ...], split: str, dataset: str
) -> np.ndarray:
    """The split's targets in the dtype and shape the task's loss takes, or a PipelineError."""
    if targets is None:
        raise PipelineError(
            f"dataset {dataset} has no target column, so there is nothing to fine-tune towards: "
            "set the dataset's target"
        )
    per_row = tuple(output_shape[1:])
    if task == "classification":
        if len(output_shape) != 2:
            raise PipelineError(
                f"a classification model must return [batch, classes] scores; this one returns "
                f"shape {list(output_shape)}"
            )
        labels = np.asarray(targets)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise PipelineError(
                f"classification targets must be one class index per row; the {split} targets "
                f"of dataset {dataset} have shape {list(labels.shape)}"
            )
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                raise PipelineError(
                    f"classification targets must be class indices; dataset {dataset}'s {split} "
                    "targets hold non-integer values"
                )
        elif labels.dtype.kind not in "iub":
            raise PipelineError(
                f"classification targets must be class indices; dataset {dataset}'s {split} "
                f"targets are {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        classes = output_shape[1]
        if classes < 2:
            raise PipelineError(
                "the model returns one score per row; fine-tuning a classifier needs [batch, "
                "classes] logits (for a binary classifier, 2 of them)"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise PipelineError(
                f"dataset {dataset}'s {split} targets run from {labels.min()} to {labels.max()} "
                f"but the model scores {classes} classes (0..{classes - 1})"
            )
        return labels
    values = np.asarray(targets, dtype=np.float32)
    if values.shape[1:] != per_row:
        if values.ndim == 1 and per_row == (1,):
            values = values[:, None]
        elif values.ndim == 2 and values.shape[1] == 1 and per_row == ():
            values = values[:, 0]
        else:
            raise PipelineError(
                f"the {split} targets of dataset {dataset} have shape {list(values.shape[1:])} per "
                f"row but the model returns {list(per_row)} per row"
            )
    if task == "embedding" and values.ndim != 2:
        raise PipelineError(
            f"embedding targets must be one vector per row; got shape {list(values.shape)}"
        )
    return values


def _loss_function(task: str, label_smoothing: float, torch: Any) -> Any:
    """loss(outputs, targets) -> the batch's mean loss, computed in fp32."""
    functional = torch.nn.functional
    if task == "classification":
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        return lambda out, target: criterion(out.float(), target)
    if task == "regression":
        return lambda out, target: functional.mse_loss(out.float(), target)
    # embedding: 1 - cosine similarity to the target vectors
    return lambda out, target: (
        1.0 - functional.cosine_similarity(out.float(), target, dim=-1)
    ).mean()


def _dim_sizes(specs: list[TensorSpec], data: SplitData) -> dict[str, int]:
    """Sizes of the named non-batch dims as the data has them, for the ONNX example input."""
    sizes: dict[str, int] = {}
    for spec in specs:
        array = data.inputs.get(spec.name)
        if array is None:
            continue
        for axis, dim in enumerate(spec.shape):
            if axis > 0 and isinstance(dim, str) and axis < array.ndim:
                sizes.setdefault(dim, int(array.shape[axis]))
    return sizes


class _Trainer:
    """One fine-tuning run: the model, its optimizer and the loop, checkpointed as it goes."""

    def __init__(
        self,
        ctx: PipelineContext,
        stage_id: str,
        s: FinetuneSettings,
        source: Artifact,
        progress: ProgressFn,
    ) -> None:
        self.ctx = ctx
        self.stage_id = stage_id
        self.s = s
        self.source = source
        self.progress = progress
        self.names = [spec.name for spec in source.inputs]
        self.checkpoint_path = ctx.stage_dir(stage_id) / training.CHECKPOINT_FILENAME
        self.state = TrainState()
        self.best_state: dict[str, Any] | None = None
        self.resumed_from_step = 0
        self.train_output_dtype = ""  # dtype of the first training forward's output (autocast)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from pipelines.datasets import SplitData, load_split
        from pipelines.metrics import primary_metric

        s, ctx = self.s, self.ctx
        self.task = ctx.task
        self.ref = ctx.dataset(s.dataset_id, "finetune dataset_id")
        self.device = training.resolve_device(s.device)
        self.plan = training.resolve_precision(s.mixed_precision, self.device)
        self.metric, self.higher_is_better = primary_metric(self.task)

        self.progress(0.0, f"loading dataset {s.dataset_id}")
        train = load_split(self.ref, "train", self.source.inputs)
        val = load_split(self.ref, "validation", self.source.inputs)
        for split, data in (("train", train), ("validation", val)):
            if data.rows == 0:
                raise PipelineError(
                    f"the {split} split of dataset {s.dataset_id} is empty: fine-tuning needs "
                    "rows in both the train and the validation split"
                )

        self.progress(0.01, "loading the TorchScript model")
        try:
            model = torch.jit.load(self.source.path, map_location=self.device)
        except Exception as exc:
            raise PipelineError(
                f"could not load {self.source.path} as TorchScript: {first_error_line(exc)}"
            ) from exc
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise PipelineError("the model has no trainable parameters, so it cannot be fine-tuned")
        floats = {p.dtype for p in self.params}
        if floats != {torch.float32}:
            raise PipelineError(
                f"fine-tuning needs fp32 weights; this model's are {sorted(map(str, floats))}"
            )

        # One forward pass on two rows: checks the inputs fit and tells the output's shape.
        probe = {name: array[:2] for name, array in train.inputs.items()}
        model.eval()
        try:
            with torch.no_grad():
                out = _first_tensor(model(*self._tensors(probe)), torch)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"the model rejected dataset {s.dataset_id}'s rows ({describe_inputs(probe)}): "
                f"{first_error_line(exc)}"
            ) from exc
        out_shape = tuple(out.shape)
        dataset = str(s.dataset_id)
        self.train = SplitData(
            inputs=train.inputs,
            targets=_prepare_targets(self.task, train.targets, out_shape, "train", dataset),
            rows=train.rows,
        )
        self.val = SplitData(
            inputs=val.inputs,
            targets=_prepare_targets(self.task, val.targets, out_shape, "validation", dataset),
            rows=val.rows,
        )
        self.loss_fn = _loss_function(self.task, s.label_smoothing, torch)

        self.batches_per_epoch = math.ceil(self.train.rows / s.batch_size)
        self.steps_per_epoch = training.optimizer_steps_per_epoch(
            self.train.rows, s.batch_size, s.gradient_accumulation_steps
        )
        self.total_steps = s.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.params, lr=s.learning_rate, weight_decay=s.weight_decay
        )
        self.scheduler = training.make_scheduler(self.optimizer, self.total_steps, s.warmup_ratio)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.plan.use_grad_scaler)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """What a checkpoint must have been made from to be resumed: settings, model, data."""
        ref = self.ref
        identity = {
            "version": CHECKPOINT_VERSION,
            "settings": self.s.model_dump(mode="json"),
            "model_sha256": training.file_sha256(Path(self.source.path)),
            "task": self.task,
            "dataset": {
                "id": ref.id,
                "format": ref.format,
                "target": ref.target,
                "splits": ref.splits,
                "train_rows": self.train.rows,
                "validation_rows": self.val.rows,
            },
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        import torch

        missing = [name for name in self.names if name not in inputs]
        if missing:
            raise PipelineError(f"the dataset gives no data for the model input(s) {missing}")
        return [
            torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
            for name in self.names
        ]

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, elapsed: float) -> None:
        st = self.state
        st.train_seconds = elapsed
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "state": asdict(st),
            "model": self.model.state_dict(),
            "best_state": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": training.rng_state(),
        }
        training.save_checkpoint(self.checkpoint_path, payload)
        record = self.ctx.state.setdefault(self.stage_id, {})
        record.update(
            {
                "checkpoint": str(self.checkpoint_path),
                "step": st.global_step,
                "epoch": st.epoch,
                "batch_in_epoch": st.batch_in_epoch,
                "total_steps": self.total_steps,
            }
        )
        self.ctx.save()

    def try_resume(self) -> bool:
        """Load the stage's checkpoint if there is one from this very run; True if it did."""
        path = self.checkpoint_path
        if not path.is_file():
            return False
        payload = training.load_checkpoint(path)
        if payload.get("fingerprint") != self.fingerprint:
            logger.info(
                "%s: ignoring %s, made with other settings, model or data", self.stage_id, path
            )
            self.progress(0.02, "ignoring a checkpoint made with other settings, model or data")
            return False
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.plan.use_grad_scaler and payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        self.best_state = payload["best_state"]
        self.state = TrainState.from_dict(payload["state"])
        training.restore_rng_state(payload["rng"])
        st = self.state
        self.resumed_from_step = st.global_step
        record = self.ctx.state.setdefault(self.stage_id, {})
        record["resumed_from_step"] = st.global_step
        self.ctx.save()
        message = (
            f"resuming from step {st.global_step} (epoch {min(st.epoch + 1, self.s.epochs)}/"
            f"{self.s.epochs}, batch {st.batch_in_epoch}/{self.batches_per_epoch})"
        )
        logger.info("%s: %s", self.stage_id, message)
        self.progress(self._fraction(), message)
        return True

    # -- the loop ---------------------------------------------------------------------------------

    def _fraction(self) -> float:
        return TRAIN_SHARE * self.state.global_step / max(1, self.total_steps)

    def evaluate(self) -> dict[str, float]:
        """Loss and task metrics of the current weights on the validation split (in fp32)."""
        import torch

        from pipelines.datasets import iter_batches
        from pipelines.metrics import task_metrics

        self.model.eval()
        outputs: list[np.ndarray] = []
        loss_sum = torch.zeros((), device=self.device)
        with torch.no_grad():
            for inputs, targets in iter_batches(self.val, self.s.batch_size):
                out = _first_tensor(self.model(*self._tensors(inputs)), torch).float()
                target = torch.from_numpy(np.asarray(targets)).to(self.device)
                loss_sum += self.loss_fn(out, target) * out.shape[0]
                outputs.append(out.cpu().numpy())
        self.model.train()
        metrics = task_metrics(self.task, np.concatenate(outputs), self.val.targets)
        if self.metric not in metrics:
            raise PipelineError(
                f"the {self.task} metrics have no {self.metric!r} (got {sorted(metrics)})"
            )
        result = {"val_loss": float(loss_sum.item()) / self.val.rows}
        result.update({f"val_{k}": float(v) for k, v in metrics.items()})
        return result

    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def fit(self) -> None:
        import torch

        from pipelines.datasets import iter_batches

        s, st = self.s, self.state
        key = f"val_{self.metric}"
        accum = s.gradient_accumulation_steps
        seconds_before = st.train_seconds
        started = time.perf_counter()

        def elapsed() -> float:
            return seconds_before + time.perf_counter() - started

        if st.global_step == 0 and st.epoch == 0 and st.batch_in_epoch == 0:
            self.progress(0.02, "validating the model before fine-tuning")
            st.initial_val = self.evaluate()
            st.history.append({"step": 0, "metrics": dict(st.initial_val)})

        self.model.train()
        for epoch in range(st.epoch, s.epochs):
            if st.stopped_early:
                break
            skip = st.batch_in_epoch
            group_loss = torch.zeros((), device=self.device)
            group_rows = 0
            batches = iter_batches(self.train, s.batch_size, shuffle=True, seed=s.seed + epoch)
            for index, (inputs, targets) in enumerate(batches):
                if index < skip:
                    continue  # trained on before the checkpoint this run resumed from
                group_start = index - index % accum
                group_len = min(accum, self.batches_per_epoch - group_start)
                target = torch.from_numpy(np.asarray(targets)).to(self.device)
                try:
                    with self.plan.autocast():
                        out = _first_tensor(self.model(*self._tensors(inputs)), torch)
                        loss = self.loss_fn(out, target)
                except PipelineError:
                    raise
                except Exception as exc:
                    raise PipelineError(
                        f"the training forward pass failed: {first_error_line(exc)}"
                    ) from exc
                if not self.train_output_dtype:
                    self.train_output_dtype = str(out.dtype).replace("torch.", "")
                self.scaler.scale(loss / group_len).backward()
                group_loss += loss.detach() * out.shape[0]
                group_rows += int(out.shape[0])
                if index + 1 - group_start < group_len:
                    continue

                # -- one optimizer step over the group's summed gradients
                if s.max_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
                    if float(norm) > s.max_grad_norm:
                        st.clipped_steps += 1
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                lr = st.last_lr = float(self.scheduler.get_last_lr()[0])
                self.scheduler.step()
                st.global_step += 1
                st.batch_in_epoch = index + 1

                step_loss = float(group_loss.item()) / group_rows
                if not math.isfinite(step_loss):
                    raise PipelineError(
                        f"training diverged: the loss is {step_loss} at step {st.global_step}; "
                        'lower learning_rate (or use mixed_precision "no")'
                    )
                st.epoch_loss_sum += step_loss * group_rows
                st.epoch_rows += group_rows
                st.interval_loss_sum += step_loss * group_rows
                st.interval_rows += group_rows
                group_loss = torch.zeros((), device=self.device)
                group_rows = 0

                # At an epoch's end the epoch's own entry and checkpoint follow the validation.
                mid_epoch = st.batch_in_epoch < self.batches_per_epoch
                if st.global_step % s.checkpoint_every_steps == 0 and mid_epoch:
                    st.history.append(
                        {
                            "step": st.global_step,
                            "metrics": {
                                "train_loss": st.interval_loss_sum / st.interval_rows,
                                "lr": lr,
                            },
                        }
                    )
                    st.interval_loss_sum, st.interval_rows = 0.0, 0
                    self._save_checkpoint(elapsed())
                self.progress(
                    self._fraction(),
                    f"epoch {epoch + 1}/{s.epochs} step {st.global_step}/{self.total_steps} "
                    f"loss {step_loss:.3f} lr {lr:.1e}",
                )

            # -- the epoch's end: validate, keep the best weights, decide on stopping
            val = self.evaluate()
            value = val[key]
            if self._improved(value):
                st.best_metric = value
                st.best_epoch = epoch + 1
                st.best_val = dict(val)
                st.bad_epochs = 0
                self.best_state = training.clone_state_dict(self.model.state_dict())
            else:
                st.bad_epochs += 1
            train_loss = st.epoch_loss_sum / max(1, st.epoch_rows)
            st.history.append(
                {
                    "step": st.global_step,
                    "metrics": {
                        "train_loss": train_loss,
                        **val,
                        "lr": st.last_lr,
                    },
                }
            )
            st.epoch = epoch + 1
            st.batch_in_epoch = 0
            st.epoch_loss_sum, st.epoch_rows = 0.0, 0
            st.interval_loss_sum, st.interval_rows = 0.0, 0
            patience = s.early_stopping_patience
            st.stopped_early = patience > 0 and st.bad_epochs >= patience and st.epoch < s.epochs
            self._save_checkpoint(elapsed())
            best = "n/a" if st.best_metric is None else f"{st.best_metric:.4g}"
            message = f"epoch {epoch + 1}/{s.epochs} {key} {value:.4g} (best {best})"
            if st.stopped_early:
                message += f"; stopping early: no better {key} for {patience} epoch(s)"
            logger.info("%s: %s", self.stage_id, message)
            self.progress(self._fraction(), message)
        st.train_seconds = elapsed()
        if self.best_state is None:
            raise PipelineError(
                f"the validation {self.metric} was never finite: training diverged; lower "
                "learning_rate"
            )
        self.model.load_state_dict(self.best_state)
        self.model.eval()

    def metrics(self) -> dict[str, float]:
        st = self.state
        key = f"val_{self.metric}"
        result = {f"best_{key}": float(st.best_metric or 0.0)}
        if key in st.initial_val:
            result[f"initial_{key}"] = st.initial_val[key]
        result.update({k: v for k, v in st.best_val.items() if k != key})
        result.update(
            {
                "best_epoch": float(st.best_epoch),
                "epochs": float(st.epoch),
                "stopped_early": float(st.stopped_early),
                "steps": float(st.global_step),
                "clipped_steps": float(st.clipped_steps),
                "resumed_from_step": float(self.resumed_from_step),
                "train_seconds": round(st.train_seconds, 3),
            }
        )
        return result


class Finetune(Stage[FinetuneSettings]):
    """Fine-tune a TorchScript model on a dataset; the ONNX export of the result becomes current."""

    name: ClassVar[str] = "finetune"
    description: ClassVar[str] = (
        "Train a TorchScript model further on a dataset (AdamW, warm-up then cosine LR, mixed "
        "precision, early stopping, resumable checkpoints), keep the best epoch by the "
        "validation metric, and export the result to ONNX."
    )
    Settings: ClassVar[type[StageSettings]] = FinetuneSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.TORCHSCRIPT.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: FinetuneSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Fine-tune the current TorchScript artifact, save it, and export it to ONNX."""
        source = ctx.current_artifact
        if ctx.task not in TASKS:
            raise PipelineError("fine-tuning needs a task: classification, regression or embedding")
        if s.label_smoothing and ctx.task != "classification":
            raise PipelineError(
                f"label_smoothing applies to classification only; this model's task is "
                f"{ctx.task}: set it to 0"
            )
        if source.precision != Precision.FP32.value:
            raise PipelineError(
                f"fine-tuning needs an fp32 model; this one is {source.precision}: fine-tune the "
                "fp32 model and quantize after"
            )
        if not source.inputs:
            raise PipelineError(
                "the model declares no inputs: give its input shapes at upload, e.g. "
                '[{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]'
            )

        import torch

        torch.manual_seed(s.seed)
        trainer = _Trainer(ctx, stage_id, s, source, progress)
        trainer.setup()
        trainer.try_resume()
        trainer.fit()
        st = trainer.state

        # -- the fine-tuned TorchScript model, with the best epoch's weights
        progress(TRAIN_SHARE, f"saving the fine-tuned model (epoch {st.best_epoch})")
        stage_dir = ctx.stage_dir(stage_id)
        # Saved from the CPU, so the file loads on a machine without a GPU.
        trainer.model.to("cpu")
        with staged_output(stage_dir, TORCHSCRIPT_FILENAME) as tmp_path:
            torch.jit.save(trainer.model, str(tmp_path))
        metrics = trainer.metrics()
        meta = {
            "settings": settings_meta(s),
            "dataset_id": s.dataset_id,
            "task": ctx.task,
            "device": trainer.device,
            "mixed_precision": trainer.plan.mode,
            "train_output_dtype": trainer.train_output_dtype,
            "total_steps": trainer.total_steps,
            "torch_version": torch.__version__,
        }
        ts_key = f"{stage_id}.torchscript"
        ctx.add_artifact(
            Artifact(
                key=ts_key,
                path=str(stage_dir / TORCHSCRIPT_FILENAME),
                format=ModelFormat.TORCHSCRIPT.value,
                precision=source.precision,
                inputs=list(source.inputs),
                outputs=list(source.outputs),
                parent=source.key,
                produced_by=self.name,
                metrics=dict(metrics),
                meta=dict(meta),
            )
        )

        # -- its ONNX export, checked against it; the export becomes current
        export_settings = ExportOnnxSettings.model_validate(
            {"dim_sizes": _dim_sizes(source.inputs, trainer.train)}
        )

        def export_progress(fraction: float, message: str) -> None:
            progress(TRAIN_SHARE + (1.0 - TRAIN_SHARE) * fraction, f"ONNX export: {message}")

        exported = ExportOnnx().run(ctx, stage_id, export_settings, export_progress)
        onnx_artifact = ctx.artifacts[exported.outputs[-1]]
        onnx_artifact.produced_by = self.name
        onnx_artifact.metrics.update(metrics)
        # The settings the pipeline compares on a retry are the stage's, not the export's.
        onnx_artifact.meta = {
            **meta,
            "export": {k: v for k, v in onnx_artifact.meta.items() if k != "settings"},
            "export_settings": settings_meta(export_settings),
        }
        ctx.current = onnx_artifact.key

        # Done: the checkpoint is not needed again (a retry of a finished stage is skipped).
        trainer.checkpoint_path.unlink(missing_ok=True)
        record = ctx.state.setdefault(stage_id, {})
        record.update({"checkpoint": None, "step": st.global_step, "completed": True})

        key = f"val_{trainer.metric}"
        initial = st.initial_val.get(key)
        before = "" if initial is None else f" (before: {initial:.4g})"
        resumed = (
            f"; resumed from step {trainer.resumed_from_step}" if trainer.resumed_from_step else ""
        )
        stopped = "; stopped early" if st.stopped_early else ""
        all_metrics = {**metrics, "max_abs_diff": exported.metrics.get("max_abs_diff", 0.0)}
        return StageOutcome(
            outputs=[ts_key, onnx_artifact.key],
            metrics=all_metrics,
            history=list(st.history),
            message=(
                f"fine-tuned {st.epoch} epoch(s), {st.global_step} steps: best {key} "
                f"{st.best_metric:.4g} at epoch {st.best_epoch}{before}{stopped}{resumed}; "
                f"exported to ONNX (max abs diff {all_metrics['max_abs_diff']:.2g})"
            ),
        )
