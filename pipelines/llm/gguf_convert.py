"""A GGUF file converted to a Hugging Face checkpoint folder with transformers' GGUF loader.

``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` dequantizes every tensor (Q4_K,
Q8_0, F16, ...) into a float model and rebuilds the config from the GGUF metadata (undoing
llama.cpp's q/k row permutation); ``AutoTokenizer`` likewise rebuilds the tokenizer (its
vocabulary, merges, special tokens and chat template) from the metadata. The model comes back
marked as quantized with gguf (``hf_quantizer``, ``config.quantization_config``) although its
weights are plain floats, and ``save_pretrained`` then refuses it ("quantized with gguf and is
not serializable"): both marks are cleared before it is saved as safetensors, with its
generation config and tokenizer files.

The GGUF is a stored file: the loader is pointed at a scratch folder holding a link to it, so
nothing is ever written beside it. The saved folder is loaded back and its logits on a probe
compared with the GGUF model's (``max_abs_diff``), so a conversion that changed the model does
not pass. torch and transformers are imported inside the function.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core import PipelineError
from pipelines.llm.lora_model import offline

__all__ = ["DTYPES", "Converted", "convert_gguf"]

# dtype setting -> (torch dtype name, precision of the checkpoint)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Text whose logits are compared between the GGUF model and the saved checkpoint.
PROBE = "The quick brown fox jumps over the lazy dog. 0 1 2 3"
# Tolerance of that comparison, relative to the largest logit (float32 is exact in practice).
_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
LINK_NAME = "model.gguf"


@dataclass
class Converted:
    """What a conversion made: the facts a version records about it."""

    architecture: str
    parameters: int
    dtype: str
    max_abs_diff: float
    probe_tokens: int
    files: list[str]


def convert_gguf(
    gguf_path: Path, dest: Path, scratch: Path, *, dtype: str = "float32"
) -> Converted:
    """Convert ``gguf_path`` into a checkpoint folder at ``dest`` (which must exist, empty).

    ``scratch`` is an empty folder the loader is pointed at (a link to the GGUF goes there).
    PipelineError if the loader cannot read the file or the saved checkpoint differs from it.
    """
    offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise PipelineError(f"the GGUF file is missing on this worker ({gguf_path})")
    link = Path(scratch) / LINK_NAME
    try:
        link.symlink_to(gguf_path.resolve())
    except OSError:  # a filesystem without links: a copy, still never beside the stored file
        shutil.copyfile(gguf_path, link)

    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(scratch), gguf_file=LINK_NAME, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(scratch),
            gguf_file=LINK_NAME,
            local_files_only=True,
            dtype=torch_dtype,
            trust_remote_code=False,
        ).eval()
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        reason = _first_line(exc).replace(str(link), gguf_path.name)
        raise PipelineError(f"transformers' GGUF loader cannot read this file: {reason}") from exc

    # The weights are dequantized floats; only these marks stop save_pretrained.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context > 0:
        tokenizer.model_max_length = context

    probe = list(tokenizer(PROBE).input_ids)[: max(2, min(32, context or 32))]
    ids = torch.tensor([probe])
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    architecture = type(model).__name__
    parameters = sum(p.numel() for p in model.parameters())

    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    _clean_config(Path(dest))
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(
        str(dest), local_files_only=True, dtype=torch_dtype
    ).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if not diff <= _TOLERANCE[dtype] * scale:
        raise PipelineError(
            f"the converted checkpoint's logits differ from the GGUF model's by {diff:.3g} "
            f"(largest logit {scale:.3g}); the conversion is not kept"
        )
    files = sorted(p.name for p in Path(dest).iterdir())
    if not any(name.endswith(".safetensors") for name in files):
        raise PipelineError("the converted checkpoint has no safetensors weights")
    return Converted(architecture, parameters, dtype, diff, len(probe), files)


def _clean_config(folder: Path) -> None:
    """No gguf quantization mark, worker path or GGUF name in the saved configs."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data: dict[str, Any] = json.loads(path.read_text())
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            data.pop(key, None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text())
        for key in ("gguf_file", "name_or_path", "local_files_only", "is_local"):
            data.pop(key, None)
        tokenizer_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
