"""Task metrics, retention against a parent model, and running a model over a dataset.

``primary_metric`` names the number evaluate, fine-tune and quantize compare models on;
``task_metrics`` computes it (and a few companions) from a model's outputs; ``retention`` says how
much of the parent's quality a child kept; ``predict`` runs an ONNX or TorchScript artifact over
arrays in batches. torch and onnxruntime are imported inside ``predict`` only.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import Artifact, ModelFormat, PipelineError, TensorSpec

__all__ = [
    "PREDICT_FORMATS",
    "clear_predict_cache",
    "predict",
    "primary_metric",
    "retention",
    "task_metrics",
]

# The artifact formats predict() can run.
PREDICT_FORMATS: tuple[str, ...] = (ModelFormat.ONNX.value, ModelFormat.TORCHSCRIPT.value)

_PRIMARY: dict[str, tuple[str, bool]] = {
    "classification": ("accuracy", True),
    "regression": ("mse", False),
    "embedding": ("cosine", True),
}

_COSINE_EPS = 1e-12


# -- metrics ---------------------------------------------------------------------------------------


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric a task is judged on and whether higher is better.

    classification: accuracy (higher); regression: mse (lower); embedding: cosine (higher);
    anything else: mse (lower).
    """
    return _PRIMARY.get(task, ("mse", False))


def _rows(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0:
        raise PipelineError(f"{what} is a scalar; expected one value per row (rows first)")
    return array.reshape(array.shape[0], -1)


def _same_rows(outputs: np.ndarray, other: np.ndarray, what: str) -> None:
    if len(outputs) != len(other):
        raise PipelineError(f"the model gave {len(outputs)} outputs for {len(other)} {what}")


def _class_labels(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer labels [N] from int (or integral float) labels, or from one-hot rows."""
    targets = np.asarray(targets)
    if targets.ndim == 2 and targets.shape[1] == n_classes and n_classes > 1:
        return targets.argmax(axis=1)
    flat = targets.reshape(len(targets), -1) if targets.ndim else targets.reshape(1, 1)
    if flat.shape[1] != 1:
        raise PipelineError(
            f"classification labels have shape {list(targets.shape)}; expected one integer "
            f"label per row (or {n_classes}-wide one-hot rows)"
        )
    labels = flat.reshape(-1)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise PipelineError("classification labels must be integers 0..C-1")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iu":
        raise PipelineError(f"classification labels must be integers, got dtype {labels.dtype}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= max(n_classes, 2):
            raise PipelineError(
                f"the labels range over {low}..{high} but the model outputs {n_classes} class "
                f"score(s) per row (labels must be 0..{max(n_classes, 2) - 1})"
            )
    return labels.astype(np.int64)


def _class_scores(outputs: np.ndarray) -> np.ndarray:
    """[N, C] scores; a single score per row (binary) becomes [N, 2] (probability or logit)."""
    scores = _rows(outputs, "the model output").astype(np.float64)
    if scores.shape[1] == 1:
        single = scores[:, 0]
        # A probability in [0, 1] splits at 0.5, a logit at 0: centre both on 0.
        threshold = 0.5 if np.all((single >= 0) & (single <= 1)) else 0.0
        centred = single - threshold
        scores = np.stack([-centred, centred], axis=1)
    return scores


def _classification(
    outputs: np.ndarray,
    targets: np.ndarray | None,
    top_k: tuple[int, ...],
    reference: np.ndarray | None,
) -> dict[str, float]:
    scores = _class_scores(outputs)
    n_classes = scores.shape[1]
    metrics: dict[str, float] = {}
    if targets is not None:
        _same_rows(scores, np.asarray(targets), "labels")
        labels = _class_labels(targets, n_classes)
        if len(labels) == 0:
            raise PipelineError("there are no rows to compute accuracy on")
        metrics["accuracy"] = float(np.mean(scores.argmax(axis=1) == labels))
        ks = sorted({int(k) for k in top_k if 1 < int(k) < n_classes})
        if ks:
            # Rank of the true class: how many classes score strictly higher than it.
            true_scores = scores[np.arange(len(labels)), labels]
            rank = (scores > true_scores[:, None]).sum(axis=1)
            for k in ks:
                metrics[f"top{k}"] = float(np.mean(rank < k))
    if reference is not None:
        ref_scores = _class_scores(reference)
        _same_rows(scores, ref_scores, "reference rows")
        if ref_scores.shape[1] != n_classes:
            raise PipelineError(
                f"the model outputs {n_classes} classes but the reference {ref_scores.shape[1]}"
            )
        metrics["agreement"] = float(np.mean(scores.argmax(1) == ref_scores.argmax(1)))
    return metrics


def _aligned(outputs: np.ndarray, other: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    out = _rows(outputs, "the model output").astype(np.float64)
    ref = np.asarray(other)
    _same_rows(out, ref, what)
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    if ref.shape != out.shape:
        raise PipelineError(
            f"the model outputs {out.shape[1]} value(s) per row but the {what} have {ref.shape[1]}"
        )
    return out, ref


def _errors(outputs: np.ndarray, expected: np.ndarray, what: str) -> tuple[float, float]:
    out, ref = _aligned(outputs, expected, what)
    if out.size == 0:
        raise PipelineError("there are no rows to compute errors on")
    diff = out - ref
    return float(np.mean(diff * diff)), float(np.mean(np.abs(diff)))


def _cosine(outputs: np.ndarray, expected: np.ndarray, what: str) -> float:
    out, ref = _aligned(outputs, expected, what)
    if len(out) == 0:
        raise PipelineError("there are no rows to compute cosine similarity on")
    dot = np.sum(out * ref, axis=1)
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    return float(np.mean(dot / np.maximum(norms, _COSINE_EPS)))


def task_metrics(
    task: str,
    outputs: np.ndarray,
    targets: np.ndarray | None,
    top_k: tuple[int, ...] = (1, 5),
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a model's ``outputs`` (rows first) for ``task``.

    * classification: ``accuracy`` of the argmax against integer labels [N] (or one-hot rows),
      ``top{k}`` for each k of ``top_k`` with 1 < k < number of classes; with ``reference``
      (the parent's outputs) also ``agreement``, the fraction of rows whose top-1 class matches.
      A single score per row is a binary classifier (probability split at 0.5, logit at 0).
    * regression and other tasks: ``mse`` and ``mae`` against the targets reshaped to the
      outputs; without targets, ``ref_mse`` and ``ref_mae`` against ``reference``.
    * embedding: ``cosine``, the mean cosine similarity of each row to its target, or to
      ``reference`` when there are no targets.

    Raises PipelineError when neither targets nor a reference are given, or shapes disagree.
    """
    if targets is None and reference is None:
        raise PipelineError(
            f"{task} metrics need targets (a label/target column) or a reference model's outputs"
        )
    outputs = np.asarray(outputs)
    if task == "classification":
        return _classification(outputs, targets, tuple(top_k), reference)
    if task == "embedding":
        expected, what = (targets, "targets") if targets is not None else (reference, "reference")
        assert expected is not None
        return {"cosine": _cosine(outputs, expected, what)}
    if targets is not None:
        mse, mae = _errors(outputs, targets, "targets")
        return {"mse": mse, "mae": mae}
    assert reference is not None
    mse, mae = _errors(outputs, reference, "reference")
    return {"ref_mse": mse, "ref_mae": mae}


def retention(child: float, parent: float, higher_is_better: bool) -> float:
    """How much of the parent's quality the child kept: 1.0 is the same, above 1.0 better.

    ``child / parent`` when higher is better, ``parent / child`` when lower is (an error metric);
    both zero gives 1.0, and a zero denominator under a non-zero numerator gives ``inf`` (the child
    is infinitely better, or the parent infinitely worse). Meant for non-negative metrics.
    """
    numerator, denominator = (child, parent) if higher_is_better else (parent, child)
    if denominator == 0:
        return 1.0 if numerator == 0 else float("inf")
    return float(numerator / denominator)


# -- running models --------------------------------------------------------------------------------

_ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


class _Runner:
    """A loaded model: input names and dtypes, the batch size it is fixed to, and one call."""

    names: list[str]
    dtypes: dict[str, np.dtype[Any]]
    fixed_batch: int | None

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class _OnnxRunner(_Runner):
    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no per-node warnings in worker logs
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception:
            if len(providers) == 1:
                raise
            # A CUDA build without a usable GPU (driver, libraries): the CPU still runs it.
            self.session = ort.InferenceSession(
                path, sess_options=options, providers=["CPUExecutionProvider"]
            )
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.dtypes = {i.name: np.dtype(_ORT_TYPES[i.type]) for i in inputs if i.type in _ORT_TYPES}
        self.fixed_batch = next(
            (int(i.shape[0]) for i in inputs if i.shape and isinstance(i.shape[0], int)), None
        )

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(None, feeds)[0])


class _TorchRunner(_Runner):
    def __init__(self, path: str, specs: list[TensorSpec]) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.names = [s.name for s in specs]
        self.dtypes = {}
        for spec in specs:
            with contextlib.suppress(TypeError):  # an odd dtype name: passed through as is
                self.dtypes[spec.name] = np.dtype(spec.dtype)
        self.fixed_batch = next(
            (int(s.shape[0]) for s in specs if s.shape and isinstance(s.shape[0], int)), None
        )

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        # Positional, in declared order: that is how the artifact's inputs map to forward().
        tensors = [torch.from_numpy(feeds[name]).to(self.device) for name in self.names]
        with torch.inference_mode():
            out = self.model(*tensors)
        tensor = _first_tensor(out).detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        return np.asarray(tensor.cpu().numpy())


def _first_tensor(out: Any) -> Any:
    """The first tensor of a model's output: itself, the first of a tuple/list, or of a dict."""
    while isinstance(out, (tuple, list, dict)):
        if not out:
            raise PipelineError("the model returned an empty tuple, list or dict")
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    if not hasattr(out, "detach"):
        raise PipelineError(f"the model's first output is a {type(out).__name__}, not a tensor")
    return out


_CACHE_SIZE = 4
_cache: OrderedDict[tuple[Any, ...], _Runner] = OrderedDict()
_cache_lock = threading.Lock()


def clear_predict_cache() -> None:
    """Forget the loaded models (predict reloads them on next use)."""
    with _cache_lock:
        _cache.clear()


def _runner(artifact: Artifact) -> _Runner:
    if artifact.format not in PREDICT_FORMATS:
        raise PipelineError(
            f"cannot run {artifact.key!r}: it is a {artifact.format} model and predictions run "
            f"{' or '.join(PREDICT_FORMATS)} models"
        )
    path = Path(artifact.path)
    try:
        st = path.stat()
    except OSError:
        raise PipelineError(f"cannot run {artifact.key!r}: its file {path} is missing") from None
    # The file's identity and version: a stage that rewrites a file gets a fresh session.
    key: tuple[Any, ...] = (
        artifact.format,
        os.path.realpath(path),
        st.st_mtime_ns,
        st.st_size,
        tuple((s.name, tuple(s.shape), s.dtype) for s in artifact.inputs),
    )
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    try:
        runner: _Runner
        if artifact.format == ModelFormat.ONNX.value:
            runner = _OnnxRunner(str(path))
        else:
            if not artifact.inputs:
                raise PipelineError("the TorchScript artifact declares no inputs")
            runner = _TorchRunner(str(path), artifact.inputs)
    except PipelineError:
        raise
    except Exception as exc:
        from pipelines.onnx_io import first_error_line

        raise PipelineError(
            f"cannot load {artifact.key!r} ({artifact.format}): {first_error_line(exc)}"
        ) from exc
    with _cache_lock:
        _cache[key] = runner
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return runner


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``size`` rows (for a fixed-batch model)."""
    if len(array) >= size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def predict(
    artifact: Artifact,
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 64,
    progress: Callable[[float], None] | None = None,
) -> np.ndarray:
    """Run ``artifact`` over ``inputs`` (arrays keyed by input name, rows first) in batches.

    Returns the model's first output for every row, concatenated. A model whose batch dim is a
    fixed number runs at that batch size (the last batch padded, its extra rows dropped). ONNX
    runs on onnxruntime (CUDA first when this onnxruntime has it), TorchScript on torch (CUDA when
    available) under ``inference_mode``; loaded models are cached per file in the process.
    ``progress`` gets the fraction of rows done after each batch; whatever it raises (Cancelled)
    stops the run. Other formats, missing inputs and failing calls raise PipelineError.
    """
    from pipelines.onnx_io import describe_inputs, first_error_line

    if batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1, got {batch_size}")
    runner = _runner(artifact)
    missing = [n for n in runner.names if n not in inputs]
    if missing:
        raise PipelineError(
            f"{artifact.key!r} needs input(s) {missing}; the data has {sorted(inputs)}"
        )
    arrays = {}
    for name in runner.names:
        array = np.asarray(inputs[name])
        wanted = runner.dtypes.get(name)
        if wanted is not None and array.dtype != wanted:
            array = array.astype(wanted)
        arrays[name] = np.ascontiguousarray(array)
    counts = {len(a) if a.ndim else -1 for a in arrays.values()}
    if len(counts) != 1 or -1 in counts:
        raise PipelineError(f"the inputs have different row counts: {describe_inputs(arrays)}")
    rows = counts.pop() if arrays else 0
    step = runner.fixed_batch or batch_size
    outputs: list[np.ndarray] = []
    for start in range(0, rows, step):
        chunk = {n: a[start : start + step] for n, a in arrays.items()}
        real = len(next(iter(chunk.values())))
        if runner.fixed_batch is not None:
            chunk = {n: _pad(a, step) for n, a in chunk.items()}
        try:
            out = runner(chunk)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"{artifact.key!r} ({artifact.format}) fails on a batch of shape "
                f"{describe_inputs(chunk)}: {first_error_line(exc)}"
            ) from exc
        if out.ndim == 0 or len(out) != len(next(iter(chunk.values()))):
            raise PipelineError(
                f"{artifact.key!r} returned an output of shape {list(out.shape)} for a batch of "
                f"{len(next(iter(chunk.values())))}: its first output is not batch-first"
            )
        outputs.append(out[:real])
        if progress is not None:
            progress(min(start + real, rows) / rows)
    if not outputs:
        return np.empty((0,), dtype=np.float32)
    return np.concatenate(outputs, axis=0)
