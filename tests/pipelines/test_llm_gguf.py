"""from_gguf: a tiny Llama written as GGUF (llama.cpp's layout) comes back as the same model.

The GGUF is written here with gguf's own writer the way llama.cpp's converter lays out a Llama:
its tensor names (``gguf.get_tensor_name_map``), q/k rows permuted for its rotary layout, the
hyper-parameters under ``llama.*`` and the byte-level BPE vocabulary, merges and special tokens
under ``tokenizer.ggml.*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.core import Artifact, PipelineContext, PipelineError
from pipelines.stages.llm_from_gguf import CHECKPOINT_DIR, FromGguf
from tests.llm_fixtures import tiny_llama

PROBE = "the quick brown fox jumps over the lazy dog"


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's ``permute``)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(folder: Path, out: Path, quant: str = "F32") -> Path:
    """A Llama checkpoint folder (float32 safetensors, byte-level BPE) as a GGUF file."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in tok["added_tokens"]:
        if added["special"]:
            types[added["id"]] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template((folder / "chat_template.jinja").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, weight in load_file(str(folder / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        if name.endswith("q_proj.weight"):
            weight = _permute(weight, heads)
        elif name.endswith("k_proj.weight"):
            weight = _permute(weight, kv_heads)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if quant == "Q8_0" and weight.ndim == 2:
            packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                gguf_name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("gguf-llama") / "llama")


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> dict[str, Path]:
    """The GGUF files, each alone in a read-only folder (as a stored version is)."""
    files = {}
    for quant in ("F32", "Q8_0"):
        folder = tmp_path_factory.mktemp(f"stored-{quant}")
        files[quant] = write_llama_gguf(llama, folder / "model.gguf", quant)
        folder.chmod(0o555)
    return files


def _convert(tmp_path: Path, gguf_file: Path, settings: dict[str, Any] | None = None):
    workdir = tmp_path / "work"
    workdir.mkdir()
    source = Artifact(
        key="input",
        path=str(gguf_file),
        format="gguf",
        precision="fp32",
        inputs=[],
        outputs=[],
        meta={"gguf": {"file_type": "F32"}},
    )
    ctx = PipelineContext.start(workdir, source, task="text-generation")
    result = FromGguf().run(ctx, "01-from_gguf", settings or {"threads": 1}, noop)
    return ctx, result


def _logits(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    ids = tokenizer(PROBE).input_ids
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits.float(), ids


def test_a_float_gguf_becomes_the_same_checkpoint(
    tmp_path: Path, llama: Path, stored: dict[str, Path]
) -> None:
    before = sorted(p.name for p in stored["F32"].parent.iterdir())
    ctx, result = _convert(tmp_path, stored["F32"])

    made = ctx.current_artifact
    assert (made.key, made.format, made.precision, made.parent) == (
        "01-from_gguf",
        "hf_checkpoint",
        "fp32",
        "input",
    )
    folder = Path(made.path)
    assert folder == ctx.workdir / "01-from_gguf" / CHECKPOINT_DIR
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "model.gguf" not in files and not any(n.endswith((".bin", ".gguf")) for n in files)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["max_position_embeddings"] == 128
    # Same weights (q/k permutation undone), same tokenizer, same chat template.
    got, ids = _logits(folder)
    want, want_ids = _logits(llama)
    assert ids == want_ids
    assert torch.allclose(got, want, atol=1e-5)
    assert result.metrics["max_abs_diff"] == 0.0 and result.metrics["parameters"] > 100_000
    assert (folder / "chat_template.jinja").read_text() == (
        llama / "chat_template.jinja"
    ).read_text()
    # Nothing written beside the stored file, and no scratch left in the stage folder.
    assert sorted(p.name for p in stored["F32"].parent.iterdir()) == before
    assert sorted(p.name for p in (ctx.workdir / "01-from_gguf").iterdir()) == [CHECKPOINT_DIR]


def test_a_quantized_gguf_is_dequantized(
    tmp_path: Path, llama: Path, stored: dict[str, Path]
) -> None:
    ctx, result = _convert(tmp_path, stored["Q8_0"], {"dtype": "bfloat16", "threads": 1})

    made = ctx.current_artifact
    assert made.precision == "bf16" and made.meta["dtype"] == "bfloat16"
    assert FromGguf.precision_for(FromGguf.Settings(dtype="bfloat16"), "int8") == ("bf16", None)
    got, _ = _logits(Path(made.path), torch.bfloat16)
    want, _ = _logits(llama)
    difference = float((got - want).abs().max())
    assert 0 < difference < 0.05  # Q8_0 and bf16 rounding, not another model
    from safetensors.torch import load_file

    weights = load_file(str(Path(made.path) / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def test_a_file_the_loader_cannot_read_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(
        PipelineError, match="GGUF loader cannot read this file: bad.gguf is GGUF v0"
    ):
        _convert(tmp_path, bad)
    assert not (tmp_path / "work" / "01-from_gguf" / CHECKPOINT_DIR).exists()
