"""An ONNX model with external data as one archive: checked at upload, packed, unpacked to run.

A model over 2 GB cannot be one protobuf, and torch's exporter writes weights beside the graph
by default, so such a model is a folder: ``model.onnx`` and the data files its tensors name. The
platform keeps it as ONE stored object, the archive (zip, tar or tar.gz), hashed like any file.

The rule for an upload (:func:`inspect_onnx_archive`): exactly one ``.onnx`` member, anywhere in
the archive; every external-data ``location`` of its tensors resolves, relative to that member's
folder, to a member of the archive (no ``..``, no absolute path, no link), and each tensor's offset
and length fit that file; and nothing else: a member the model does not name is refused (named in
the message), so what is stored, downloaded and run is exactly the model. Inspection unpacks
into a scratch folder beside the upload (streamed, never into memory), reads the graph without
its weights (:mod:`pipelines.onnx_skeleton`) and removes the folder whatever happens.

To run a stored archive, :func:`unpack_onnx` extracts it once into a cache folder named by its
sha256 (checked before unpacking), renamed into place whole, so concurrent jobs share one copy
and none ever sees half of one. A job that makes an external-data model (quantize, over 2 GB)
gets it packed by :func:`pack_onnx` into an uncompressed tar (weights barely compress).
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.core import PipelineError
from pipelines.formats.archives import (
    Member,
    ZipRules,
    archive_kind,
    extract_archive,
    list_members,
    shown_name,
)
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.formats.onnx_model import check_external_data, external_tensors, inspect_onnx
from pipelines.onnx_skeleton import SkeletonError, read_skeleton

__all__ = [
    "ARCHIVE_SUFFIX",
    "has_external_data",
    "inspect_onnx_archive",
    "is_onnx_archive",
    "pack_onnx",
    "unpack_onnx",
]

#: The stored file's suffix for each kind of archive (the download keeps it).
ARCHIVE_SUFFIX = {"zip": ".zip", "tar": ".tar", "tar.gz": ".tar.gz"}

#: Unpacking a stored archive: its bytes were checked at upload and are verified by sha256
#: before unpacking, so only the structural rules apply, not the upload's size limit.
_STORED_LIMIT = 2**50


def _rules(kind: str, max_unpacked_bytes: int) -> ZipRules:
    return ZipRules(kind, "zip or tar", max_unpacked_bytes, invalid_code="invalid_archive")


def is_onnx_archive(members: list[Member]) -> bool:
    """Whether an archive's members include an ``.onnx`` file (else a zip may be TorchScript)."""
    return any(m.name.lower().endswith(".onnx") for m in members)


def _the_model(members: list[Member], kind: str) -> Member:
    models = [m for m in members if m.name.lower().endswith(".onnx")]
    if len(models) != 1:
        found = ", ".join(repr(shown_name(m.name)) for m in models[:3]) or "none"
        raise RejectedUpload(
            f"a model archive holds exactly one .onnx file and the data files it names; this "
            f"{kind} archive holds {len(models)} ({found})",
            code="archive_model",
        )
    return models[0]


def inspect_onnx_archive(path: Path, max_unpacked_bytes: int) -> ModelInfo:
    """Check the archive at ``path`` as an ONNX model with its external data; RejectedUpload.

    The ModelInfo's ``details["model_archive"]`` records the kind, the model's member name and the
    member files, which :func:`unpack_onnx` and the download need.
    """
    path = Path(path)
    kind = archive_kind(path) or "archive"
    rules = _rules(kind, max_unpacked_bytes)
    members = list_members(path, rules)
    model_member = _the_model(members, kind)
    with tempfile.TemporaryDirectory(prefix=".r1-unpack-", dir=path.parent) as scratch:
        root = Path(scratch) / "model"
        extract_archive(path, root, rules)
        model_path = root.joinpath(*model_member.name.split("/"))
        try:
            model = read_skeleton(model_path).model
        except (SkeletonError, ValueError) as exc:  # DecodeError is a ValueError too
            raise RejectedUpload(
                f"not a valid ONNX model: {model_member.name!r} in the archive is not an ONNX "
                f"protobuf ({' '.join(str(exc).split())[:200]})",
                code="invalid_onnx",
            ) from None
        data = check_external_data(model, model_path.parent)
        named = {model_member.name} | {p.relative_to(root.resolve()).as_posix() for p in data}
        extra = sorted(m.name for m in members if m.name not in named)
        if extra:
            shown = ", ".join(repr(shown_name(n)) for n in extra[:3])
            raise RejectedUpload(
                f"the archive holds {len(extra)} file(s) the model does not name ({shown}); a "
                "model archive holds the .onnx file and its external data files, nothing else",
                code="archive_extra",
            )
        info = inspect_onnx(model_path, model, external_ok=True)
    info.details["model_archive"] = {
        "kind": kind,
        "model": model_member.name,
        "files": sorted(m.name for m in members),
        "unpacked_bytes": sum(m.size for m in members),
    }
    return info


def has_external_data(path: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps tensors in other files (graph read, not weights)."""
    return bool(external_tensors(read_skeleton(Path(path)).model))


def pack_onnx(model_path: Path, out: Path) -> dict[str, Any]:
    """Write ``model_path`` and the data files it names into a new tar at ``out``.

    The references are checked as an upload's are (inside the model's folder, no links, offsets
    within the files). Returns the ``model_archive`` details a stored version keeps.
    """
    model_path = Path(model_path)
    base = model_path.parent.resolve()
    data = check_external_data(read_skeleton(model_path).model, base)
    entries = [(model_path.resolve(), model_path.name)]
    entries += [(p, p.relative_to(base).as_posix()) for p in data]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for source, name in entries:
            info = tf.gettarinfo(str(source), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(source, "rb") as f:
                tf.addfile(info, f)
    return {
        "kind": "tar",
        "model": model_path.name,
        "files": sorted(name for _, name in entries),
        "unpacked_bytes": sum(source.stat().st_size for source, _ in entries),
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unpack_onnx(archive: Path, sha256: str, model: str, cache_root: Path) -> Path:
    """The model file of a stored archive, unpacked once under ``cache_root/<sha256>/``.

    The archive is hashed before it is unpacked (PipelineError when it no longer matches); the
    folder appears whole by a rename, and a concurrent job that renamed its copy first wins, so
    every job and serving process on the host shares one copy. Nothing is ever written into it
    afterwards: a job works on copies (``onnx_io.copy_onnx``), never beside a stored file.
    """
    name = PurePosixPath(model)
    if name.is_absolute() or ".." in name.parts or len(sha256) != 64 or not sha256.isalnum():
        raise PipelineError(f"not a stored archive's model: {model!r} in {sha256[:16]!r}")
    folder = Path(cache_root) / sha256
    target = folder.joinpath(*name.parts)
    if target.is_file():
        return target
    if _sha256(Path(archive)) != sha256:
        raise PipelineError(
            f"the stored archive {Path(archive).name} no longer matches its sha256; it will not "
            "be unpacked or run. Upload the model again."
        )
    kind = archive_kind(Path(archive)) or "archive"
    try:
        extract_archive(Path(archive), folder, _rules(kind, _STORED_LIMIT))
    except FileExistsError:
        pass  # another process unpacked the same bytes first: its folder is complete
    except RejectedUpload as exc:
        raise PipelineError(f"the stored archive cannot be unpacked: {exc.message}") from None
    if not target.is_file():
        raise PipelineError(f"the stored archive holds no {model!r}")
    return target
