"""quantize's settings, and the precision rule validate_pipeline follows through a pipeline.

Kept apart from the stage and the converters so the web process (which validates pipelines) loads
neither onnx nor onnxruntime, and so the rule lives beside the modes it is about.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from pipelines.core import Precision, StageSettings

__all__ = [
    "FLOAT_MODES",
    "INT8_MODES",
    "MODE_PRECISION",
    "QuantizeSettings",
    "precision_problem",
    "quantize_precision",
]

OpType = Annotated[str, Field(pattern=r"^([A-Za-z][A-Za-z0-9_]*|\*)$", max_length=64)]
# The ops int8 quantizes by default: those that carry the weights and the matrix products. The
# rest (LayerNormalization, Softmax, Gelu, Add, Where, Shape, ...) stay float: quantizing every op
# type took a transformer encoder's cosine to its FP32 outputs down to 0.32, and made it slower.
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
Mode = Literal["int8_dynamic", "int8_static", "fp16", "bf16"]
CalibrateMethod = Literal["minmax", "entropy", "percentile"]

# The precision each mode leaves the model in.
MODE_PRECISION: dict[str, str] = {
    "int8_dynamic": Precision.INT8.value,
    "int8_static": Precision.INT8.value,
    "fp16": Precision.FP16.value,
    "bf16": Precision.BF16.value,
}
INT8_MODES = ("int8_dynamic", "int8_static")
FLOAT_MODES = ("fp16", "bf16")


def _listed(names: list[str], verb: str) -> str:
    """``a applies`` / ``a, b apply``: setting names and a verb that agrees with them."""
    if len(names) == 1:
        verb = verb.replace("apply", "applies") if "apply" in verb else verb + "s"
    return f"{', '.join(names)} {verb}"


class QuantizeSettings(StageSettings):
    """Settings of quantize."""

    mode: Mode = Field(
        "int8_dynamic",
        description=(
            "int8_dynamic: int8 weights, activations quantized per batch at run time; no data "
            "needed. int8_static: int8 weights and activations in QDQ form (TensorRT and "
            "onnxruntime run it), activation ranges calibrated on calibration_dataset_id. "
            "fp16 / bf16: half-precision floats; about half the size."
        ),
    )
    per_channel: bool | None = Field(
        None,
        description=(
            "int8 modes: one weight scale per output channel instead of one per tensor (more "
            "accurate, slightly larger). Unset: per channel for int8_static, per tensor for "
            "int8_dynamic."
        ),
    )
    reduce_range: bool | None = Field(
        None,
        description=(
            "int8 modes: quantize weights to 7 bits. Avoids overflow in the int8 kernels of x86 "
            "CPUs without VNNI; costs some accuracy elsewhere. Unset: 7 bits where the worker "
            "quantizing is such a CPU (the model is judged there), 8 bits otherwise."
        ),
    )
    op_types: list[OpType] | None = Field(
        None,
        min_length=1,
        description=(
            'int8 modes: op types to quantize, e.g. ["MatMul", "Gemm"]; unset: the weight-'
            "bearing ops (MatMul, Gemm, Conv), keeping LayerNorm, Softmax, activations, Add and "
            'shape ops in float, which quantized break transformers. ["*"]: every op type the '
            "mode supports."
        ),
    )
    calibration_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "int8_static (required): the dataset whose train split calibrates the activation "
            "ranges; its rows must have the model's input shape. Also the evaluation dataset "
            "when eval_dataset_id is unset."
        ),
    )
    calibrate_method: CalibrateMethod = Field(
        "minmax",
        description=(
            "int8_static: how activation ranges are chosen from the calibration data. minmax: the "
            "observed min and max; entropy: the range that keeps the histogram's information "
            "(KL divergence); percentile: clips the extreme 0.001% of values."
        ),
    )
    calibration_samples: int = Field(
        256,
        ge=1,
        le=100_000,
        description="int8_static: how many rows of the calibration train split to run.",
    )
    keep_io_types: bool = Field(
        True,
        description=(
            "fp16 / bf16: keep float32 model inputs and outputs (casts at the edges), so callers "
            "keep sending and receiving float32. Off: inputs and outputs become fp16 / bf16."
        ),
    )
    eval_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "Dataset to measure the model's task metric on, before and after quantization; unset: "
            "calibration_dataset_id if set, else no accuracy check."
        ),
    )
    eval_split: Literal["validation", "test"] = Field(
        "validation", description="The split of the evaluation dataset to measure on."
    )
    min_retention: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description=(
            "Least fraction of the parent's metric the quantized model must keep (0.99: at most "
            "1% worse) to be registered; below it, later stages run on the parent instead. With "
            "no evaluation dataset, a classifier is judged on generated inputs and must agree "
            "with the parent's top-1 class on this fraction of them."
        ),
    )
    min_cosine: float = Field(
        0.99,
        ge=-1.0,
        le=1.0,
        description=(
            "Where the task's metric cannot be measured (no evaluation dataset, or one without "
            "targets) and the model is not a classifier: the least cosine similarity between "
            "the quantized model's outputs and the parent's, on every judged row, for it to be "
            "registered."
        ),
    )
    keep_below_threshold: bool = Field(
        False,
        description=(
            "Register the quantized model even when it is under min_retention (or min_cosine)."
        ),
    )
    sensitivity_search: bool = Field(
        True,
        description=(
            "int8 modes: when the quantized model keeps less than min_retention, rank the weight "
            "nodes by the output error their quantization alone causes (on a few calibration or "
            "evaluation rows, against the FP32 run) and keep the worst in float, 1, 2, 4, ... "
            "of them, until retention holds or max_excluded_fraction is reached; the nodes kept "
            "in float are recorded. Off: a model under min_retention is refused as it is."
        ),
    )
    max_excluded_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description=(
            "int8 modes: the largest share of the weight nodes the sensitivity search may keep "
            "in float (at least one node)."
        ),
    )

    @model_validator(mode="after")
    def _check_mode_settings(self) -> QuantizeSettings:
        # Only values that differ from the default count as "set": a validated pipeline is stored
        # with every field written out and must validate again as it is.
        problems: list[str] = []
        if self.mode == "int8_static" and self.calibration_dataset_id is None:
            problems.append(
                "int8_static needs calibration_dataset_id: the dataset whose train split "
                'calibrates the activation ranges (e.g. {"calibration_dataset_id": 3}); '
                "int8_dynamic needs none"
            )
        if self.mode != "int8_static":
            used = [
                name
                for name in ("calibration_dataset_id", "calibrate_method", "calibration_samples")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(f"{_listed(used, 'only apply')} to mode int8_static")
        if self.mode in FLOAT_MODES:
            used = [
                name
                for name in (
                    "per_channel",
                    "reduce_range",
                    "op_types",
                    "sensitivity_search",
                    "max_excluded_fraction",
                )
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(f"{_listed(used, 'only apply')} to the int8 modes")
        elif not self.keep_io_types:
            problems.append("keep_io_types only applies to modes fp16 and bf16")
        if self.effective_eval_dataset_id is None:
            used = [
                name
                for name in ("eval_split",)
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(
                    f"{_listed(used, 'need')} an evaluation dataset: set eval_dataset_id"
                )
        if problems:
            raise PydanticCustomError("quantize_settings", "; ".join(problems))
        return self

    @property
    def effective_eval_dataset_id(self) -> int | None:
        """The dataset retention is measured on: eval_dataset_id, else calibration_dataset_id."""
        if self.eval_dataset_id is not None:
            return self.eval_dataset_id
        return self.calibration_dataset_id

    @property
    def effective_op_types(self) -> list[str] | None:
        """What the quantizer is told to quantize (None: everything it supports)."""
        if self.op_types is None:
            return list(WEIGHT_OPS)
        return None if self.op_types == ["*"] else list(self.op_types)

    @property
    def effective_per_channel(self) -> bool:
        if self.per_channel is not None:
            return self.per_channel
        return self.mode == "int8_static"


def precision_problem(mode: str, precision: str | None) -> str | None:
    """Why quantize in ``mode`` cannot take a model of ``precision``; None when it can.

    The phrase follows "the model ...": "is already int8". Every mode starts from fp32 (or from a
    model whose precision is unknown): quantizing a quantized model only adds error.
    """
    if precision is None or precision == Precision.FP32.value:
        return None
    if precision == MODE_PRECISION.get(mode, Precision.INT8.value):
        return f"is already {precision}"
    return f"is {precision}, and {mode} starts from the fp32 model"


def quantize_precision(
    settings: StageSettings | None, precision: str | None
) -> tuple[str, str | None]:
    """For validate_pipeline: the precision quantize leaves, and why it refuses the model (or None).

    The refusal follows "stage N (quantize): ". ``settings`` None (they did not validate): every
    mode leaves a quantized model, and none takes one that is already int8, fp16 or bf16.
    """
    if not isinstance(settings, QuantizeSettings):
        quantized = (Precision.INT8.value, Precision.FP16.value, Precision.BF16.value)
        refusal = None
        if precision in quantized:
            refusal = f"the model is already {precision} at that point; remove this stage"
        return Precision.INT8.value, refusal
    mode = settings.mode
    target = MODE_PRECISION[mode]
    refusal = None
    if precision_problem(mode, precision) is None:
        pass
    elif precision == target:
        refusal = f"the model is already {precision} at that point; remove this stage"
    else:
        refusal = (
            f"the model is {precision} at that point, and {mode} starts from the fp32 model; "
            f"quantize once, from fp32: remove this stage or the one that made it {precision}"
        )
    return target, refusal
