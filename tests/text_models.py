"""Tiny random language models for the certification tests, built from tests.llm_fixtures.

A random model's greedy tokens are often single bytes of a multi-byte character, which the
serving process rightly streams as U+FFFD (a decode failure). :func:`ascii_llama` makes a random
Llama that only ever chooses whole characters: its LM head's rows for the tokens that do not
decode to text on their own are zero (logit 0), and every other row is paired with its negation,
so some whole-character token always has a logit above 0. The end-of-sequence row is kept as it
is, so some continuations end early as real ones do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.llm_fixtures import tiny_llama

__all__ = ["ascii_llama", "copy_model", "edit_head", "lowercasing_tokenizer"]


def edit_head(folder: Path, edit) -> Path:
    """Apply ``edit(head, tokenizer)`` to the checkpoint's LM head weight, in place."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    path = folder / "model.safetensors"
    weights = load_file(path)
    edit(weights["lm_head.weight"], AutoTokenizer.from_pretrained(folder))
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def _whole_characters_only(head, tokenizer) -> None:
    ids = range(1, head.shape[0])  # 0 is the end of sequence
    good = [i for i in ids if "\ufffd" not in tokenizer.decode([i])]
    bad = sorted(set(ids) - set(good))
    head[bad] = 0.0
    for a, b in zip(good[0::2], good[1::2], strict=False):
        head[b] = -head[a]


def ascii_llama(folder: Path, seed: int = 0) -> Path:
    """A random tiny Llama whose greedy text is always valid UTF-8 (see the module's doc)."""
    tiny_llama(folder, seed=seed)
    return edit_head(folder, _whole_characters_only)


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def lowercasing_tokenizer(folder: Path) -> Path:
    """The checkpoint's tokenizer made to lowercase what it encodes (it no longer round-trips):
    tokenizer.json's normalizer, read as it is once the config names no class of its own."""
    path = folder / "tokenizer.json"
    config = json.loads(path.read_text())
    config["normalizer"] = {"type": "Lowercase"}
    path.write_text(json.dumps(config))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config))
    return folder
