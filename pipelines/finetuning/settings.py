"""The finetune stage's settings, below the stage and the trainer that read them.

``validate_pipeline`` checks them in the web process, so this module imports pydantic only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.core import StageSettings

# The tasks fine-tuning has a loss for; any other task (or none) is refused by the stage.
TASKS = ("classification", "regression", "embedding")


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
