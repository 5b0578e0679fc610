"""The one storage helper: streamed uploads, generated names, hashing, paths inside MEDIA_ROOT.

Uploads never sit whole in memory: :class:`HashingUploadHandler` spools every chunk to a temporary
file on the storage volume, hashing as it goes, and stops reading once the size limit is passed
(a body declared over the limit is refused before this, unread, by ``core.middleware``).
Stored files always get generated names; the user's file name is kept only for display.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler

T = TypeVar("T")

# What a multipart body carries besides the file: the other form fields and the framing.
FORM_OVERHEAD = 1024 * 1024


class HashingUploadHandler(TemporaryFileUploadHandler):
    """Streams each uploaded file to a temp file, computing sha256 and enforcing the size limit.

    A refusal is recorded on ``request.upload_refusal`` so the view can say why the file is
    missing. Refusing stops the parse where it is (``connection_reset``: the rest of the body is
    not drained; the middleware closes the connection instead) and closes the temporary file,
    which deletes it: no half-written file is left.
    """

    chunk_size = 256 * 1024

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):  # noqa: N803
        limit = settings.R1_MAX_UPLOAD_BYTES
        if content_length and content_length > limit + FORM_OVERHEAD:
            self._refuse(
                f"the upload is {human_size(content_length)}, over the {human_size(limit)} limit"
            )
        return None

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self.request, "upload_refusal", None):
            raise StopUpload(connection_reset=True)
        super().new_file(*args, **kwargs)
        self._sha = hashlib.sha256()
        self._size = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self._size += len(raw_data)
        if self._size > settings.R1_MAX_UPLOAD_BYTES:
            self._refuse(f"the file is over the {human_size(settings.R1_MAX_UPLOAD_BYTES)} limit")
            raise StopUpload(connection_reset=True)
        self._sha.update(raw_data)
        self.file.write(raw_data)

    def file_complete(self, file_size: int):
        uploaded = super().file_complete(file_size)
        uploaded.sha256 = self._sha.hexdigest()
        return uploaded

    def _refuse(self, reason: str) -> None:
        self.request.upload_refusal = reason


def human_size(n: int) -> str:
    """``n`` bytes for people: 512 B, 1.5 MiB, 3.0 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def media_path(relative: str) -> Path:
    """The absolute path of a stored file; refuses anything that would leave MEDIA_ROOT."""
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{relative!r} is outside the storage root")
    return path


def _new_name(kind: str, team_id: int, suffix: str) -> str:
    return f"{kind}/team-{team_id}/{uuid.uuid4().hex}{suffix}"


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 (hex) and size in bytes."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        size = os.fstat(f.fileno()).st_size
    return digest.hexdigest(), size


def sha256_cached(path: Path) -> str:
    """The file's sha256, hashed again only when its size or modification time changed.

    For pages that show whether stored files still match the hash they were certified with:
    hashing a multi-GB engine on every view would be far too slow. A rewrite that keeps both the
    size and the nanosecond mtime is not noticed here; the worker still hashes every file it
    loads, so such a file is never run.
    """
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _sha256_of(real, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=512)
def _sha256_of(real_path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(real_path))[0]


def write_atomic(relative: str, data: bytes) -> Path:
    """Write ``data`` to a stored file under a fixed name: a temporary name, then a rename.

    A reader sees the old file or the new one, never half of either; writing the same name
    again (a job delivered twice) replaces it.
    """
    final = media_path(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def store_upload(temp_path: Path, *, kind: str, team_id: int, suffix: str) -> str:
    """Move a spooled upload into storage under a generated name; returns its relative path."""
    relative = _new_name(kind, team_id, suffix)
    final = media_path(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(temp_path), final)
    return relative


def store_copy(src: Path, *, kind: str, team_id: int, suffix: str) -> tuple[str, str, int]:
    """Copy a worker-made file into storage; returns (relative path, sha256, size).

    The copy is written to a temporary name and renamed, so no reader ever sees half a file.
    """
    relative = _new_name(kind, team_id, suffix)
    final = media_path(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    shutil.copyfile(src, partial)
    # The hash is of the copy, so the row describes the bytes that were stored.
    sha256, size = sha256_file(partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it visible
    partial.replace(final)
    return relative, sha256, size


def store_built(
    build: Callable[[Path], T], *, kind: str, team_id: int, suffix: str
) -> tuple[str, str, int, T]:
    """Store a file that ``build`` writes (an archive packed from a job's files) in one step.

    ``build`` writes the path it is given, a temporary name in storage, renamed to a generated
    name once written, hashed and on disk; when it raises, nothing is left. Returns (relative
    path, sha256, size, what ``build`` returned).
    """
    relative = _new_name(kind, team_id, suffix)
    final = media_path(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    try:
        result = build(partial)
        sha256, size = sha256_file(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
    return relative, sha256, size, result


def remove(relative: str) -> None:
    media_path(relative).unlink(missing_ok=True)


class SpooledFile:
    """A local file presented as Django's spooled upload, for commands and scripts."""

    def __init__(self, path: Path, name: str, sha256: str, size: int) -> None:
        self._path, self.name, self.sha256, self.size = path, name, sha256, size

    def temporary_file_path(self) -> str:
        return str(self._path)


def spool_local_file(src: Path) -> SpooledFile:
    """Copy a local file into the upload spool, as an upload through the web would arrive."""
    spool = Path(settings.MEDIA_ROOT) / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    dest = spool / f"{uuid.uuid4().hex}.upload"
    shutil.copyfile(src, dest)
    sha256, size = sha256_file(dest)
    return SpooledFile(dest, Path(src).name, sha256, size)
