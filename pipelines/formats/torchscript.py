"""Zip uploads: container safety, pickle scanning, and the TorchScript layout.

``torch.jit.save`` writes a zip whose members all live under one folder ``<top>/``:
``data.pkl`` (the module's attributes, pickle protocol 2), ``constants.pkl``, ``code/**.py`` (the
TorchScript source) with ``*.debug_pkl`` next to each, ``data/<n>`` (raw tensor storages),
``constants/<n>``, ``version``, ``byteorder``, ``.data/serialization_id`` and ``extra/*`` (the
``_extra_files``). ``torch.save`` writes the same container without ``code/``: only a pickle of
tensors (and possibly arbitrary Python objects).
"""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path
from typing import Any

from pipelines.core import ModelFormat, Precision, TensorSpec
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.formats.pickles import looks_dangerous, scan_pickle
from pipelines.formats.shapes import EXAMPLE, validate_specs

MAX_MEMBERS = 100_000
MAX_PICKLE_MEMBER_BYTES = 256 * 2**20  # data.pkl of a huge model is a few MB
MAX_PICKLE_MEMBERS = 10_000  # one .debug_pkl per code file, plus data.pkl and constants.pkl
MAX_OPCODES = 4_000_000  # over all pickles of one archive: ~6 s of scanning at worst
BOMB_RATIO = 200
BOMB_MIN_BYTES = 2**20

CHECKPOINT_MESSAGE = (
    "this is a torch.save checkpoint (weights only, no model code); export the model with "
    "torch.jit.script(...).save() or to ONNX"
)
TENSORRT_MESSAGE = (
    "TensorRT engines are never accepted from uploads (an engine can carry plugin code); "
    "upload the ONNX model and let a worker build the engine"
)
SHAPES_MESSAGE = "TorchScript files do not record input shapes: give the input shape, " + EXAMPLE

_DRIVE = re.compile(r"^[A-Za-z]:")


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


def _show(name: str) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean if len(clean) <= 80 else clean[:77] + "..."


def check_members(infos: list[zipfile.ZipInfo], max_unpacked_bytes: int) -> None:
    """Refuse unsafe zip members: traversal, absolute names, links, duplicates, bombs."""
    if not infos:
        raise _refuse("the zip archive is empty", "invalid_zip")
    if len(infos) > MAX_MEMBERS:
        raise _refuse(f"the zip archive has more than {MAX_MEMBERS} members", "zip_bomb")
    seen: set[str] = set()
    total = 0
    for info in infos:
        raw = info.orig_filename
        name = info.filename
        shown = _show(raw)
        if "\x00" in raw or any(not ch.isprintable() for ch in raw):
            raise _refuse(f"zip member {shown!r} has control characters in its name", "zip_unsafe")
        if raw.startswith(("/", "\\")) or _DRIVE.match(raw):
            raise _refuse(f"zip member {shown!r} has an absolute path", "zip_unsafe")
        if ".." in re.split(r"[\\/]", raw):
            raise _refuse(f"zip member {shown!r} would escape the archive ('..')", "zip_unsafe")
        if name in seen:
            raise _refuse(f"zip member {shown!r} appears twice", "zip_unsafe")
        seen.add(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _refuse(f"zip member {shown!r} is a symbolic link", "zip_unsafe")
        if info.flag_bits & 0x1:
            raise _refuse(f"zip member {shown!r} is encrypted", "zip_unsafe")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(
                f"zip member {shown!r} uses compression method {info.compress_type}; "
                "torch.jit.save only stores or deflates",
                "zip_unsafe",
            )
        total += info.file_size
        if total > max_unpacked_bytes:
            raise _refuse(
                f"the zip archive unpacks to more than {max_unpacked_bytes} bytes "
                "(the upload limit)",
                "zip_bomb",
            )
        if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(
            info.compress_size, 1
        ):
            ratio = info.file_size // max(info.compress_size, 1)
            raise _refuse(
                f"zip member {shown!r} is compressed {ratio}:1 (over {BOMB_RATIO}:1): "
                "refused as a zip bomb",
                "zip_bomb",
            )


def _scan_members(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], checkpoint: bool) -> int:
    """Scan every pickle member; refuse on the first finding. Returns how many were scanned."""
    scanned = 0
    budget = MAX_OPCODES
    for info in infos:
        if info.is_dir() or not info.filename.lower().endswith("pkl"):  # .pkl and .debug_pkl
            continue
        shown = _show(info.filename)
        if scanned >= MAX_PICKLE_MEMBERS:
            raise _refuse(
                f"the archive has more than {MAX_PICKLE_MEMBERS} pickle members", "unsafe_pickle"
            )
        if info.file_size > MAX_PICKLE_MEMBER_BYTES:
            raise _refuse(
                f"zip member {shown!r} is a {info.file_size}-byte pickle, too large to be one "
                "torch.jit.save writes",
                "unsafe_pickle",
            )
        try:
            with zf.open(info) as f:
                result = scan_pickle(f, info.file_size, max_opcodes=budget)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _refuse(f"zip member {shown!r} cannot be read ({exc})", "invalid_zip") from None
        scanned += 1
        budget -= result.opcodes
        if result.ok:
            continue
        if result.refused:
            dangerous = [g for g in result.refused if looks_dangerous(g)]
            name = (dangerous or result.refused)[0]
            if name.startswith("__torch__.torch.classes.tensorrt"):
                raise _refuse(
                    f"this TorchScript file embeds a TensorRT engine ({name}). " + TENSORRT_MESSAGE,
                    "tensorrt",
                )
            if checkpoint and not dangerous:
                raise _refuse(
                    f"{CHECKPOINT_MESSAGE} (its {shown} also pickles {name}, which loading would "
                    "import)",
                    "checkpoint",
                )
            raise _refuse(
                f"refused: {shown} references {name}, which torch.jit.save never writes; loading "
                "this file would import and call it. Upload ONNX, or TorchScript made with "
                "torch.jit.script(model).save(path)",
                "unsafe_pickle",
            )
        raise _refuse(
            f"refused: {shown} is not a pickle torch.jit.save writes ({result.problems[0]})",
            "unsafe_pickle",
        )
    return scanned


def _read_small(zf: zipfile.ZipFile, name: str, limit: int = 64) -> str:
    try:
        info = zf.getinfo(name)
    except KeyError:
        return ""
    if info.file_size > limit:
        return ""
    with zf.open(info) as f:
        return f.read(limit).decode("ascii", "replace").strip()


def inspect_zip(
    path: Path, declared_inputs: list[TensorSpec] | None, max_unpacked_bytes: int
) -> ModelInfo:
    """Check a zip upload; return its ModelInfo when it is a TorchScript archive."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" or not zipfile.is_zipfile(path):
        raise _refuse(
            "not a valid zip archive: it must start with a local file header and end with "
            "a central directory (torch.jit.save writes both)",
            "invalid_zip",
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise _refuse(f"not a valid zip archive ({exc})", "invalid_zip") from None
    with zf:
        infos = zf.infolist()
        check_members(infos, max_unpacked_bytes)

        names = [i.filename for i in infos]
        tops = {n.split("/", 1)[0] for n in names}
        top = next(iter(tops)) if len(tops) == 1 else ""
        in_folder = bool(top) and all("/" in n for n in names)
        has_data = in_folder and f"{top}/data.pkl" in names
        has_code = in_folder and any(n.startswith(f"{top}/code/") for n in names)
        has_constants = in_folder and f"{top}/constants.pkl" in names
        checkpoint = has_data and not has_code and not has_constants

        scanned = _scan_members(zf, infos, checkpoint)

        if checkpoint:
            raise _refuse(CHECKPOINT_MESSAGE, "checkpoint")
        if not has_data:
            hint = ""
            if any(n.endswith("archive_format") for n in names):
                hint = " (it looks like a torch.export .pt2 archive)"
            raise _refuse(
                "a zip archive that is not a TorchScript model (torch.jit.save writes "
                f"<name>/data.pkl and <name>/code/ inside one folder){hint}; upload ONNX or "
                "TorchScript",
                "unrecognised",
            )
        if declared_inputs is None:
            raise _refuse(SHAPES_MESSAGE, "missing_shapes")
        inputs = validate_specs(declared_inputs)

        details: dict[str, Any] = {
            "archive": _show(top),
            "members": len(infos),
            "pickles_scanned": scanned,
            "code_files": sum(
                1 for n in names if n.startswith(f"{top}/code/") and n.endswith(".py")
            ),
            "tensor_records": sum(
                1 for i in infos if i.filename.startswith((f"{top}/data/", f"{top}/constants/"))
            ),
            "parameter_bytes": sum(
                i.file_size
                for i in infos
                if i.filename.startswith((f"{top}/data/", f"{top}/constants/"))
            ),
            "unpacked_bytes": sum(i.file_size for i in infos),
            "serialization_version": _read_small(zf, f"{top}/version"),
            "extra_files": sorted(
                _show(n[len(f"{top}/extra/") :]) for n in names if n.startswith(f"{top}/extra/")
            )[:20],
            "inputs_from": "declared",
        }
    return ModelInfo(
        format=ModelFormat.TORCHSCRIPT.value,
        precision=Precision.FP32.value,
        inputs=inputs,
        outputs=[],
        details=details,
    )
