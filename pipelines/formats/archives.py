"""Zip safety: the one check every uploaded archive passes before a byte of it is unpacked.

An npz dataset, a TorchScript model, and next an ONNX model with its external-data files or a
Hugging Face checkpoint are all zips. Each is judged from its central directory alone (nothing is
decompressed) by :func:`check_zip_members`: member count, total and per-member uncompressed size,
compression ratio (a zip bomb), names (no absolute paths, no ``..``, no control characters, no
duplicates), no symbolic links, no encryption, only stored or deflated members. What a format
allows beyond that (npz: only ``.npy`` members; TorchScript: one top folder and scanned pickles)
is its own module's business; the :class:`ZipRules` it passes say how it is worded and bounded.
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.formats.errors import RejectedUpload

__all__ = [
    "BOMB_MIN_BYTES",
    "BOMB_RATIO",
    "MAX_MEMBERS",
    "ZipRules",
    "check_zip_members",
    "read_zip_members",
    "shown_name",
]

# One bomb rule for every archive. Until this module the npz check refused members over 16 MiB
# compressed better than 500:1 and the TorchScript check members over 1 MiB better than 200:1, so
# the same bytes could pass as a dataset and fail as a model. Deflate tops out near 1030:1, which
# only runs of identical bytes reach; real data, even one-hot features saved with
# savez_compressed, stays under 500:1, while tensor storages torch.jit.save writes are stored
# (1:1). A member below 16 MiB cannot hurt however well it compresses: the total is bounded.
BOMB_RATIO = 500
BOMB_MIN_BYTES = 16 * 2**20
# Members of one archive: a TorchScript model has one per tensor storage plus its code files, so
# the largest models reach tens of thousands. A format may ask for fewer (ZipRules.max_members).
MAX_MEMBERS = 100_000

_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipRules:
    """How one kind of archive is bounded and named in refusals.

    ``kind`` words the messages ("zip", "npz": "npz member 'x.npy' is encrypted");
    ``writer`` is the tool whose archives are accepted (said when a compression method is
    refused); ``max_unpacked_bytes`` bounds the members' total uncompressed size (the upload
    limit), ``max_member_bytes`` each one (None: only the total); ``invalid_code`` tags an
    archive that cannot be read at all.
    """

    kind: str
    writer: str
    max_unpacked_bytes: int
    max_members: int = MAX_MEMBERS
    max_member_bytes: int | None = None
    invalid_code: str = "invalid_zip"


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


def shown_name(name: str, limit: int = 80) -> str:
    """A member name safe to put in a message: non-printables as "?", long names cut."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def read_zip_members(path: Path, rules: ZipRules) -> list[zipfile.ZipInfo]:
    """The members of the zip at ``path`` after :func:`check_zip_members`; an unreadable archive
    is refused with ``rules.invalid_code``."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise _refuse(
            f"not a valid {rules.kind} (zip) archive: {exc}", rules.invalid_code
        ) from None
    check_zip_members(infos, rules)
    return infos


def check_zip_members(infos: list[zipfile.ZipInfo], rules: ZipRules) -> None:
    """Refuse unsafe members: names that escape, links, duplicates, encryption, odd compression,
    too many members, too many bytes, bombs. An empty list passes (the format words that)."""
    kind = rules.kind
    if len(infos) > rules.max_members:
        raise _refuse(f"the {kind} archive has more than {rules.max_members} members", "zip_bomb")
    seen: set[str] = set()
    total = 0
    for info in infos:
        raw = info.orig_filename
        shown = shown_name(raw)
        member = f"{kind} member {shown!r}"
        if any(not ch.isprintable() for ch in raw):
            raise _refuse(f"{member} has control characters in its name", "zip_unsafe")
        if raw.startswith(("/", "\\")) or _DRIVE.match(raw):
            raise _refuse(f"{member} has an absolute path", "zip_unsafe")
        if ".." in re.split(r"[\\/]", raw):
            raise _refuse(f"{member} would escape the archive ('..')", "zip_unsafe")
        if info.filename in seen:
            raise _refuse(f"{member} appears twice", "zip_unsafe")
        seen.add(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _refuse(f"{member} is a symbolic link", "zip_unsafe")
        if info.flag_bits & 0x1:
            raise _refuse(f"{member} is encrypted", "zip_unsafe")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(
                f"{member} uses compression method {info.compress_type}; {rules.writer} only "
                "stores or deflates",
                "zip_unsafe",
            )
        if rules.max_member_bytes is not None and info.file_size > rules.max_member_bytes:
            raise _refuse(
                f"{member} unpacks to {info.file_size} bytes, over the "
                f"{rules.max_member_bytes}-byte limit of one member",
                "zip_bomb",
            )
        total += info.file_size
        if total > rules.max_unpacked_bytes:
            raise _refuse(
                f"the {kind} archive unpacks to more than {rules.max_unpacked_bytes} bytes "
                "(the upload limit)",
                "zip_bomb",
            )
        if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(
            info.compress_size, 1
        ):
            ratio = info.file_size // max(info.compress_size, 1)
            raise _refuse(
                f"{member} is compressed {ratio}:1 (over {BOMB_RATIO}:1): refused as a zip bomb",
                "zip_bomb",
            )
