"""ONNX models are inspected from their graph, types and shapes: the weights are never read.

The memory test runs the inspection in a fresh process and reads its peak RSS
(``ru_maxrss``), so nothing this test process allocated counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipelines.formats import RejectedUpload, inspect_model
from pipelines.formats.onnx_model import check_skeleton, inspect_onnx
from pipelines.onnx_skeleton import SkeletonError, is_stripped, read_skeleton

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
N = 2000  # 8000 bytes of float32: over the skeleton's 4096-byte "read whole" size

MEASURE = """
import json, resource, sys
from pipelines.formats import inspect_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = inspect_model(sys.argv[1], "big.onnx")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_mib": (after - before) / 1024, "inputs": [t.shape for t in info.inputs],
                  "outputs": [t.shape for t in info.outputs], "details": info.details}))
"""


def matmul_model(rows: int, cols: int) -> onnx.ModelProto:
    """x[b, rows] @ w[rows, cols], reshaped by a small int64 constant: y[n, cols]."""
    weight = numpy_helper.from_array(np.zeros((rows, cols), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, cols], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Reshape", ["xw", "shape"], ["y"]),
        ],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])],
        [weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def big_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(matmul_model(1024, 51200), str(path))  # a 200 MiB initializer
    return path


def test_a_200_mb_model_is_inspected_in_a_few_mib(big_onnx):
    size_mib = big_onnx.stat().st_size / MiB
    assert size_mib > 199

    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(big_onnx)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(run.stdout)

    assert result["inputs"] == [["b", 1024]]
    assert result["outputs"] == [["n", 51200]]
    assert result["details"]["parameter_bytes"] == 1024 * 51200 * 4 + 16
    assert result["details"]["shape_inference"] == "ok"
    assert result["grown_mib"] < 40, f"inspecting a {size_mib:.0f} MiB model took {result}"


def test_the_skeleton_has_everything_but_the_large_tensors_data(big_onnx):
    skeleton = read_skeleton(big_onnx)
    full = onnx.load(str(big_onnx))

    assert skeleton.stripped_tensors == 1 and skeleton.stripped_bytes == 1024 * 51200 * 4
    assert skeleton.model.graph.node == full.graph.node
    assert skeleton.model.graph.input == full.graph.input
    assert skeleton.model.graph.output == full.graph.output
    weight, shape = skeleton.model.graph.initializer
    assert is_stripped(weight) and not weight.raw_data
    assert list(weight.dims) == [1024, 51200] and weight.data_type == TensorProto.FLOAT
    assert not is_stripped(shape) and shape == full.graph.initializer[1]  # small: read whole
    check_skeleton(skeleton.model)


def test_a_small_model_reads_exactly_as_onnx_load(mlp_onnx):
    assert read_skeleton(mlp_onnx).model == onnx.load(str(mlp_onnx))


def test_stripping_every_tensor_gives_the_same_inspection(mlp_onnx):
    full = onnx.load(str(mlp_onnx))
    skeleton = read_skeleton(mlp_onnx, keep_bytes=0)

    assert skeleton.stripped_tensors == len(full.graph.initializer)
    assert inspect_onnx(mlp_onnx, skeleton.model) == inspect_onnx(mlp_onnx, full)


def test_an_external_data_model_reads_as_onnx_load_without_its_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(
        matmul_model(64, 256), str(path),
        save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
        size_threshold=1024,
    )  # fmt: skip

    skeleton = read_skeleton(path)

    assert skeleton.model == onnx.load(str(path), load_external_data=False)
    assert skeleton.stripped_tensors == 0
    with pytest.raises(RejectedUpload, match="external data"):
        inspect_model(path, "ext.onnx")


def test_large_constants_and_subgraph_weights_are_left_unread(tmp_path):
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [N])],
        [numpy_helper.from_array(np.ones(N, np.float32), "bias")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [N])],
    )
    constant = numpy_helper.from_array(np.full(N, 2, np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value=constant),
            helper.make_node("Mul", ["x0", "k"], ["x"]),
            helper.make_node(
                "If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        "branches",
        [
            helper.make_tensor_value_info("x0", TensorProto.FLOAT, [N]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "branches.onnx"
    onnx.save(model, str(path))

    skeleton = read_skeleton(path)

    assert skeleton.stripped_tensors == 2
    assert skeleton.stripped_bytes == 2 * N * 4
    info = inspect_model(path, "branches.onnx")
    assert [t.name for t in info.inputs] == ["x0", "flag"]
    assert info.outputs[0].shape == [N]


def test_a_truncated_or_inconsistent_file_is_refused(big_onnx, tmp_path):
    cut = tmp_path / "cut.onnx"
    with open(big_onnx, "rb") as f:
        cut.write_bytes(f.read(50 * MiB))
    with pytest.raises(SkeletonError, match="past its message's end"):
        read_skeleton(cut)
    with pytest.raises(RejectedUpload, match="truncated"):
        inspect_model(cut, "cut.onnx")

    # raw_data shorter than the shape says: refused without reading it.
    model = matmul_model(64, 256)
    model.graph.initializer[0].raw_data = b"\0" * 8000
    short = tmp_path / "short.onnx"
    onnx.save(model, str(short))
    with pytest.raises(SkeletonError, match="has 8000 bytes of data but its shape and type need"):
        read_skeleton(short)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 4096)
    with pytest.raises(SkeletonError):
        read_skeleton(garbage)
