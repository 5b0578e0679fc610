"""The one zip-safety check, judged from the central directory alone (no Django, no torch)."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.datasets import inspect_dataset
from pipelines.formats import RejectedUpload
from pipelines.formats.archives import (
    BOMB_MIN_BYTES,
    ZipRules,
    check_zip_members,
    read_zip_members,
)

RULES = ZipRules("zip", "the writer", max_unpacked_bytes=2**30)


def refusal(infos: list[zipfile.ZipInfo], rules: ZipRules = RULES) -> RejectedUpload:
    with pytest.raises(RejectedUpload) as caught:
        check_zip_members(infos, rules)
    return caught.value


def member(name: str, size: int = 10, compressed: int = 10) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.file_size, info.compress_size = size, compressed
    return info


def test_it_passes_a_plain_archive_and_says_nothing_of_emptiness(tmp_path: Path) -> None:
    path = tmp_path / "ok.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("top/a.bin", b"x" * 100)
    assert [i.filename for i in read_zip_members(path, RULES)] == ["top/a.bin"]
    check_zip_members([], RULES)  # whether an empty archive is valid is the format's call


def test_it_refuses_links_encryption_and_other_compression() -> None:
    link = member("top/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert "symbolic link" in refusal([link]).message

    secret = member("top/secret")
    secret.flag_bits |= 0x1
    assert "encrypted" in refusal([secret]).message

    bz = member("top/bz")
    bz.compress_type = zipfile.ZIP_BZIP2
    error = refusal([bz])
    assert error.code == "zip_unsafe" and "the writer only stores or deflates" in error.message


def test_it_bounds_members_count_and_each_members_size() -> None:
    few = ZipRules("npz", "numpy", 2**30, max_members=2)
    error = refusal([member(f"{i}.npy") for i in range(3)], few)
    assert error.code == "zip_bomb" and "npz archive has more than 2 members" in error.message

    small = ZipRules("zip", "w", 2**30, max_member_bytes=100)
    error = refusal([member("a", size=101, compressed=101)], small)
    assert error.code == "zip_bomb" and "over the 100-byte limit of one member" in error.message


def test_one_bomb_rule_for_every_kind_of_archive() -> None:
    big = BOMB_MIN_BYTES + 1
    for rules in (RULES, ZipRules("npz", "numpy", 2**30)):
        assert refusal([member("m", size=big, compressed=big // 600)], rules).code == "zip_bomb"
        check_zip_members([member("m", size=big, compressed=big // 400)], rules)


def test_an_npz_member_may_not_escape_either(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("../input.npy", "w") as f:
        np.save(f, np.zeros((4, 2), np.float32))
    with pytest.raises(RejectedUpload) as caught:
        inspect_dataset(path, "d.npz")
    assert caught.value.code == "zip_unsafe" and "escape" in caught.value.message
