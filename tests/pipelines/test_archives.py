"""The one archive-safety check (zip from its central directory, tar as streamed) and the one
safe unpacking: all or nothing, sizes checked while writing (no Django, no torch)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipelines.core import PipelineError
from pipelines.datasets import inspect_dataset
from pipelines.formats import (
    RejectedUpload,
    has_external_data,
    inspect_model,
    pack_onnx,
    unpack_onnx,
)
from pipelines.formats.archives import (
    BOMB_MIN_BYTES,
    Member,
    ZipRules,
    archive_kind,
    check_zip_members,
    extract_archive,
    list_members,
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


# -- tars, names, and unpacking (extract_archive) -------------------------------------------------

TAR_RULES = ZipRules("tar", "tar", max_unpacked_bytes=2**30)


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w"):
    with tarfile.open(path, mode) as tf:
        for entry in members:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
    return path


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def refused_unpack(path: Path, dest: Path, rules: ZipRules = TAR_RULES) -> RejectedUpload:
    """The refusal, after checking nothing was left: no ``dest``, no partial folder beside it."""
    with pytest.raises(RejectedUpload) as caught:
        extract_archive(path, dest, rules)
    assert not dest.exists() and list(dest.parent.glob(f".{dest.name}*")) == []
    return caught.value


def test_it_lists_and_unpacks_zip_tar_and_tar_gz_alike(tmp_path: Path) -> None:
    files = [("./top//a.bin", b"a" * 3000), ("top/sub/b.txt", b"hello")]
    make_tar(tmp_path / "m.tar", files)
    make_tar(tmp_path / "m.tar.gz", files, "w:gz")
    with zipfile.ZipFile(tmp_path / "m.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(name, data)
    expected = [Member("top/a.bin", 3000), Member("top/sub/b.txt", 5)]
    for name, kind in (("m.tar", "tar"), ("m.tar.gz", "tar.gz"), ("m.zip", "zip")):
        assert archive_kind(tmp_path / name) == kind
        assert list_members(tmp_path / name, TAR_RULES) == expected
        dest = tmp_path / f"out-{kind}"
        assert extract_archive(tmp_path / name, dest, TAR_RULES) == expected
        assert (dest / "top/a.bin").read_bytes() == b"a" * 3000
        assert (dest / "top/sub/b.txt").read_bytes() == b"hello"
        with pytest.raises(FileExistsError):  # never into a folder that is already there
            extract_archive(tmp_path / name, dest, TAR_RULES)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (special("top/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special("top/hard", tarfile.LNKTYPE, "top/a.bin"), "hard link"),
        (special("top/fifo", tarfile.FIFOTYPE), "device or a pipe"),
        (special("top/dev", tarfile.CHRTYPE), "device or a pipe"),
        (("/etc/cron.d/x", b"x"), "absolute path"),
        (("top/../../x", b"x"), "escape the archive"),
        (("top/a.bin/inner", b"x"), "both a file and a folder"),
        (("./top/a.bin", b"again"), "appears twice"),
    ],
)
def test_it_refuses_a_hostile_tar_member_and_keeps_nothing_written(
    tmp_path: Path, entry, words: str
) -> None:
    path = make_tar(tmp_path / "bad.tar", [("top/a.bin", b"a" * 100), entry])
    error = refused_unpack(path, tmp_path / "out")  # the first member was written, then removed
    assert error.code == "zip_unsafe" and words in error.message
    with pytest.raises(RejectedUpload):
        list_members(path, TAR_RULES)


def test_it_bounds_a_tars_members_and_bytes_and_refuses_a_gzip_bomb(tmp_path: Path) -> None:
    many = make_tar(tmp_path / "many.tar", [(f"f{i}", b"x") for i in range(5)])
    error = refused_unpack(many, tmp_path / "o1", ZipRules("tar", "tar", 2**30, max_members=4))
    assert error.code == "zip_bomb" and "more than 4 members" in error.message

    big = make_tar(tmp_path / "big.tar", [("a", b"x" * 600), ("b", b"x" * 600)])
    error = refused_unpack(big, tmp_path / "o2", ZipRules("tar", "tar", 1000))
    assert error.code == "zip_bomb" and "more than 1000 bytes" in error.message

    bomb = make_tar(tmp_path / "bomb.tar.gz", [("zeros", bytes(BOMB_MIN_BYTES + 2**20))], "w:gz")
    error = refused_unpack(bomb, tmp_path / "o3")
    assert error.code == "zip_bomb" and "refused as a zip bomb" in error.message


def test_a_zip_header_that_lies_about_a_size_writes_no_more_than_it_declared(
    tmp_path: Path,
) -> None:
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ok.bin", b"fine")
        zf.writestr("big.bin", b"B" * 4000)
    data = bytearray(path.read_bytes())
    # Both the local header and the central directory say 40 bytes, where 4000 follow.
    struct_4000, struct_40 = (4000).to_bytes(4, "little"), (40).to_bytes(4, "little")
    assert data.count(struct_4000 * 2) == 2
    path.write_bytes(bytes(data).replace(struct_4000 * 2, struct_4000 + struct_40))
    assert [m.size for m in list_members(path, RULES)] == [4, 40]
    error = refused_unpack(path, tmp_path / "out", RULES)
    assert error.code in ("invalid_zip", "zip_bomb")


def test_a_truncated_tar_gz_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "t.tar.gz", [("a", os.urandom(300_000))], "w:gz")
    path.write_bytes(path.read_bytes()[:150_000])
    error = refused_unpack(path, tmp_path / "out")
    assert error.code == "invalid_zip"


def test_a_zip_symlink_or_device_is_refused_before_any_byte_is_written(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.bin", b"data")
        link = zipfile.ZipInfo("b.bin")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("c.bin")
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    assert "symbolic link" in refused_unpack(path, tmp_path / "out", RULES).message
    assert "device or a pipe" in refusal([fifo]).message


# -- ONNX models with external data, as archives (pipelines.formats.onnx_archive) ----------------


def external_onnx(folder: Path, location: str = "model.onnx.data") -> Path:
    """y = x @ W + b (16 -> 4) saved with every weight in ``location`` beside the graph."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=location, size_threshold=0
    )
    return path


def relocate(path: Path, location: str, offset: int | None = None) -> None:
    """Point the model's first tensor at ``location`` (and ``offset``), weights untouched."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    path.write_bytes(model.SerializeToString())


def zip_folder(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out


def archive_refusal(path: Path) -> RejectedUpload:
    with pytest.raises(RejectedUpload) as caught:
        inspect_model(path, path.name)
    assert [p for p in path.parent.iterdir() if p.name.startswith(".r1-unpack-")] == []
    return caught.value


def test_an_onnx_archive_is_inspected_from_its_graph_as_zip_tar_or_tar_gz(tmp_path: Path) -> None:
    model = external_onnx(tmp_path / "m" / "sub")
    zipped = zip_folder(tmp_path / "m", tmp_path / "m.zip")
    for mode, name in (("w", "m.tar"), ("w:gz", "m.tar.gz")):
        with tarfile.open(tmp_path / name, mode) as tf:
            tf.add(model.parent, "sub")
    for path in (zipped, tmp_path / "m.tar", tmp_path / "m.tar.gz"):
        info = inspect_model(path, path.name)
        assert (info.format, info.precision) == ("onnx", "fp32")
        assert [(t.name, t.shape) for t in info.inputs] == [("x", ["batch", 16])]
        assert info.details["model_archive"]["model"] == "sub/model.onnx"
        assert info.details["model_archive"]["files"] == ["sub/model.onnx", "sub/model.onnx.data"]
        assert info.details["parameter_count"] == 16 * 4 + 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r1")] == []


def test_a_single_onnx_file_that_names_external_data_says_to_upload_an_archive(
    tmp_path: Path,
) -> None:
    error = archive_refusal(external_onnx(tmp_path / "m"))
    assert error.code == "external_data" and "upload a zip or tar" in error.message


@pytest.mark.parametrize(
    ("location", "offset", "code", "words"),
    [
        ("../outside.bin", None, "external_data", "'..'"),
        ("/etc/passwd", None, "external_data", "absolute"),
        ("missing.bin", None, "external_data", "missing"),
        ("model.onnx.data", 10**6, "external_data", "do not fit"),
    ],
)
def test_an_archive_whose_model_names_data_it_does_not_hold_is_refused(
    tmp_path: Path, location: str, offset: int | None, code: str, words: str
) -> None:
    relocate(external_onnx(tmp_path / "m"), location, offset)
    error = archive_refusal(zip_folder(tmp_path / "m", tmp_path / "bad.zip"))
    assert error.code == code and words in error.message


def test_a_data_file_too_short_for_its_tensors_is_refused(tmp_path: Path) -> None:
    model = external_onnx(tmp_path / "m")
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:40])
    error = archive_refusal(zip_folder(tmp_path / "m", tmp_path / "short.zip"))
    assert error.code == "external_data" and "do not fit the file (40 bytes)" in error.message


def test_an_archive_with_two_models_none_or_extra_files_is_refused(tmp_path: Path) -> None:
    external_onnx(tmp_path / "m")
    two = zip_folder(tmp_path / "m", tmp_path / "two.zip", {"other/b.onnx": b"x"})
    error = archive_refusal(two)
    assert error.code == "archive_model" and "holds 2" in error.message

    extra = zip_folder(tmp_path / "m", tmp_path / "extra.zip", {"run.sh": b"#!/bin/sh\n"})
    error = archive_refusal(extra)
    assert error.code == "archive_extra" and "'run.sh'" in error.message

    with tarfile.open(tmp_path / "none.tar", "w") as tf:
        tf.add(tmp_path / "m" / "model.onnx.data", "model.onnx.data")
    assert archive_refusal(tmp_path / "none.tar").code == "archive_model"


def test_a_hostile_member_of_an_onnx_archive_is_refused(tmp_path: Path) -> None:
    model = external_onnx(tmp_path / "m")
    with tarfile.open(tmp_path / "link.tar", "w") as tf:
        tf.add(model, "model.onnx")
        tf.addfile(special("model.onnx.data", tarfile.SYMTYPE, "/etc/passwd"))
    assert "symbolic link" in archive_refusal(tmp_path / "link.tar").message

    with tarfile.open(tmp_path / "up.tar", "w") as tf:
        tf.add(model, "model.onnx")
        tf.add(model.parent / "model.onnx.data", "../model.onnx.data")
    assert "escape the archive" in archive_refusal(tmp_path / "up.tar").message

    bomb = zip_folder(tmp_path / "m", tmp_path / "bomb.zip", {"z.bin": bytes(BOMB_MIN_BYTES * 2)})
    assert archive_refusal(bomb).code == "zip_bomb"


def test_pack_then_unpack_gives_a_runnable_model_once_per_sha256(tmp_path: Path) -> None:
    import hashlib

    import onnxruntime as ort

    model = external_onnx(tmp_path / "job", location="weights/w.bin")
    assert has_external_data(model)
    packed = tmp_path / "packed.tar"
    details = pack_onnx(model, packed)
    assert details["files"] == ["model.onnx", "weights/w.bin"]
    assert inspect_model(packed, "packed.tar").details["model_archive"]["files"] == details["files"]

    sha = hashlib.sha256(packed.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = unpack_onnx(packed, sha, "model.onnx", cache)
    assert path == cache / sha / "model.onnx" and (cache / sha / "weights/w.bin").is_file()
    x = np.ones((2, 16), np.float32)
    expected = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    assert np.allclose(ort.InferenceSession(str(path)).run(None, {"x": x})[0], expected)
    packed.write_bytes(b"changed")  # unpacked already: the cached copy of those bytes serves
    assert unpack_onnx(packed, sha, "model.onnx", cache) == path
    with pytest.raises(PipelineError, match="no longer matches its sha256"):
        unpack_onnx(packed, sha, "model.onnx", tmp_path / "cold")
    assert not (tmp_path / "cold" / sha).exists()
