"""What the text-generation checks share: the loaded model, the golden texts and prompts, the
full-precision reference, the serving process kept up for the whole suite, and the streaming
load's result (run once, judged by two checks).

The golden set of a language model is a text dataset (``golden_dataset_id``: ``text``,
``prompt_completion`` or ``messages`` rows, its ``golden_split``, at most ``golden_rows`` texts),
or the built-in English sample without one. Perplexity is measured on its texts; the **golden
prompts** are the first ``text_prompt_tokens`` tokens of the first ``text_prompts`` texts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.certification.profiles import HardwareProfile
from pipelines.certification.serving_probe import Endpoint
from pipelines.certification.settings import TEXT_GOLDEN_KINDS, CertifySettings
from pipelines.core import Artifact, ModelFormat, PipelineContext, PipelineError, Precision
from pipelines.llm.kinds import MARKER

if TYPE_CHECKING:
    from pipelines.llm.runtime import Generation, TextModel

__all__ = [
    "FULL_PRECISIONS",
    "TextGolden",
    "TextSuiteState",
    "describe_text_file",
    "find_text_reference",
    "load_text_golden",
]

# What "full precision" is for a language model: float weights (many checkpoints are published
# in bf16, and that upload is the best the platform has of them).
FULL_PRECISIONS = (Precision.FP32.value, Precision.BF16.value, Precision.FP16.value)
# The formats a reference may be in: runnable by itself (an adapter needs its base).
REFERENCE_FORMATS = (ModelFormat.HF_CHECKPOINT.value, ModelFormat.ORT_GENAI.value)


@dataclass
class TextGolden:
    """The golden texts, and where they came from (``SuiteReport.golden``)."""

    texts: list[str]
    record: dict[str, Any]


def load_text_golden(ctx: PipelineContext, settings: CertifySettings) -> TextGolden:
    """The golden texts of ``settings`` (PipelineError when the dataset cannot give any)."""
    from pipelines.llm.perplexity import BUILTIN_SAMPLE

    if settings.golden_dataset_id is None:
        texts = list(BUILTIN_SAMPLE)[: settings.golden_rows]
        return TextGolden(texts, {"source": "built-in English sample", "texts": len(texts)})
    from pipelines.datasets.text_corpus import load_texts, text_kind

    ref = ctx.dataset(settings.golden_dataset_id, "certify golden_dataset_id")
    kind = text_kind(ref)
    if kind not in TEXT_GOLDEN_KINDS:
        what = f"a {kind} dataset" if kind else "not a text dataset"
        raise PipelineError(
            f"golden dataset {ref.id} is {what}; a language model's golden set is text rows "
            "(text, prompt/completion or messages): perplexity and the golden prompts come "
            "from it"
        )
    texts = [t for t in load_texts(ref, settings.golden_split) if t.strip()]
    texts = texts[: settings.golden_rows]
    if not texts:
        raise PipelineError(f"golden dataset {ref.id} has no text in its {settings.golden_split}")
    record = {
        "source": "dataset",
        "dataset_id": ref.id,
        "kind": kind,
        "split": settings.golden_split,
        "texts": len(texts),
    }
    return TextGolden(texts, record)


def find_text_reference(ctx: PipelineContext, artifact: Artifact) -> Artifact | None:
    """The nearest ancestor of ``artifact`` in full precision that a text runtime runs by itself
    (its folder here): what a quantized or converted model is compared with."""
    for ancestor in ctx.lineage(artifact):
        if (
            ancestor.precision in FULL_PRECISIONS
            and ancestor.format in REFERENCE_FORMATS
            and Path(ancestor.path).is_dir()
        ):
            return ancestor
    return None


def _archive_sha256(artifact: Artifact) -> tuple[str, int]:
    """The sha256 and size of the one tar a model folder is stored as: its stored archive where
    it is a registered version's (the job's input or an ancestor), else the tar
    :func:`pipelines.llm.folders.pack_folder` makes of it, which is byte for byte the one the
    platform registers a job's folder as (sorted members, no times or owners)."""
    from pipelines.backends.tensorrt_build import sha256_file
    from pipelines.llm.folders import pack_folder

    stored = artifact.meta.get("stored_file")
    if stored and artifact.produced_by is None:  # a stage's output may carry its input's meta
        return sha256_file(stored), Path(stored).stat().st_size
    with tempfile.TemporaryDirectory(prefix="certify-sha-") as tmp:
        tar = Path(tmp) / "model.tar"
        pack_folder(Path(artifact.path), tar, MARKER[artifact.format])
        return sha256_file(tar), tar.stat().st_size


def describe_text_file(artifact: Artifact) -> dict[str, Any]:
    """sha256, size and identity of a language model, for the report: those of the one tar its
    folder is stored as (the file the version records, whose sha256 a certificate is bound to)."""
    from pipelines.certification.profiles import RUNTIME_FOR_FORMAT

    sha, size = _archive_sha256(artifact)
    return {
        "key": artifact.key,
        "sha256": sha,
        "size_bytes": size,
        "format": artifact.format,
        "precision": artifact.precision,
        "backend": RUNTIME_FOR_FORMAT.get(artifact.format, artifact.format),
        "compiled_with": artifact.backend,
    }


@dataclass
class TextSuiteState:
    """Everything the text checks share; :meth:`close` ends the serving process and the model."""

    artifact: Artifact
    ctx: PipelineContext
    settings: CertifySettings
    profile: HardwareProfile
    golden: TextGolden
    thresholds: dict[str, Any]
    reference: Artifact | None = None
    model: TextModel | None = None
    # Progress inside the running check: (fraction of the check, message).
    progress: Callable[[float, str], None] = lambda fraction, message: None
    # The streaming load's result (``_text_load``), run once for the two checks that judge it.
    load: dict[str, Any] | None = None
    load_error: str = ""
    _prompts: list[list[int]] | None = None
    _greedy: list[Generation] | None = None
    _endpoint: Endpoint | None = None
    _endpoint_error: str = ""
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def loaded(self) -> TextModel:
        assert self.model is not None, "the loads check sets the model"
        return self.model

    def prompts(self) -> list[list[int]]:
        """The golden prompts' token ids: the first ``text_prompt_tokens`` of each golden text
        (of two tokens or more), at most ``text_prompts`` of them."""
        if self._prompts is None:
            model, settings = self.loaded, self.settings
            room = max(1, model.context_length - settings.text_new_tokens)
            found = []
            for text in self.golden.texts:
                ids = model.encode(text)[: min(settings.text_prompt_tokens, room)]
                if ids:
                    found.append(ids)
                if len(found) == settings.text_prompts:
                    break
            if not found:
                raise PipelineError("no golden text gives a token to prompt the model with")
            self._prompts = found
        return self._prompts

    def prompt_texts(self) -> list[str]:
        """The golden prompts as text (what a client of the serving process sends)."""
        return [self.loaded.decode(ids) or " " for ids in self.prompts()]

    def new_tokens(self, prompts: list[list[int]]) -> int:
        """``text_new_tokens``, or fewer where the longest prompt leaves less room."""
        longest = max(len(p) for p in prompts)
        return max(1, min(self.settings.text_new_tokens, self.loaded.context_length - longest))

    def greedy(self) -> list[Generation]:
        """The model's greedy continuations of the golden prompts (decoded together, once)."""
        if self._greedy is None:
            prompts = self.prompts()
            self._greedy = self.loaded.generate(prompts, self.new_tokens(prompts))
        return self._greedy

    def endpoint(self) -> Endpoint | None:
        """The model served by the platform's serving process on loopback, started on first use
        and kept up until :meth:`close`; None where no serving process is registered."""
        if self._endpoint_error:  # it failed once: the next checks say so without a new try
            raise RuntimeError(self._endpoint_error)
        if self._endpoint is None:
            from pipelines.certification.serving_probe import registered_server

            server = registered_server()
            if server is None:
                return None
            device, batch = self.profile.device_kind, self.settings.stream_concurrency
            context = server(self.artifact, device, batch, base=self.adapter_base())
            try:
                self._endpoint = self._stack.enter_context(context)
            except RuntimeError as exc:
                self._endpoint_error = f"the serving process did not serve it: {exc}"
                raise RuntimeError(self._endpoint_error) from None
        return self._endpoint

    def adapter_base(self) -> Artifact | None:
        """A LoRA adapter's base: the nearest checkpoint in its lineage (None for the rest), as
        :func:`pipelines.llm.runtime.open_in_context` finds it."""
        if self.artifact.format != ModelFormat.LORA_ADAPTER.value:
            return None
        checkpoint = ModelFormat.HF_CHECKPOINT.value
        return next((a for a in self.ctx.lineage(self.artifact) if a.format == checkpoint), None)

    def close(self) -> None:
        self._stack.close()
        self._endpoint = None
        if self.model is not None:
            self.model.close()
            self.model = None
