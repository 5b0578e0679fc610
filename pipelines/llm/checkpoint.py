"""A Hugging Face checkpoint uploaded as a zip or tar, checked without importing torch.

The archive is the folder ``save_pretrained`` writes (``config.json``, ``generation_config.json``,
tokenizer files, ``*.safetensors`` shards with their index), at the top of the archive or under
one top folder. What is accepted, in the order it is checked:

- the archive rules of :mod:`pipelines.formats.archives` (no absolute or ``..`` path, no link,
  no bomb, sizes bounded; unpacked by streaming into a scratch folder beside the upload that is
  removed whatever happens);
- exactly one ``config.json``; its folder is the checkpoint, and nothing lies outside it;
- no code: a ``*.py`` file anywhere, or an ``auto_map`` in ``config.json`` or
  ``tokenizer_config.json``, is refused (custom code would need ``trust_remote_code``, which the
  platform never sets);
- no pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``): loading one runs
  code, so the refusal says how to convert them to safetensors;
- no file beyond the weights, the tokenizer and a small allow-list (:data:`ALLOWED`), named in
  the refusal;
- a tokenizer: ``tokenizer.json``, or ``tokenizer.model`` with ``tokenizer_config.json``, or a
  GPT-2 style ``vocab.json`` with ``merges.txt``;
- ``model_type`` is a causal LM transformers implements (:mod:`pipelines.llm.architectures`),
  and the config is not pre-quantized (``quantization_config``: such weights need their
  quantizer's package to load);
- the weights: :func:`pipelines.llm.weights.read_weights` and
  :func:`~pipelines.llm.weights.check_shapes`.

JSON files are read only up to a bound; tensor data is never read.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.core import ModelFormat, Precision, TensorSpec
from pipelines.formats.archives import (
    Member,
    ZipRules,
    archive_kind,
    extract_archive,
    list_members,
    shown_name,
)
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.llm.architectures import causal_lm_architectures
from pipelines.llm.weights import INDEX, check_shapes, read_weights

__all__ = [
    "ALLOWED",
    "ConfigView",
    "PICKLE_SUFFIXES",
    "inspect_checkpoint_archive",
    "llm_io",
    "looks_like_checkpoint",
]

CONFIG = "config.json"
MAX_JSON_BYTES = 32 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
    }
)
#: Files a checkpoint folder may hold besides its config, weights and tokenizer.
ALLOWED = TOKENIZER_FILES | {"generation_config.json", "chat_template.json", ".gitattributes"}
_DOCS = re.compile(r"(?i)(readme|license|licence|notice|use_policy)(\.(md|txt))?")
DTYPE_PRECISION = {
    "float32": Precision.FP32.value,
    "float16": Precision.FP16.value,
    "bfloat16": Precision.BF16.value,
}
_CONVERT = (
    "loading a pickle runs code, so only safetensors weights are accepted: convert them with "
    "transformers (model = AutoModelForCausalLM.from_pretrained(folder); "
    "model.save_pretrained(out, safe_serialization=True)) and upload that folder"
)


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


def _parts(raw: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", raw) if p not in ("", ".")]


def looks_like_checkpoint(names: Iterable[str]) -> bool:
    """Whether an archive with these member names is meant as a Hugging Face checkpoint.

    It holds a ``config.json``, is not TorchScript (``<top>/data.pkl``, where ``torch.jit.save``
    keeps extra files such as a config under ``<top>/extra/``), and is not an ONNX model archive
    (a ``.onnx`` member and no safetensors: an ONNX export's folder often has a config.json).
    """
    split = [_parts(n) for n in names]
    if not any(p and p[-1] == CONFIG for p in split):
        return False
    if any(len(p) == 2 and p[1] == "data.pkl" for p in split):
        return False
    onnx = any(p and p[-1].lower().endswith(".onnx") for p in split)
    weights = any(p and p[-1].lower().endswith(".safetensors") for p in split)
    return weights or not onnx


def llm_io(vocab: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A causal LM's inputs (token ids) and outputs (logits over the vocabulary)."""
    return (
        [TensorSpec("input_ids", ["batch", "sequence"], "int64")],
        [TensorSpec("logits", ["batch", "sequence", vocab or "vocab"], "float32")],
    )


class ConfigView:
    """A config's values, looked up where causal LMs keep them (top level, else ``text_config``
    of a multimodal model whose text backbone is loaded)."""

    def __init__(self, config: dict[str, Any]) -> None:
        text = config.get("text_config")
        self.scopes = [config] + ([text] if isinstance(text, dict) else [])

    def get(self, *keys: str) -> int | None:
        """The first positive int among ``keys`` (GPT-2's n_embd is Llama's hidden_size)."""
        for scope in self.scopes:
            for key in keys:
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def raw(self, key: str) -> Any:
        for scope in self.scopes:
            if key in scope:
                return scope[key]
        return None


def read_json(path: Path, what: str, code: str = "invalid_config") -> dict[str, Any]:
    """A JSON object from ``path``, read only when under :data:`MAX_JSON_BYTES`."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise _refuse(f"{what} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit", code)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(f"{what} is not valid JSON ({str(exc)[:100]})", code) from None
    if not isinstance(value, dict):
        raise _refuse(f"{what} is not a JSON object", code)
    return value


def _root(members: list[Member]) -> tuple[str, dict[str, Member]]:
    """The checkpoint's folder in the archive ("" or "top/") and its files by relative name."""
    configs = [m.name for m in members if PurePosixPath(m.name).name == CONFIG]
    if len(configs) != 1:
        shown = ", ".join(repr(shown_name(c)) for c in configs[:3]) or "none"
        raise _refuse(
            f"a checkpoint archive holds exactly one {CONFIG}; this one holds {len(configs)} "
            f"({shown})",
            "checkpoint_layout",
        )
    depth = configs[0].count("/")
    if depth > 1:
        raise _refuse(
            f"{CONFIG} is at {shown_name(configs[0])!r}: zip or tar the checkpoint folder itself, "
            "so that config.json is at the top of the archive or in its one top folder",
            "checkpoint_layout",
        )
    prefix = configs[0][: -len(CONFIG)]
    outside = [m.name for m in members if not m.name.startswith(prefix)]
    if outside:
        shown = ", ".join(repr(shown_name(n)) for n in outside[:3])
        raise _refuse(
            f"the archive holds {len(outside)} file(s) outside the checkpoint folder "
            f"{prefix.rstrip('/')!r} ({shown}); archive only that folder",
            "archive_extra",
        )
    return prefix, {m.name[len(prefix) :]: m for m in members}


def _allowed(name: str) -> bool:
    """A top-level file a checkpoint folder may hold besides its weights."""
    return (
        name in ALLOWED
        or name in (CONFIG, INDEX)
        or name.endswith(".jinja")
        or _DOCS.fullmatch(name) is not None
    )


def _check_names(files: dict[str, Member]) -> tuple[list[str], str]:
    """Refuse code, pickles and unknown files; the safetensors files and the tokenizer kind."""
    code = sorted(n for n in files if n.lower().endswith(".py"))
    if code:
        shown = ", ".join(repr(shown_name(n)) for n in code[:3])
        raise _refuse(
            f"the checkpoint holds Python code ({shown}): custom code is refused, as running it "
            "would need trust_remote_code, which this platform never sets. Upload a model whose "
            "architecture transformers implements itself",
            "custom_code",
        )
    pickles = sorted(n for n in files if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        shown = ", ".join(repr(shown_name(n)) for n in pickles[:3])
        raise _refuse(f"pickled weights are refused ({shown}): {_CONVERT}", "pickle")
    shards: list[str] = []
    unknown: list[str] = []
    for name in sorted(files):
        top_level = "/" not in name
        if top_level and name.endswith(".safetensors"):
            shards.append(name)
        elif not (top_level and _allowed(name)):
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(shown_name(n)) for n in unknown[:5])
        raise _refuse(
            f"the checkpoint holds {len(unknown)} file(s) that are not part of a Hugging Face "
            f"checkpoint ({shown}); it may hold {CONFIG}, generation_config.json, *.safetensors "
            f"with {INDEX}, tokenizer files, *.jinja chat templates, README and LICENSE, and "
            "nothing else",
            "archive_extra",
        )
    if "tokenizer.json" in files:
        tokenizer = "tokenizer.json"
    elif "tokenizer.model" in files and "tokenizer_config.json" in files:
        tokenizer = "tokenizer.model"
    elif "vocab.json" in files and "merges.txt" in files:
        tokenizer = "vocab.json+merges.txt"
    else:
        raise _refuse(
            "the checkpoint has no tokenizer: it needs tokenizer.json, or tokenizer.model with "
            "tokenizer_config.json (tokenizer.save_pretrained(folder) writes them)",
            "no_tokenizer",
        )
    return shards, tokenizer


def _check_config(config: dict[str, Any]) -> tuple[str, str]:
    """The model_type and its class name; refuses custom code and unknown architectures."""
    if "auto_map" in config:
        raise _refuse(
            f"{CONFIG} has an auto_map: the model needs custom code, which is refused "
            "(trust_remote_code is never set). Upload a model whose architecture transformers "
            "implements itself",
            "custom_code",
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise _refuse(
            f"{CONFIG} has no model_type, so its architecture is unknown", "invalid_config"
        )
    known = causal_lm_architectures()
    if model_type not in known:
        examples = ", ".join(t for t in ("llama", "qwen2", "gemma3_text", "mistral", "gpt2"))
        raise _refuse(
            f"model_type {shown_name(model_type, 40)!r} is not one of the {len(known)} causal "
            f"language models transformers implements (e.g. {examples}); other architectures "
            "are refused, as they would need custom code",
            "architecture",
        )
    if config.get("quantization_config"):
        raise _refuse(
            f"{CONFIG} has a quantization_config: pre-quantized checkpoints need their "
            "quantizer's package to load. Upload the float (fp32/bf16/fp16) checkpoint; the "
            "quantize stage makes INT8 and INT4 versions of it",
            "quantized",
        )
    return model_type, known[model_type]


def _chat_template(files: dict[str, Member], tokenizer_config: dict[str, Any] | None) -> bool:
    if any(n.endswith(".jinja") or n == "chat_template.json" for n in files):
        return True
    return bool(tokenizer_config and tokenizer_config.get("chat_template"))


def _rules(kind: str, max_unpacked_bytes: int) -> ZipRules:
    return ZipRules(kind, "zip or tar", max_unpacked_bytes, invalid_code="invalid_archive")


def inspect_checkpoint_archive(
    path: Path, max_unpacked_bytes: int, members: list[Member] | None = None
) -> ModelInfo:
    """Check the zip or tar at ``path`` as a Hugging Face causal-LM checkpoint; RejectedUpload.

    ``members`` is the archive's checked listing when the caller already has it (a tar is
    read front to back to list it). Nothing is left beside ``path`` whatever happens.
    """
    path = Path(path)
    kind = archive_kind(path) or "archive"
    rules = _rules(kind, max_unpacked_bytes)
    if members is None:
        members = list_members(path, rules)
    prefix, files = _root(members)
    shards, tokenizer = _check_names(files)
    with tempfile.TemporaryDirectory(prefix=".r1-unpack-", dir=path.parent) as scratch:
        unpacked = Path(scratch) / "model"
        extract_archive(path, unpacked, rules)
        root = unpacked.joinpath(*prefix.rstrip("/").split("/")) if prefix else unpacked
        config = read_json(root / CONFIG, CONFIG)
        model_type, architecture = _check_config(config)
        tokenizer_config = None
        if "tokenizer_config.json" in files:
            tokenizer_config = read_json(root / "tokenizer_config.json", "tokenizer_config.json")
            if "auto_map" in tokenizer_config:
                raise _refuse(
                    "tokenizer_config.json has an auto_map: the tokenizer needs custom code, "
                    "which is refused (trust_remote_code is never set)",
                    "custom_code",
                )
        weights = read_weights(root, shards, INDEX in files)
        view = ConfigView(config)
        check_shapes(view.get, weights)
    dtype = weights.float_dtype()
    declared = view.raw("dtype") or view.raw("torch_dtype")
    if dtype is None and declared in DTYPE_PRECISION:
        dtype = declared
    vocab = view.get("vocab_size", "n_vocab", "padded_vocab_size")
    heads = view.get("num_attention_heads", "n_head", "num_heads")
    multi_query = view.raw("multi_query") is True
    inputs, outputs = llm_io(vocab)
    llm = {
        "architecture": architecture,
        "model_type": model_type,
        "parameters": weights.parameters,
        "dtype": dtype,
        "context_length": view.get(
            "max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"
        ),
        "vocab_size": vocab,
        "layers": view.get("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        "heads": heads,
        "kv_heads": view.get("num_key_value_heads", "num_kv_heads", "n_head_kv")
        or (1 if multi_query else heads),
        "hidden_size": view.get("hidden_size", "n_embd", "d_model", "dim"),
        "tokenizer": tokenizer,
        "chat_template": _chat_template(files, tokenizer_config),
    }
    return ModelInfo(
        format=ModelFormat.HF_CHECKPOINT.value,
        precision=DTYPE_PRECISION.get(dtype or "", Precision.FP32.value),
        inputs=inputs,
        outputs=outputs,
        details={
            "llm": llm,
            "model_archive": {
                "kind": kind,
                "model": prefix + CONFIG,
                "files": sorted(m.name for m in members),
                "unpacked_bytes": sum(m.size for m in members),
            },
        },
    )
