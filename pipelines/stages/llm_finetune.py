"""finetune (text-generation): LoRA adapters trained on a text dataset, optionally merged.

The run itself is :class:`pipelines.llm.lora.LoraRun`; this stage checks the model and the
dataset, runs it, and adds what it made:

* the adapter folder (``<stage dir>/adapter``: ``adapter_config.json``,
  ``adapter_model.safetensors`` and the base's tokenizer files), an artifact of format
  ``lora_adapter`` whose parent is the checkpoint it was trained on (its base: the platform
  runs it over that version). Its key is the stage id, or ``<stage id>.adapter`` when merged;
* with ``merge: true``, the merged checkpoint (``<stage dir>/merged``, an ``hf_checkpoint`` in
  the base's dtype), keyed by the stage id and made from the adapter (its parent is the adapter,
  so the lineage reads base -> adapter -> merged). It is left current, so the INT8 quantize of
  the issue's pipeline (upload -> fine-tune -> merge -> int8 -> evaluate -> benchmark) takes it;
  without merge the adapter is current.

Training is resumable: a worker killed mid-run, or a job cancelled and retried, continues from
the last checkpoint (``<stage dir>/lora_checkpoint.pt``) with the same data order and RNG, so the
adapter is the one an uninterrupted run would have given.
"""

from __future__ import annotations

from pathlib import Path
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
from pipelines.llm.lora_settings import LoraFinetuneSettings
from pipelines.stages.base import Formats, Stage, StageOutcome, settings_meta

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
_QUANTIZED = (Precision.INT8.value, Precision.INT4.value)


class LlmFinetune(Stage[LoraFinetuneSettings]):
    """LoRA fine-tuning of a language-model checkpoint; the adapter (or the merge) is current."""

    name: ClassVar[str] = "finetune"
    description: ClassVar[str] = (
        "Train LoRA adapters (peft) on the checkpoint's attention and MLP projections with a "
        "text, prompt/completion or messages dataset (AdamW, warm-up then cosine, gradient "
        "accumulation, clipping, bf16 autocast, optional gradient checkpointing, resumable "
        "checkpoints). Registers the adapter as a child of its base and, with merge, the "
        "merged checkpoint, which becomes current."
    )
    Settings: ClassVar[type[StageSettings]] = LoraFinetuneSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.HF_CHECKPOINT.value,)
    produces: ClassVar[str | None] = ModelFormat.LORA_ADAPTER.value

    @classmethod
    def produces_for(cls, settings: StageSettings) -> Formats:
        merge = isinstance(settings, LoraFinetuneSettings) and settings.merge
        return ModelFormat.HF_CHECKPOINT.value if merge else ModelFormat.LORA_ADAPTER.value

    @classmethod
    def format_hint(cls, settings: StageSettings) -> str | None:
        """finetune trains a float checkpoint: before quantize, after from_gguf."""
        return "finetune trains the float hf_checkpoint: put it before quantize"

    @classmethod
    def precision_for(
        cls, settings: StageSettings | None, precision: str | None
    ) -> tuple[str | None, str | None]:
        """A quantized checkpoint is refused (train the float one, quantize after)."""
        if precision in _QUANTIZED:
            return precision, (
                f"fine-tuning needs a float checkpoint; this one is {precision}: fine-tune its "
                "float parent and quantize after"
            )
        return precision, None

    def _pre_run(self, ctx: PipelineContext, settings: LoraFinetuneSettings) -> None:
        from pipelines.llm.lora_data import trainable_kind

        super()._pre_run(ctx, settings)
        source = ctx.current_artifact
        _, refusal = self.precision_for(settings, source.precision)
        if refusal is not None:
            raise PipelineError(refusal)
        if not (Path(source.path) / "config.json").is_file():
            raise PipelineError(f"{source.key!r} is not a checkpoint folder (no config.json)")
        # The dataset's kind is checked before the model is loaded.
        trainable_kind(ctx.dataset(settings.dataset_id, "finetune dataset_id"), settings.dataset_id)

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: LoraFinetuneSettings, progress: ProgressFn
    ) -> StageOutcome:
        import torch

        from pipelines.llm.lora import TRAIN_SHARE, LoraRun
        from pipelines.llm.lora_model import publish_folder, save_adapter, save_merged

        source = ctx.current_artifact
        ref = ctx.dataset(s.dataset_id, "finetune dataset_id")
        stage_dir = ctx.stage_dir(stage_id)

        def recorded(step: int, path: Path) -> None:
            record = ctx.state.setdefault(stage_id, {})
            record.update({"checkpoint": str(path), "step": step})
            ctx.save()

        threads_before = torch.get_num_threads()
        try:
            run = LoraRun(Path(source.path), source.key, s, ref, stage_dir, progress, recorded)
            run.setup()
            if run.try_resume():
                ctx.state.setdefault(stage_id, {})["resumed_from_step"] = run.resumed_from_step
            run.fit()
            progress(TRAIN_SHARE, "measuring the validation loss")
            val_loss = run.evaluate()
            st = run.state
            if val_loss is not None:
                _add_history(st.history, st.global_step, {"val_loss": val_loss})
            metrics = run.metrics(val_loss)

            progress(TRAIN_SHARE + 0.02, "saving the adapter")
            with publish_folder(stage_dir, ADAPTER_DIR) as tmp:
                save_adapter(run.model, run.base, tmp)
            adapter_dir = stage_dir / ADAPTER_DIR
            adapter_bytes = sum(p.stat().st_size for p in adapter_dir.glob("adapter_model*"))
            metrics["adapter_mb"] = round(adapter_bytes / 2**20, 4)
            meta = {
                "settings": settings_meta(s),
                "dataset_id": s.dataset_id,
                "dataset_kind": run.train.kind,
                "loss_on": run.train.loss_on,
                "dropped_sequences": run.train.dropped,
                "truncated_rows": run.train.truncated,
                "target_modules": run.target_modules,
                "base": source.key,
                "max_seq_length": run.max_length,
                "mixed_precision": run.plan.mode,
                "threads": run.threads,
                "device": run.device,
                "total_steps": run.total_steps,
                "torch_version": torch.__version__,
            }
            merged_key = stage_id
            adapter_key = f"{stage_id}.adapter" if s.merge else stage_id
            ctx.add_artifact(
                Artifact(
                    key=adapter_key,
                    path=str(adapter_dir),
                    format=ModelFormat.LORA_ADAPTER.value,
                    precision=source.precision,
                    inputs=list(source.inputs),
                    outputs=list(source.outputs),
                    parent=source.key,
                    produced_by=self.name,
                    metrics=dict(metrics),
                    meta=dict(meta),
                )
            )
            outputs = [adapter_key]
            if s.merge:
                progress(TRAIN_SHARE + 0.05, "merging the adapter into the base weights")
                with publish_folder(stage_dir, MERGED_DIR) as tmp:
                    save_merged(run.model, run.base, tmp)
                ctx.add_artifact(
                    Artifact(
                        key=merged_key,
                        path=str(stage_dir / MERGED_DIR),
                        format=ModelFormat.HF_CHECKPOINT.value,
                        precision=source.precision,
                        inputs=list(source.inputs),
                        outputs=list(source.outputs),
                        parent=adapter_key,
                        produced_by=self.name,
                        metrics={k: v for k, v in metrics.items() if k != "adapter_mb"},
                        meta={**meta, "adapter": adapter_key, "merged": True},
                    )
                )
                outputs.append(merged_key)
        finally:
            torch.set_num_threads(threads_before)

        # Done: the checkpoint is not needed again (a retry of a finished stage is skipped).
        run.checkpoint_path.unlink(missing_ok=True)
        record = ctx.state.setdefault(stage_id, {})
        record.update({"checkpoint": None, "step": st.global_step, "completed": True})
        progress(1.0, "done")
        return StageOutcome(
            outputs=outputs,
            metrics=metrics,
            history=list(st.history),
            message=_message(run, metrics, s.merge),
        )


def _add_history(history: list[dict], step: int, values: dict[str, float]) -> None:
    """Add ``values`` at ``step``: into the last point when it is that step's, else a new one."""
    if history and history[-1].get("step") == step:
        history[-1]["metrics"].update(values)
    else:
        history.append({"step": step, "metrics": dict(values)})


def _message(run: object, metrics: dict[str, float], merged: bool) -> str:
    from pipelines.llm.lora import LoraRun

    assert isinstance(run, LoraRun)
    parts = [
        f"LoRA r={run.s.rank} on {', '.join(run.target_modules)}: {int(metrics['steps'])} steps, "
        f"loss {metrics['initial_loss']:.4g} -> {metrics['final_loss']:.4g} "
        f"(on {run.train.loss_on})"
    ]
    if "val_loss" in metrics and "initial_val_loss" in metrics:
        parts.append(
            f"validation loss {metrics['initial_val_loss']:.4g} -> {metrics['val_loss']:.4g}"
        )
    parts.append(
        f"{metrics['seconds_per_step']:.3g} s/step, {metrics['tokens_per_second']:.0f} tokens/s, "
        f"adapter {metrics['adapter_mb']:.3g} MB ({int(metrics['trainable_parameters'])} "
        "trainable parameters)"
    )
    if run.resumed_from_step:
        parts.append(f"resumed from step {run.resumed_from_step}")
    if merged:
        parts.append("merged into the base weights")
    return "; ".join(parts)
