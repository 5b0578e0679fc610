"""Archive safety: the one check every uploaded zip or tar passes, and the one safe way to unpack.

An npz dataset, a TorchScript model, an ONNX model with its external-data files and next a
Hugging Face checkpoint are all archives. A zip is judged from its central directory alone
(nothing is decompressed) by :func:`check_zip_members`; a tar (plain or gzip) has no directory, so
:func:`list_members` reads its headers in one streaming pass, judging each as it comes. Both
apply the same rules: member count, total and per-member uncompressed size, compression ratio (a
bomb), names (no absolute paths, no ``..``, no control characters, no duplicates once normalised,
no name both a file and a folder), regular files only (no symbolic or hard link, device, pipe or
sparse file), and for zips no encryption and only stored or deflated members.

:func:`extract_archive` unpacks into a fresh folder: every member is written through a counter, so
a header that lies about a size cannot write more than it declared (nor less, unnoticed); files
are created exclusively, never through a link; and the folder appears by one rename when every
member is written, or not at all (a refusal removes what was written). What a format allows
beyond that (npz: only ``.npy``; TorchScript: one top folder; ONNX: one model and the data it
names) is its own module's business; the :class:`ZipRules` it passes bound and word the checks.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipelines.formats.errors import RejectedUpload

__all__ = [
    "BOMB_MIN_BYTES",
    "BOMB_RATIO",
    "MAX_MEMBERS",
    "ArchiveRules",
    "Member",
    "ZipRules",
    "archive_kind",
    "check_zip_members",
    "extract_archive",
    "list_members",
    "read_zip_members",
    "shown_name",
]

# One bomb rule for every archive. Until this module the npz check refused members over 16 MiB
# compressed better than 500:1 and the TorchScript check members over 1 MiB better than 200:1, so
# the same bytes could pass as a dataset and fail as a model. Deflate tops out near 1030:1, which
# only runs of identical bytes reach; real data, even one-hot features saved with
# savez_compressed, stays under 500:1, while tensor storages torch.jit.save writes are stored
# (1:1). A member below 16 MiB cannot hurt however well it compresses: the total is bounded.
# A tar.gz compresses as one stream, so there the rule applies to the whole archive.
BOMB_RATIO = 500
BOMB_MIN_BYTES = 16 * 2**20
# Members of one archive: a TorchScript model has one per tensor storage plus its code files, so
# the largest models reach tens of thousands. A format may ask for fewer (ZipRules.max_members).
MAX_MEMBERS = 100_000

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1024 * 1024
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class ZipRules:
    """How one kind of archive is bounded and named in refusals.

    ``kind`` words the messages ("zip", "npz", "tar": "npz member 'x.npy' is encrypted");
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


#: The rules are the same for tars; the old name stays for the zip-only callers.
ArchiveRules = ZipRules


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its normalised name ("a/b.bin") and declared size."""

    name: str
    size: int


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


def shown_name(name: str, limit: int = 80) -> str:
    """A member name safe to put in a message: non-printables as "?", long names cut."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def archive_kind(path: Path) -> str | None:
    """ "zip", "tar" or "tar.gz" from the file's first bytes; None for anything else.

    A gzip stream is called "tar.gz" without looking inside: :func:`list_members` refuses one
    that holds no tar.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


class _Tally:
    """The checks every member passes, zip or tar, in the order the members come."""

    def __init__(self, rules: ZipRules) -> None:
        self.rules = rules
        self.count = 0
        self.total = 0
        self.files: set[str] = set()
        self.folders: set[str] = set()

    def name(self, raw: str, is_dir: bool = False) -> str:
        """The member's normalised name ("./a//b" -> "a/b"), or a refusal; counts it."""
        kind = self.rules.kind
        self.count += 1
        if self.count > self.rules.max_members:
            raise _refuse(
                f"the {kind} archive has more than {self.rules.max_members} members", "zip_bomb"
            )
        member = f"{kind} member {shown_name(raw)!r}"
        if any(not ch.isprintable() for ch in raw):
            raise _refuse(f"{member} has control characters in its name", "zip_unsafe")
        if raw.startswith(("/", "\\")) or _DRIVE.match(raw):
            raise _refuse(f"{member} has an absolute path", "zip_unsafe")
        parts = [p for p in re.split(r"[\\/]", raw) if p not in ("", ".")]
        if ".." in parts:
            raise _refuse(f"{member} would escape the archive ('..')", "zip_unsafe")
        if not parts:
            if is_dir:
                return ""
            raise _refuse(f"{member} has no name", "zip_unsafe")
        name = "/".join(parts)
        parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if is_dir:
            parents.add(name)
        if name in self.files and not is_dir:
            raise _refuse(f"{member} appears twice", "zip_unsafe")
        if parents & self.files or (not is_dir and name in self.folders):
            raise _refuse(f"{member} is both a file and a folder", "zip_unsafe")
        self.folders |= parents
        if not is_dir:
            self.files.add(name)
        return name

    def size(self, raw: str, size: int) -> None:
        rules = self.rules
        member = f"{rules.kind} member {shown_name(raw)!r}"
        if rules.max_member_bytes is not None and size > rules.max_member_bytes:
            raise _refuse(
                f"{member} unpacks to {size} bytes, over the "
                f"{rules.max_member_bytes}-byte limit of one member",
                "zip_bomb",
            )
        self.total += size
        if self.total > rules.max_unpacked_bytes:
            raise _refuse(
                f"the {rules.kind} archive unpacks to more than {rules.max_unpacked_bytes} bytes "
                "(the upload limit)",
                "zip_bomb",
            )

    def ratio(self, unpacked: int, packed: int, what: str) -> None:
        if unpacked > BOMB_MIN_BYTES and unpacked > BOMB_RATIO * max(packed, 1):
            ratio = unpacked // max(packed, 1)
            raise _refuse(
                f"{what} is compressed {ratio}:1 (over {BOMB_RATIO}:1): refused as a zip bomb",
                "zip_bomb",
            )


# -- zip ------------------------------------------------------------------------------------------


def read_zip_members(path: Path, rules: ZipRules) -> list[zipfile.ZipInfo]:
    """The members of the zip at ``path`` after :func:`check_zip_members`; an unreadable archive
    is refused with ``rules.invalid_code``."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except _READ_ERRORS as exc:
        raise _refuse(
            f"not a valid {rules.kind} (zip) archive: {exc}", rules.invalid_code
        ) from None
    check_zip_members(infos, rules)
    return infos


def _zip_checked(
    infos: list[zipfile.ZipInfo], rules: ZipRules
) -> Iterator[tuple[zipfile.ZipInfo, str]]:
    """Each member with its normalised name ("" for a folder), after every check."""
    tally = _Tally(rules)
    if len(infos) > rules.max_members:
        raise _refuse(
            f"the {rules.kind} archive has more than {rules.max_members} members", "zip_bomb"
        )
    for info in infos:
        raw = info.orig_filename
        member = f"{rules.kind} member {shown_name(raw)!r}"
        mode = info.external_attr >> 16
        is_dir = info.is_dir()
        name = tally.name(raw, is_dir)
        if stat.S_ISLNK(mode):
            raise _refuse(f"{member} is a symbolic link", "zip_unsafe")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(f"{member} is not a regular file (a device or a pipe)", "zip_unsafe")
        if info.flag_bits & 0x1:
            raise _refuse(f"{member} is encrypted", "zip_unsafe")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(
                f"{member} uses compression method {info.compress_type}; {rules.writer} only "
                "stores or deflates",
                "zip_unsafe",
            )
        tally.size(raw, info.file_size)
        tally.ratio(info.file_size, info.compress_size, member)
        yield info, ("" if is_dir else name)


def check_zip_members(infos: list[zipfile.ZipInfo], rules: ZipRules) -> None:
    """Refuse unsafe members: names that escape, links, duplicates, encryption, odd compression,
    too many members, too many bytes, bombs. An empty list passes (the format words that)."""
    for _ in _zip_checked(infos, rules):
        pass


# -- tar ------------------------------------------------------------------------------------------


def _tar_checked(
    tf: tarfile.TarFile, rules: ZipRules, packed: int
) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """Each member of an open tar with its normalised name ("" for a folder), checked as read.

    ``packed`` is the archive's size on disk: a tar.gz is one compressed stream, so the bomb
    ratio is of everything read so far against it, checked before the next header is read.
    """
    tally = _Tally(rules)
    for info in tf:
        member = f"{rules.kind} member {shown_name(info.name)!r}"
        name = tally.name(info.name, info.isdir())
        if info.issym():
            raise _refuse(f"{member} is a symbolic link", "zip_unsafe")
        if info.islnk():
            raise _refuse(f"{member} is a hard link", "zip_unsafe")
        if info.ischr() or info.isblk() or info.isfifo():
            raise _refuse(f"{member} is a device or a pipe", "zip_unsafe")
        if info.issparse():
            raise _refuse(f"{member} is a sparse file", "zip_unsafe")
        if not (info.isreg() or info.isdir()):
            raise _refuse(f"{member} is not a regular file", "zip_unsafe")
        if info.isdir():
            yield info, ""
            continue
        tally.size(info.name, info.size)
        tally.ratio(tally.total, packed, f"the {rules.kind} archive")
        yield info, name


def _open_tar(path: Path, rules: ZipRules) -> tarfile.TarFile:
    try:
        # "r|*": a stream, read once front to back; gzip or plain, found from the bytes.
        return tarfile.open(path, mode="r|*")
    except _READ_ERRORS as exc:
        raise _refuse(f"not a valid {rules.kind} archive: {exc}", rules.invalid_code) from None


# -- both -----------------------------------------------------------------------------------------


def list_members(path: Path, rules: ZipRules) -> list[Member]:
    """The regular files of the zip or tar at ``path``, every member checked; nothing written.

    A tar.gz is decompressed once to read its headers (bounded by the size and ratio rules).
    """
    path = Path(path)
    kind = archive_kind(path)
    if kind == "zip":
        infos = read_zip_members(path, rules)
        return [Member(name, i.file_size) for i, name in _zip_checked(infos, rules) if name]
    if kind is None:
        raise _refuse(f"not a zip or tar archive ({rules.kind})", rules.invalid_code)
    packed = path.stat().st_size
    try:
        with _open_tar(path, rules) as tf:
            return [Member(name, i.size) for i, name in _tar_checked(tf, rules, packed) if name]
    except RejectedUpload:
        raise
    except _READ_ERRORS as exc:
        raise _refuse(f"not a valid {rules.kind} archive: {exc}", rules.invalid_code) from None


def _write_member(stream: IO[bytes], root: Path, name: str, declared: int, rules: ZipRules) -> None:
    """Write one member under ``root``, refusing more or fewer bytes than it declared."""
    target = root.joinpath(*name.split("/"))
    if not target.resolve().is_relative_to(root):  # names are checked; this is the last guard
        raise _refuse(f"{rules.kind} member {shown_name(name)!r} escapes", "zip_unsafe")
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    written = 0
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        while chunk := stream.read(min(_CHUNK, declared - written + 1)):
            written += len(chunk)
            if written > declared:
                raise _refuse(
                    f"{rules.kind} member {shown_name(name)!r} holds more than the {declared} "
                    "bytes its header declares",
                    "zip_bomb",
                )
            out.write(chunk)
    if written != declared:
        raise _refuse(
            f"{rules.kind} member {shown_name(name)!r} holds {written} bytes, not the "
            f"{declared} its header declares (the archive is truncated or corrupt)",
            rules.invalid_code,
        )


def _extract_into(path: Path, root: Path, rules: ZipRules) -> list[Member]:
    kind = archive_kind(path)
    members: list[Member] = []
    if kind == "zip":
        infos = read_zip_members(path, rules)
        with zipfile.ZipFile(path) as zf:
            for info, name in _zip_checked(infos, rules):
                if name:
                    with zf.open(info) as stream:
                        _write_member(stream, root, name, info.file_size, rules)
                    members.append(Member(name, info.file_size))
        return members
    if kind is None:
        raise _refuse(f"not a zip or tar archive ({rules.kind})", rules.invalid_code)
    with _open_tar(path, rules) as tf:
        for info, name in _tar_checked(tf, rules, path.stat().st_size):
            if name:
                stream = tf.extractfile(info)
                assert stream is not None  # a regular file always has one
                _write_member(stream, root, name, info.size, rules)
                members.append(Member(name, info.size))
    return members


def extract_archive(path: Path, dest: Path, rules: ZipRules) -> list[Member]:
    """Unpack the zip or tar at ``path`` into the new folder ``dest``, all or nothing.

    Members are written into a hidden folder beside ``dest`` that is renamed to ``dest`` once
    every one is written and checked; any refusal or read error removes it and raises
    RejectedUpload. ``dest`` must not exist: FileExistsError when it does, or when another
    process renamed its own copy there first (the caller decides whether that one will do).
    """
    path, dest = Path(path), Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.partial"
    partial.mkdir()
    try:
        try:
            members = _extract_into(path, partial.resolve(), rules)
        except RejectedUpload:
            raise
        except _READ_ERRORS as exc:
            raise _refuse(
                f"the {rules.kind} archive cannot be unpacked: {exc}", rules.invalid_code
            ) from None
        try:
            partial.rename(dest)
        except OSError:
            if dest.exists():
                raise FileExistsError(dest) from None
            raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return members
