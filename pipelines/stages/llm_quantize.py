"""quantize (text-generation): a checkpoint to weight-only INT8/INT4, or to bf16/fp16, held to
its parent's perplexity.

* ``int8`` / ``int4``: ONNX Runtime GenAI's model builder (:mod:`pipelines.llm.builder`) makes an
  ``ort_genai`` folder for the CPU: MatMulNBits weights in blocks of ``block_size``, RTN or
  k-quant; the embeddings kept float, and under int4 the LM head and the projections measured
  most sensitive (:mod:`pipelines.llm.sensitivity`) kept int8 by default, up to
  ``effective_bits`` (under int8 the LM head is int8 with the rest: measured on
  Gemma 3 270M, a float head halved decode speed for 0.2% perplexity).
* ``bf16`` / ``fp16``: the checkpoint's weights written in that dtype (an ``hf_checkpoint``).

The parent's and the new model's perplexity are measured on the same token ids: the test split
of the text dataset ``dataset_id`` names, or, with none, the built-in English sample
(:data:`pipelines.llm.perplexity.BUILTIN_SAMPLE`; the message says which). A model whose
perplexity rises more than ``max_ppl_increase`` (0.02: 2 %) over its parent's is NOT KEPT: nothing
is published and the parent stays current. The model is built in a scratch folder of the stage
and published as ``<stage>/model`` with one rename once it is judged, so a killed worker never
leaves a folder that looks complete.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    ProgressFn,
    StageSettings,
)
from pipelines.stages.base import Formats, Stage, StageOutcome, not_kept, settings_meta

__all__ = ["LlmQuantize", "LlmQuantizeSettings", "MODEL_DIR"]

#: The folder a stage publishes its model as, inside its stage directory.
MODEL_DIR = "model"
_INT = (Precision.INT8.value, Precision.INT4.value)
_FLOAT = (Precision.FP16.value, Precision.BF16.value)
# Calibrated on a GPU with Model Optimizer into a checkpoint TensorRT-LLM and vLLM load.
_MODELOPT = ("fp8", "int4_awq")


def _stored_precision(setting: str) -> str:
    """The precision a version records for a precision setting (int4_awq is int4)."""
    return Precision.INT4.value if setting == "int4_awq" else setting


class LlmQuantizeSettings(StageSettings):
    """Settings of quantize for a language model."""

    precision: Literal["int8", "int4", "fp16", "bf16", "fp8", "int4_awq"] = Field(
        "int8",
        description=(
            "int8 / int4: weight-only quantization to an ONNX Runtime GenAI model for the CPU; "
            "fp16 / bf16: the checkpoint's weights in that dtype; fp8 / int4_awq: calibrated "
            "on a GPU worker with NVIDIA Model Optimizer into a checkpoint for TensorRT-LLM "
            "(never run yet: no GPU so far)."
        ),
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="int8/int4: weights per quantization block (one scale per block)."
    )
    method: Literal["rtn", "k_quant"] = Field(
        "rtn",
        description=(
            "int8/int4: rtn rounds each weight to the nearest level; k_quant searches each "
            "block's scale (llama.cpp's k-quants), slower to build, often closer to the parent."
        ),
    )
    accuracy_level: int = Field(
        4,
        ge=1,
        le=4,
        description=(
            "int8/int4: what the CPU kernels compute in: 4 int8 activations (fastest), 3 bf16, "
            "2 fp16, 1 fp32."
        ),
    )
    keep_embeddings: bool = Field(
        True, description="int8/int4: keep the token embeddings float (not quantized)."
    )
    keep_lm_head: bool | None = Field(
        None,
        description=(
            "Keep the LM head above the body's precision (int8 under int4, float under int8): "
            "every token's distribution comes out of it. Default: on for int4, off for int8 "
            "(measured on Gemma 3 270M: an INT8 head cost +0.0% perplexity against a float "
            "one and decoded 2x faster, the head being most of the bytes read per token)."
        ),
    )
    symmetric: bool = Field(
        True,
        description="int8/int4: symmetric blocks (one scale); false adds a zero point per block.",
    )
    sensitive_layers: Literal["measured", "int8", "int4"] = Field(
        "measured",
        description=(
            "int4: which MatMuls stay int8. measured (default): each projection's loss "
            "increase under int4 and int8 is measured on calibration text (Model Optimizer "
            "AutoQuantize's gradient score) and the ones that buy the most per extra bit are "
            "kept int8 up to effective_bits (a model without Llama-style projections falls "
            "back to int8, said in the message); int8: llama.cpp's mixed strategy (the first "
            "and last eighth of the layers and every third layer's qkv/v/down projections); "
            "int4: none, all like the rest. Measured on Gemma 3 270M at llama.cpp's budget: "
            "+24.9% perplexity against its +38.7% (RTN), see the README."
        ),
    )
    effective_bits: float = Field(
        5.0,
        ge=4.0,
        le=8.0,
        description=(
            "int4 with measured sensitive layers: the decoder body's average bits a weight "
            "(4: all int4; 5: a quarter of the weights int8; 8: all int8). The LM head is "
            "counted apart (keep_lm_head)."
        ),
    )
    calibration_tokens: int = Field(
        4096,
        ge=2,
        le=1_048_576,
        description=(
            "int4 with measured sensitive layers: about this many tokens the sensitivity is "
            "measured on, in windows of at most max_length (the train split of dataset_id, or "
            "the built-in sample, which is shorter)."
        ),
    )
    max_ppl_increase: float = Field(
        0.02,
        ge=-1.0,
        le=100.0,
        description=(
            "A model whose perplexity is more than this fraction above its parent's (0.02: 2%) "
            "is not kept; the parent stays current."
        ),
    )
    dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "A text dataset whose test split perplexity is measured on; none: a built-in short "
            "English sample (a rough check)."
        ),
    )
    max_length: int = Field(
        512, ge=2, le=1_048_576, description="Tokens per perplexity window (capped at the context)."
    )
    max_texts: int = Field(
        200, ge=1, le=100_000, description="At most this many texts of the split are scored."
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads (default: the worker's engine threads)."
    )
    timeout_s: int = Field(
        3600, ge=30, le=86_400, description="The model builder is stopped after this long."
    )


def _scaled(progress: ProgressFn, lo: float, span: float, what: str) -> Callable[[float], None]:
    return lambda f: progress(lo + span * f, f"{what}: {f * 100:.0f}%")


def load_eval_texts(
    ctx: PipelineContext, dataset_id: int | None, split: str, max_texts: int, purpose: str
) -> tuple[list[str], str]:
    """The texts perplexity is measured on, and how the message names them."""
    from pipelines.llm.perplexity import BUILTIN_SAMPLE

    if dataset_id is None:
        return list(BUILTIN_SAMPLE), "the built-in English sample (no dataset_id given)"
    from pipelines.datasets.text_corpus import load_texts

    ref = ctx.dataset(dataset_id, purpose)
    texts = [t for t in load_texts(ref, split) if t.strip()][:max_texts]
    if not texts:
        raise PipelineError(f"the {split} split of dataset {ref.id} has no text to measure on")
    return texts, f"{len(texts)} texts of the {split} split of dataset {ref.id}"


@dataclass(frozen=True)
class MeasuredInt8:
    """What the sensitivity measurement chose for an int4 build, and what it rests on."""

    calibration: str  # "4096 tokens of ..."
    calibration_tokens: int
    effective_bits: float  # the body's average bits a weight
    int8_share: float  # of the body's weights
    int8_nodes: tuple[str, ...]
    ranking: list[dict[str, object]]  # every projection, most loss saved per bit first


def _measure_sensitivity(
    ctx: PipelineContext, s: LlmQuantizeSettings, parent: object, progress: ProgressFn
) -> MeasuredInt8 | None:
    """Each projection's INT4 and INT8 cost on calibration text, and the ones kept INT8 under
    ``effective_bits`` (progress 0.1 to 0.2); None when the model has no Llama-style
    projections to measure (llama.cpp's list is used instead)."""
    from pipelines.llm.perplexity import windows
    from pipelines.llm.sensitivity import choose_int8, measure_sensitivity, projections

    model = getattr(parent, "model", None)
    if model is None or getattr(parent, "backend", "") != "torch":
        raise PipelineError(
            "measured sensitive layers need the parent as a torch checkpoint; use "
            "sensitive_layers int8 (llama.cpp's list) for this model"
        )
    if not projections(model):
        return None
    texts, source = load_eval_texts(ctx, s.dataset_id, "train", s.max_texts, "quantize")
    calibration: list[list[int]] = []
    tokens = 0
    for text in texts:
        for window in windows(parent.encode(text), s.max_length):  # type: ignore[attr-defined]
            if tokens >= s.calibration_tokens:
                break
            calibration.append(window)
            tokens += len(window)
        if tokens >= s.calibration_tokens:
            break
    progress(0.1, f"sensitivity of each projection on {tokens} tokens of {source}")
    costs = measure_sensitivity(
        model,
        calibration,
        block_size=s.block_size,
        symmetric=s.symmetric,
        progress=lambda f, m: progress(0.1 + 0.1 * f, m),
    )
    chosen = choose_int8(costs, s.effective_bits)
    body = sum(c.params for c in costs)
    int8 = sum(c.params for c in chosen)
    ranked = sorted(costs, key=lambda c: c.gain_per_param, reverse=True)
    return MeasuredInt8(
        calibration=f"{tokens} tokens of {source}",
        calibration_tokens=tokens,
        effective_bits=round(4.0 + 4.0 * int8 / body, 4) if body else 4.0,
        int8_share=round(int8 / body, 4) if body else 0.0,
        int8_nodes=tuple(c.node for c in chosen),
        ranking=[
            {"node": c.node, "params": c.params, "int4": c.int4, "int8": c.int8} for c in ranked
        ],
    )


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics JSON and MLflow can hold (an infinite perplexity is said in the message)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


class LlmQuantize(Stage[LlmQuantizeSettings]):
    """Weight-only int8/int4 (ONNX Runtime GenAI) or bf16/fp16, held to the parent's perplexity."""

    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "Quantize a language model checkpoint: weight-only int8 or int4 through ONNX Runtime "
        "GenAI's model builder (block size, RTN or k-quant, accuracy level; under int4 the LM "
        "head and the most sensitive layers kept int8 by default), bf16/fp16 weights, or "
        "fp8/int4_awq through Model Optimizer on a GPU worker. A model whose "
        "perplexity rises more than max_ppl_increase over its parent's is not kept."
    )
    Settings: ClassVar[type[StageSettings]] = LlmQuantizeSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.HF_CHECKPOINT.value,)
    produces: ClassVar[str | None] = ModelFormat.ORT_GENAI.value

    @classmethod
    def produces_for(cls, settings: StageSettings) -> Formats:
        if isinstance(settings, LlmQuantizeSettings) and settings.precision in _FLOAT + _MODELOPT:
            return ModelFormat.HF_CHECKPOINT.value
        return ModelFormat.ORT_GENAI.value

    @classmethod
    def format_hint(cls, settings: StageSettings) -> str | None:
        return (
            "quantize takes a Hugging Face checkpoint: merge a LoRA adapter first; an ONNX "
            "Runtime GenAI model is quantized already"
        )

    @classmethod
    def precision_for(
        cls, settings: StageSettings | None, precision: str | None
    ) -> tuple[str | None, str | None]:
        """It leaves the precision asked for; it refuses a model that is int already, or that
        is in the precision asked for."""
        target = _stored_precision(
            settings.precision if isinstance(settings, LlmQuantizeSettings) else "int8"
        )
        if precision in _INT or precision == Precision.FP8.value:
            return target, (
                f"the model is {precision} at that point; quantize its float checkpoint instead"
            )
        if precision == target:
            return target, f"the model is already {precision} at that point; remove this stage"
        return target, None

    def _pre_run(self, ctx: PipelineContext, settings: LlmQuantizeSettings) -> None:
        super()._pre_run(ctx, settings)
        source = ctx.current_artifact
        refusal = self.precision_for(settings, source.precision)[1]
        if refusal is not None:
            raise PipelineError(refusal.replace("at that point", f"({source.key})"))
        if not Path(source.path).is_dir():
            raise PipelineError(f"the checkpoint folder of {source.key} is missing")
        if settings.precision in _INT:
            from pipelines.llm.builder import builder_problem

            problem = builder_problem(Path(source.path))
            if problem is not None:
                raise PipelineError(f"{problem}; quantize it to bf16 or fp16 instead")
        if settings.precision in _MODELOPT:
            from pipelines.llm.modelopt_ptq import modelopt_problem

            problem = modelopt_problem()
            if problem is not None:
                raise PipelineError(problem)
        if settings.dataset_id is not None:  # a missing dataset fails now, not after the build
            ctx.dataset(settings.dataset_id, "quantize dataset_id")

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: LlmQuantizeSettings, progress: ProgressFn
    ) -> StageOutcome:
        from pipelines.llm.builder import (
            BuildSettings,
            build_ort_genai,
            convert_checkpoint,
            folder_bytes,
        )
        from pipelines.llm.perplexity import measure_perplexity
        from pipelines.llm.runtime import open_in_context, open_text_model
        from pipelines.staging import scratch_dir

        source = ctx.current_artifact
        texts, judged_on = load_eval_texts(ctx, s.dataset_id, "test", s.max_texts, "quantize")
        stage_dir = ctx.stage_dir(stage_id)
        final = stage_dir / MODEL_DIR
        fmt = str(self.produces_for(s))

        progress(0.0, f"perplexity of {source.key} on {judged_on}")
        with open_in_context(ctx, source, threads=s.threads) as parent_model:
            ids = [parent_model.encode(t) for t in texts]
            before = measure_perplexity(
                parent_model, ids, s.max_length, _scaled(progress, 0.0, 0.1, source.key)
            )
            sensitivity = None
            if s.precision == "int4" and s.sensitive_layers == "measured":
                sensitivity = _measure_sensitivity(ctx, s, parent_model, progress)
        notes: list[str] = []
        meta: dict[str, object] = {}
        sensitive_layers = s.sensitive_layers
        if sensitivity is not None:  # its nodes, and nothing else, int8 (none at 4 bits)
            meta["sensitivity"] = {
                **asdict(sensitivity),
                "int8_nodes": list(sensitivity.int8_nodes),
            }
            sensitive_layers = "int4"
        elif s.sensitive_layers == "measured":
            sensitive_layers = "int8"
            if s.precision == "int4":
                notes.append(
                    "no Llama-style projections to measure: llama.cpp's sensitive layers kept int8"
                )
        build_from = 0.2 if sensitivity is not None else 0.1
        with scratch_dir(stage_dir) as scratch:
            out = scratch / MODEL_DIR
            if s.precision in _INT:
                import onnxruntime_genai

                built = build_ort_genai(
                    Path(source.path),
                    out,
                    scratch / "cache",
                    BuildSettings(
                        s.precision,
                        s.block_size,
                        s.method,
                        s.accuracy_level,
                        s.keep_embeddings,
                        s.precision == "int4" if s.keep_lm_head is None else s.keep_lm_head,
                        sensitive_layers,
                        s.symmetric,
                        sensitivity.int8_nodes if sensitivity is not None else (),
                    ),
                    lambda f, m: progress(build_from + (0.8 - build_from) * f, m),
                    timeout_s=s.timeout_s,
                    threads=s.threads,
                )
                shutil.rmtree(scratch / "cache", ignore_errors=True)
                notes += built.notes
                meta.update(
                    builder_options=built.extra_options,
                    build_seconds=built.seconds,
                    onnxruntime_genai_version=onnxruntime_genai.__version__,
                )
            elif s.precision in _MODELOPT:
                from pipelines.llm.modelopt_ptq import quantize_with_modelopt

                calibrated = quantize_with_modelopt(
                    Path(source.path),
                    out,
                    s.precision,
                    texts,
                    ids,
                    lambda f, m: progress(0.1 + 0.85 * f, m),
                    max_length=s.max_length,
                )
            else:
                progress(0.1, f"writing the checkpoint's weights in {s.precision}")
                convert_checkpoint(Path(source.path), out, s.precision, s.threads)
            candidate = Artifact(
                key=stage_id,
                path=str(out),
                format=fmt,
                precision=_stored_precision(s.precision),
                inputs=[],
                outputs=[],
                parent=source.key,
                produced_by=self.name,
            )
            progress(0.8, f"perplexity of the {s.precision} model on {judged_on}")
            if s.precision in _MODELOPT:  # measured on the calibrated model, on the GPU
                after = replace(before, perplexity=calibrated)
                same_tokens = True
            else:
                with open_text_model(candidate, threads=s.threads) as model:
                    after = measure_perplexity(
                        model, ids, s.max_length, _scaled(progress, 0.8, 0.15, s.precision)
                    )
                    same_tokens = all(model.encode(t) == i for t, i in zip(texts, ids, strict=True))
            if not same_tokens:
                notes.append(
                    "its tokenizer encodes the texts differently from the parent's; both were "
                    "scored on the parent's tokens"
                )
            increase = after.perplexity / before.perplexity - 1.0
            size, parent_size = folder_bytes(out), folder_bytes(Path(source.path))
            metrics = _finite(
                {
                    "perplexity": after.perplexity,
                    "parent_perplexity": before.perplexity,
                    "ppl_increase": increase,
                    "ppl_tokens": float(after.tokens),
                    "size_bytes": float(size),
                    "size_ratio": size / parent_size if parent_size else 1.0,
                    **(
                        {"body_effective_bits": sensitivity.effective_bits}
                        if sensitivity is not None
                        else {}
                    ),
                }
            )
            measured = (
                f"perplexity {after.perplexity:.4g} vs parent {before.perplexity:.4g} "
                f"({increase:+.2%}) on {judged_on}, {after.tokens} tokens"
            )
            if not math.isfinite(increase) or increase > s.max_ppl_increase:
                if final.exists():  # what an earlier, killed run published is not this run's
                    shutil.rmtree(final)
                return not_kept(
                    f"perplexity {increase:+.2%} > {s.max_ppl_increase:+.2%}",
                    f"{measured}; the {s.precision} model is not registered; later stages use "
                    "the parent",
                    settings=s,
                    parent=source.key,
                    metrics=metrics,
                )
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)

        candidate.path = str(final)
        candidate.metrics = dict(metrics)
        candidate.meta = {
            **meta,
            "settings": settings_meta(s),
            "perplexity": {
                "judged_on": judged_on,
                "dataset_id": s.dataset_id,
                "split": "test" if s.dataset_id is not None else None,
                "tokens": after.tokens,
                "texts": after.texts,
                "max_length": s.max_length,
            },
            **({"notes": notes} if notes else {}),
        }
        ctx.add_artifact(candidate)
        progress(1.0, "quantized")
        what = (
            f"weight-only {s.precision} ({s.method}, block {s.block_size}) for ONNX Runtime GenAI"
            if s.precision in _INT
            else f"{s.precision} checkpoint"
        )
        if sensitivity is not None:
            what += (
                f", {sensitivity.int8_share:.0%} of the body's weights int8 by measured "
                f"sensitivity ({sensitivity.effective_bits:g} bits a weight; "
                f"{sensitivity.calibration})"
            )
        message = f"{what}: {measured}; size x{metrics['size_ratio']:.2f}"
        if notes:
            message += f" ({'; '.join(notes)})"
        return StageOutcome(outputs=[candidate.key], metrics=metrics, message=message)
