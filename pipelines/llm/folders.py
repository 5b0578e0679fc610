"""A model folder as one stored tar: packed by the worker, unpacked once per host to run.

The tar holds the folder's regular files under their relative paths (no links, no folders of
their own, owner and mode reset), in name order so the same folder packs to the same bytes.
Unpacking goes through :func:`pipelines.formats.onnx_archive.unpack_onnx`'s cache (sha256
checked first, renamed into place whole); the artifact's path is the marker file's folder.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from pipelines.core import PipelineError
from pipelines.formats.onnx_archive import unpack_onnx

__all__ = ["pack_folder", "unpack_folder"]


def pack_folder(folder: Path, out: Path, marker: str) -> dict[str, Any]:
    """Write every regular file under ``folder`` into a new tar at ``out``.

    ``marker`` is the file (relative to ``folder``) that marks the model's root; a link or
    anything but a regular file is refused. Returns the ``model_archive`` details a stored
    version keeps (kind, model = the marker, files, unpacked bytes).
    """
    folder = Path(folder)
    if not (folder / marker).is_file():
        raise PipelineError(f"{folder.name} is not a model folder: it has no {marker}")
    entries: list[tuple[Path, str]] = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise PipelineError(f"{path.relative_to(folder)} is a link; a model folder has none")
        if path.is_file():
            entries.append((path, path.relative_to(folder).as_posix()))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for source, name in entries:
            info = tf.gettarinfo(str(source), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            info.mtime = 0
            with open(source, "rb") as f:
                tf.addfile(info, f)
    return {
        "kind": "tar",
        "model": marker,
        "files": [name for _, name in entries],
        "unpacked_bytes": sum(source.stat().st_size for source, _ in entries),
    }


def unpack_folder(archive: Path, sha256: str, marker: str, cache_root: Path) -> Path:
    """The folder of a stored model tar, unpacked once under ``cache_root/<sha256>/``."""
    return unpack_onnx(archive, sha256, marker, cache_root).parent
