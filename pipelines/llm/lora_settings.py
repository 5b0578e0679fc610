"""The language-model finetune stage's settings (LoRA), below the stage and the run that read them.

``validate_pipeline`` checks them in the web process, so this module imports pydantic only.
The names follow the tensor finetune's where they mean the same thing (``dataset_id``,
``learning_rate``, ``warmup_ratio``, ``gradient_accumulation_steps``, ``max_grad_norm``,
``mixed_precision``, ``checkpoint_every_steps``, ``seed``, ``device``), so a user who knows one
knows the other.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.core import StageSettings

# A module name as peft matches it: the last part of a dotted module path (q_proj, c_attn).
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class LoraFinetuneSettings(StageSettings):
    """Settings of finetune for a text-generation checkpoint (LoRA adapters through peft)."""

    dataset_id: int = Field(
        ...,
        ge=1,
        description=(
            "Id of the text dataset to train on: text (language modelling), prompt/completion "
            "(the loss is on the completion only) or messages (chat, through the tokenizer's "
            "chat template; the loss is on the assistant turns). Its train split is trained on, "
            "its validation split gives the loss before and after."
        ),
    )
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r of each adapter (A is r x in).")
    alpha: float = Field(
        16.0, gt=0.0, le=4096.0, description="LoRA alpha: the update is scaled by alpha / rank."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description=(
            "Names of the Linear modules that get adapters (e.g. q_proj, v_proj). Default: every "
            "attention and MLP projection the model has (q/k/v/o_proj, gate/up/down_proj for "
            "Llama-likes; c_attn, c_proj, c_fc for GPT-2), never lm_head or the embeddings."
        ),
    )
    learning_rate: float = Field(
        2e-4, gt=0.0, le=1.0, description="Peak AdamW learning rate, reached after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay.")
    warmup_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the optimizer steps over which the learning rate rises linearly; after "
            "it, the rate follows a cosine down to 0 at the last step."
        ),
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Sequences per forward/backward pass.")
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "Micro-batches whose gradients are summed before each optimizer step (the loss is "
            "the mean over all their trained tokens): an effective batch of batch_size x this."
        ),
    )
    max_grad_norm: float = Field(
        1.0, ge=0.0, le=1e6, description="Clip the gradients' global L2 norm to this; 0 disables."
    )
    max_seq_length: int = Field(
        512,
        ge=8,
        le=131072,
        description=(
            "Longest sequence trained on, in tokens (at most the model's context length). A "
            "longer text is cut into windows of this length; a longer prompt/completion or "
            "conversation keeps its start."
        ),
    )
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the train split.")
    max_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Optimizer steps to take; when set it replaces epochs (the data repeats).",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Autocast precision of the forward pass. auto: bf16 on the CPU "
            '(torch.autocast("cpu", bfloat16)); on a GPU bf16 where supported, else fp16 with '
            "loss scaling. The adapter weights and optimizer stay fp32."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute each layer's activations in the backward pass instead of keeping them: "
            "less memory for longer sequences, about a third more compute."
        ),
    )
    checkpoint_every_steps: int = Field(
        50,
        ge=1,
        le=1_000_000,
        description=(
            "Save a resumable checkpoint (adapter weights, optimizer, schedule, position, RNG) "
            "every this many optimizer steps, so a killed worker loses at most this much work."
        ),
    )
    log_every_steps: int = Field(
        10, ge=1, le=100_000, description="Steps between two points of the logged loss curve."
    )
    eval_examples: int = Field(
        64,
        ge=0,
        le=100_000,
        description=(
            "Validation sequences whose loss is measured before and after training; 0 skips it."
        ),
    )
    merge: bool = Field(
        False,
        description=(
            "Also merge the adapter into the base weights and register the merged checkpoint, "
            "which then becomes current (what quantize takes); else the adapter is current."
        ),
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the data order, init, dropout.")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads torch uses (default: R1_ENGINE_THREADS, else every core).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto takes the GPU when the worker has one."
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one module name, or leave it out for the default")
        for name in value:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name such as q_proj")
        if any(name in ("lm_head", "embed_tokens", "wte", "wpe") for name in value):
            raise ValueError("adapters go on projections, not on lm_head or the embeddings")
        return sorted(set(value))

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> LoraFinetuneSettings:
        if self.device == "cpu" and self.mixed_precision == "fp16":
            raise ValueError(
                'mixed_precision "fp16" needs a CUDA GPU; with device "cpu" use "bf16" or "no"'
            )
        return self
