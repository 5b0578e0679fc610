"""A checkpoint's safetensors weights, checked from their headers against its config.

No tensor data is read: every header passes :func:`~pipelines.formats.read_safetensors_header`
(offsets inside the file, tensors tiling the data without overlap or gap, known dtypes, sizes
that fit the shapes), the shards agree with ``model.safetensors.index.json`` (the index names
exactly the shards present, and each tensor where it is), and the shapes fit the config where
the naming is unambiguous across Llama, GPT-2, Gemma, Qwen, Mistral, Falcon, GPT-NeoX... : the
token embedding is ``[vocab_size, hidden_size]``, ``lm_head`` has ``vocab_size`` rows, the
stack of decoder layers in the tensor names has ``num_hidden_layers`` layers, and an
attention's ``k_proj`` has ``num_key_value_heads * head_dim`` rows. Anything this cannot read
with certainty is left alone: only clear contradictions are refused, as loading would fail
on them later with a size mismatch.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.formats.archives import shown_name
from pipelines.formats.errors import RejectedUpload
from pipelines.formats.safetensors_header import read_safetensors_header

__all__ = ["INDEX", "Weights", "check_shapes", "read_weights"]

INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 2**20

# Float dtypes, by the torch name a config uses for them.
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The token embedding's name ends with one of these (Llama/Qwen/Gemma/Mistral, GPT-2,
# GPT-NeoX, Bloom/Falcon, InternLM-style).
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
# A decoder layer's tensors: "<prefix>.<i>.", the prefix ending in one of these containers.
LAYER = re.compile(r"^((?:[^.]+\.)*?(?:layers|h|blocks|layer))\.(\d+)\.")


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


@dataclass
class Weights:
    """What the headers say: each tensor's (dtype, shape), and the shard it sits in."""

    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    shard_of: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        total = 0
        for _, shape in self.tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def float_dtype(self) -> str | None:
        """The torch name of the float dtype holding most bytes, or None (no float tensor)."""
        bits = {"F32": 32, "F16": 16, "BF16": 16}
        held: dict[str, int] = defaultdict(int)
        for dtype, shape in self.tensors.values():
            if dtype in FLOAT_DTYPES:
                n = 1
                for d in shape:
                    n *= d
                held[dtype] += n * bits[dtype]
        if not held:
            return None
        return FLOAT_DTYPES[max(held, key=lambda d: held[d])]


def _read_index(path: Path) -> dict[str, str]:
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise _refuse(
            f"{INDEX} is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit", "shard_index"
        )
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(f"{INDEX} is not valid JSON ({str(exc)[:100]})", "shard_index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _refuse(f"{INDEX} has no weight_map of tensor name -> shard file", "shard_index")
    return weight_map


def read_weights(root: Path, shards: list[str], has_index: bool) -> Weights:
    """Check the safetensors files ``shards`` (names relative to ``root``) and their index.

    Without an index there must be exactly one file; with one, its weight_map names exactly
    the shards present and puts each tensor in the shard that holds it.
    """
    if not shards:
        raise _refuse(
            "the checkpoint has no *.safetensors weights; save them with "
            "model.save_pretrained(folder, safe_serialization=True)",
            "no_weights",
        )
    if len(shards) > 1 and not has_index:
        raise _refuse(
            f"the checkpoint has {len(shards)} safetensors files but no {INDEX} saying which "
            "tensor is in which; upload the folder save_pretrained wrote, index included",
            "shard_index",
        )
    weight_map = _read_index(root / INDEX) if has_index else None
    if weight_map is not None:
        _check_shards(weight_map, shards)
    weights = Weights()
    for shard in sorted(shards):
        try:
            header = read_safetensors_header(root / shard)
        except RejectedUpload as exc:
            raise _refuse(f"{shown_name(shard)}: {exc.message}", exc.code) from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in weights.tensors:
                raise _refuse(
                    f"tensor {shown_name(name)!r} is in two shards ({weights.shard_of[name]} and "
                    f"{shown_name(shard)})",
                    "shard_index",
                )
            weights.tensors[name] = (entry["dtype"], list(entry["shape"]))
            weights.shard_of[name] = shard
    if weight_map is not None:
        _check_tensors(weight_map, weights)
    return weights


def _check_shards(weight_map: dict[str, str], shards: list[str]) -> None:
    named, present = set(weight_map.values()), set(shards)
    missing = sorted(named - present)
    if missing:
        shown = ", ".join(repr(shown_name(m)) for m in missing[:3])
        raise _refuse(
            f"{INDEX} names {len(missing)} shard(s) that are not in the archive ({shown})",
            "shard_index",
        )
    unnamed = sorted(present - named)
    if unnamed:
        shown = ", ".join(repr(shown_name(m)) for m in unnamed[:3])
        raise _refuse(
            f"the archive holds {len(unnamed)} safetensors file(s) that {INDEX} does not name "
            f"({shown})",
            "shard_index",
        )


def _check_tensors(weight_map: dict[str, str], weights: Weights) -> None:
    for name, shard in weight_map.items():
        if weights.shard_of.get(name) != shard:
            raise _refuse(
                f"{INDEX} puts tensor {shown_name(name)!r} in {shown_name(shard)!r}, which does "
                "not hold it",
                "shard_index",
            )
    unlisted = sorted(set(weights.tensors) - set(weight_map))
    if unlisted:
        raise _refuse(
            f"{INDEX} does not list {len(unlisted)} tensor(s) the shards hold (e.g. "
            f"{shown_name(unlisted[0])!r})",
            "shard_index",
        )


def _layer_stacks(names: list[str]) -> dict[str, list[int]]:
    """Layer indices by the prefix that holds them ("model.layers" -> [0, 1, ...])."""
    stacks: dict[str, set[int]] = defaultdict(set)
    for name in names:
        match = LAYER.match(name)
        if match:
            stacks[match.group(1)].add(int(match.group(2)))
    return {prefix: sorted(found) for prefix, found in stacks.items()}


def _mismatch(what: str, name: str, shape: list[int], expected: str) -> RejectedUpload:
    return _refuse(
        f"tensor {shown_name(name)!r} has shape {shape}, but config.json says {what} "
        f"({expected}): the weights do not belong to this config",
        "shape_mismatch",
    )


def check_shapes(get: Callable[..., Any], weights: Weights) -> None:
    """Refuse weights that contradict the config; ``get(*keys)`` reads its first int among keys
    (``ConfigView.get`` of :mod:`pipelines.llm.checkpoint`)."""
    tensors = weights.tensors
    vocab = get("vocab_size", "n_vocab", "padded_vocab_size")
    hidden = get("hidden_size", "n_embd", "d_model", "dim")
    embed_dim = get("word_embed_proj_dim", "embedding_size") or hidden
    for name, (_, shape) in tensors.items():
        if (
            name.endswith(EMBEDDING_SUFFIXES)
            and vocab
            and embed_dim
            and shape != [vocab, embed_dim]
        ):
            expected = f"vocab_size {vocab}, hidden_size {embed_dim}"
            raise _mismatch("the token embedding is [vocab, hidden]", name, shape, expected)
    for name, (_, shape) in tensors.items():
        is_head = name == "lm_head.weight" or name.endswith(".lm_head.weight")
        if is_head and vocab and (len(shape) != 2 or shape[0] != vocab):
            raise _mismatch("lm_head has vocab_size rows", name, shape, f"{vocab}")

    layers = get("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if not layers:
        return
    allowed = {layers, layers + (get("num_nextn_predict_layers") or 0)}
    stacks = _layer_stacks(list(tensors))
    sizes = {p: len(ix) if ix == list(range(len(ix))) else -1 for p, ix in stacks.items()}
    matching = [p for p, n in sizes.items() if n in allowed]
    if stacks and not matching:
        found = ", ".join(
            f"{p}.{ix[0]}..{ix[-1]} ({len(ix)} layers{'' if sizes[p] > 0 else ', with gaps'})"
            for p, ix in sorted(stacks.items())
        )
        raise _refuse(
            f"config.json says {layers} layers (num_hidden_layers) but the weights hold {found}: "
            "the weights do not belong to this config",
            "shape_mismatch",
        )
    if len(matching) == 1:
        _check_heads(get, hidden, matching[0], tensors)


def _check_heads(
    get: Callable[..., Any], hidden: int | None, prefix: str, tensors: dict[str, Any]
) -> None:
    """An attention's q/k projections against the heads, in the decoder stack only (a vision
    tower beside it has heads of its own)."""
    heads = get("num_attention_heads", "n_head", "num_heads")
    if not heads or get("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim"):
        return  # latent attention (DeepSeek) sizes its projections otherwise
    head_dim = get("head_dim") or (hidden // heads if hidden and hidden % heads == 0 else None)
    kv_heads = get("num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    if not head_dim:
        return
    for name, (_, shape) in tensors.items():
        if not name.startswith(prefix + ".") or len(shape) != 2:
            continue
        if name.endswith("self_attn.k_proj.weight") and shape[0] != kv_heads * head_dim:
            expected = f"{kv_heads} key/value heads of {head_dim}"
            raise _mismatch("k_proj has kv_heads * head_dim rows", name, shape, expected)
        # Gated attention (Qwen3-Next) doubles q_proj: both are the config's heads.
        if name.endswith("self_attn.q_proj.weight") and shape[0] not in (
            heads * head_dim,
            2 * heads * head_dim,
        ):
            expected = f"{heads} heads of {head_dim}"
            raise _mismatch("q_proj has heads * head_dim rows", name, shape, expected)
