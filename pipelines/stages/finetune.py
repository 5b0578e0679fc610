"""finetune: train a TorchScript model further on a dataset, then export it to ONNX.

The training itself is ``pipelines.finetuning`` (settings, data and targets, the trainer with its
checkpoints); this stage checks what the model and task allow, runs the trainer, and adds two
artifacts: the fine-tuned TorchScript model (``<stage_id>.torchscript``, made from the input) and
its ONNX export (``<stage_id>``, made from the fine-tuned TorchScript), which is left current so
quantize, compile and benchmark can follow.

Training is resumable: a worker killed mid-training, or a job cancelled and retried, continues
from the last checkpoint (``<stage dir>/checkpoint.pt``) with the same data order, so the result
is the one an uninterrupted run would have given.
"""

from __future__ import annotations

from typing import ClassVar

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    ProgressFn,
    StageSettings,
)
from pipelines.finetuning.data import dim_sizes
from pipelines.finetuning.settings import TASKS, FinetuneSettings
from pipelines.finetuning.trainer import TRAIN_SHARE, Trainer
from pipelines.stages.base import Stage, StageOutcome, settings_meta
from pipelines.stages.export_onnx import ExportOnnx, ExportOnnxSettings
from pipelines.staging import staged_output

TORCHSCRIPT_FILENAME = "model.pt"


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
        trainer = Trainer(ctx, stage_id, s, source, progress)
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
            {"dim_sizes": dim_sizes(source.inputs, trainer.train)}
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
