"""ONNX graph helpers of quantize: saving (with external data), node order, and what changed.

The counts are what a quantize result reports: which op types now run on int8 or half-precision
data. onnx is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.onnx_io import op_types

if TYPE_CHECKING:
    import onnx

__all__ = [
    "QDQ_OPS",
    "describe_counts",
    "dynamic_counts",
    "float_counts",
    "qdq_counts",
    "save_model",
    "toposort",
    "zero_points_all_zero",
]

# Ops that only appear in a graph once something was quantized dynamically: MatMulInteger,
# ConvInteger, DynamicQuantizeLinear, DequantizeLinear (quantized Gather), QAttention, QGemm, ...
_QUANTIZED_OP = re.compile(r"(?i:integer|quantize)|^Q[A-Z]")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))


def toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes so each comes after the nodes it reads from (TensorRT needs it).

    The float16 converter appends its input/output casts at the end; onnxruntime sorts for itself,
    TensorRT's parser does not. Nodes in a cycle or reading unknown names keep their order, last.
    """
    producers: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = i
    deps = [
        {producers[name] for name in node.input if name in producers and producers[name] != i}
        for i, node in enumerate(graph.node)
    ]
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, wanted in enumerate(deps):
        for j in wanted:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = deque(i for i, n in enumerate(remaining) if n == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def dynamic_counts(path: Path) -> Counter[str]:
    return Counter(op for op in op_types(path) if _QUANTIZED_OP.search(op))


def qdq_counts(path: Path) -> Counter[str]:
    """Op types of the nodes that read a DequantizeLinear output: the ones running on int8 data."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return Counter(
        node.op_type
        for node in graph.node
        if node.op_type not in QDQ_OPS and any(i in dequantized for i in node.input)
    )


def float_counts(model: onnx.ModelProto, elem_type: int) -> Counter[str]:
    """Op types of the nodes (casts aside) that write a tensor of ``elem_type``."""
    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    return Counter(
        node.op_type
        for node in graph.node
        if node.op_type != "Cast" and any(types.get(o) == elem_type for o in node.output)
    )


def describe_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in counts.most_common()) or "none"


def zero_points_all_zero(path: Path) -> bool:
    """Whether every zero point of the QDQ graph is 0 (symmetric, as TensorRT requires)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        zero_point = node.input[2] if node.op_type in QDQ_OPS and len(node.input) > 2 else ""
        if zero_point in inits and np.any(numpy_helper.to_array(inits[zero_point]) != 0):
            return False
    return True
