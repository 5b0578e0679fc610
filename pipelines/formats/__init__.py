"""Upload inspection: decide what a model file is, from its content, without executing any of it.

The web process streams an upload to a temporary file and calls :func:`inspect_model` on it before
anything is stored. Nothing here unpickles, loads TorchScript, or imports torch: pickles are only
parsed opcode by opcode (:mod:`pipelines.formats.pickles`), ONNX is parsed as protobuf and checked
by ``onnx.checker``. Accepted:

- ONNX: one ``.onnx`` file, weights inside, or a zip/tar holding one ``.onnx`` and the external
  data files it names (:mod:`pipelines.formats.onnx_archive`);
- TorchScript: the zip ``torch.jit.save`` writes;
- a Hugging Face causal-LM checkpoint: a zip/tar of the folder ``save_pretrained`` writes
  (``config.json``, tokenizer, safetensors), checked from its JSON and safetensors headers
  (:mod:`pipelines.llm.checkpoint`). An archive holding a ``config.json`` is one, unless it is
  TorchScript or an ONNX model archive (a ``.onnx`` member and no safetensors);
- GGUF (llama.cpp): one file, from its header (:mod:`pipelines.llm.gguf_header`).

Everything else raises :class:`RejectedUpload` with a reason the user can act on. The format is
decided by the bytes; the file's name only picks the wording of the refusal for kinds that are
refused anyway (a ``.plan`` of random bytes is called a TensorRT engine, a valid ONNX model named
``.plan`` is accepted as ONNX).
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

from pipelines.core import TensorSpec
from pipelines.formats.archives import ZipRules, archive_kind, list_members
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.formats.names import extension, sanitize_filename
from pipelines.formats.onnx_archive import (
    ARCHIVE_SUFFIX,
    has_external_data,
    inspect_onnx_archive,
    is_onnx_archive,
    pack_onnx,
    unpack_onnx,
)
from pipelines.formats.onnx_model import (
    MAX_ONNX_BYTES,
    check_external_data,
    inspect_onnx,
    load_model,
    looks_like_model,
)
from pipelines.formats.pickles import PickleScan, looks_dangerous, scan_pickle
from pipelines.formats.safetensors_header import read_safetensors_header
from pipelines.formats.shapes import parse_input_shapes
from pipelines.formats.torchscript import TENSORRT_MESSAGE, inspect_zip

__all__ = [
    "ARCHIVE_SUFFIX",
    "has_external_data",
    "pack_onnx",
    "unpack_onnx",
    "ModelInfo",
    "PickleScan",
    "RejectedUpload",
    "scan_pickle",
    "check_external_data",
    "inspect_model",
    "parse_input_shapes",
    "read_safetensors_header",
    "sanitize_filename",
    "PICKLE_MESSAGE",
    "TENSORRT_MESSAGE",
    "SAFETENSORS_MESSAGE",
    "UPLOADABLE",
]

#: What may be uploaded, for the end of refusals.
UPLOADABLE = "ONNX, TorchScript, a Hugging Face checkpoint folder as a zip or tar, or a GGUF file"
PICKLE_MESSAGE = (
    "pickle files are refused: loading one runs arbitrary code. Upload ONNX or TorchScript; "
    "a language model as its Hugging Face checkpoint folder with safetensors weights"
)
SAFETENSORS_MESSAGE = (
    "safetensors weights alone need their model definition: for a language model, upload the "
    "whole checkpoint folder as a zip or tar (config.json, tokenizer, safetensors); otherwise "
    "upload ONNX or TorchScript"
)
NATIVE_MESSAGE = (
    "native code is refused: this is {what}, and loading one runs its code. Upload " + UPLOADABLE
)

TENSORRT_EXTENSIONS = frozenset({".plan", ".engine", ".trt"})
NATIVE_EXTENSIONS = frozenset({".so", ".dll", ".dylib", ".pyd", ".exe"})
PICKLE_EXTENSIONS = frozenset({".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"})

# Scanning a plain pickle only improves the message (it is refused anyway): bound the work.
_PICKLE_SNIFF_BYTES = 64 * 2**20
_PICKLE_SNIFF_OPCODES = 1_000_000
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_OTHER_FORMATS = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 (Keras .h5) file"),
    (b"\x93NUMPY", "a NumPy array file"),
)


def _native(what: str) -> RejectedUpload:
    return RejectedUpload(NATIVE_MESSAGE.format(what=what), code="native_code")


def _tensorrt() -> RejectedUpload:
    return RejectedUpload(TENSORRT_MESSAGE, code="tensorrt")


def _scan_file(path: Path, size: int) -> PickleScan:
    with path.open("rb") as f:
        return scan_pickle(f, min(size, _PICKLE_SNIFF_BYTES), max_opcodes=_PICKLE_SNIFF_OPCODES)


def _pickle_refusal(scan: PickleScan | None) -> RejectedUpload:
    message = PICKLE_MESSAGE
    if scan is not None and scan.refused:
        dangerous = [g for g in scan.refused if looks_dangerous(g)]
        message += f" (this one would import and call {(dangerous or scan.refused)[0]})"
    return RejectedUpload(message, code="pickle")


def _has_embedded_zip(path: Path) -> bool:
    """A zip central directory with entries that does not start at byte 0 (a polyglot file).

    ``zipfile.is_zipfile`` alone only looks for an end-of-archive signature, which four random
    weight bytes near the end of a genuine ONNX file can match; opening the central directory
    and finding entries cannot happen by chance.
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.infolist()) > 0
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return False


def _zip_holds_onnx(path: Path, max_unpacked_bytes: int) -> bool:
    """Whether a zip upload is a model archive (it has an .onnx member) rather than TorchScript.

    An unreadable or unsafe zip answers False: the TorchScript check words that refusal.
    """
    try:
        members = list_members(path, ZipRules("zip", "zip", max_unpacked_bytes))
    except RejectedUpload:
        return False
    return is_onnx_archive(members)


def _archive_rules(kind: str, max_unpacked_bytes: int) -> ZipRules:
    """The rules model archives (ONNX with its data, checkpoints) are listed under."""
    return ZipRules(kind, "zip or tar", max_unpacked_bytes, invalid_code="invalid_archive")


def _zip_names(path: Path) -> list[str]:
    """The member names of a zip's central directory, unchecked (they only pick the
    inspector, which checks them); none when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return []


def _hexhead(head: bytes) -> str:
    return " ".join(f"{b:02x}" for b in head[:8])


def _looks_like_text(head: bytes) -> bool:
    for cut in range(4):  # the 64-byte head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return False


def inspect_model(
    path: Path,
    original_name: str,
    declared_inputs: list[TensorSpec] | None = None,
    max_unpacked_bytes: int = 4 * 2**30,
) -> ModelInfo:
    """Identify and validate the uploaded file at ``path`` without executing anything from it.

    ``original_name`` is the name the user gave (it only words refusals); ``declared_inputs`` are
    the input specs from the upload form, required for TorchScript (see
    :func:`parse_input_shapes`) and ignored for ONNX, whose inputs are read from the file;
    ``max_unpacked_bytes`` bounds the file, and a zip's unpacked size. Raises RejectedUpload.
    """
    path = Path(path)
    ext = extension(original_name)
    try:
        st = path.stat()
    except OSError as exc:
        raise RejectedUpload(
            f"the upload cannot be read ({exc.strerror})", code="unreadable"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise RejectedUpload("the upload is not a regular file", code="unreadable")
    size = st.st_size
    if size == 0:
        raise RejectedUpload("the file is empty", code="empty")
    with path.open("rb") as f:
        head = f.read(64)

    # Native code first: nothing else matters about an executable.
    if head.startswith(b"\x7fELF"):
        raise _native("an ELF executable or shared library (.so)")
    if head.startswith(b"MZ"):
        raise _native("a Windows executable or DLL (PE)")
    if head[:4] in _MACHO:
        raise _native("a macOS executable or library (Mach-O)")

    # An archive: a Hugging Face checkpoint (it holds a config.json), an ONNX model with its
    # external data (zip or tar), else a zip is TorchScript, a torch.save checkpoint, or
    # something else; the archive checks decide.
    # (Imported here: pipelines.llm imports this package's modules.)
    from pipelines.llm.checkpoint import inspect_checkpoint_archive, looks_like_checkpoint

    kind = archive_kind(path)
    if kind is not None and kind != "zip":
        # A tar has no directory: list it once (every member checked) and hand the listing on.
        members = list_members(path, _archive_rules(kind, max_unpacked_bytes))
        if looks_like_checkpoint(m.name for m in members):
            return inspect_checkpoint_archive(path, max_unpacked_bytes, members)
        return inspect_onnx_archive(path, max_unpacked_bytes)
    if kind == "zip":
        if looks_like_checkpoint(_zip_names(path)):
            return inspect_checkpoint_archive(path, max_unpacked_bytes)
        if _zip_holds_onnx(path, max_unpacked_bytes):
            return inspect_onnx_archive(path, max_unpacked_bytes)
        return inspect_zip(path, declared_inputs, max_unpacked_bytes)
    if _has_embedded_zip(path):
        raise RejectedUpload(
            "the file has a zip archive appended after other data; such polyglot files look "
            "different to different readers and are refused. Upload the model file itself",
            code="zip_unsafe",
        )

    if size > max_unpacked_bytes:
        raise RejectedUpload(
            f"the file is {size} bytes, over the {max_unpacked_bytes}-byte limit", code="too_large"
        )

    if head.startswith(b"GGUF"):
        from pipelines.llm.gguf_header import inspect_gguf

        return inspect_gguf(path)

    # Pickle: a protocol 2+ pickle starts with PROTO (0x80, version); older ones must parse.
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickle_refusal(_scan_file(path, size))
    scan = _scan_file(path, size)
    if scan.is_pickle:
        raise _pickle_refusal(scan)

    if head.startswith(b"ftrt"):  # serialized TensorRT engines (and Torch-TensorRT's) start so
        raise _tensorrt()

    # safetensors: 8-byte header length, then JSON ('{"' as every writer emits it).
    if head[8:10] == b'{"' or ext == ".safetensors":
        read_safetensors_header(path)  # a malformed header gets its own, precise refusal
        raise RejectedUpload(SAFETENSORS_MESSAGE, code="safetensors")

    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise RejectedUpload(
                f"unrecognised model format ({what}); upload {UPLOADABLE}",
                code="unrecognised",
            )

    # ONNX: protobuf has no magic number, so parse it and look for a graph with nodes.
    parse_error = ""
    model = None
    if size <= MAX_ONNX_BYTES:
        try:
            model = load_model(path)
        except Exception as exc:  # DecodeError, or onnx's own errors on garbage
            parse_error = " ".join(str(exc).split())[:200] or type(exc).__name__
    if model is not None and looks_like_model(model):
        return inspect_onnx(path, model)

    if ext in TENSORRT_EXTENSIONS:
        raise _tensorrt()
    if ext in NATIVE_EXTENSIONS:
        raise _native(f"a {ext} file")
    if ext == ".onnx":
        if size > MAX_ONNX_BYTES:
            reason = (
                "it is over 2 GB; ONNX models that big keep their weights in external data: "
                "upload a zip or tar holding the .onnx file and its data files"
            )
        elif model is None:
            reason = f"the file is not an ONNX protobuf, or it is truncated ({parse_error})"
        elif not model.HasField("graph"):
            reason = "the file has no graph"
        else:
            reason = "the graph has no nodes"
        raise RejectedUpload(f"not a valid ONNX model: {reason}", code="invalid_onnx")
    if ext in PICKLE_EXTENSIONS:
        hint = f"a {ext} file that is neither a TorchScript archive, a pickle, nor ONNX"
    elif _looks_like_text(head):
        hint = "it looks like a text file"
    else:
        hint = f"it starts with bytes {_hexhead(head)}"
    raise RejectedUpload(
        f"unrecognised model format ({hint}); upload {UPLOADABLE}", code="unrecognised"
    )
