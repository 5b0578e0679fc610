"""Dataset inspection (real files, hostile ones included), splits, and mapping rows onto inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pipelines import datasets
from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.datasets import (
    DatasetInfo,
    SplitData,
    check_compatible,
    inspect_dataset,
    iter_batches,
    load_split,
    split_indices,
)
from pipelines.datasets import text as dataset_text
from pipelines.demo import DIGITS_INPUT, write_digits_dataset
from pipelines.formats import RejectedUpload

FLAT = [TensorSpec("input", ["batch", 64], "float32")]
IMAGE = [TensorSpec("image", ["batch", 1, 8, 8], "float32")]


class _TouchCanary:
    """Pickles to ``os.system("touch <canary>")``: loading it with pickle would create the file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ref_for(
    path: Path, fmt: str, target: str | None = None, splits: dict[str, float] | None = None
) -> DatasetRef:
    """A DatasetRef as the web layer would store it: schema from the inspector."""
    ref = DatasetRef(id="3", path=str(path), format=fmt, target=target)
    ref.schema = inspect_dataset(path, path.name).schema
    if splits is not None:
        ref.splits = splits
    return ref


def refused(path: Path, max_bytes: int = datasets.MAX_DATASET_BYTES) -> RejectedUpload:
    with pytest.raises(RejectedUpload) as info:
        inspect_dataset(path, path.name, max_bytes=max_bytes)
    return info.value


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("digits")
    files = {}
    for fmt in ("csv", "jsonl", "npz"):
        files[fmt] = folder / f"digits.{fmt}"
        assert write_digits_dataset(files[fmt], fmt) == 1797
    return files


# -- inspection -----------------------------------------------------------------------------------


def test_it_inspects_a_csv_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], [[0.5, 1, 0], [1.5, 2, 1], [2, 3, 1]])

    info = inspect_dataset(path, "d.csv")

    assert isinstance(info, DatasetInfo)
    assert info.format == "csv" and info.rows == 3
    assert info.schema == {
        "columns": [
            {"name": "a", "dtype": "float64"},
            {"name": "b", "dtype": "int64"},
            {"name": "label", "dtype": "int64"},
        ]
    }
    assert info.details["default_target"] == "label"
    assert json.loads(json.dumps(info.to_dict()))["rows"] == 3


def test_it_inspects_a_jsonl_file_with_list_columns(tmp_path: Path) -> None:
    records = [{"x": [[1, 2], [3, 4.5]], "w": 1.0, "y": i} for i in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", records)

    info = inspect_dataset(path, "d.jsonl")

    assert info.format == "jsonl" and info.rows == 4
    assert info.schema == {
        "columns": [
            {"name": "x", "dtype": "float64", "shape": [2, 2]},
            {"name": "w", "dtype": "float64"},
            {"name": "y", "dtype": "int64"},
        ]
    }
    assert info.details["default_target"] == "y"


def test_it_inspects_an_npz_file_from_headers(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(
        path, x=np.zeros((5, 3, 2), np.float16), target=np.arange(5), mask=np.ones(5, bool)
    )

    info = inspect_dataset(path, "d.npz")

    assert info.format == "npz" and info.rows == 5
    assert info.schema == {
        "arrays": [
            {"name": "x", "dtype": "float16", "shape": [5, 3, 2]},
            {"name": "target", "dtype": "int64", "shape": [5]},
            {"name": "mask", "dtype": "bool", "shape": [5]},
        ]
    }
    assert info.details["members"] == 3 and info.details["default_target"] == "target"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "npz"])
def test_it_inspects_the_digits_dataset_in_every_format(
    digits_files: dict[str, Path], fmt: str
) -> None:
    info = inspect_dataset(digits_files[fmt], f"digits.{fmt}")

    assert info.format == fmt and info.rows == 1797
    if fmt == "npz":
        assert info.schema["arrays"] == [
            {"name": "input", "dtype": "float32", "shape": [1797, 64]},
            {"name": "label", "dtype": "int64", "shape": [1797]},
        ]
    else:
        columns = info.schema["columns"]
        assert [c["name"] for c in columns] == [f"p{i}" for i in range(64)] + ["label"]
        assert columns[-1]["dtype"] == "int64"
        assert {c["dtype"] for c in columns[:-1]} == {"float64"}


def test_it_decides_the_format_by_content_not_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.csv", [{"a": 1, "label": 0}])
    assert inspect_dataset(path, "data.csv").format == "jsonl"


# -- refusals -------------------------------------------------------------------------------------


def test_it_refuses_an_object_array_npz_without_unpickling(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.npz"
    payload = np.empty(2, dtype=object)
    payload[0] = _TouchCanary(canary)
    payload[1] = 1
    np.savez(path, input=payload, label=np.arange(2))

    error = refused(path)
    assert error.code == "pickle"
    assert "holds Python objects (dtype object)" in error.message
    assert "needs pickle" in error.message
    with pytest.raises(PipelineError, match="dtype object"):
        load_split(DatasetRef(id="3", path=str(path), format="npz"), "all", FLAT)
    assert not canary.exists()

    # Proof that the payload is live: numpy with pickle allowed (in a child process) runs it.
    code = f"import numpy as np; np.load({str(path)!r}, allow_pickle=True)['input']"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert canary.exists()


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ("a,b,label\n1,2,0\n1,2\n", "line 3 has 2 values but the header has 3 columns"),
        ("a,b,label\n1,2,0\n1,2,3,4\n", "line 3 has 4 values"),
        ("a,colour,label\n1,red,0\n", "column 'colour' holds text ('red' on line 2)"),
        ("a,b,label\n1,,0\n", "line 2, column 'b' is empty"),
        ("a,b,label\n1,nan,0\n", "only finite numbers"),
        ("1,2,3\n4,5,6\n", "header row"),
        ("a,a,label\n1,2,0\n", "more than once"),
        ("a,b,label\n", "no data rows"),
    ],
)
def test_it_refuses_bad_csv(tmp_path: Path, lines: str, fragment: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(lines)

    error = refused(path)

    assert fragment in error.message
    assert error.code in ("invalid_csv", "empty")


def test_it_says_csv_datasets_are_numbers_only(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["x", "species"], [[1, "setosa"]])
    message = refused(path).message
    assert "CSV datasets must be all numbers" in message
    assert "encode class labels as integers" in message


def test_it_refuses_an_empty_file(tmp_path: Path) -> None:
    for name in ("d.csv", "d.jsonl", "d.npz"):
        path = tmp_path / name
        path.write_bytes(b"")
        error = refused(path)
        assert error.code == "empty" and "empty" in error.message


def test_it_refuses_a_blank_text_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("\n\n  \n")
    assert refused(path).code == "empty"


@pytest.mark.parametrize(
    ("records", "fragment"),
    [
        ('{"a": 1, "label": 0}\n{"a": 2, "b": 3}\n', "line 2 lacks ['label'] and adds ['b']"),
        ('{"a": 1, "label": 0}\n{"a": 1, "label": 0, "c": 1}\n', "adds ['c']"),
        ('{"a": "x", "label": 0}\n', "key 'a': text ('x')"),
        ('{"a": [1, [2]], "label": 0}\n', "ragged"),
        ('{"a": [1, 2], "label": 0}\n{"a": [1, 2, 3], "label": 0}\n', "has shape [3]"),
        ('{"a": true, "label": 0}\n', "true is not a number"),
        ('{"a": NaN, "label": 0}\n', "not valid JSON"),
        ('{"a": 1, "label": 0}\n[1, 2]\n', "line 2 is a JSON list"),
        ('{"a": 1\n', "line 1 is not valid JSON"),
    ],
)
def test_it_refuses_bad_jsonl(tmp_path: Path, records: str, fragment: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(records)

    error = refused(path)

    assert error.code == "invalid_jsonl"
    assert fragment in error.message


def test_it_refuses_a_json_array_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}]')
    assert "one JSON object per line" in refused(path).message


def test_it_refuses_a_non_zip_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"a,b\n1,2\n")

    error = refused(path)

    assert error.code == "invalid_npz"
    assert "zip archive numpy.savez writes" in error.message


def test_it_refuses_a_zip_bomb_named_npz_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("input.npy", b"\0" * (48 * 2**20))  # ~48 KB on disk
    assert path.stat().st_size < 2**20

    started = time.perf_counter()
    error = refused(path)

    assert time.perf_counter() - started < 1.0  # from the zip directory, nothing unpacked
    assert error.code == "zip_bomb"
    assert "refused as a zip bomb" in error.message


def test_it_bounds_the_unpacked_size_of_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, input=np.zeros((100, 64), np.float32), label=np.zeros(100, np.int64))
    assert path.stat().st_size < 20_000

    error = refused(path, max_bytes=20_000)

    assert error.code == "zip_bomb"
    assert "unpacks to more than 20000 bytes" in error.message


def test_it_refuses_npz_members_that_are_not_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", b"hello")
    assert "not a .npy array" in refused(path).message


def test_it_refuses_npz_arrays_of_different_row_counts(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((4, 2)), label=np.zeros(3))
    assert "different row counts" in refused(path).message


def test_it_refuses_text_arrays_in_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((2, 2)), label=np.array(["cat", "dog"]))
    message = refused(path).message
    assert "'label' has dtype <U3" in message and "encode class labels as integers" in message


def test_it_refuses_a_truncated_npz_member(tmp_path: Path) -> None:
    source = tmp_path / "ok.npz"
    np.savez(source, input=np.zeros((8, 8), np.float32))
    with zipfile.ZipFile(source) as zf:
        data = zf.read("input.npy")
    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("input.npy", data[:-16])
    assert "truncated or corrupt" in refused(path).message


def test_it_refuses_an_over_long_line_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_text, "MAX_LINE_CHARS", 100)
    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "1" * 500 + ",0\n")

    error = refused(path)

    assert error.code == "line_too_long" and "line 2" in error.message


def test_it_refuses_a_pickle_named_csv(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    import pickle

    path = tmp_path / "d.csv"
    path.write_bytes(pickle.dumps(_TouchCanary(canary), protocol=4))

    error = refused(path)

    assert error.code == "pickle" and not canary.exists()


def test_it_refuses_binary_and_npy_files(tmp_path: Path) -> None:
    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros(3))
    assert "numpy.savez" in refused(npy).message
    blob = tmp_path / "d.csv"
    blob.write_bytes(b"\x01\x02\x00\x00garbage")
    assert refused(blob).code == "unrecognised"


# -- splits ---------------------------------------------------------------------------------------


def test_it_splits_deterministically_disjointly_and_completely() -> None:
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}

    first = split_indices(1797, fractions, seed=0)
    again = split_indices(1797, fractions, seed=0)
    other = split_indices(1797, fractions, seed=1)

    parts = [first[name] for name in ("train", "validation", "test")]
    assert [len(p) for p in parts] == [1437, 180, 180]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 1797  # disjoint and covering
    assert sorted(joined.tolist()) == list(range(1797))
    for name in ("train", "validation", "test", "all"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["validation"], other["validation"])
    np.testing.assert_array_equal(first["all"], np.arange(1797))


@pytest.mark.parametrize("rows", [3, 4, 5, 7, 11])
def test_it_gives_every_non_zero_split_a_row_on_tiny_datasets(rows: int) -> None:
    cut = split_indices(rows, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=3)

    sizes = [len(cut[n]) for n in ("train", "validation", "test")]
    assert min(sizes) >= 1 and sum(sizes) == rows


def test_it_leaves_a_zero_fraction_split_empty() -> None:
    cut = split_indices(10, {"train": 0.5, "validation": 0.5, "test": 0.0}, seed=0)
    assert [len(cut[n]) for n in ("train", "validation", "test")] == [5, 5, 0]


def test_it_loads_splits_that_partition_the_rows(tmp_path: Path) -> None:
    rows = [[i, i * 10, i % 2] for i in range(50)]
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)
    ref = ref_for(path, "csv", splits={"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 7})
    spec = [TensorSpec("x", ["batch", 2], "float32")]

    seen = []
    for split in ("train", "validation", "test"):
        data = load_split(ref, split, spec)
        assert data.targets is not None
        assert data.rows == len(data.targets) == len(data.inputs["x"])
        seen.extend(data.inputs["x"][:, 0].astype(int).tolist())
    assert sorted(seen) == list(range(50))
    again = load_split(ref, "validation", spec)
    np.testing.assert_array_equal(
        again.inputs["x"], load_split(ref, "validation", spec).inputs["x"]
    )


def test_it_refuses_an_empty_split_with_the_reason(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[1, 0], [2, 1], [3, 0]])
    ref = ref_for(path, "csv", splits={"train": 1.0, "validation": 0.0, "test": 0.0, "seed": 0})
    with pytest.raises(PipelineError, match="its test split is empty"):
        load_split(ref, "test", [TensorSpec("x", ["batch", 1], "float32")])


def test_it_refuses_an_unknown_split(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[1, 0]])
    with pytest.raises(PipelineError, match="unknown split 'dev'"):
        load_split(ref_for(path, "csv"), "dev", [TensorSpec("x", ["batch", 1], "float32")])


# -- mapping rows onto model inputs ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "npz"])
def test_it_maps_digits_to_a_flat_input(digits_files: dict[str, Path], fmt: str) -> None:
    ref = ref_for(digits_files[fmt], fmt)

    data = load_split(ref, "validation", DIGITS_INPUT)

    assert isinstance(data, SplitData) and data.rows == 180
    x = data.inputs["input"]
    assert x.shape == (180, 64) and x.dtype == np.float32
    assert data.targets is not None and data.targets.dtype == np.int64
    assert set(np.unique(data.targets).tolist()) <= set(range(10))
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_it_maps_the_same_rows_from_every_format(digits_files: dict[str, Path]) -> None:
    loaded = [load_split(ref_for(p, f), "test", FLAT) for f, p in digits_files.items()]
    for other in loaded[1:]:
        np.testing.assert_allclose(other.inputs["input"], loaded[0].inputs["input"], atol=1e-6)
        np.testing.assert_array_equal(other.targets, loaded[0].targets)


@pytest.mark.parametrize("fmt", ["csv", "npz"])
def test_it_reshapes_rows_to_an_image_input(digits_files: dict[str, Path], fmt: str) -> None:
    ref = ref_for(digits_files[fmt], fmt)

    flat = load_split(ref, "all", FLAT).inputs["input"]
    image = load_split(ref, "all", IMAGE).inputs["image"]

    assert image.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(image.reshape(1797, 64), flat)


def test_it_infers_one_named_dim(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "b", "c", "d", "label"], [[1, 2, 3, 4, 0]] * 3)
    spec = [TensorSpec("seq", ["batch", "tokens", 2], "float32")]
    assert load_split(ref_for(path, "csv"), "all", spec).inputs["seq"].shape == (3, 2, 2)


def test_it_explains_a_column_count_mismatch(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [f"f{i}" for i in range(32)] + ["label"], [[0] * 33] * 4)
    ref = ref_for(path, "csv")
    expected = (
        "dataset 3 has 32 feature columns but model input 'input' takes [batch, 64] "
        "(64 values per row)"
    )

    with pytest.raises(PipelineError) as loading:
        load_split(ref, "all", FLAT)
    with pytest.raises(PipelineError) as checking:
        check_compatible(ref, FLAT)

    assert str(loading.value) == expected
    assert str(checking.value) == expected


def test_it_checks_compatibility_from_the_schema_alone(digits_files: dict[str, Path]) -> None:
    schema = inspect_dataset(digits_files["csv"], "digits.csv").schema
    ref = DatasetRef(id="9", path="/nowhere/digits.csv", format="csv", schema=schema)

    check_compatible(ref, DIGITS_INPUT)  # no file is read: the path does not exist
    check_compatible(ref, IMAGE)
    with pytest.raises(PipelineError, match=r"takes \[batch, 3, 8, 8\] \(192 values per row\)"):
        check_compatible(ref, [TensorSpec("image", ["batch", 3, 8, 8], "float32")])
    with pytest.raises(PipelineError, match="one column per input, named after it: use JSON"):
        check_compatible(ref, [TensorSpec("a", ["batch", 1], "f4"), TensorSpec("b", [1], "f4")])
    with pytest.raises(PipelineError, match="dataset 9 has no column 'species'"):
        check_compatible(
            DatasetRef(id="9", path="", format="csv", schema=schema, target="species"), FLAT
        )
    with pytest.raises(PipelineError, match="format 'parquet'"):
        check_compatible(DatasetRef(id="9", path="", format="parquet"), FLAT)


def test_it_uses_the_named_target_and_leaves_the_rest_as_features(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "price", "label"], [[1, 2.5, 7], [2, 3.5, 8]])
    ref = ref_for(path, "csv", target="price")

    data = load_split(ref, "all", [TensorSpec("x", ["batch", 2], "float32")])

    np.testing.assert_array_equal(data.inputs["x"], [[1, 7], [2, 8]])
    np.testing.assert_array_equal(data.targets, [2.5, 3.5])


def test_it_gives_no_targets_without_a_target_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "b"], [[1, 2], [3, 4]])
    data = load_split(ref_for(path, "csv"), "all", [TensorSpec("x", ["batch", 2], "float32")])
    assert data.targets is None and data.inputs["x"].shape == (2, 2)


def test_it_maps_jsonl_keys_named_after_each_input(tmp_path: Path) -> None:
    records = [{"a": [i, i + 1], "b": [[i] * 3], "label": i % 2} for i in range(6)]
    ref = ref_for(write_jsonl(tmp_path / "d.jsonl", records), "jsonl")
    specs = [TensorSpec("a", ["batch", 2], "float32"), TensorSpec("b", ["batch", 1, 3], "int64")]

    data = load_split(ref, "all", specs)

    assert data.inputs["a"].shape == (6, 2) and data.inputs["a"].dtype == np.float32
    assert data.inputs["b"].shape == (6, 1, 3) and data.inputs["b"].dtype == np.int64
    np.testing.assert_array_equal(data.targets, [0, 1, 0, 1, 0, 1])


def test_it_maps_a_jsonl_features_key_or_all_columns(tmp_path: Path) -> None:
    spec = [TensorSpec("input", ["batch", 4], "float32")]
    with_features = [{"id": 5, "features": [1, 2, 3, 4], "label": 0}] * 3
    data = load_split(
        ref_for(write_jsonl(tmp_path / "f.jsonl", with_features), "jsonl"), "all", spec
    )
    np.testing.assert_array_equal(data.inputs["input"][0], [1, 2, 3, 4])

    mixed = [{"input": 1, "b": [2, 3], "c": 4, "y": 1}] * 3  # a number named like the input
    data = load_split(ref_for(write_jsonl(tmp_path / "m.jsonl", mixed), "jsonl"), "all", spec)
    np.testing.assert_array_equal(data.inputs["input"][0], [1, 2, 3, 4])  # file order, flattened
    np.testing.assert_array_equal(data.targets, [1, 1, 1])


def test_it_maps_npz_arrays_by_input_name_or_the_single_feature_array(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.ones((4, 64), np.float64), label=np.arange(4))
    data = load_split(ref_for(path, "npz"), "all", IMAGE)
    assert data.inputs["image"].shape == (4, 1, 8, 8) and data.inputs["image"].dtype == np.float32

    two = tmp_path / "two.npz"
    np.savez(two, image=np.ones((4, 64)), extra=np.zeros((4, 3)), label=np.arange(4))
    assert load_split(ref_for(two, "npz"), "all", IMAGE).inputs["image"].shape == (4, 1, 8, 8)
    with pytest.raises(PipelineError, match="2 non-target arrays .* none is named 'input'"):
        load_split(ref_for(two, "npz"), "all", FLAT)


def test_it_refuses_fractional_values_for_an_integer_input(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[1.5, 0], [2, 1]])
    with pytest.raises(PipelineError, match="takes int64 but dataset 3 holds fractional values"):
        load_split(ref_for(path, "csv"), "all", [TensorSpec("ids", ["batch", 1], "int64")])


def test_it_reports_a_missing_dataset_file(tmp_path: Path) -> None:
    ref = DatasetRef(id="4", path=str(tmp_path / "gone.csv"), format="csv")
    with pytest.raises(PipelineError, match="dataset 4: its file is missing"):
        load_split(ref, "all", FLAT)


def test_it_iterates_batches_in_order_or_shuffled() -> None:
    data = SplitData(inputs={"x": np.arange(10).reshape(10, 1)}, targets=np.arange(10), rows=10)

    batches = list(iter_batches(data, 4))
    assert [len(b[0]["x"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(10))

    shuffled = [t for _, t in iter_batches(data, 3, shuffle=True, seed=5) if t is not None]
    again = [t for _, t in iter_batches(data, 3, shuffle=True, seed=5) if t is not None]
    order = np.concatenate(shuffled)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again, strict=True))
    for inputs, targets in iter_batches(data, 3, shuffle=True, seed=5):
        np.testing.assert_array_equal(inputs["x"][:, 0], targets)  # rows stay paired
    with pytest.raises(ValueError):
        next(iter_batches(data, 0))
