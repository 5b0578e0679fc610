"""Perplexity: exp of the token-weighted mean negative log-likelihood over some texts.

Every token after a window's first is predicted from the tokens before it in its window. A text
longer than ``max_length`` tokens is cut into windows of ``max_length`` tokens that overlap by one
token, so each of its tokens after the very first is scored exactly once (with up to
``max_length - 1`` tokens of context: a window's first tokens see less context than a sliding
window would give them, which makes the number a little higher and much cheaper). The mean is
over tokens, not texts: a long text weighs more than a short one.

Comparing two models (a quantized one against its parent) is only fair on the same token ids:
:func:`measure_perplexity` takes ids, so a stage encodes the texts once and scores both models
on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.core import PipelineError

if TYPE_CHECKING:
    from pipelines.llm.runtime import TextModel

__all__ = [
    "BUILTIN_SAMPLE",
    "PerplexityResult",
    "measure_perplexity",
    "perplexity",
    "windows",
]

#: A short English sample, used when no text dataset is named (the stage message says so). It
#: is a rough check, not a benchmark: a few hundred tokens of plain prose.
BUILTIN_SAMPLE: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the "
    "clocks were striking thirteen.",
    "A language model assigns a probability to every sequence of words. Given the words so far, "
    "it predicts which word is likely to come next, and the better it predicts, the lower its "
    "perplexity on text it has not seen.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed "
    "farms and cities, and carry sand and stones that settle where the current slows down.",
    "She opened the window, looked at the garden for a long time, and then went back to the "
    "letter she had been trying to finish since the morning.",
    "To make bread, mix flour, water, salt and yeast, knead the dough until it is smooth, let it "
    "rise for an hour, shape it, and bake it in a hot oven until the crust is brown.",
    "The meeting was moved to Thursday because half of the team was travelling, and nobody "
    "wanted to make a decision about the budget without them.",
)


@dataclass(frozen=True)
class PerplexityResult:
    """The perplexity and what it rests on."""

    perplexity: float
    mean_nll: float
    tokens: int  # tokens scored
    texts: int  # texts that had at least one token scored
    windows: int


def windows(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """``ids`` cut into windows of at most ``max_length`` tokens, consecutive windows sharing
    one token, so every token but the first is predicted exactly once."""
    if max_length < 2:
        raise PipelineError(f"max_length must be at least 2 tokens, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return [ids]
    step = max_length - 1
    cut = [ids[start : start + max_length] for start in range(0, len(ids) - 1, step)]
    return [w for w in cut if len(w) >= 2]


def measure_perplexity(
    model: TextModel,
    token_lists: Sequence[Sequence[int]],
    max_length: int,
    progress: Callable[[float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on texts given as token ids (``max_length`` capped at the model's
    context). PipelineError when nothing can be scored (no text of two tokens or more)."""
    if not token_lists:
        raise PipelineError("perplexity needs at least one text, and none was given")
    length = min(max_length, model.context_length) if model.context_length else max_length
    cut = [windows(ids, length) for ids in token_lists]
    total_windows = sum(len(c) for c in cut)
    nll, tokens, texts, done = 0.0, 0, 0, 0
    for text_windows in cut:
        scored = 0
        for window in text_windows:
            value, count = model.negative_log_likelihood(window)
            nll += value
            scored += count
            done += 1
            if progress is not None:
                progress(done / max(total_windows, 1))
        tokens += scored
        texts += scored > 0
    if tokens == 0:
        raise PipelineError(
            "no text had two tokens or more, so no token could be predicted: perplexity needs "
            "longer texts"
        )
    mean = nll / tokens
    value = math.exp(mean) if mean < 700 else math.inf
    return PerplexityResult(value, mean, tokens, texts, total_windows)


def perplexity(model: TextModel, texts: Sequence[str], max_length: int) -> float:
    """Perplexity of ``model`` on ``texts`` (each encoded by the model's own tokenizer)."""
    if not texts:
        raise PipelineError("perplexity needs at least one text, and none was given")
    return measure_perplexity(model, [model.encode(t) for t in texts], max_length).perplexity
