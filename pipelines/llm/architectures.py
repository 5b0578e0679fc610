"""Which language models transformers implements itself, read from its source without importing it.

An upload is checked in the web process, which must not import torch, and importing
``transformers.models.auto.modeling_auto`` imports torch. The tables are plain literals in
transformers' source, so they are read with :mod:`ast` from the installed package (found with
``importlib.util.find_spec``, which imports nothing) and cached for the process:

- ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` in ``models/auto/modeling_auto.py``: model_type -> the
  class ``AutoModelForCausalLM`` builds. A checkpoint whose ``model_type`` is not a key needs
  custom code (``trust_remote_code``), which the platform never runs.
- ``GGUF_CONFIG_MAPPING`` in ``integrations/ggml.py`` (older releases:
  ``GGUF_SUPPORTED_ARCHITECTURES`` in ``modeling_gguf_pytorch_utils.py``): the GGUF
  ``general.architecture`` values transformers' GGUF loader reads. Its ``"general"`` and
  ``"tokenizer"`` entries are metadata sections, not architectures.

The loader renames a few GGUF architectures before it checks them (``qwen2moe`` ->
``qwen2_moe``, ...) and loads some under another model_type (``gemma3`` -> ``gemma3_text``);
:func:`gguf_model_type` mirrors those renames (from ``load_gguf_checkpoint`` in
``modeling_gguf_pytorch_utils.py``) so that a GGUF is accepted only when the loader reads it
AND the model it makes is a causal LM transformers implements.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from pipelines.core import PipelineError

__all__ = [
    "causal_lm_architectures",
    "gguf_architectures",
    "gguf_loader_table",
    "gguf_model_type",
    "transformers_root",
]

# Sections of GGUF_CONFIG_MAPPING that are not architectures.
_GGUF_SECTIONS = frozenset({"general", "tokenizer"})

# load_gguf_checkpoint's renames: a GGUF architecture -> the name it checks and loads under.
_GGUF_RENAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}
# ... and the model_type the loaded config then gets (the text backbone of a multimodal GGUF).
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
# Encoder-decoder architectures the loader reads that are not causal LMs.
_NOT_CAUSAL = ("t5", "t5encoder", "umt5")


def transformers_root() -> Path:
    """The installed transformers package's folder (nothing is imported to find it)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "transformers is not installed here, so language models cannot be checked; install "
            "the platform's requirements"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _assigned_literal(source: Path, name: str) -> ast.expr | None:
    """The expression assigned to the module-level ``name`` in ``source``, or None."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    return None


def _unreadable(what: str) -> PipelineError:
    return PipelineError(
        f"cannot read {what} from the installed transformers ({transformers_root()}); its "
        "layout changed: update pipelines/llm/architectures.py"
    )


@functools.cache
def causal_lm_architectures() -> dict[str, str]:
    """model_type -> causal-LM class name, as ``AutoModelForCausalLM`` maps them."""
    source = transformers_root() / "models" / "auto" / "modeling_auto.py"
    value = _assigned_literal(source, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    # OrderedDict([("llama", "LlamaForCausalLM"), ...]) or a plain dict literal.
    if isinstance(value, ast.Call) and value.args:
        value = value.args[0]
    try:
        pairs = ast.literal_eval(value) if value is not None else None
    except ValueError:
        pairs = None
    if isinstance(pairs, dict):
        pairs = list(pairs.items())
    if not isinstance(pairs, list | tuple) or not pairs:
        raise _unreadable("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    mapping: dict[str, str] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise _unreadable("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        model_type, cls = pair
        # A few entries map to a tuple of classes; the first is the default.
        mapping[str(model_type)] = str(cls[0] if isinstance(cls, tuple | list) else cls)
    return mapping


@functools.cache
def gguf_loader_table() -> tuple[str, ...]:
    """The loader's table as transformers defines it (its ``GGUF_SUPPORTED_ARCHITECTURES``:
    every key of ``GGUF_CONFIG_MAPPING``, metadata sections included)."""
    root = transformers_root()
    value = _assigned_literal(root / "integrations" / "ggml.py", "GGUF_CONFIG_MAPPING")
    if isinstance(value, ast.Dict):
        keys = [k.value for k in value.keys if isinstance(k, ast.Constant)]
        if keys and all(isinstance(k, str) for k in keys):
            return tuple(keys)
    older = root / "modeling_gguf_pytorch_utils.py"
    value = _assigned_literal(older, "GGUF_SUPPORTED_ARCHITECTURES")
    try:
        listed = ast.literal_eval(value) if value is not None else None
    except ValueError:
        listed = None
    if isinstance(listed, list | tuple) and listed:
        return tuple(str(a) for a in listed)
    raise _unreadable("the GGUF loader's architectures (GGUF_CONFIG_MAPPING)")


def gguf_architectures() -> frozenset[str]:
    """The GGUF architectures (``general.architecture``) the loader reads into a causal LM."""
    table = set(gguf_loader_table()) - _GGUF_SECTIONS
    causal = causal_lm_architectures()
    return frozenset(a for a in table if _loaded_type(a) in causal)


def _loaded_type(name: str) -> str:
    return _GGUF_MODEL_TYPES.get(name, name)


def gguf_model_type(architecture: str, model_name: str = "") -> str | None:
    """The causal-LM model_type transformers loads a GGUF of ``architecture`` as, or None when
    its GGUF loader cannot read it or what it reads is not a causal LM transformers implements.

    ``model_name`` is the file's ``general.name``: the loader reads a ``llama`` GGUF whose name
    says mistral as a Mistral model.
    """
    arch = architecture.strip()
    if not arch or any(part in arch for part in _NOT_CAUSAL):
        return None
    renamed = arch
    if "llama" in arch and "mistral" in model_name.lower():
        renamed = "mistral"
    for old, new in _GGUF_RENAMES.items():
        if old in arch:
            renamed = new
    table = set(gguf_loader_table()) - _GGUF_SECTIONS
    if arch not in table and renamed not in table:
        return None
    model_type = _loaded_type(renamed)
    return model_type if model_type in causal_lm_architectures() else None
