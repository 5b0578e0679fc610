"""evaluate (text-generation): perplexity, test-case accuracy and greedy agreement, each beside
the parent's.

* **Perplexity** on a split of a text dataset (``dataset_id``), or on the built-in English sample
  when none is named (:data:`pipelines.llm.perplexity.BUILTIN_SAMPLE`; the message says which).
  The texts are encoded once, by the current model's tokenizer, and both models are scored on
  those token ids.
* **Test-case accuracy** on a ``test_cases`` dataset (``test_cases_dataset_id``): each prompt is
  continued greedily (``max_new_tokens``) and the decoded text is checked with the case's check
  (:func:`pipelines.datasets.text_corpus.check_case`); also per tag.
* **Greedy agreement** with the parent: a few prompts (the first 16 tokens of the perplexity
  texts) are continued greedily by both models for ``agreement_tokens`` tokens;
  ``greedy_agreement`` is the share of those positions where the two chose the same token (a
  sequence that stopped early counts its missing positions as different) and
  ``greedy_prefix_tokens`` the mean length of the run of equal tokens they start with.

The parent is the nearest ancestor a text runtime can run (a LoRA adapter's is its base). The
current and the parent model are loaded one after the other, never together. Metrics go into
the current artifact's metrics (the version's) and the stage result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
)
from pipelines.llm.agreement import greedy_agreement
from pipelines.stages.base import Stage, StageOutcome, settings_meta

__all__ = ["LlmEvaluate", "LlmEvaluateSettings"]

Split = Literal["test", "validation", "train", "all"]
PROMPT_TOKENS = 16  # tokens of each perplexity text that prompt the agreement check
CASE_BATCH = 8  # test-case prompts decoded together


class LlmEvaluateSettings(StageSettings):
    """Settings of evaluate for a language model."""

    dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "A text dataset whose split perplexity is measured on; none: a built-in short "
            "English sample."
        ),
    )
    split: Split = Field("test", description="The split of dataset_id that is scored.")
    test_cases_dataset_id: int | None = Field(
        None,
        ge=1,
        description="A test_cases dataset: each prompt is continued greedily and checked.",
    )
    test_cases_split: Split = Field("test", description="The split of the test cases used.")
    max_length: int = Field(
        512, ge=2, le=1_048_576, description="Tokens per perplexity window (capped at the context)."
    )
    max_texts: int = Field(
        200, ge=1, le=100_000, description="At most this many texts of the split are scored."
    )
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Tokens generated for each test case."
    )
    agreement_prompts: int = Field(
        4, ge=0, le=64, description="Prompts of the greedy agreement check (0: no check)."
    )
    agreement_tokens: int = Field(
        64, ge=1, le=1024, description="Greedy tokens compared with the parent's per prompt."
    )
    compare_parent: bool = Field(True, description="Also measure the parent model.")
    threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads (default: the worker's engine threads)."
    )


@dataclass
class _Measured:
    """What one model scored."""

    perplexity: float | None = None
    ppl_tokens: int = 0
    outputs: list[str] = field(default_factory=list)  # one per test case
    greedy: list[list[int]] = field(default_factory=list)  # one per agreement prompt


def _generate_texts(model: Any, prompts: list[list[int]], max_new: int) -> list[str]:
    """Greedy continuations of ``prompts`` decoded to text, a few prompts at a time."""
    outputs: list[str] = []
    for start in range(0, len(prompts), CASE_BATCH):
        batch = prompts[start : start + CASE_BATCH]
        for generation in model.generate(batch, max_new):
            outputs.append(model.decode(generation.tokens))
    return outputs


def _fit(ids: list[int], room: int) -> list[int]:
    """A prompt's last ``room`` tokens (a prompt longer than the context keeps its end)."""
    return ids[-room:] if len(ids) > room else ids


class LlmEvaluate(Stage[LlmEvaluateSettings]):
    """Perplexity, test-case accuracy and greedy agreement of a language model vs its parent."""

    name: ClassVar[str] = "evaluate"
    description: ClassVar[str] = (
        "Evaluate a language model: perplexity on a text split (or a built-in sample), accuracy "
        "on test cases (greedy generation, checked), and greedy agreement with the model it was "
        "made from, each beside the parent's value."
    )
    Settings: ClassVar[type[StageSettings]] = LlmEvaluateSettings
    accepts: ClassVar[tuple[str, ...]] = (
        ModelFormat.HF_CHECKPOINT.value,
        ModelFormat.ORT_GENAI.value,
        ModelFormat.LORA_ADAPTER.value,
    )
    produces: ClassVar[str | None] = None

    def _pre_run(self, ctx: PipelineContext, settings: LlmEvaluateSettings) -> None:
        super()._pre_run(ctx, settings)
        if settings.dataset_id is not None:
            ctx.dataset(settings.dataset_id, "evaluate dataset_id")
        if settings.test_cases_dataset_id is not None:
            ctx.dataset(settings.test_cases_dataset_id, "evaluate test_cases_dataset_id")

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: LlmEvaluateSettings, progress: ProgressFn
    ) -> StageOutcome:
        from pipelines.llm.runtime import text_parent
        from pipelines.stages.llm_quantize import load_eval_texts

        current = ctx.current_artifact
        parent = text_parent(ctx, current) if s.compare_parent else None
        texts, judged_on = load_eval_texts(
            ctx, s.dataset_id, s.split, s.max_texts, "evaluate dataset_id"
        )
        cases: list[Any] = []
        if s.test_cases_dataset_id is not None:
            from pipelines.datasets.text_corpus import load_cases

            ref = ctx.dataset(s.test_cases_dataset_id, "evaluate test_cases_dataset_id")
            cases = load_cases(ref, s.test_cases_split)
            if not cases:
                raise PipelineError(
                    f"the {s.test_cases_split} split of dataset {ref.id} has no test cases"
                )
        span = 0.5 if parent is not None else 1.0
        ids: list[list[int]] = []
        greedy = parent is not None and s.agreement_prompts > 0
        ours = self._measure(ctx, current, s, texts, cases, ids, greedy, progress, 0.0, span)
        theirs = None
        if parent is not None:
            theirs = self._measure(ctx, parent, s, texts, cases, ids, greedy, progress, 0.5, 0.5)

        metrics, notes = self._metrics(s, ours, theirs, cases)
        current.metrics.update(metrics)
        current.meta["evaluation"] = {
            "stage_id": stage_id,
            "task": "text-generation",
            "judged_on": judged_on,
            "dataset_id": s.dataset_id,
            "split": s.split if s.dataset_id is not None else None,
            "test_cases_dataset_id": s.test_cases_dataset_id,
            "parent": parent.key if parent is not None else None,
            "settings": settings_meta(s),
        }
        progress(1.0, "evaluated")
        message = self._message(metrics, judged_on, parent, len(cases))
        if notes:
            message += "; " + "; ".join(notes)
        return StageOutcome(metrics=metrics, message=message)

    def _measure(
        self,
        ctx: PipelineContext,
        artifact: Artifact,
        s: LlmEvaluateSettings,
        texts: list[str],
        cases: list[Any],
        ids: list[list[int]],
        greedy: bool,
        progress: ProgressFn,
        lo: float,
        span: float,
    ) -> _Measured:
        """Score one model; ``ids`` (the texts' tokens) is filled by the first model scored."""
        from pipelines.llm.perplexity import measure_perplexity
        from pipelines.llm.runtime import open_in_context

        key = artifact.key
        progress(lo, f"loading {key}")
        with open_in_context(ctx, artifact, threads=s.threads) as model:
            if not ids:
                ids.extend(model.encode(t) for t in texts)
            found = _Measured()
            result = measure_perplexity(
                model,
                ids,
                s.max_length,
                lambda f: progress(lo + span * 0.5 * f, f"{key}: perplexity {f * 100:.0f}%"),
            )
            found.perplexity, found.ppl_tokens = result.perplexity, result.tokens
            if cases:
                progress(lo + span * 0.5, f"{key}: {len(cases)} test cases")
                room = max(1, model.context_length - s.max_new_tokens)
                prompts = [
                    _fit(model.encode(c.prompt) or [model.pad_token_id], room) for c in cases
                ]
                found.outputs = _generate_texts(model, prompts, s.max_new_tokens)
            if greedy:
                progress(lo + span * 0.8, f"{key}: greedy continuations")
                prompts = [i[:PROMPT_TOKENS] for i in ids if i][: s.agreement_prompts]
                longest = max((len(p) for p in prompts), default=0)
                new = min(s.agreement_tokens, model.context_length - longest)
                if prompts and new >= 1:
                    found.greedy = [g.tokens for g in model.generate(prompts, new)]
        return found

    @staticmethod
    def _metrics(
        s: LlmEvaluateSettings, ours: _Measured, theirs: _Measured | None, cases: list[Any]
    ) -> tuple[dict[str, float], list[str]]:
        metrics: dict[str, float] = {"ppl_tokens": float(ours.ppl_tokens)}
        notes: list[str] = []
        values: dict[str, float | None] = {"perplexity": ours.perplexity}
        if theirs is not None:
            values["parent_perplexity"] = theirs.perplexity
            if ours.perplexity and theirs.perplexity:
                values["ppl_increase"] = ours.perplexity / theirs.perplexity - 1.0
        if cases:
            from pipelines.datasets.text_corpus import check_case

            metrics["test_cases"] = float(len(cases))
            for prefix, found in (("", ours), ("parent_", theirs)):
                if found is None:
                    continue
                passed = [check_case(c, out) for c, out in zip(cases, found.outputs, strict=True)]
                values[f"{prefix}test_case_accuracy"] = sum(passed) / len(cases)
                for tag in sorted({t for c in cases for t in c.tags}):
                    tagged = [p for c, p in zip(cases, passed, strict=True) if tag in c.tags]
                    values[f"{prefix}test_case_accuracy.{tag}"] = sum(tagged) / len(tagged)
        if theirs is not None and ours.greedy and theirs.greedy:
            share, run = greedy_agreement(ours.greedy, theirs.greedy, s.agreement_tokens)
            values["greedy_agreement"] = share
            values["greedy_prefix_tokens"] = run
            metrics["agreement_prompts"] = float(len(ours.greedy))
        for name, value in values.items():
            if value is None:
                continue
            if math.isfinite(value):
                metrics[name] = float(value)
            else:
                notes.append(f"{name} is not finite, left out")
        return metrics, notes

    @staticmethod
    def _message(
        metrics: dict[str, float], judged_on: str, parent: Artifact | None, cases: int
    ) -> str:
        parts = []
        if "perplexity" in metrics:
            line = f"perplexity {metrics['perplexity']:.4g}"
            if "parent_perplexity" in metrics:
                line += f" (parent {metrics['parent_perplexity']:.4g}"
                line += f", {metrics['ppl_increase']:+.2%})" if "ppl_increase" in metrics else ")"
            parts.append(f"{line} on {judged_on}")
        if "test_case_accuracy" in metrics:
            line = f"test cases {metrics['test_case_accuracy']:.1%} of {cases}"
            if "parent_test_case_accuracy" in metrics:
                line += f" (parent {metrics['parent_test_case_accuracy']:.1%})"
            parts.append(line)
        if "greedy_agreement" in metrics:
            parts.append(
                f"greedy tokens equal to {parent.key if parent else 'the parent'}'s: "
                f"{metrics['greedy_agreement']:.1%} (first {metrics['greedy_prefix_tokens']:.1f} "
                "tokens in a row on average)"
            )
        if parent is None:
            parts.append("no parent model to compare with")
        return "; ".join(parts)
