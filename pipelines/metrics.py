"""Task metrics and retention against a parent model.

``primary_metric`` names the number evaluate, fine-tune and quantize compare models on;
``task_metrics`` computes it (and a few companions) from a model's outputs; ``retention`` says how
much of the parent's quality a child kept. Running a model to get those outputs is
:func:`pipelines.engines.predict`'s job, so this module never loads a model.
"""

from __future__ import annotations

import numpy as np

from pipelines.core import PipelineError

__all__ = ["primary_metric", "retention", "task_metrics"]

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
