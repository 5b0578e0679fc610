"""Builders of hostile files for the upload inspector's tests.

Every payload here is *live*: loading it with pickle would run ``touch <canary>``, which the tests
check (in a subprocess) so that "the canary never appears" means something. Only the inspector,
which never unpickles, is pointed at them in-process.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path

# -- pickles ---------------------------------------------------------------------------------------


class _TouchCanary:
    """``pickle.dumps`` of this object is a pickle that runs ``touch <canary>`` when loaded."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def reduce_pickle(canary: Path, protocol: int = 2) -> bytes:
    """The classic payload: GLOBAL posix.system (STACK_GLOBAL from protocol 4), then REDUCE."""
    return pickle.dumps(_TouchCanary(canary), protocol=protocol)


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _string_arg(canary: Path) -> bytes:
    data = f"touch {canary}".encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def stack_global_pickle(canary: Path) -> bytes:
    """Protocol 4, hand-written: SHORT_BINUNICODE "os", "system", STACK_GLOBAL, REDUCE."""
    return (
        b"\x80\x04"
        + _unicode("os")
        + _unicode("system")
        + b"\x93"  # STACK_GLOBAL
        + _string_arg(canary)
        + b"\x85"  # TUPLE1
        + b"R"  # REDUCE
        + b"."  # STOP
    )


def memoized_stack_global_pickle(canary: Path) -> bytes:
    """Protocol 4 whose STACK_GLOBAL operands come back from the memo, behind decoy strings.

    The strings "os" and "system" are memoized (MEMOIZE, and BINPUT) and popped; then harmless
    torch names are pushed and popped, and the real operands are fetched with BINGET. A scanner
    that pairs STACK_GLOBAL with the last two string literals it saw reports
    torch._utils._rebuild_tensor_v2; the global actually imported is os.system.
    """
    return (
        b"\x80\x04"
        + _unicode("os")
        + b"\x94"  # MEMOIZE -> memo[0]
        + b"0"  # POP
        + _unicode("system")
        + b"q\x07"  # BINPUT 7
        + b"0"  # POP
        + _unicode("torch._utils")
        + b"\x94"  # MEMOIZE -> memo[2] (len(memo) counts entries)
        + b"0"
        + _unicode("_rebuild_tensor_v2")
        + b"\x94"
        + b"0"
        + b"h\x00"  # BINGET 0 -> "os"
        + b"h\x07"  # BINGET 7 -> "system"
        + b"\x93"  # STACK_GLOBAL
        + _string_arg(canary)
        + b"\x85R."
    )


def dup_stack_global_pickle(canary: Path) -> bytes:
    """STACK_GLOBAL operands juggled with MARK/POP_MARK/DUP/POP, decoys pushed last and popped.

    The last two string literals before STACK_GLOBAL are the allowlisted "torch._utils" and
    "_rebuild_tensor_v2", but they are popped: the global imported is builtins.exec.
    """
    return (
        b"\x80\x04"
        + b"("  # MARK
        + _unicode("torch")
        + b"1"  # POP_MARK: drops the first decoy
        + _unicode("builtins")
        + _unicode("exec")
        + b"2"  # DUP
        + b"0"  # POP
        + _unicode("torch._utils")
        + _unicode("_rebuild_tensor_v2")
        + b"00"  # POP POP: the decoys leave, "builtins" "exec" are on top again
        + b"\x93"
        + _unicode(f"open({str(canary)!r}, 'w').close()")
        + b"\x85R."
    )


def protocol0_pickle(canary: Path) -> bytes:
    """A text-only protocol 0 pickle (no 0x80 marker): GLOBAL os.system, REDUCE."""
    return f"cos\nsystem\n(Vtouch {canary}\ntR.".encode()


# -- zips ------------------------------------------------------------------------------------------


def replace_member(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    """Copy the zip ``src`` to ``dst`` with the member ending in ``suffix`` replaced by ``data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            body = data if info.filename.endswith(suffix) else zin.read(info)
            zout.writestr(info, body)
    return dst


def add_members(src: Path, dst: Path, members: dict[str, bytes]) -> Path:
    """Copy the zip ``src`` to ``dst`` and append ``members`` (names are written verbatim)."""
    shutil.copyfile(src, dst)
    with zipfile.ZipFile(dst, "a") as zout:
        for name, body in members.items():
            zout.writestr(zipfile.ZipInfo(name), body)
    return dst


def deflate_bomb(dst: Path, top: str = "archive", zeros: int = 64 * 2**20) -> Path:
    """A TorchScript-shaped zip whose data/0 is ``zeros`` zero bytes deflated (~1000:1)."""
    chunk = bytes(2**20)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr(f"{top}/code/__torch__.py", "")
        with zf.open(f"{top}/data/0", "w") as member:
            for _ in range(zeros // len(chunk)):
                member.write(chunk)
    return dst


def forged_size_zip(dst: Path, claimed: int = 3 * 2**30, members: int = 2) -> Path:
    """A small stored zip whose directory claims each member unpacks to ``claimed`` bytes."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for i in range(members):
            zf.writestr(f"archive/data/{i}", b"x" * 16)
    raw = bytearray(dst.read_bytes())
    start = 0
    while (at := raw.find(b"PK\x01\x02", start)) >= 0:  # central directory entries
        raw[at + 24 : at + 28] = struct.pack("<I", claimed)  # uncompressed size
        start = at + 4
    dst.write_bytes(bytes(raw))
    return dst


# -- other hostile or broken files -----------------------------------------------------------------


def random_bytes(dst: Path, size: int = 4096, seed: int = 1234) -> Path:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[0] = 0xA7  # not a pickle opcode, not a magic number: the content identifies nothing
    dst.write_bytes(bytes(data))
    return dst


def elf_file(dst: Path) -> Path:
    dst.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(56) + b"\x00" * 200)
    return dst


def pe_file(dst: Path) -> Path:
    dst.write_bytes(b"MZ\x90\x00" + bytes(60) + b"PE\x00\x00" + bytes(200))
    return dst


def safetensors_bad_length(dst: Path, length: int) -> Path:
    """A safetensors-looking file whose 8-byte header length is ``length`` (2**63, or too long)."""
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    dst.write_bytes(struct.pack("<Q", length) + header)
    return dst


def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
