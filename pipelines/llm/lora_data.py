"""A text dataset as token sequences to train on, with the tokens the loss counts marked.

Rows come from :mod:`pipelines.datasets.text_corpus` (the same splits as every stage sees) and
become :class:`Example` s: ``input_ids`` and ``labels`` of the same length, a label of
:data:`IGNORE` (-100, what cross-entropy ignores) where the model is not trained to predict the
token. What the loss counts depends on the kind:

* ``text``: every token. A text longer than ``max_length`` is cut into consecutive windows, so
  nothing is dropped; the tokenizer's EOS ends each text, so the model learns where texts end.
* ``prompt_completion``: the completion's tokens (and the EOS after it) only; the prompt's labels
  are IGNORE. Prompt and completion are tokenized apart, so the boundary is exact.
* ``messages``: the assistant turns only. The conversation is rendered through the tokenizer's
  chat template one message at a time, each rendering checked to extend the one before (so
  every piece of text is known to belong to one message, or to the template's header before an
  assistant turn), and each piece is tokenized on its own. A template that does not render turn
  by turn that way (one that rewrites earlier turns) makes that conversation train on all its
  tokens instead; :attr:`TrainData.all_token_conversations` counts those.

A sequence longer than ``max_length`` (prompt/completion, messages) keeps its start; one left
with no trained token is dropped and counted. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.core import DatasetRef, PipelineError
from pipelines.datasets.text_corpus import load_chats, load_pairs, load_texts, text_kind

__all__ = [
    "IGNORE",
    "TRAINABLE_KINDS",
    "Example",
    "TrainData",
    "build_examples",
    "trainable_kind",
]

IGNORE = -100
TRAINABLE_KINDS = ("text", "prompt_completion", "messages")

# What the loss is on, per kind, for messages and the stage's summary.
LOSS_ON = {
    "text": "all tokens",
    "prompt_completion": "completion tokens",
    "messages": "assistant turns",
}


@dataclass
class Example:
    """One training sequence; ``labels[i]`` is ``input_ids[i]`` or IGNORE (not trained on)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss counts: labelled ones after the first (the first has no prefix)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class TrainData:
    """The examples of one split and how they were made."""

    kind: str
    examples: list[Example]
    rows: int  # rows of the split
    dropped: int = 0  # rows (or windows) left with no trained token
    truncated: int = 0  # rows cut to max_length
    all_token_conversations: int = 0  # conversations trained on all tokens (see module doc)
    notes: list[str] = field(default_factory=list)

    @property
    def loss_on(self) -> str:
        if self.kind == "messages" and self.all_token_conversations:
            return (
                f"assistant turns ({self.all_token_conversations} conversation(s) on all tokens: "
                "the chat template does not render them turn by turn)"
            )
        return LOSS_ON[self.kind]


def trainable_kind(ref: DatasetRef, dataset_id: int | str) -> str:
    """The dataset's text kind if fine-tuning can use it; else a PipelineError saying why."""
    kind = text_kind(ref)
    if kind is None:
        raise PipelineError(
            f"dataset {dataset_id} is not a text dataset: fine-tuning a language model needs "
            "JSON Lines rows of text, prompt/completion or messages"
        )
    if kind not in TRAINABLE_KINDS:
        raise PipelineError(
            f"dataset {dataset_id} holds test cases (prompt, expected, check): they are for "
            "evaluate, they have no reference answer to train on; fine-tune on a text, "
            "prompt_completion or messages dataset"
        )
    return kind


def build_examples(ref: DatasetRef, tokenizer: Any, split: str, max_length: int) -> TrainData:
    """The examples of ``split`` of a text, prompt_completion or messages dataset."""
    kind = trainable_kind(ref, ref.id)
    eos = _eos_id(tokenizer)
    if kind == "text":
        texts = load_texts(ref, split)
        data = TrainData(kind, [], len(texts))
        for text in texts:
            ids = list(tokenizer(text).input_ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            if len(ids) > max_length:
                data.truncated += 1
            for start in range(0, len(ids), max_length):
                window = ids[start : start + max_length]
                _keep(data, Example(window, list(window)))
        return data
    if kind == "prompt_completion":
        pairs = load_pairs(ref, split)
        data = TrainData(kind, [], len(pairs))
        for prompt, completion in pairs:
            head = list(tokenizer(prompt).input_ids)
            tail = list(tokenizer(completion, add_special_tokens=False).input_ids)
            if eos is not None:
                tail.append(eos)
            _add_truncated(data, head + tail, [IGNORE] * len(head) + tail, max_length)
        return data
    chats = load_chats(ref, split)
    data = TrainData(kind, [], len(chats))
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"dataset {ref.id} holds conversations (messages) but this checkpoint's tokenizer "
            "has no chat template to render them; use a prompt_completion dataset instead"
        )
    for messages in chats:
        ids, labels = _conversation(tokenizer, messages, eos, data)
        _add_truncated(data, ids, labels, max_length)
    return data


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None


def _keep(data: TrainData, example: Example) -> None:
    if example.trained_tokens == 0:
        data.dropped += 1
    else:
        data.examples.append(example)


def _add_truncated(data: TrainData, ids: list[int], labels: list[int], max_length: int) -> None:
    if len(ids) > max_length:
        data.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    _keep(data, Example(ids, labels))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:
        raise PipelineError(
            f"the tokenizer's chat template cannot render a conversation: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if not isinstance(text, str):
        raise PipelineError("the tokenizer's chat template did not render text")
    return text


def _pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]] | None:
    """The rendered conversation as (text, trained) pieces, or None if the template does not
    render message by message (a rendering that is not an extension of the one before)."""
    pieces: list[tuple[str, bool]] = []
    before = ""
    for k, message in enumerate(messages):
        assistant = message["role"] == "assistant"
        if assistant:
            header = _render(tokenizer, messages[:k], True)
            if not header.startswith(before):
                return None
            pieces.append((header[len(before) :], False))
            before = header
        rendered = _render(tokenizer, messages[: k + 1], False)
        if not rendered.startswith(before):
            return None
        pieces.append((rendered[len(before) :], assistant))
        before = rendered
    return pieces


def _conversation(
    tokenizer: Any, messages: list[dict[str, str]], eos: int | None, data: TrainData
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: loss on its assistant turns (see module doc)."""
    ids: list[int] = []
    pieces = _pieces(tokenizer, messages)
    if pieces is None:
        data.all_token_conversations += 1
        text = _render(tokenizer, messages, False)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None and eos not in ids[-4:]:
            ids.append(eos)
        return ids, list(ids)
    labels: list[int] = []
    last_trained: list[int] = []
    for text, trained in pieces:
        if not text:
            continue
        piece = list(tokenizer(text, add_special_tokens=False).input_ids)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
        if trained:
            last_trained = piece
    # A template that ends a turn with no EOS would never teach the model to stop answering.
    if eos is not None and eos not in last_trained:
        ids.append(eos)
        labels.append(eos)
    return ids, labels
