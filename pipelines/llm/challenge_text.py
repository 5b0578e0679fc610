"""Champion/challenger for language models: both scored on the same split of the same dataset.

* A ``test_cases`` dataset: each prompt continued greedily (``max_new_tokens``) and checked with
  its case's check (:func:`pipelines.datasets.text_corpus.check_case`); the score is the share
  that passed (higher is better).
* Any other text dataset (text, prompt/completion, messages): perplexity on its texts (lower is
  better), each model reading the texts with its own tokenizer, in windows of ``max_length``.

A LoRA adapter is scored over its ``base`` checkpoint. The models are loaded one after the other,
never together (a worker's memory holds one).
"""

from __future__ import annotations

import math

from pipelines.core import Artifact, DatasetRef, PipelineError

__all__ = ["text_score"]

MAX_NEW_TOKENS = 32
MAX_LENGTH = 512
CASE_BATCH = 8  # test-case prompts decoded together


def text_score(
    artifact: Artifact,
    dataset: DatasetRef,
    split: str,
    *,
    base: Artifact | None = None,
    threads: int | None = None,
) -> tuple[str, bool, float, int]:
    """(metric, higher_is_better, value, rows) of one language model on a split of a dataset."""
    from pipelines.datasets.text_corpus import check_case, load_cases, load_texts, text_kind
    from pipelines.llm.perplexity import perplexity
    from pipelines.llm.runtime import open_text_model

    kind = text_kind(dataset)
    if kind is None:
        raise PipelineError(f"dataset {dataset.id} is not a text dataset: a language model is "
                            "scored on texts (perplexity) or test cases")  # fmt: skip
    with open_text_model(artifact, threads=threads, base=base) as model:
        if kind == "test_cases":
            cases = load_cases(dataset, split)
            room = max(1, model.context_length - MAX_NEW_TOKENS)
            prompts = [(model.encode(c.prompt) or [model.pad_token_id])[-room:] for c in cases]
            outputs = [
                model.decode(g.tokens)
                for i in range(0, len(prompts), CASE_BATCH)
                for g in model.generate(prompts[i : i + CASE_BATCH], MAX_NEW_TOKENS)
            ]
            passed = sum(check_case(c, out) for c, out in zip(cases, outputs, strict=True))
            return "test_case_accuracy", True, passed / len(cases), len(cases)
        texts = load_texts(dataset, split)
        value = perplexity(model, texts, min(MAX_LENGTH, model.context_length))
    if not math.isfinite(value):
        raise PipelineError(f"{artifact.key} gives no finite perplexity on dataset {dataset.id}")
    return "perplexity", False, value, len(texts)
