"""Zip uploads: pickle scanning and the TorchScript layout (container safety: ``archives``).

``torch.jit.save`` writes a zip whose members all live under one folder ``<top>/``:
``data.pkl`` (the module's attributes, pickle protocol 2), ``constants.pkl``, ``code/**.py`` (the
TorchScript source) with ``*.debug_pkl`` next to each, ``data/<n>`` (raw tensor storages),
``constants/<n>``, ``version``, ``byteorder``, ``.data/serialization_id`` and ``extra/*`` (the
``_extra_files``). ``torch.save`` writes the same container without ``code/``: only a pickle of
tensors (and possibly arbitrary Python objects).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from pipelines.core import ModelFormat, Precision, TensorSpec
from pipelines.formats.archives import ZipRules, check_zip_members, shown_name
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.formats.pickles import looks_dangerous, scan_pickle
from pipelines.formats.shapes import EXAMPLE, validate_specs

MAX_PICKLE_MEMBER_BYTES = 256 * 2**20  # data.pkl of a huge model is a few MB
MAX_PICKLE_MEMBERS = 10_000  # one .debug_pkl per code file, plus data.pkl and constants.pkl
MAX_OPCODES = 4_000_000  # over all pickles of one archive: ~6 s of scanning at worst

CHECKPOINT_MESSAGE = (
    "this is a torch.save checkpoint (weights only, no model code); export the model with "
    "torch.jit.script(...).save() or to ONNX"
)
TENSORRT_MESSAGE = (
    "TensorRT engines are never accepted from uploads (an engine can carry plugin code); "
    "upload the ONNX model and let a worker build the engine"
)
SHAPES_MESSAGE = "TorchScript files do not record input shapes: give the input shape, " + EXAMPLE


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


def _scan_members(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], checkpoint: bool) -> int:
    """Scan every pickle member; refuse on the first finding. Returns how many were scanned."""
    scanned = 0
    budget = MAX_OPCODES
    for info in infos:
        if info.is_dir() or not info.filename.lower().endswith("pkl"):  # .pkl and .debug_pkl
            continue
        shown = shown_name(info.filename)
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
        if not infos:
            raise _refuse("the zip archive is empty", "invalid_zip")
        check_zip_members(infos, ZipRules("zip", "torch.jit.save", max_unpacked_bytes))

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
            "archive": shown_name(top),
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
                shown_name(n[len(f"{top}/extra/") :])
                for n in names
                if n.startswith(f"{top}/extra/")
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
