"""Language-model uploads: a Hugging Face checkpoint as a zip or tar, and a GGUF file.

The checkpoints are the tiny random Llama and GPT-2 of ``tests.llm_fixtures`` (built once per
module); each hostile variant is a copy of one with one thing changed. Every refusal is checked
for its words and for leaving nothing beside the upload (the inspector unpacks into a scratch
folder there). The GGUF files are written here with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.formats import RejectedUpload, inspect_model
from pipelines.llm.architectures import (
    causal_lm_architectures,
    gguf_architectures,
    gguf_loader_table,
    gguf_model_type,
)
from pipelines.llm.checkpoint import inspect_checkpoint_archive
from pipelines.llm.gguf_header import inspect_gguf, precision_of, read_header
from tests.llm_fixtures import CONTEXT, VOCAB, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parents[2]
LIMIT = 2**30
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture(scope="module")
def num_parameters(llama: Path, gpt2: Path) -> dict[str, int]:
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).num_parameters()
        for name, folder in (("llama", llama), ("gpt2", gpt2))
    }


def pack(
    folder: Path,
    out: Path,
    *,
    top: str | None = "model",
    extra: dict[str, bytes] | None = None,
    raw: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """``folder``'s files into a zip or tar (by ``out``'s suffix), under ``top`` or at the root;
    ``extra`` files are added beside them, ``raw`` members under exactly their given names."""
    entries = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.name not in drop]
    entries += sorted((extra or {}).items())
    named = [(f"{top}/{n}" if top else n, data) for n, data in entries]
    named += sorted((raw or {}).items())
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in named:
                zf.writestr(name, data)
    else:
        with tarfile.open(out, "w") as tf:
            for name, data in named:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


def copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "variant"
    shutil.copytree(folder, target)
    return target


def edit_json(path: Path, **changes: object) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def edit_header(path: Path, change) -> None:
    """Rewrite a safetensors file's header through ``change(header)``, data kept as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def refused(path: Path, *words: str, code: str | None = None) -> RejectedUpload:
    """The refusal of ``path`` through the upload inspector; nothing left beside it."""
    with pytest.raises(RejectedUpload) as info:
        inspect_model(path, path.name, max_unpacked_bytes=LIMIT)
    err = info.value
    for word in words:
        assert word in str(err), str(err)
    if code is not None:
        assert err.code == code, (err.code, str(err))
    assert sorted(os.listdir(path.parent)) == [path.name]  # the scratch folder is gone
    return err


# -- accepted -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("top", ["model", None])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_checkpoint_archive_is_described_from_its_headers(
    request, tmp_path: Path, num_parameters: dict[str, int], kind: str, top: str | None, arch: str
) -> None:
    folder = request.getfixturevalue(arch)
    archive = pack(folder, tmp_path / "up" / f"ckpt.{kind}", top=top)
    info = inspect_model(archive, archive.name, max_unpacked_bytes=LIMIT)
    assert (info.format, info.precision) == ("hf_checkpoint", "fp32")
    assert [(t.name, t.shape, t.dtype) for t in info.inputs] == [
        ("input_ids", ["batch", "sequence"], "int64")
    ]
    assert [(t.name, t.shape) for t in info.outputs] == [("logits", ["batch", "sequence", VOCAB])]
    llm = info.details["llm"]
    assert llm == {
        "architecture": "LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel",
        "model_type": arch,
        "parameters": num_parameters[arch],
        "dtype": "float32",
        "context_length": CONTEXT,
        "vocab_size": VOCAB,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2 if arch == "llama" else 4,
        "hidden_size": 64,
        "tokenizer": "tokenizer.json",
        "chat_template": True,
    }
    prefix = f"{top}/" if top else ""
    files = sorted(p.name for p in folder.iterdir())
    assert info.details["model_archive"] == {
        "kind": kind,
        "model": f"{prefix}config.json",
        "files": [prefix + n for n in files],
        "unpacked_bytes": sum((folder / n).stat().st_size for n in files),
    }
    assert sorted(os.listdir(archive.parent)) == [archive.name]


def test_sharded_bf16_weights_with_their_index_are_accepted(
    llama: Path, tmp_path: Path, num_parameters: dict[str, int]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = copy(llama, tmp_path)
    (folder / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(llama, local_files_only=True)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / INDEX).is_file()
    info = inspect_model(pack(folder, tmp_path / "up" / "c.tar"), "c.tar", max_unpacked_bytes=LIMIT)
    assert info.precision == "bf16" and info.details["llm"]["dtype"] == "bfloat16"
    assert info.details["llm"]["parameters"] == num_parameters["llama"]

    # The index must name exactly the shards present.
    first = sorted(folder.glob("model-*.safetensors"))[0]
    missing = pack(folder, tmp_path / "missing" / "c.zip", drop=(first.name,))
    refused(missing, "names 1 shard(s) that are not in the archive", first.name, code="shard_index")
    extra = pack(
        folder, tmp_path / "extra" / "c.zip", extra={"stray.safetensors": first.read_bytes()}
    )
    refused(extra, "does not name", "stray.safetensors", code="shard_index")


def test_a_sentencepiece_tokenizer_needs_its_config(llama: Path, tmp_path: Path) -> None:
    folder = copy(llama, tmp_path)
    (folder / "tokenizer.json").rename(folder / "tokenizer.model")
    info = inspect_checkpoint_archive(pack(folder, tmp_path / "up" / "c.zip"), LIMIT)
    assert info.details["llm"]["tokenizer"] == "tokenizer.model"
    (folder / "tokenizer_config.json").unlink()
    refused(pack(folder, tmp_path / "no" / "c.zip"), "no tokenizer", code="no_tokenizer")


# -- refused --------------------------------------------------------------------------------------


def _overlap(header: dict) -> None:
    names = sorted(n for n in header if n != "__metadata__")
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])


def _past_the_end(header: dict) -> None:
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 64, end + 64]


def _transposed_embedding(header: dict) -> None:
    header["model.embed_tokens.weight"]["shape"] = [64, VOCAB]  # same bytes, wrong shape


HOSTILE = {
    # name: (how the folder is changed, words of the refusal, code)
    "auto_map": (
        lambda f: edit_json(f / "config.json", auto_map={"AutoModelForCausalLM": "m.M"}),
        ("auto_map", "trust_remote_code"),
        "custom_code",
    ),
    "python_file": (
        lambda f: (f / "modeling_evil.py").write_text("import os\n"),
        ("'modeling_evil.py'", "custom code", "trust_remote_code"),
        "custom_code",
    ),
    "tokenizer_auto_map": (
        lambda f: edit_json(f / "tokenizer_config.json", auto_map={"AutoTokenizer": ["t.T"]}),
        ("tokenizer_config.json has an auto_map",),
        "custom_code",
    ),
    "pickle_weights": (
        lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00."),
        ("'pytorch_model.bin'", "convert", "safe_serialization=True"),
        "pickle",
    ),
    "no_tokenizer": (
        lambda f: (f / "tokenizer.json").unlink(),
        ("no tokenizer", "tokenizer.json"),
        "no_tokenizer",
    ),
    "no_weights": (
        lambda f: (f / "model.safetensors").unlink(),
        ("no *.safetensors weights",),
        "no_weights",
    ),
    "overlapping_offsets": (
        lambda f: edit_header(f / "model.safetensors", _overlap),
        ("model.safetensors", "overlaps another"),
        "invalid_safetensors",
    ),
    "offsets_past_the_file": (
        lambda f: edit_header(f / "model.safetensors", _past_the_end),
        ("model.safetensors", "past the data"),
        "invalid_safetensors",
    ),
    "embedding_shape": (
        lambda f: edit_header(f / "model.safetensors", _transposed_embedding),
        ("'model.embed_tokens.weight' has shape [64, 320]", "vocab_size 320, hidden_size 64"),
        "shape_mismatch",
    ),
    "vocab_size": (
        lambda f: edit_json(f / "config.json", vocab_size=VOCAB + 8),
        ("[320, 64]", f"vocab_size {VOCAB + 8}", "do not belong to this config"),
        "shape_mismatch",
    ),
    "layer_count": (
        lambda f: edit_json(f / "config.json", num_hidden_layers=3),
        ("says 3 layers", "model.layers.0..1 (2 layers)"),
        "shape_mismatch",
    ),
    "kv_heads": (
        lambda f: edit_json(f / "config.json", num_key_value_heads=4),
        ("k_proj.weight", "4 key/value heads of 16"),
        "shape_mismatch",
    ),
    "unknown_model_type": (
        lambda f: edit_json(f / "config.json", model_type="my_secret_llm"),
        ("'my_secret_llm'", "causal language models transformers implements", "refused"),
        "architecture",
    ),
    "encoder_model_type": (
        lambda f: edit_json(f / "config.json", model_type="t5"),
        ("'t5'",),
        "architecture",
    ),
    "quantized": (
        lambda f: edit_json(f / "config.json", quantization_config={"quant_method": "gptq"}),
        ("quantization_config",),
        "quantized",
    ),
    "unknown_file": (
        lambda f: (f / "install.sh").write_text("#!/bin/sh\n"),
        ("'install.sh'", "not part of a Hugging Face checkpoint"),
        "archive_extra",
    ),
    "bad_config": (
        lambda f: (f / "config.json").write_text("{not json"),
        ("config.json is not valid JSON",),
        "invalid_config",
    ),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_a_hostile_checkpoint_is_refused_with_its_reason(
    llama: Path, tmp_path: Path, hostile: str
) -> None:
    change, words, code = HOSTILE[hostile]
    folder = copy(llama, tmp_path)
    change(folder)
    kind = "tar" if len(hostile) % 2 else "zip"  # both kinds, spread over the cases
    refused(pack(folder, tmp_path / "up" / f"ckpt.{kind}"), *words, code=code)


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"../evil.txt": b"x"}, "would escape the archive ('..')"),
        ({"/etc/evil.txt": b"x"}, "absolute path"),
        ({"elsewhere/notes.txt": b"x"}, "outside the checkpoint folder"),
        ({"other/config.json": b"{}"}, "exactly one config.json"),
    ],
)
def test_archive_paths_are_checked(
    llama: Path, tmp_path: Path, members: dict[str, bytes], words: str
) -> None:
    refused(pack(llama, tmp_path / "up" / "c.zip", raw=members), words)


def test_a_config_too_deep_is_refused_with_how_to_archive(llama: Path, tmp_path: Path) -> None:
    archive = pack(llama, tmp_path / "up" / "c.tar", top="repo/model")
    refused(archive, "zip or tar the checkpoint folder itself", code="checkpoint_layout")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_link_is_refused(llama: Path, tmp_path: Path, kind: str) -> None:
    archive = pack(llama, tmp_path / "up" / f"c.{kind}", drop=("tokenizer.json",))
    if kind == "zip":
        with zipfile.ZipFile(archive, "a") as zf:
            link = zipfile.ZipInfo("model/tokenizer.json")
            link.external_attr = 0o120777 << 16
            zf.writestr(link, "/etc/passwd")
    else:
        with tarfile.open(archive, "a") as tf:
            link = tarfile.TarInfo("model/tokenizer.json")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
    refused(archive, "symbolic link", code="zip_unsafe")


def test_a_zip_bomb_is_refused(llama: Path, tmp_path: Path) -> None:
    archive = pack(llama, tmp_path / "up" / "c.zip", extra={"README.md": bytes(40 * 2**20)})
    refused(archive, "zip bomb", code="zip_bomb")


def test_the_upload_limit_bounds_the_unpacked_size(llama: Path, tmp_path: Path) -> None:
    archive = pack(llama, tmp_path / "up" / "c.tar")
    with pytest.raises(RejectedUpload, match="unpacks to more than 4096 bytes"):
        inspect_model(archive, "c.tar", max_unpacked_bytes=4096)


def test_an_onnx_archive_with_a_config_stays_onnx_unless_it_has_safetensors(
    llama: Path, tmp_path: Path
) -> None:
    # No safetensors: the ONNX archive rules decide (a graph and the data it names, nothing
    # else), not the checkpoint's, so config.json is refused as a file the model does not name.
    archive = tmp_path / "a" / "m.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model.onnx", b"\x08\x07")  # a protobuf: ir_version 7, nothing else
        zf.writestr("config.json", b"{}")
    refused(archive, "'config.json'", "the model does not name", code="archive_extra")
    # With safetensors it is a checkpoint, and the .onnx file is an unknown extra.
    archive = pack(llama, tmp_path / "b" / "c.zip", extra={"model.onnx": b"\x08\x07"})
    refused(archive, "'model.onnx'", "not part of a Hugging Face checkpoint", code="archive_extra")


def test_a_lone_safetensors_file_says_to_upload_the_folder(llama: Path, tmp_path: Path) -> None:
    lone = tmp_path / "up" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(llama / "model.safetensors", lone)
    refused(lone, "upload the whole checkpoint folder as a zip or tar", code="safetensors")


# -- GGUF -----------------------------------------------------------------------------------------


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    file_type: str = "MOSTLY_F16",
    tensor_type: str | None = None,
    tokenizer: bool = True,
    extra: dict[str, object] | None = None,
) -> Path:
    """A llama-style GGUF: the metadata a llama GGUF has and a few small tensors."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(CONTEXT)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(16)
    writer.add_file_type(LlamaFileType[file_type])
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(VOCAB)])
        writer.add_token_types([1] * VOCAB)
        writer.add_chat_template("{{ messages }}")
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_string(key, value)
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((VOCAB, 64)).astype(np.float32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", embedding.astype(np.float16))
    else:
        qtype = GGMLQuantizationType[tensor_type]
        writer.add_tensor("token_embd.weight", quantize(embedding, qtype), raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("file_type", "tensor_type", "label", "precision"),
    [
        ("MOSTLY_F16", None, "F16", "fp16"),
        ("MOSTLY_Q8_0", "Q8_0", "Q8_0", "int8"),
        ("MOSTLY_Q4_K_M", "Q4_0", "Q4_K_M", "int4"),
    ],
)
def test_a_gguf_is_described_from_its_header(
    tmp_path: Path, file_type: str, tensor_type: str | None, label: str, precision: str
) -> None:
    path = write_gguf(tmp_path / "up" / "m.gguf", file_type=file_type, tensor_type=tensor_type)
    info = inspect_model(path, "m.gguf", max_unpacked_bytes=LIMIT)
    assert info == inspect_gguf(path)  # the upload inspector dispatches on the GGUF magic
    assert (info.format, info.precision) == ("gguf", precision)
    assert info.details["gguf"] == {
        "file_type": label,
        "architecture": "llama",
        "version": 3,
        "tensors": 3,
    }
    assert info.details["llm"] == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "parameters": VOCAB * 64 + 64 + 64,
        "dtype": label,
        "context_length": CONTEXT,
        "vocab_size": VOCAB,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "hidden_size": 64,
        "tokenizer": "gguf",
        "chat_template": True,
    }
    assert [t.shape for t in info.outputs] == [["batch", "sequence", VOCAB]]


def test_the_header_reads_as_gguf_reader_reads_it(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = write_gguf(tmp_path / "m.gguf", file_type="MOSTLY_Q8_0", tensor_type="Q8_0")
    header, reader = read_header(path), GGUFReader(path)
    assert set(header.fields) == set(reader.fields) - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    for key, value in header.fields.items():
        expected = reader.fields[key].contents()
        if isinstance(expected, list):
            assert value.count == len(expected), key
        else:
            assert value == pytest.approx(expected), key
    assert [(t.name, t.type_name, t.elements) for t in header.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_elements)) for t in reader.tensors
    ]


def _raw_gguf(path: Path, kv: bytes, n_kv: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv + bytes(32))
    return path


def test_a_truncated_or_forged_gguf_is_refused_cleanly(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    for cut in (30, 200, 1500, len(whole) - 100):
        part = tmp_path / f"cut{cut}" / "m.gguf"
        part.parent.mkdir()
        part.write_bytes(whole[:cut])
        refused(part, "not a valid GGUF file", code="invalid_gguf")
    key = struct.pack("<Q", 1) + b"x"
    # Arrays past the end of the file (GGUFReader would loop on them), or over the bound.
    uint8s = _raw_gguf(tmp_path / "a" / "m.gguf", key + struct.pack("<IIQ", 9, 0, 2**20))
    refused(uint8s, "truncated", code="invalid_gguf")
    huge = _raw_gguf(tmp_path / "d" / "m.gguf", key + struct.pack("<IIQ", 9, 0, 2**62))
    refused(huge, "over the limit", code="invalid_gguf")
    strings = _raw_gguf(tmp_path / "b" / "m.gguf", key + struct.pack("<IIQ", 9, 8, 2**40))
    refused(strings, "over the limit", code="invalid_gguf")
    many = _raw_gguf(tmp_path / "c" / "m.gguf", key + struct.pack("<IQ", 8, 1) + b"y", n_kv=2**60)
    refused(many, "more than fit", code="invalid_gguf")


@pytest.mark.parametrize(
    ("kwargs", "words", "code"),
    [
        ({"arch": "bert"}, "'bert' is not one transformers' GGUF loader reads", "architecture"),
        ({"arch": "t5"}, "'t5'", "architecture"),
        ({"tokenizer": False}, "no tokenizer", "no_tokenizer"),
        ({"extra": {"split.count": 3}}, "one part of a split model", "gguf_split"),
    ],
)
def test_an_unloadable_gguf_is_refused(tmp_path: Path, kwargs: dict, words: str, code: str) -> None:
    refused(write_gguf(tmp_path / "up" / "m.gguf", **kwargs), words, code=code)


def test_gguf_precisions_follow_their_bits() -> None:
    assert [precision_of(t) for t in ("F32", "BF16", "Q6_K", "Q5_K_M", "Q4_0", "IQ2_XS")] == [
        "fp32",
        "bf16",
        "int8",
        "int8",
        "int4",
        "int4",
    ]


# -- the tables, and what the web process imports -------------------------------------------------


def test_the_parsed_tables_equal_transformers_own() -> None:
    code = (
        "import json\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES\n"
        "from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES\n"
        "causal = {k: v[0] if isinstance(v, (tuple, list)) else v "
        "for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}\n"
        "print(json.dumps([causal, list(GGUF_SUPPORTED_ARCHITECTURES)]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    causal, gguf_table = json.loads(run.stdout.strip().splitlines()[-1])
    assert causal_lm_architectures() == causal and len(causal) > 100
    assert list(gguf_loader_table()) == gguf_table
    readable = gguf_architectures()
    assert {"llama", "qwen2", "gemma3", "gpt2", "mistral"} <= readable
    assert not readable & {"t5", "umt5", "general", "tokenizer", "deci"}
    assert gguf_model_type("gemma3") == "gemma3_text" and gguf_model_type("qwen2moe") == "qwen2_moe"


def test_inspection_imports_neither_torch_nor_transformers(llama: Path, tmp_path: Path) -> None:
    archive = pack(llama, tmp_path / "c.tar")
    gguf_file = write_gguf(tmp_path / "m.gguf")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipelines.formats import inspect_model\n"
        f"inspect_model(Path({str(archive)!r}), 'c.tar')\n"
        f"inspect_model(Path({str(gguf_file)!r}), 'm.gguf')\n"
        "bad = [m for m in ('torch', 'transformers', 'django') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
