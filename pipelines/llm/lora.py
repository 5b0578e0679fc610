"""LoRA fine-tuning of a Hugging Face checkpoint folder with peft: the run, resumable.

A :class:`LoraRun` loads the checkpoint in fp32, puts LoRA adapters on its attention and MLP
projections (:mod:`pipelines.llm.lora_model`), and trains only them with AdamW: linear warm-up
then cosine (:mod:`pipelines.finetuning.schedule`), gradient accumulation (the loss is the mean
over every trained token of the group), clipping, bf16 autocast (also on the CPU), optional
gradient checkpointing. The data are :mod:`pipelines.llm.lora_data` examples, in a seeded order
per epoch, so a run is the same run every time it is given the same seed.

Every ``checkpoint_every_steps`` optimizer steps, and after the last one, the adapter weights,
optimizer, scheduler, loss scaler, position, loss curve and RNG go to one file written atomically
(:func:`pipelines.finetuning.checkpoints.save_checkpoint`, read back with ``weights_only=True``).
A run started again over the same folder, settings and data (its fingerprint) continues from it
and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import DatasetRef, PipelineError, ProgressFn
from pipelines.finetuning.checkpoints import (
    file_sha256,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from pipelines.finetuning.precision import resolve_device, resolve_precision
from pipelines.finetuning.schedule import (
    make_scheduler,
    optimizer_step,
    optimizer_steps_per_epoch,
)
from pipelines.llm.lora_data import Example, TrainData, build_examples
from pipelines.llm.lora_model import (
    collate,
    default_target_modules,
    folder_fingerprint,
    load_checkpoint_folder,
    token_loss_sum,
    wrap_lora,
)
from pipelines.llm.lora_settings import LoraFinetuneSettings

logger = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "lora_checkpoint.pt"
# Bumped when the checkpoint's layout changes: an older checkpoint is then not resumed.
CHECKPOINT_VERSION = 1
# Share of the stage's progress the training takes; saving (and merging) take the rest.
TRAIN_SHARE = 0.9
# Settings that do not change the trained weights: a resume need not match them.
_NOT_IN_FINGERPRINT = frozenset({"threads", "merge", "eval_examples", "device"})


@dataclass
class LoraState:
    """The run's position and what it has measured, everything a checkpoint brings back."""

    global_step: int = 0
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # micro-batches of epoch ``epoch`` already trained on
    tokens_seen: int = 0  # input tokens (not padding) of every trained micro-batch
    trained_tokens: int = 0  # tokens the loss counted
    first_loss: float | None = None
    last_loss: float = 0.0
    last_lr: float = 0.0
    interval_loss_sum: float = 0.0  # token-weighted, since the last history point
    interval_tokens: int = 0
    clipped_steps: int = 0
    train_seconds: float = 0.0
    initial_val_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def thread_count(requested: int | None) -> int:
    """The threads torch runs with: the setting, else R1_ENGINE_THREADS, else every core."""
    if requested:
        return int(requested)
    env = int(os.environ.get("R1_ENGINE_THREADS", "0") or 0)
    return env if env > 0 else max(1, os.cpu_count() or 1)


def _checkpoint_activations(model: Any) -> None:
    """Gradient (activation) checkpointing of every block, non-reentrant (so the frozen
    embeddings' outputs need not require grad); transformers 5 renamed the call."""
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        # A model class that still overrides the old name is called by it, which warns.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class LoraRun:
    """One LoRA fine-tuning run of the checkpoint in ``base`` on dataset ``ref``.

    ``on_checkpoint(step, path)`` is called after each checkpoint is written (the stage records
    it in the context). Call :meth:`setup`, :meth:`try_resume`, :meth:`fit`, then save.
    """

    def __init__(
        self,
        base: Path,
        base_key: str,
        settings: LoraFinetuneSettings,
        ref: DatasetRef,
        work_dir: Path,
        progress: ProgressFn,
        on_checkpoint: Callable[[int, Path], None] | None = None,
    ) -> None:
        self.base = Path(base)
        self.base_key = base_key
        self.s = settings
        self.ref = ref
        self.checkpoint_path = Path(work_dir) / CHECKPOINT_FILENAME
        self.progress = progress
        self.on_checkpoint = on_checkpoint
        self.state = LoraState()
        self.resumed_from_step = 0

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        s = self.s
        self.threads = thread_count(s.threads)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(s.device)
        self.plan = resolve_precision(s.mixed_precision, self.device)

        self.progress(0.0, "loading the checkpoint")
        model, self.tokenizer = load_checkpoint_folder(self.base)
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.max_length = min(s.max_seq_length, context) if context > 0 else s.max_seq_length
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

        self.progress(0.01, f"tokenizing dataset {s.dataset_id}")
        self.train: TrainData = build_examples(self.ref, self.tokenizer, "train", self.max_length)
        if not self.train.examples:
            raise PipelineError(
                f"dataset {s.dataset_id} leaves nothing to train on: its {self.train.rows} train "
                f"rows have no trained token within max_seq_length {self.max_length}"
            )
        self.val: list[Example] = []
        if s.eval_examples:
            val = build_examples(self.ref, self.tokenizer, "validation", self.max_length)
            self.val = val.examples[: s.eval_examples]

        self.target_modules = list(s.target_modules or default_target_modules(model))
        if s.gradient_checkpointing:
            _checkpoint_activations(model)
        model.config.use_cache = False
        torch.manual_seed(s.seed)  # the adapters' initial A matrices
        self.model = wrap_lora(model, s, self.target_modules, self.base_key).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.total_parameters = sum(p.numel() for p in self.model.parameters())

        self.batches_per_epoch = math.ceil(len(self.train.examples) / s.batch_size)
        self.steps_per_epoch = optimizer_steps_per_epoch(
            len(self.train.examples), s.batch_size, s.gradient_accumulation_steps
        )
        self.total_steps = s.max_steps or s.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.params, lr=s.learning_rate, weight_decay=s.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, s.warmup_ratio)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.plan.use_grad_scaler)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        import hashlib
        import json

        settings = {
            k: v for k, v in self.s.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT
        }
        identity = {
            "version": CHECKPOINT_VERSION,
            "settings": settings,
            "target_modules": self.target_modules,
            "base": folder_fingerprint(self.base),
            "dataset": {
                "id": self.ref.id,
                "sha256": file_sha256(Path(self.ref.path)),
                "splits": self.ref.splits,
                "examples": len(self.train.examples),
            },
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    # -- checkpoints ------------------------------------------------------------------------------

    def _adapter_state(self) -> dict[str, Any]:
        return {
            n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }

    def save(self, elapsed: float) -> None:
        """Write the checkpoint of the run as it is now (atomically)."""
        self.state.train_seconds = elapsed
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "state": asdict(self.state),
            "adapter": self._adapter_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        save_checkpoint(self.checkpoint_path, payload)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state.global_step, self.checkpoint_path)

    def try_resume(self) -> bool:
        """Continue from the checkpoint if one of this very run is there; True if it did."""
        import torch

        if not self.checkpoint_path.is_file():
            return False
        payload = load_checkpoint(self.checkpoint_path)
        if payload.get("version") != CHECKPOINT_VERSION or (
            payload.get("fingerprint") != self.fingerprint
        ):
            self.progress(0.02, "ignoring a checkpoint made with other settings, model or data")
            return False
        weights = payload["adapter"]
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != set(named):
            raise PipelineError(f"the checkpoint {self.checkpoint_path} holds other adapters")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(weights[name].to(param.device))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.plan.use_grad_scaler and payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        self.state = LoraState.from_dict(payload["state"])
        restore_rng_state(payload["rng"])
        self.resumed_from_step = self.state.global_step
        self.progress(self._fraction(), f"resuming from step {self.state.global_step}")
        logger.info("LoRA run resumed from step %d", self.state.global_step)
        return True

    # -- the loop ---------------------------------------------------------------------------------

    def _fraction(self) -> float:
        return TRAIN_SHARE * self.state.global_step / max(1, self.total_steps)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.s.seed + epoch).permutation(len(self.train.examples))

    def evaluate(self) -> float | None:
        """Mean loss per trained token of the validation examples (fp32), or None if none."""
        import torch

        if not self.val:
            return None
        training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.val), self.s.batch_size):
                chunk = self.val[start : start + self.s.batch_size]
                batch = collate(chunk, self.pad_id, self.device)
                fp32 = torch.autocast(self.device, enabled=False)
                total += float(token_loss_sum(self.model, batch, fp32))
                tokens += sum(e.trained_tokens for e in chunk)
        self.model.train(training)
        return total / max(1, tokens)

    def fit(self) -> None:
        """Train until ``total_steps`` optimizer steps are taken, checkpointing on the way."""

        s, st = self.s, self.state
        accum = s.gradient_accumulation_steps
        seconds_before = st.train_seconds
        started = time.perf_counter()

        def elapsed() -> float:
            return seconds_before + time.perf_counter() - started

        if st.global_step == 0 and st.initial_val_loss is None and self.val:
            self.progress(0.02, "measuring the validation loss before training")
            st.initial_val_loss = self.evaluate()
            st.history.append({"step": 0, "metrics": {"val_loss": st.initial_val_loss}})

        self.model.train()
        while st.global_step < self.total_steps:
            order = self._order(st.epoch)
            start = st.batch_in_epoch
            end = min(start + accum, self.batches_per_epoch)
            micro = [
                [
                    self.train.examples[int(i)]
                    for i in order[b * s.batch_size : (b + 1) * s.batch_size]
                ]
                for b in range(start, end)
            ]
            group_tokens = sum(e.trained_tokens for batch in micro for e in batch)
            step_started = time.perf_counter()
            loss_sum = 0.0
            for examples in micro:
                batch = collate(examples, self.pad_id, self.device)
                try:
                    loss = token_loss_sum(self.model, batch, self.plan.autocast())
                except PipelineError:
                    raise
                except RuntimeError as exc:
                    raise PipelineError(f"the training step failed: {exc}") from exc
                self.scaler.scale(loss / max(1, group_tokens)).backward()
                loss_sum += float(loss.detach())
                st.tokens_seen += int(batch["attention_mask"].sum())
            lr, clipped = optimizer_step(
                self.scaler, self.optimizer, self.scheduler, self.params, s.max_grad_norm
            )
            st.last_lr = lr
            st.clipped_steps += clipped

            st.global_step += 1
            st.batch_in_epoch = end
            if st.batch_in_epoch >= self.batches_per_epoch:
                st.epoch += 1
                st.batch_in_epoch = 0
            step_loss = loss_sum / max(1, group_tokens)
            if not math.isfinite(step_loss):
                raise PipelineError(
                    f"training diverged: the loss is {step_loss} at step {st.global_step}; lower "
                    'learning_rate (or use mixed_precision "no")'
                )
            if st.first_loss is None:
                st.first_loss = step_loss
            st.last_loss = step_loss
            st.trained_tokens += group_tokens
            st.interval_loss_sum += loss_sum
            st.interval_tokens += group_tokens
            last = st.global_step >= self.total_steps
            if st.global_step % s.log_every_steps == 0 or last:
                st.history.append(
                    {
                        "step": st.global_step,
                        "metrics": {
                            "loss": st.interval_loss_sum / max(1, st.interval_tokens),
                            "lr": lr,
                        },
                    }
                )
                st.interval_loss_sum, st.interval_tokens = 0.0, 0
            seconds = elapsed()
            if st.global_step % s.checkpoint_every_steps == 0 or last:
                self.save(seconds)
            tokens_per_s = sum(len(e.input_ids) for b in micro for e in b) / max(
                1e-9, time.perf_counter() - step_started
            )
            self.progress(
                self._fraction(),
                f"step {st.global_step}/{self.total_steps} loss {step_loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s:.0f} tokens/s",
            )
        st.train_seconds = elapsed()
        self.model.eval()

    # -- results ----------------------------------------------------------------------------------

    def metrics(self, val_loss: float | None) -> dict[str, float]:
        st = self.state
        trained_steps = max(1, st.global_step)
        result = {
            "final_loss": float(st.last_loss),
            "initial_loss": float(st.first_loss or 0.0),
            "steps": float(st.global_step),
            "epochs": round(st.epoch + st.batch_in_epoch / max(1, self.batches_per_epoch), 4),
            "train_seconds": round(st.train_seconds, 3),
            "seconds_per_step": round(st.train_seconds / trained_steps, 4),
            "tokens_per_second": round(st.tokens_seen / max(1e-9, st.train_seconds), 1),
            "trained_tokens": float(st.trained_tokens),
            "trainable_parameters": float(self.trainable),
            "trainable_percent": round(100.0 * self.trainable / max(1, self.total_parameters), 4),
            "train_sequences": float(len(self.train.examples)),
            "clipped_steps": float(st.clipped_steps),
            "resumed_from_step": float(self.resumed_from_step),
        }
        if st.initial_val_loss is not None:
            result["initial_val_loss"] = float(st.initial_val_loss)
        if val_loss is not None:
            result["val_loss"] = float(val_loss)
        return result
