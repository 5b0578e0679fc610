"""The fine-tune run: setup, the training loop, validation, and checkpoint / resume.

A :class:`Trainer` trains the loaded ScriptModule itself (its parameters are trainable), validates
after every epoch and keeps the best weights by the task's primary metric. Every
``checkpoint_every_steps`` optimizer steps and at every epoch end the whole training state goes to
``<stage dir>/checkpoint.pt``, and its step is recorded in ``ctx.state[stage_id]``; a worker killed
mid-training continues from the last checkpoint with the same data order, so the result is the one
an uninterrupted run would have given.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import Artifact, PipelineContext, PipelineError, ProgressFn
from pipelines.finetuning.checkpoints import (
    CHECKPOINT_FILENAME,
    TrainState,
    clone_state_dict,
    fingerprint,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_payload,
)
from pipelines.finetuning.data import load_splits, loss_function, with_targets
from pipelines.finetuning.model import first_tensor, load_trainable, probe_output_shape, to_tensors
from pipelines.finetuning.precision import resolve_device, resolve_precision
from pipelines.finetuning.schedule import (
    make_scheduler,
    optimizer_step,
    optimizer_steps_per_epoch,
)
from pipelines.finetuning.settings import FinetuneSettings
from pipelines.onnx_io import first_error_line

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Share of the stage's progress bar the training takes; saving and the ONNX export take the rest.
TRAIN_SHARE = 0.9


class Trainer:
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
        self.checkpoint_path = ctx.stage_dir(stage_id) / CHECKPOINT_FILENAME
        self.state = TrainState()
        self.best_state: dict[str, Any] | None = None
        self.resumed_from_step = 0
        self.train_output_dtype = ""  # dtype of the first training forward's output (autocast)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from pipelines.metrics import primary_metric

        s, ctx = self.s, self.ctx
        self.task = ctx.task
        self.ref = ctx.dataset(s.dataset_id, "finetune dataset_id")
        self.device = resolve_device(s.device)
        self.plan = resolve_precision(s.mixed_precision, self.device)
        self.metric, self.higher_is_better = primary_metric(self.task)

        self.progress(0.0, f"loading dataset {s.dataset_id}")
        train, val = load_splits(self.ref, self.source.inputs, s.dataset_id)

        self.progress(0.01, "loading the TorchScript model")
        self.model, self.params = load_trainable(self.source.path, self.device)
        out_shape = probe_output_shape(self.model, self._tensors, train.inputs, s.dataset_id)
        dataset = str(s.dataset_id)
        self.train = with_targets(self.task, train, out_shape, "train", dataset)
        self.val = with_targets(self.task, val, out_shape, "validation", dataset)
        self.loss_fn = loss_function(self.task, s.label_smoothing, torch)

        self.batches_per_epoch = math.ceil(self.train.rows / s.batch_size)
        self.steps_per_epoch = optimizer_steps_per_epoch(
            self.train.rows, s.batch_size, s.gradient_accumulation_steps
        )
        self.total_steps = s.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.params, lr=s.learning_rate, weight_decay=s.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, s.warmup_ratio)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.plan.use_grad_scaler)
        self.fingerprint = fingerprint(
            s, Path(self.source.path), self.task, self.ref, self.train.rows, self.val.rows
        )

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        return to_tensors(self.names, inputs, self.device)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, elapsed: float) -> None:
        st = self.state
        st.train_seconds = elapsed
        payload = training_payload(
            self.fingerprint,
            st,
            self.model,
            self.best_state,
            self.optimizer,
            self.scheduler,
            self.scaler,
        )
        save_checkpoint(self.checkpoint_path, payload)
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
        payload = load_checkpoint(path)
        if payload.get("fingerprint") != self.fingerprint:
            logger.info(
                "%s: ignoring %s, made with other settings, model or data", self.stage_id, path
            )
            self.progress(0.02, "ignoring a checkpoint made with other settings, model or data")
            return False
        self.state, self.best_state = restore_training(
            payload,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.plan.use_grad_scaler,
        )
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
                out = first_tensor(self.model(*self._tensors(inputs)), torch).float()
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
                        out = first_tensor(self.model(*self._tensors(inputs)), torch)
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
                lr, clipped = optimizer_step(
                    self.scaler, self.optimizer, self.scheduler, self.params, s.max_grad_norm
                )
                st.last_lr = lr
                st.clipped_steps += clipped
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
                self.best_state = clone_state_dict(self.model.state_dict())
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
