"""quantize: ONNX fp32 -> int8 (dynamic or static QDQ), fp16 or bf16, gated on accuracy retention.

Modes:

* ``int8_dynamic``: ``quantize_dynamic``; weights int8, activations quantized per batch at run
  time. No data needed.
* ``int8_static``: ``quantize_static`` in QDQ form (explicit QuantizeLinear/DequantizeLinear pairs,
  what TensorRT consumes now that its implicit INT8 calibrators are deprecated, and what
  onnxruntime runs), symmetric int8 weights and activations (TensorRT wants zero points of 0),
  weights per channel; activation ranges come from running the model over a calibration dataset.
* ``fp16``: ``convert_float_to_float16``; inputs and outputs stay float32 by default, so callers
  see the same contract.
* ``bf16``: the same conversion to bfloat16, kept only if a provider of this worker runs it.

When an evaluation dataset is known, the primary metric of the model's task is measured on the
parent and on the new model; a model that keeps less than ``min_retention`` of it is not
registered (unless ``keep_below_threshold``) and the parent stays the current artifact. Where the
metric cannot be measured (no dataset: the default pipeline), the new model is still judged
against the parent (:mod:`pipelines.judging`): top-1 agreement for a classifier, held to
``min_retention``, else the least per-row cosine, held to ``min_cosine``; on the eval split's rows
when a dataset is known, else on inputs generated from the declared shapes. A model under its
threshold ends the stage NOT_KEPT, which the dashboard shows amber with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
)
from pipelines.judging import Judgement, Unjudgeable, judge
from pipelines.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    external_data_files,
    human_bytes,
    model_size_bytes,
    read_tensor_specs,
    uses_external_data,
)
from pipelines.quantization.checks import Made, check_runs
from pipelines.quantization.graph import describe_counts
from pipelines.quantization.retention import (
    Evaluation,
    JudgeOnRows,
    Unmeasurable,
    measure_retention,
    pct,
)
from pipelines.quantization.settings import (
    INT8_MODES,
    MODE_PRECISION,
    QuantizeSettings,
    precision_problem,
    quantize_precision,
)
from pipelines.stages.base import ONNX_FILENAME, Stage, StageOutcome, not_kept, settings_meta
from pipelines.staging import scratch_dir, staged_output

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Quantize"]


class _NotRegistered(Exception):
    """Raised inside the staging block so that a refused model is never published."""

    def __init__(
        self,
        verdict: str,
        made: Made,
        out_bytes: int,
        evaluation: Evaluation | None,
        judgement: Judgement | None,
    ) -> None:
        super().__init__(verdict)
        self.verdict = verdict
        self.made = made
        self.out_bytes = out_bytes
        self.evaluation = evaluation
        self.judgement = judgement


def _judge(
    ctx: PipelineContext,
    source: Artifact,
    candidate: Artifact,
    s: QuantizeSettings,
    made: Made,
    dataset_id: int | None,
    progress: ProgressFn,
) -> tuple[Judgement | None, str, Mapping[str, np.ndarray] | None]:
    """The new model against its parent where no task metric holds it (pipelines.judging): on
    the eval split's rows when a dataset is known, else on generated inputs. (None, why) when
    the parent itself cannot run them: nothing to judge against is not a reason to refuse.
    The dataset rows it judged on come back too (None: generated), for the search to reuse."""
    inputs, judged_on = None, "generated"
    if dataset_id is not None:
        from pipelines.datasets import load_split

        data = load_split(ctx.dataset(dataset_id, "eval_dataset_id"), s.eval_split, source.inputs)
        if data.rows:
            inputs, judged_on = data.inputs, f"dataset {dataset_id} ({s.eval_split})"
    where = "generated inputs" if inputs is None else f"rows of {judged_on}"
    progress(0.85, f"judging the {s.mode} model against its parent on {where}")
    try:
        found = judge(
            source,
            candidate,
            ctx.task,
            inputs=inputs,
            judged_on=judged_on,
            candidate_device=_device(made),
        )
    except Unjudgeable as exc:
        return None, f"not judged: {exc}", inputs
    return found, "", inputs


def _device(made: Made) -> str:
    """Where the quantized model runs to be judged: where its check ran."""
    return "cuda" if "CUDAExecutionProvider" in made.providers else "cpu"


def _verdict(
    s: QuantizeSettings, evaluation: Evaluation | None, judgement: Judgement | None
) -> str | None:
    """Why the new model is under its threshold (``retention 96.3% < 99.0%``), or None."""
    if evaluation is not None:
        if evaluation.retention >= s.min_retention:
            return None
        kept, wanted = evaluation.retention, s.min_retention
        return f"retention {pct(kept, wanted)} < {pct(wanted, kept)}"
    if judgement is None:
        return None
    threshold = s.min_retention if judgement.metric == "agreement" else s.min_cosine
    return None if judgement.passes(threshold) else judgement.verdict(threshold)


def _remove_stale_output(stage_dir: Path) -> None:
    """A model an earlier, killed run of this stage published is not an output of this one."""
    final = stage_dir / ONNX_FILENAME
    if final.is_file():
        for extra in external_data_files(final):
            extra.unlink(missing_ok=True)
        final.unlink()


def _convert(
    ctx: PipelineContext,
    source: Artifact,
    s: QuantizeSettings,
    scratch: Path,
    out: Path,
    external: bool,
    progress: ProgressFn,
) -> tuple[Made, bool | None, str | None]:
    """Write ``source`` in ``s.mode`` to ``out``; whether the int8 pre-processing ran (None:
    a float mode, which has none), and the file the int8 quantizer was given (None: float)."""
    if s.mode not in INT8_MODES:
        from pipelines.quantization.floats import convert_to_float

        progress(0.0, f"converting the model to {s.mode}")
        return convert_to_float(source, out, scratch, s, external), None, None
    from pipelines.onnx_io import copy_onnx
    from pipelines.quantization.int8 import int8_dynamic, int8_static, preprocess

    progress(0.0, "pre-processing the model for quantization")
    pre = preprocess(source, scratch, external)
    # Never the stored file itself: the quantizer writes beside what it is given.
    to_quantize = pre or str(copy_onnx(source.path, scratch))
    if s.mode == "int8_dynamic":
        progress(0.3, "quantizing weights to int8")
        made = int8_dynamic(source, to_quantize, out, s, external)
    else:
        made = int8_static(ctx, source, to_quantize, out, s, external, progress)
    return made, pre is not None, to_quantize


class Quantize(Stage[QuantizeSettings]):
    """int8 (dynamic or static QDQ), fp16 or bf16, checked against the parent's task metric."""

    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "Quantize an fp32 ONNX model: int8_dynamic (no data needed), int8_static (QDQ, calibrated "
        "on a dataset; runs on TensorRT and onnxruntime), fp16 or bf16. With an evaluation "
        "dataset, a model that keeps less than min_retention of the parent's metric is not "
        "registered; without one, it is judged against the parent on generated inputs (top-1 "
        "agreement for a classifier, else cosine) and held to min_retention or min_cosine."
    )
    Settings: ClassVar[type[StageSettings]] = QuantizeSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    @classmethod
    def precision_for(
        cls, settings: StageSettings | None, precision: str | None
    ) -> tuple[str | None, str | None]:
        """Every mode starts from fp32 and leaves the mode's precision (int8, fp16 or bf16)."""
        return quantize_precision(settings, precision)

    def _pre_run(self, ctx: PipelineContext, settings: QuantizeSettings) -> None:
        super()._pre_run(ctx, settings)
        source = ctx.current_artifact
        problem = precision_problem(settings.mode, source.precision)
        if problem is not None:
            raise PipelineError(
                f"the model {source.key!r} {problem}: quantizing a quantized model only adds "
                "error; remove this quantize stage or quantize its fp32 parent"
            )
        # A missing dataset fails now, not after the quantization.
        eval_id = settings.effective_eval_dataset_id
        if eval_id is not None:
            ctx.dataset(eval_id, "eval_dataset_id")
        if settings.calibration_dataset_id is not None:
            ctx.dataset(settings.calibration_dataset_id, "calibration_dataset_id")

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: QuantizeSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Quantize the current ONNX artifact; the new model becomes current if it is kept."""
        import onnxruntime

        source = ctx.current_artifact
        eval_id = s.effective_eval_dataset_id

        source_bytes = model_size_bytes(source.path)
        external = uses_external_data(source.path) or source_bytes > EXTERNAL_DATA_THRESHOLD
        stage_dir = ctx.stage_dir(stage_id)
        preprocessed: bool | None = None
        evaluation: Evaluation | None = None
        judgement: Judgement | None = None
        unchecked = unjudged = ""
        try:
            with scratch_dir(stage_dir) as scratch, staged_output(stage_dir, ONNX_FILENAME) as out:
                made, preprocessed, to_quantize = _convert(
                    ctx, source, s, scratch, out, external, progress
                )
                if not made.checked:
                    progress(0.7, f"checking that onnxruntime runs the {s.mode} model")
                    made.max_abs_diff = check_runs(
                        source, out, s.mode, made.providers, made.check_feeds
                    )
                inputs, outputs = read_tensor_specs(out)
                out_bytes = model_size_bytes(out)
                artifact = Artifact(
                    key=stage_id,
                    path=str(out),
                    format=ModelFormat.ONNX.value,
                    precision=MODE_PRECISION[s.mode],
                    inputs=inputs,
                    outputs=outputs,
                    parent=source.key,
                    produced_by=self.name,
                )
                if eval_id is not None:
                    try:
                        evaluation = measure_retention(
                            ctx, source, artifact, eval_id, s, made.providers, progress
                        )
                    except JudgeOnRows:
                        pass  # judged below, on the same rows
                    except Unmeasurable as exc:
                        if s.eval_dataset_id is not None:  # asked for by name: say why not
                            raise
                        unchecked = f"no retention check: {exc}"
                    if (
                        evaluation is not None
                        and evaluation.retention < s.min_retention
                        and s.sensitivity_search
                        and to_quantize is not None
                    ):
                        from pipelines.quantization.tuning import search_on_dataset

                        made, evaluation = search_on_dataset(
                            ctx, source, artifact, to_quantize, scratch, s, external, progress,
                            made, evaluation, eval_id,
                        )  # fmt: skip
                        out_bytes = model_size_bytes(out)
                if evaluation is None:
                    judgement, unjudged, rows = _judge(
                        ctx, source, artifact, s, made, eval_id, progress
                    )
                    if (
                        judgement is not None
                        and _verdict(s, None, judgement) is not None
                        and s.sensitivity_search
                        and to_quantize is not None
                    ):
                        from pipelines.quantization.tuning import search_on_judgement

                        made, judgement = search_on_judgement(
                            ctx, source, artifact, to_quantize, scratch, s, external, progress,
                            made, judgement, rows, _device(made),
                        )  # fmt: skip
                        out_bytes = model_size_bytes(out)
                verdict = _verdict(s, evaluation, judgement)
                if verdict is not None and not s.keep_below_threshold:
                    raise _NotRegistered(verdict, made, out_bytes, evaluation, judgement)
        except _NotRegistered as refused:
            _remove_stale_output(stage_dir)
            return self._refused(s, source, source_bytes, refused)

        final = stage_dir / ONNX_FILENAME
        size_ratio = out_bytes / source_bytes if source_bytes else 1.0
        metrics = self._metrics(size_ratio, made, evaluation, judgement)
        artifact.path = str(final)
        artifact.metrics = {"size_bytes": float(out_bytes), **metrics}
        artifact.meta = {
            "mode": s.mode,
            "onnxruntime_version": onnxruntime.__version__,
            "quantized_ops": dict(made.counts),
            "settings": settings_meta(s),
            **({} if preprocessed is None else {"preprocessed": preprocessed}),
            **made.meta,
        }
        if evaluation is not None:
            artifact.meta["evaluation"] = {
                "metric": evaluation.metric,
                "dataset_id": evaluation.dataset_id,
                "split": evaluation.split,
                "rows": evaluation.rows,
                "judged_on": f"dataset {evaluation.dataset_id} ({evaluation.split})",
            }
        if judgement is not None:
            artifact.meta["judgement"] = judgement.meta()
        elif unjudged:
            artifact.meta["judgement"] = {"judged_on": None, "not_judged": unjudged}
        ctx.add_artifact(artifact)
        progress(1.0, "quantized")

        notes = list(made.notes)
        if unchecked:
            notes.append(unchecked)
        if unjudged:
            notes.append(unjudged)
        if preprocessed is False:
            notes.append("pre-processing failed; quantized the model as it is")
        if evaluation is not None and evaluation.retention < s.min_retention:
            notes.append(
                f"under the {pct(s.min_retention, evaluation.retention)} threshold, kept "
                "because keep_below_threshold is set"
            )
        elif verdict is not None:
            notes.append(f"{verdict}, kept because keep_below_threshold is set")
        message = (
            f"{self._headline(s, made)}, {human_bytes(source_bytes)} -> {human_bytes(out_bytes)} "
            f"(x{size_ratio:.2f})"
        )
        if evaluation is not None:
            message += f"; {evaluation.describe()}"
        elif judgement is not None:
            message += f"; {judgement.describe()}"
        if notes:
            message += f" ({'; '.join(notes)})"
        return StageOutcome(outputs=[artifact.key], metrics=metrics, message=message)

    @staticmethod
    def _headline(s: QuantizeSettings, made: Made) -> str:
        total = sum(made.counts.values())
        if s.mode == "int8_dynamic":
            what = "int8 dynamic quantization"
        elif s.mode == "int8_static":
            what = (
                f"int8 static quantization (QDQ, symmetric, "
                f"{'per-channel' if s.effective_per_channel else 'per-tensor'} weights, "
                f"{s.calibrate_method} calibration on {made.meta.get('calibration_rows')} rows)"
            )
        else:
            counts = describe_counts(made.counts)
            return f"{s.mode} conversion: {total} nodes in {s.mode} ({counts})"
        if made.meta.get("reduce_range"):
            what += ", 7-bit weights"
        return f"{what}: {total} quantized nodes ({describe_counts(made.counts)})"

    @staticmethod
    def _metrics(
        size_ratio: float,
        made: Made,
        evaluation: Evaluation | None,
        judgement: Judgement | None = None,
    ) -> dict[str, float]:
        metrics: dict[str, float] = {
            "size_ratio": size_ratio,
            "quantized_nodes": float(sum(made.counts.values())),
            **{f"quantized_ops.{op}": float(n) for op, n in sorted(made.counts.items())},
        }
        if made.max_abs_diff is not None:
            metrics["max_abs_diff"] = made.max_abs_diff
        if evaluation is not None:
            if math.isfinite(evaluation.retention):  # inf: the parent scored 0 (JSON has no inf)
                metrics["retention"] = evaluation.retention
            metrics[evaluation.metric] = evaluation.value
            metrics[f"parent_{evaluation.metric}"] = evaluation.parent
        if judgement is not None:
            metrics.update(judgement.metrics())
        return metrics

    def _refused(
        self,
        s: QuantizeSettings,
        source: Artifact,
        source_bytes: int,
        refused: _NotRegistered,
    ) -> StageOutcome:
        e, j = refused.evaluation, refused.judgement
        size_ratio = refused.out_bytes / source_bytes if source_bytes else 1.0
        if e is not None:
            measured = (
                f"{e.metric} {e.value:.4f} vs {e.parent:.4f} on {e.rows} {e.split} rows of "
                f"dataset {e.dataset_id}"
            )
        else:
            assert j is not None
            measured = j.describe() + (", no dataset named" if j.judged_on == "generated" else "")
        notes = f" ({'; '.join(refused.made.notes)})" if refused.made.notes else ""
        return not_kept(
            refused.verdict,
            f"{measured}; the {s.mode} model is not registered (set keep_below_threshold to "
            f"keep it); later stages use the parent{notes}",
            settings=s,
            parent=source.key,
            metrics=self._metrics(size_ratio, refused.made, e, j),
            details={"judgement": j.meta()} if j is not None else {},
        )
