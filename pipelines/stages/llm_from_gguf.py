"""from_gguf: a GGUF file read into a Hugging Face checkpoint, the version every later stage takes.

The conversion is :func:`pipelines.llm.gguf_convert.convert_gguf` (transformers' GGUF loader,
dequantized floats saved as safetensors with the tokenizer and generation config). The new
``hf_checkpoint`` (``<stage dir>/checkpoint``, published whole) is made from the GGUF and left
current, so quantize, finetune, evaluate and benchmark follow it as they follow an uploaded
checkpoint. Its precision is the dtype it is saved in (float32 by default: a Q4_K_M file's
dequantized weights are exact in float32), whatever the GGUF's own quantization was.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    ProgressFn,
    StageSettings,
)
from pipelines.llm.gguf_convert import DTYPES as _PRECISION
from pipelines.stages.base import Stage, StageOutcome, settings_meta

CHECKPOINT_DIR = "checkpoint"


class FromGgufSettings(StageSettings):
    """Settings of from_gguf."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description=(
            "The dtype the dequantized weights are saved in. float32 keeps them exactly; "
            "bfloat16 or float16 halve the checkpoint."
        ),
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads torch uses (default: R1_ENGINE_THREADS, else every core).",
    )


class FromGguf(Stage[FromGgufSettings]):
    """Convert a GGUF file into a safetensors checkpoint folder, which becomes current."""

    name: ClassVar[str] = "from_gguf"
    description: ClassVar[str] = (
        "Read a GGUF file (llama.cpp) with transformers' GGUF loader and save it as a Hugging "
        "Face checkpoint (safetensors, tokenizer, generation config), checked against the GGUF "
        "model's logits; later stages take the checkpoint."
    )
    Settings: ClassVar[type[StageSettings]] = FromGgufSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.GGUF.value,)
    produces: ClassVar[str | None] = ModelFormat.HF_CHECKPOINT.value

    @classmethod
    def precision_for(
        cls, settings: StageSettings | None, precision: str | None
    ) -> tuple[str | None, str | None]:
        """Any GGUF is read; the checkpoint is in the dtype setting's precision."""
        dtype = settings.dtype if isinstance(settings, FromGgufSettings) else "float32"
        return _PRECISION[dtype], None

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: FromGgufSettings, progress: ProgressFn
    ) -> StageOutcome:
        import torch

        from pipelines.llm.gguf_convert import convert_gguf
        from pipelines.llm.lora import thread_count
        from pipelines.llm.lora_model import publish_folder
        from pipelines.staging import scratch_dir

        source = ctx.current_artifact
        stage_dir = ctx.stage_dir(stage_id)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(thread_count(s.threads))
        try:
            progress(0.05, "reading the GGUF file with transformers' loader")
            with (
                scratch_dir(stage_dir) as scratch,
                publish_folder(stage_dir, CHECKPOINT_DIR) as tmp,
            ):
                made = convert_gguf(Path(source.path), tmp, scratch, dtype=s.dtype)
        finally:
            torch.set_num_threads(threads_before)
        folder = stage_dir / CHECKPOINT_DIR
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        metrics = {
            "parameters": float(made.parameters),
            "max_abs_diff": made.max_abs_diff,
            "checkpoint_mb": round(size / 2**20, 3),
        }
        meta = {
            "settings": settings_meta(s),
            "architecture": made.architecture,
            "dtype": made.dtype,
            "converted_from": "gguf",
            "gguf": source.meta.get("gguf", {}),
            "files": made.files,
            "torch_version": torch.__version__,
        }
        ctx.add_artifact(
            Artifact(
                key=stage_id,
                path=str(folder),
                format=ModelFormat.HF_CHECKPOINT.value,
                precision=_PRECISION[s.dtype],
                inputs=list(source.inputs),
                outputs=list(source.outputs),
                parent=source.key,
                produced_by=self.name,
                metrics=metrics,
                meta=meta,
            )
        )
        progress(1.0, "converted")
        return StageOutcome(
            outputs=[stage_id],
            metrics=metrics,
            message=(
                f"converted the GGUF to a {made.architecture} checkpoint in {made.dtype} "
                f"({made.parameters:,} parameters, {metrics['checkpoint_mb']:.3g} MB of "
                f"safetensors); logits on a {made.probe_tokens}-token probe match the GGUF "
                f"model's to {made.max_abs_diff:.2g}"
            ),
        )
