"""Running a validated pipeline over a context, resumably; and a local runner for the CLI.

``run_pipeline`` is what the Celery task calls. It saves the context after every stage, so a job
delivered again after its worker died skips the stages it already finished; stages publish their
files atomically (pipelines.staging), so a finished stage's files are whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.core import (
    Artifact,
    Cancelled,
    DatasetRef,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    StageConfigError,
    StageResult,
    StageStatus,
    TensorSpec,
)
from pipelines.llm.kinds import MARKER, is_text_format
from pipelines.stages import PlannedStage, default_pipeline, validate_pipeline
from pipelines.staging import clean_partials

logger = logging.getLogger(__name__)

# (index of the stage in the plan, from 0; fraction of that stage done, 0..1; message)
PipelineProgress = Callable[[int, float, str], None]
# Called with each finished stage's result (the original one for a skipped stage).
StageDoneFn = Callable[[StageResult, PipelineContext], None]

SKIPPED_MESSAGE = "already done by an earlier run of this job"


def _already_done(ctx: PipelineContext, step: PlannedStage) -> StageResult | None:
    """The earlier SUCCEEDED (or NOT_KEPT) result of ``step`` if its outputs are all still
    there, else None.

    An output whose recorded settings differ from the plan's is not "done": the stage runs again
    rather than handing back a model made with other settings. A NOT_KEPT result has no output;
    the settings it was judged with are in its ``details`` (a judgement under other settings,
    keep_below_threshold say, is not reused).
    """
    prior = ctx.results.get(step.stage_id)
    if prior is None or not prior.status.done or prior.name != step.name:
        return None
    wanted_settings = step.settings.model_dump(mode="json")
    judged_with = prior.details.get("settings")
    if prior.status is StageStatus.NOT_KEPT and judged_with != wanted_settings:
        return None
    for key in prior.outputs:
        artifact = ctx.artifacts.get(key)
        if artifact is None or not Path(artifact.path).is_file():
            return None
        recorded = artifact.meta.get("settings")
        if recorded is not None and recorded != wanted_settings:
            return None
    return prior


def _failure_message(exc: Exception) -> str:
    # A PipelineError is written for the user; anything else is a bug, so keep its type.
    if isinstance(exc, PipelineError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_pipeline(
    ctx: PipelineContext,
    planned: Sequence[PlannedStage],
    progress: PipelineProgress | None = None,
    on_stage_done: StageDoneFn | None = None,
) -> list[StageResult]:
    """Run ``planned`` over ``ctx`` in order; return one result per stage.

    A stage whose earlier SUCCEEDED (or NOT_KEPT) result is in ``ctx.results`` and whose output
    files exist is not run again (unless a stage before it had to run): it gets a SKIPPED result,
    its outputs stay in the context (the last becomes current again) and ``on_stage_done`` is
    still called with the original result, so the caller can make sure its outputs are
    registered. A context delivered again starts from its input, so a stage that runs again
    takes what the stage before it left (a NOT_KEPT stage: its parent), not the last model the
    earlier run made. ``ctx`` is saved after every stage.

    ``Cancelled`` (raised by ``progress``) propagates as it is. Any other exception records a
    FAILED result, saves the context and is re-raised.
    """
    results: list[StageResult] = []
    # Once a stage runs again, the ones after it must too: their outputs were made from the
    # previous run's files, which that stage has just replaced.
    upstream_ran = False
    if "input" in ctx.artifacts:
        ctx.current = "input"
    for index, step in enumerate(planned):
        prior = None if upstream_ran else _already_done(ctx, step)
        if prior is not None:
            if prior.outputs:
                ctx.current = prior.outputs[-1]
            results.append(
                StageResult(
                    stage_id=step.stage_id,
                    name=step.name,
                    status=StageStatus.SKIPPED,
                    outputs=list(prior.outputs),
                    metrics=dict(prior.metrics),
                    message=SKIPPED_MESSAGE,
                )
            )
            ctx.save()
            if progress is not None:
                progress(index, 1.0, SKIPPED_MESSAGE)
            if on_stage_done is not None:
                on_stage_done(prior, ctx)
            continue

        # Files a killed worker was writing for this stage: never published, never needed.
        clean_partials(ctx.workdir / step.stage_id)

        def stage_progress(fraction: float, message: str, _index: int = index) -> None:
            if progress is not None:
                progress(_index, min(max(fraction, 0.0), 1.0), message)

        upstream_ran = True
        started = time.perf_counter()
        logger.info("stage %s starting", step.stage_id)
        try:
            result = step.stage_class().run(ctx, step.stage_id, step.settings, stage_progress)
        except Cancelled:
            logger.info("stage %s cancelled", step.stage_id)
            raise
        except Exception as exc:
            if not isinstance(exc, PipelineError):
                logger.exception("stage %s crashed", step.stage_id)
            ctx.results[step.stage_id] = StageResult(
                stage_id=step.stage_id,
                name=step.name,
                status=StageStatus.FAILED,
                seconds=round(time.perf_counter() - started, 4),
                message=_failure_message(exc),
            )
            ctx.save()
            raise
        ctx.results[step.stage_id] = result
        ctx.save()
        logger.info("stage %s %s in %.2fs", step.stage_id, result.status.value, result.seconds)
        results.append(result)
        if on_stage_done is not None:
            on_stage_done(result, ctx)
    return results


def _tensor_specs(items: Sequence[TensorSpec | dict[str, Any]] | None) -> list[TensorSpec] | None:
    if items is None:
        return None
    return [t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t) for t in items]


def run_local(
    model_path: str | Path,
    format: str,
    inputs: Sequence[TensorSpec | dict[str, Any]] | None,
    stages: list[dict[str, Any]] | None,
    workdir: str | Path,
    *,
    precision: str = Precision.FP32.value,
    show_progress: bool = True,
    task: str = "other",
    datasets: dict[str, DatasetRef] | None = None,
) -> PipelineContext:
    """Run a pipeline on a local model file with a progress bar; return the final context.

    ``inputs`` are the model's input specs (dicts like ``{"name", "shape", "dtype"}`` work); for
    ONNX they may be None and are read from the file. ``stages`` None means the default pipeline.
    ``task`` picks the metric of evaluate, fine-tune and quantize retention; ``datasets`` maps the
    ids the stages' ``*dataset_id`` settings name to local files.
    A ``workdir`` that holds an earlier run of the same model resumes it.
    """
    from tqdm import tqdm

    model_path = Path(model_path).resolve()
    workdir = Path(workdir)
    if format in MARKER:  # a language model's folder (checkpoint, ORT GenAI, adapter)
        if not (model_path / MARKER[format]).is_file():
            raise StageConfigError(f"no {format} folder at {model_path} (no {MARKER[format]})")
    elif not model_path.is_file():
        raise StageConfigError(f"no model file at {model_path}")
    if stages is None:
        stages = default_pipeline(format, precision)
    planned = validate_pipeline(format, stages, precision)

    specs = _tensor_specs(inputs)
    outputs: list[TensorSpec] = []
    if format == ModelFormat.ONNX.value:
        from pipelines.onnx_io import read_tensor_specs

        file_inputs, outputs = read_tensor_specs(model_path)
        specs = specs if specs is not None else file_inputs
    if not specs and is_text_format(format):
        specs = [TensorSpec("input_ids", ["batch", "sequence"], "int64")]
    if not specs:
        raise StageConfigError(
            'give the model\'s inputs, e.g. [{"name": "x", "shape": ["batch", 64], '
            '"dtype": "float32"}]'
        )

    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PipelineContext.load(workdir)
    if ctx is None:
        source = Artifact(
            key="input",
            path=str(model_path),
            format=format,
            precision=precision,
            inputs=specs,
            outputs=outputs,
        )
        ctx = PipelineContext.start(workdir, source, task=task, datasets=datasets)
        ctx.save()
    elif Path(ctx.artifacts["input"].path) != model_path:
        raise StageConfigError(
            f"{workdir} holds a run of {ctx.artifacts['input'].path}; use another workdir"
        )

    names = [step.name for step in planned]
    bar = tqdm(
        total=len(planned),
        unit="stage",
        disable=not show_progress,
        bar_format="|{bar:20}| {n:.2f}/{total} stages [{elapsed}] {desc}",
    )

    def on_progress(index: int, fraction: float, message: str) -> None:
        # The stage's own fraction moves the bar within its stage, so a long export still moves.
        bar.set_description_str(
            f"{index + 1}/{len(names)} {names[index]}: {message[:60]}", refresh=False
        )
        bar.n = index + fraction
        bar.refresh()

    try:
        run_pipeline(ctx, planned, progress=on_progress)
    finally:
        bar.close()
    return ctx
