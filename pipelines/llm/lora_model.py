"""The pieces of a LoRA run that touch the model: loading, adapters, batches, loss, saving.

* :func:`load_checkpoint_folder`: a checkpoint folder's model (fp32, to train) and tokenizer,
  from local files only (never a download, never custom code);
* :func:`default_target_modules` / :func:`wrap_lora`: which projections get adapters, and the
  peft model with them;
* :func:`collate` / :func:`token_loss_sum`: padded batches and the summed loss of their trained
  tokens;
* :func:`save_adapter` / :func:`save_merged`: the output folders (safetensors, the base's
  tokenizer files copied as they are), written into a hidden partial folder and renamed into
  place whole (:func:`publish_folder`).

torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.core import PipelineError
from pipelines.llm.lora_data import IGNORE, Example
from pipelines.staging import PARTIAL_PREFIX

__all__ = [
    "INERT_BASE_PREFIX",
    "collate",
    "copy_companion_files",
    "default_target_modules",
    "folder_fingerprint",
    "load_checkpoint_folder",
    "publish_folder",
    "save_adapter",
    "save_merged",
    "token_loss_sum",
    "wrap_lora",
]

# An adapter's adapter_config.json names its base with this prefix and the base's artifact key:
# not a local folder and not a valid hub repository id (a colon), so nothing would ever download
# it; the platform runs an adapter over the base its version's parent names.
INERT_BASE_PREFIX = "r1platform:"

# Linear modules by these names are never given adapters: output heads and MoE routers.
_NEVER = frozenset({"lm_head", "score", "classifier", "gate", "router"})

# Files of a checkpoint folder that a saved model writes itself; every other top-level file
# (tokenizer files, chat template, licence) is copied from the base as it is.
_MODEL_FILES = ("config.json", "generation_config.json")
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".gguf")


def offline() -> None:
    """Make sure the hub is never asked for anything (set before transformers reads it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def load_checkpoint_folder(folder: Path) -> tuple[Any, Any]:
    """(model in fp32, tokenizer) of a Hugging Face checkpoint folder, local files only."""
    offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise PipelineError(f"the checkpoint cannot be loaded: {_first_line(exc)}") from exc
    return model, tokenizer


def stored_dtype(folder: Path) -> str:
    """The dtype a checkpoint's config.json says its weights are stored in ("float32" if none)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).replace("torch.", "")


def _projection_modules(model: Any) -> dict[str, list[str]]:
    """Linear (and GPT-2 Conv1D) modules inside the model's repeated blocks, by last name."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is head:
            continue
        parts = name.split(".")
        # Inside a block list (a numbered path part): attention and MLP, not heads/projectors.
        if not any(part.isdigit() for part in parts[:-1]):
            continue
        found.setdefault(parts[-1], []).append(type(module).__name__)
    return found


def default_target_modules(model: Any) -> list[str]:
    """The attention and MLP projections of the model's blocks (q/k/v/o_proj, gate/up/down_proj
    for Llama-likes; c_attn, c_proj, c_fc for GPT-2), never lm_head, embeddings or routers."""
    names = sorted(n for n in _projection_modules(model) if n not in _NEVER)
    if not names:
        raise PipelineError(
            "found no Linear projections in this model's blocks to put LoRA adapters on; name "
            "them in target_modules"
        )
    return names


def wrap_lora(model: Any, settings: Any, target_modules: Sequence[str], base_key: str) -> Any:
    """The peft model with LoRA adapters on ``target_modules`` (only they train)."""
    from peft import LoraConfig, get_peft_model

    available = _projection_modules(model)
    missing = [name for name in target_modules if name not in available]
    if missing:
        raise PipelineError(
            f"target_modules {', '.join(missing)} are not projections of this model; it has "
            f"{', '.join(sorted(available)) or 'none'}"
        )
    # GPT-2's Conv1D stores its weight transposed (in x out): peft must know.
    conv1d = any("Conv1D" in available[name] for name in target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(target_modules),
        bias="none",
        fan_in_fan_out=conv1d,
    )
    with warnings.catch_warnings():
        # peft names the base by the folder it was loaded from; the adapter names it inertly.
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        # peft asks transformers 5 by the old name (is_gradient_checkpointing): not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = INERT_BASE_PREFIX + base_key
    return peft_model


def collate(examples: Sequence[Example], pad_id: int, device: str) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels}


def token_loss_sum(model: Any, batch: dict[str, Any], autocast: Any) -> Any:
    """Summed cross-entropy of each labelled token given the tokens before it (a 0-d tensor).

    The caller divides by the trained tokens of the whole accumulation group, so every token
    weighs the same whatever micro-batch it falls in.
    """
    import torch

    with autocast:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    labels = batch["labels"].to(logits.device)[:, 1:]
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


# -- output folders --------------------------------------------------------------------------


@contextmanager
def publish_folder(stage_dir: Path, name: str) -> Iterator[Path]:
    """Yield a hidden partial folder; when the block succeeds it becomes ``stage_dir/name``.

    A folder already there (an earlier, interrupted attempt) is replaced. A block that raises
    leaves nothing behind (:func:`pipelines.staging.clean_partials` removes what a killed worker
    left).
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=stage_dir))
    final = stage_dir / name
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + "old-", dir=stage_dir))
            os.replace(final, old / name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_companion_files(base: Path, dest: Path, *, generation_config: bool) -> list[str]:
    """Copy the base folder's tokenizer files (every top-level file that is not weights or
    config) into ``dest`` byte for byte; ``generation_config`` copies that file too."""
    copied = []
    for path in sorted(Path(base).iterdir()):
        name = path.name
        if not path.is_file() or path.is_symlink() or name.endswith(_MODEL_SUFFIXES):
            continue
        if name == "config.json" or name.startswith("adapter_") or name == "README.md":
            continue
        if name == "generation_config.json" and not generation_config:
            continue
        if (Path(dest) / name).exists():
            continue
        shutil.copyfile(path, Path(dest) / name)
        copied.append(name)
    return copied


def save_adapter(peft_model: Any, base: Path, dest: Path) -> None:
    """The adapter folder: adapter_config.json, adapter_model.safetensors, tokenizer files."""
    offline()
    # No embedding layer is trained, so none is saved (and the base is never looked up).
    peft_model.save_pretrained(str(dest), safe_serialization=True, save_embedding_layers=False)
    (Path(dest) / "README.md").unlink(missing_ok=True)  # peft's model card template
    config_path = Path(dest) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if not str(config.get("base_model_name_or_path", "")).startswith(INERT_BASE_PREFIX):
        raise PipelineError("the adapter's config names a base that could be downloaded")
    # peft writes target_modules from a set: sorted, the same adapter is the same bytes.
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_companion_files(base, dest, generation_config=True)


def save_merged(peft_model: Any, base: Path, dest: Path) -> Any:
    """Merge the adapters into the base weights and save the checkpoint (in the base's stored
    dtype, safetensors, with its generation config and tokenizer files); the merged model."""
    import torch

    offline()
    merged = peft_model.merge_and_unload()
    dtype = getattr(torch, stored_dtype(base), torch.float32)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merged = merged.to(dtype)
    merged.config.use_cache = True
    merged.save_pretrained(str(dest))
    for name in ("config.json", "generation_config.json"):
        path = Path(dest) / name
        if path.is_file():  # no worker path or stage key leaks into a stored version
            data = json.loads(path.read_text())
            data.pop("_name_or_path", None)
            data.pop("_model_name_or_path", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    copy_companion_files(base, dest, generation_config=True)
    return merged


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over a folder's top-level files (names and contents): what a resume must match."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
