"""A GGUF file (llama.cpp's format), described from its header without reading its tensors.

:func:`read_header` reads the header itself, bounded by the file's size: every count, string
and array must fit in the bytes that remain, and every tensor's data must lie inside the file.
It reads the file the way ``gguf.GGUFReader`` does (the tests compare the two), with gguf's own
tables of types, but not through the reader: the reader trusts the counts it reads (an array
count of 2**63 past the end of the file keeps it looping), and it makes numpy views of every
vocabulary entry, which took 15 s on the 262k-token Gemma 3 270M file (this walk: 0.3 s).
Nothing is imported but gguf's constants (no torch, no transformers). :func:`inspect_gguf`
then describes the model (architecture, context length, vocabulary, layers, heads, parameter
count, file type: Q4_K_M, Q8_0, F16, ...) and accepts it only when transformers' GGUF loader
reads its architecture into a causal LM it implements
(:func:`pipelines.llm.architectures.gguf_model_type`): the worker converts it with that loader.

Precision is the nearest :class:`~pipelines.core.Precision`: F32, F16, BF16 as they are; 5 to 8
bits (Q8_0, Q6_K, Q5_K_M) ``int8``; 4 bits and fewer (Q4_K_M, Q4_0, IQ4_XS, Q3_K, Q2_K)
``int4``; the exact type is kept in ``details["gguf"]["file_type"]``.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core import ModelFormat, Precision
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.llm.architectures import causal_lm_architectures, gguf_architectures
from pipelines.llm.architectures import gguf_model_type as loaded_model_type
from pipelines.llm.checkpoint import llm_io

__all__ = ["Array", "Header", "Tensor", "inspect_gguf", "precision_of", "read_header"]

MAGIC = b"GGUF"
MAX_ARRAY = 8_000_000  # elements of one metadata array (vocabularies reach a few 100k)
MAX_STRING = 64 * 2**20
MAX_DIMS = 8
# Metadata value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array.
_SCALAR = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_KEPT = 4096  # arrays of numbers up to this length keep their values


def _bad(reason: str) -> RejectedUpload:
    return RejectedUpload(f"not a valid GGUF file: {reason}", code="invalid_gguf")


@dataclass
class Header:
    """What the header holds: metadata values (an array as :class:`Array`), and the tensors."""

    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Array:
    """A metadata array: its element type and length; short arrays of numbers keep values."""

    item_type: int
    count: int
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    type_name: str  # a GGMLQuantizationType name: "Q4_K", "F16", ...
    elements: int


class _Walk:
    """The header, read with every length checked against the bytes that remain."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _bad(f"the file is truncated ({what} runs past its end at byte {self.size})")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.u64(what)
        if n > limit:
            raise _bad(f"{what} is {n} bytes long, over the {limit}-byte limit")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n]).decode("utf-8", "replace")

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALAR:
            fmt = _SCALAR[kind]
            return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY and depth < 2:
            item, count = self.u32(what), self.u64(what)
            if count > MAX_ARRAY:
                raise _bad(f"{what} has {count} elements, over the limit of {MAX_ARRAY}")
            if item in _SCALAR:
                width = struct.calcsize(_SCALAR[item])
                start = self.take(width * count, what)
                values: tuple[Any, ...] = ()
                if count <= _KEPT:
                    values = struct.unpack_from(f"<{count}{_SCALAR[item][1]}", self.buf, start)
                return Array(item, count, values)
            for _ in range(count):  # strings (a vocabulary) or nested arrays: skipped
                self.skip(item, what, depth + 1)
            return Array(item, count)
        raise _bad(f"{what} has an unknown value type {kind}")

    def skip(self, kind: int, what: str, depth: int) -> None:
        if kind == _STRING:
            n = self.u64(what)
            if n > MAX_STRING:
                raise _bad(f"{what} holds a string of {n} bytes, over the {MAX_STRING} limit")
            self.take(n, what)
        else:
            self.value(kind, what, depth)


def read_header(path: Path) -> Header:
    """The GGUF header at ``path``; refuses counts, strings or tensors that do not fit."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise _bad(f"the file has {size} bytes, too few for a GGUF header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        walk = _Walk(buf)
        if bytes(buf[:4]) != MAGIC:
            raise _bad("it does not start with the GGUF magic")
        walk.take(4, "the magic")
        version = walk.u32("the version")
        if version & 0xFFFF == 0:
            raise _bad("it is a big-endian GGUF; convert it to little-endian")
        if version not in (2, 3):
            raise _bad(f"version {version}; GGUF versions 2 and 3 are read")
        header = Header(version)
        n_tensors, n_kv = walk.u64("the tensor count"), walk.u64("the metadata count")
        if n_kv * 13 > walk.size or n_tensors * 24 > walk.size:
            raise _bad(f"it declares {n_kv} metadata keys and {n_tensors} tensors, more than fit")
        for _ in range(n_kv):
            key = walk.string("a metadata key", 65536)
            if key in header.fields:
                raise _bad(f"metadata {key[:60]!r} appears twice")
            header.fields[key] = walk.value(walk.u32(key), f"metadata {key[:60]!r}")
        alignment = header.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _bad(f"general.alignment {alignment} is not a power of two")
        spans = []
        for _ in range(n_tensors):
            name = walk.string("a tensor name", 65536)
            shown = name[:60]
            n_dims = walk.u32(f"tensor {shown!r}")
            if n_dims > MAX_DIMS:
                raise _bad(f"tensor {shown!r} has {n_dims} dimensions")
            dims = tuple(walk.u64(f"tensor {shown!r}") for _ in range(n_dims))
            try:
                kind = GGMLQuantizationType(walk.u32(f"tensor {shown!r}"))
                block, type_size = GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise _bad(f"tensor {shown!r} has an unknown type") from None
            elements = 1
            for d in dims:
                elements *= d
            if dims and dims[0] % block:
                raise _bad(f"tensor {shown!r}: {dims[0]} values do not fill {kind.name} blocks")
            offset = walk.u64(f"tensor {shown!r}")
            header.tensors.append(Tensor(name, dims, kind.name, elements))
            spans.append((shown, offset, elements // block * type_size))
        data_start = -(-walk.pos // alignment) * alignment
        for shown, offset, n_bytes in spans:
            if data_start + offset + n_bytes > walk.size:
                raise _bad(
                    f"the file is truncated: tensor {shown!r} ends at byte "
                    f"{data_start + offset + n_bytes}, past its end ({walk.size})"
                )
    names = [t.name for t in header.tensors]
    if len(set(names)) != len(names):
        raise _bad("a tensor name appears twice")
    return header


def precision_of(type_name: str) -> str:
    """The nearest Precision of a GGML type or file type name ("Q4_K_M" -> "int4")."""
    name = type_name.upper()
    if name in ("F32", "F64"):
        return Precision.FP32.value
    if name == "F16":
        return Precision.FP16.value
    if name == "BF16":
        return Precision.BF16.value
    if name.startswith(("Q8", "Q6", "Q5", "I8", "I16", "I32", "I64")):
        return Precision.INT8.value
    return Precision.INT4.value


def _int(value: Any) -> int | None:
    if isinstance(value, Array):  # per-layer values (LFM2's head_count_kv): the largest
        value = max((v for v in value.values if isinstance(v, int)), default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _file_type(header: Header) -> str:
    """The file type's name ("Q4_K_M"), or the most common type of the 2-D tensors."""
    from gguf.constants import LlamaFileType

    raw = _int(header.fields.get("general.file_type"))
    try:
        kind = LlamaFileType(raw) if raw is not None else None
    except ValueError:
        kind = None
    if kind is not None and kind != LlamaFileType.GUESSED:
        return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts: Counter[str] = Counter()
    for tensor in header.tensors:
        if len(tensor.dims) > 1:
            counts[tensor.type_name] += tensor.elements
    return counts.most_common(1)[0][0] if counts else "F32"


def inspect_gguf(path: Path) -> ModelInfo:
    """Describe the GGUF file at ``path``; RejectedUpload when it is corrupt or unsupported."""
    header = read_header(Path(path))
    fields = header.fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _bad("it has no general.architecture")
    if (_int(fields.get("split.count")) or 1) > 1:
        raise RejectedUpload(
            "this GGUF is one part of a split model: merge the parts into one file "
            "(llama-gguf-split --merge first-part.gguf model.gguf) and upload that",
            code="gguf_split",
        )
    name = fields.get("general.name")
    model_type = loaded_model_type(arch, name if isinstance(name, str) else "")
    if model_type is None:
        readable = ", ".join(sorted(gguf_architectures()))
        raise RejectedUpload(
            f"GGUF architecture {arch[:40]!r} is not one transformers' GGUF loader reads into a "
            f"causal language model ({readable}); other architectures are refused",
            code="architecture",
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, Array) or not tokens.count or "tokenizer.ggml.model" not in fields:
        raise RejectedUpload(
            "the GGUF file has no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens); "
            "convert the model with its tokenizer",
            code="no_tokenizer",
        )

    def meta(key: str) -> int | None:
        return _int(fields.get(f"{arch}.{key}"))

    file_type = _file_type(header)
    vocab = meta("vocab_size") or tokens.count
    heads = meta("attention.head_count")
    inputs, outputs = llm_io(vocab)
    llm = {
        "architecture": causal_lm_architectures()[model_type],
        "model_type": model_type,
        "parameters": sum(t.elements for t in header.tensors),
        "dtype": file_type,
        "context_length": meta("context_length"),
        "vocab_size": vocab,
        "layers": meta("block_count"),
        "heads": heads,
        "kv_heads": meta("attention.head_count_kv") or heads,
        "hidden_size": meta("embedding_length"),
        "tokenizer": "gguf",
        "chat_template": bool(fields.get("tokenizer.chat_template")),
    }
    return ModelInfo(
        format=ModelFormat.GGUF.value,
        precision=precision_of(file_type),
        inputs=inputs,
        outputs=outputs,
        details={
            "llm": llm,
            "gguf": {
                "file_type": file_type,
                "architecture": arch,
                "version": header.version,
                "tensors": len(header.tensors),
            },
        },
    )
