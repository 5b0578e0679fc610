"""Sensitivity search: which weight nodes to keep in float so an int8 model keeps its quality.

Two parts, kept apart so either can change alone:

* :func:`rank_nodes` orders the weight-bearing nodes (MatMul, Gemm, Conv with a constant weight)
  by the error their int8 quantization *alone* causes. The FP32 model is run once on a few
  calibration rows with every candidate's activation input exposed; each node is then run by
  itself (a one-node ONNX model, so every op's attributes mean what they mean in the graph) on
  its true FP32 input, once as it is and once with the input and weight quantized and
  dequantized the way the mode does it. The score is the relative error of the node's output,
  ``||Y_int8 - Y|| / ||Y||``. Measured on FP32 inputs, a node's score is its own error, not
  the error that upstream nodes already put into its input (what comparing a fully quantized
  model's intermediate outputs would measure), and one model run serves every node.
* :func:`search` keeps the worst-ranked nodes in float in growing steps (1, 2, 4, ... nodes)
  until a scorer says the candidate holds the threshold, then bisects down to the fewest
  that do, never past ``cap`` nodes. The scorer is any function from a candidate's file to a
  number held to the threshold: retention of a task metric on a dataset, or an agreement /
  cosine against the parent on generated inputs (:func:`pipelines.judging.score_candidate`).

Ranking is a heuristic (simulated quantization, minmax ranges for static); every step is judged
on the real quantized model, so a wrong guess costs a step, never a wrong verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "NodeError",
    "SearchResult",
    "Step",
    "excluded_cap",
    "rank_nodes",
    "search",
]

Scheme = Literal["dynamic", "static"]
_WEIGHT_AXIS_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class NodeError:
    """A node and the relative output error its quantization alone causes."""

    name: str
    op_type: str
    error: float


@dataclass(frozen=True)
class Step:
    """One candidate of the search: how many nodes it kept in float and its score."""

    excluded: int
    score: float


@dataclass
class SearchResult:
    """The nodes kept in float (the fewest that held the threshold, or the cap), and the steps."""

    excluded: list[str]
    passed: bool
    score: float
    steps: list[Step] = field(default_factory=list)

    def describe(self, start: float) -> str:
        """``score 0.9812 -> 0.9934 (tried 1, 2, 4, 3 nodes in float)``."""
        tried = ", ".join(str(s.excluded) for s in self.steps)
        return f"score {start:.4f} -> {self.score:.4f} (tried {tried} nodes in float)"

    def meta(self, ranked: Sequence[NodeError], start: float) -> dict[str, object]:
        """JSON-safe record for the artifact's meta."""
        return {
            "excluded_nodes": list(self.excluded),
            "passed": self.passed,
            "score_before": start,
            "score_after": self.score,
            "steps": [{"excluded": s.excluded, "score": s.score} for s in self.steps],
            "ranked": [{"node": r.name, "op_type": r.op_type, "error": r.error} for r in ranked],
        }


def excluded_cap(candidates: int, fraction: float) -> int:
    """How many of ``candidates`` nodes the search may keep in float: at least one, and never
    all of them (a model with nothing quantized is no int8 model)."""
    return min(max(1, int(candidates * fraction)), candidates - 1) if candidates else 0


def _fake_quant_weight(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Symmetric int8 weights (per channel along ``axis``, else per tensor), dequantized."""
    if axis is None:
        scale = np.max(np.abs(w)) / qmax
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.max(np.abs(w), axis=reduce, keepdims=True) / qmax
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(w.dtype)


def _fake_quant_activation(a: np.ndarray, scheme: Scheme) -> np.ndarray:
    """The activation as the int8 kernels see it, dequantized.

    dynamic: uint8, asymmetric, one range per tensor per run (DynamicQuantizeLinear);
    static: int8, symmetric, one range per tensor from the observed min and max (MinMax).
    """
    if scheme == "dynamic":
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        scale = (hi - lo) / 255 or 1.0
        zero = np.round(-lo / scale)
        return ((np.clip(np.round(a / scale) + zero, 0, 255) - zero) * scale).astype(a.dtype)
    scale = float(np.max(np.abs(a))) / 127 or 1.0
    return (np.clip(np.round(a / scale), -127, 127) * scale).astype(a.dtype)


def _weight_axis(node: object, weight_index: int, rank: int) -> int:
    """The output-channel axis of a node's weight: what a per-channel scale runs along."""
    op = node.op_type  # type: ignore[attr-defined]
    if op == "Conv":
        return 0
    if op == "Gemm":
        trans = {a.name: a.i for a in node.attribute}  # type: ignore[attr-defined]
        flag = "transB" if weight_index == 1 else "transA"
        return 0 if trans.get(flag, 0) else 1
    return rank - 1 if weight_index == 1 else max(rank - 2, 0)  # MatMul: B's columns


def _expose(model: object, names: Sequence[str]) -> bytes:
    """``model`` serialized with ``names`` added as float outputs."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # type: ignore[arg-type]
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy.SerializeToString()


def _single_node(model: object, node: object, activation: str, weight: str) -> bytes:
    """A model of ``node`` alone: the activation and the weight are its inputs (so the FP32 and
    the quantized-then-dequantized ones can be fed), any other constant (a bias) stays one."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name: t for t in graph.initializer}
    extra = [inits[i] for i in node.input if i and i in inits and i != weight]  # type: ignore[attr-defined]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)  # type: ignore[arg-type]
    out = copy.output[0]
    del copy.output[1:]
    one = helper.make_graph(
        [copy],
        "node",
        [
            helper.make_tensor_value_info(activation, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(weight, TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=extra,
    )
    made = helper.make_model(one, opset_imports=list(model.opset_import))  # type: ignore[attr-defined]
    made.ir_version = model.ir_version  # type: ignore[attr-defined]
    return made.SerializeToString()


def rank_nodes(
    model_path: str | Path,
    node_names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    scheme: Scheme,
    per_channel: bool,
    reduce_range: bool,
) -> list[NodeError]:
    """``node_names`` (those with one constant weight and one activation input) ordered from the
    largest relative output error under int8 to the smallest."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(node_names)
    chosen: list[tuple[object, str, int]] = []  # node, activation input, weight index
    for node in model.graph.node:
        if node.name not in wanted or node.op_type not in _WEIGHT_AXIS_OPS:
            continue
        first_two = list(node.input[:2])
        weights = [i for i, name in enumerate(first_two) if name in inits]
        if len(first_two) == 2 and len(weights) == 1:
            chosen.append((node, first_two[1 - weights[0]], weights[0]))
    if not chosen:
        return []

    options = ort.SessionOptions()
    options.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    graph_inputs = {i.name for i in model.graph.input}
    inner = [a for _, a, _ in chosen if a not in graph_inputs]
    whole = ort.InferenceSession(_expose(model, inner), options, cpu)
    known = {i.name for i in whole.get_inputs()}
    fed = {k: v for k, v in feeds.items() if k in known}
    names = [o.name for o in whole.get_outputs()]
    captured = {**fed, **dict(zip(names, whole.run(None, fed), strict=True))}
    del whole

    qmax = 63 if reduce_range else 127
    ranked: list[NodeError] = []
    for node, activation, w_index in chosen:
        a = np.asarray(captured[activation], np.float32)
        w_name = node.input[w_index]  # type: ignore[attr-defined]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        axis = _weight_axis(node, w_index, w.ndim) if per_channel else None
        session = ort.InferenceSession(_single_node(model, node, activation, w_name), options, cpu)
        y = session.run(None, {activation: a, w_name: w})[0]
        y_q = session.run(
            None,
            {
                activation: _fake_quant_activation(a, scheme),
                w_name: _fake_quant_weight(w, axis, qmax),
            },
        )[0]
        norm = float(np.linalg.norm(y))
        error = float(np.linalg.norm(y_q - y)) / norm if norm > 0 else 0.0
        ranked.append(NodeError(node.name, node.op_type, error))  # type: ignore[attr-defined]
    ranked.sort(key=lambda r: r.error, reverse=True)
    return ranked


def search(
    ranked: Sequence[str],
    make: Callable[[list[str]], Path],
    score: Callable[[Path], float],
    threshold: float,
    cap: int,
) -> SearchResult:
    """Keep the first k of ``ranked`` in float for k = 1, 2, 4, ... (at most ``cap``) until
    ``score(make(first k)) >= threshold``, then bisect to the fewest k that holds it.

    ``make`` writes a candidate quantized with those nodes left in float and returns its file;
    the k = 0 candidate (everything quantized) is the caller's, already judged below threshold.
    Without a k that holds, the best-scoring candidate is returned with ``passed`` False.
    """
    steps: list[Step] = []
    scores: dict[int, float] = {}

    def attempt(k: int) -> float:
        value = score(make(list(ranked[:k])))
        steps.append(Step(k, value))
        scores[k] = value
        return value

    cap = min(cap, len(ranked))
    failing, holding = 0, None
    k = 1
    while k <= cap:
        if attempt(k) >= threshold:
            holding = k
            break
        failing = k
        if k == cap:
            break
        k = min(k * 2, cap)
    if holding is None:
        if not scores:
            return SearchResult([], False, float("nan"), steps)
        best = max(scores, key=lambda n: scores[n])
        return SearchResult(list(ranked[:best]), False, scores[best], steps)
    while holding - failing > 1:
        middle = (failing + holding) // 2
        if attempt(middle) >= threshold:
            holding = middle
        else:
            failing = middle
    return SearchResult(list(ranked[:holding]), True, scores[holding], steps)
