"""The data a fine-tune run trains on: the splits, their targets checked for the task, the loss.

Every refusal here is a PipelineError whose message says what to change in the dataset or the
model, because these are the mistakes a user makes (a dataset without a target, class indices
outside the model's classes, targets of the wrong shape). torch is passed in or imported inside
the functions, so this module stays light to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import DatasetRef, PipelineError, TensorSpec

if TYPE_CHECKING:
    from pipelines.datasets import SplitData


def load_splits(
    ref: DatasetRef, specs: list[TensorSpec], dataset_id: int
) -> tuple[SplitData, SplitData]:
    """The train and validation splits mapped onto the model's inputs; both must have rows."""
    from pipelines.datasets import load_split

    train = load_split(ref, "train", specs)
    val = load_split(ref, "validation", specs)
    for split, data in (("train", train), ("validation", val)):
        if data.rows == 0:
            raise PipelineError(
                f"the {split} split of dataset {dataset_id} is empty: fine-tuning needs "
                "rows in both the train and the validation split"
            )
    return train, val


def with_targets(
    task: str, data: SplitData, output_shape: tuple[int, ...], split: str, dataset: str
) -> SplitData:
    """``data`` with its targets as :func:`prepare_targets` makes them for the task's loss."""
    from pipelines.datasets import SplitData

    return SplitData(
        inputs=data.inputs,
        targets=prepare_targets(task, data.targets, output_shape, split, dataset),
        rows=data.rows,
    )


def prepare_targets(
    task: str, targets: np.ndarray | None, output_shape: tuple[int, ...], split: str, dataset: str
) -> np.ndarray:
    """The split's targets in the dtype and shape the task's loss takes, or a PipelineError."""
    if targets is None:
        raise PipelineError(
            f"dataset {dataset} has no target column, so there is nothing to fine-tune towards: "
            "set the dataset's target"
        )
    per_row = tuple(output_shape[1:])
    if task == "classification":
        if len(output_shape) != 2:
            raise PipelineError(
                f"a classification model must return [batch, classes] scores; this one returns "
                f"shape {list(output_shape)}"
            )
        labels = np.asarray(targets)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise PipelineError(
                f"classification targets must be one class index per row; the {split} targets "
                f"of dataset {dataset} have shape {list(labels.shape)}"
            )
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                raise PipelineError(
                    f"classification targets must be class indices; dataset {dataset}'s {split} "
                    "targets hold non-integer values"
                )
        elif labels.dtype.kind not in "iub":
            raise PipelineError(
                f"classification targets must be class indices; dataset {dataset}'s {split} "
                f"targets are {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        classes = output_shape[1]
        if classes < 2:
            raise PipelineError(
                "the model returns one score per row; fine-tuning a classifier needs [batch, "
                "classes] logits (for a binary classifier, 2 of them)"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise PipelineError(
                f"dataset {dataset}'s {split} targets run from {labels.min()} to {labels.max()} "
                f"but the model scores {classes} classes (0..{classes - 1})"
            )
        return labels
    values = np.asarray(targets, dtype=np.float32)
    if values.shape[1:] != per_row:
        if values.ndim == 1 and per_row == (1,):
            values = values[:, None]
        elif values.ndim == 2 and values.shape[1] == 1 and per_row == ():
            values = values[:, 0]
        else:
            raise PipelineError(
                f"the {split} targets of dataset {dataset} have shape {list(values.shape[1:])} per "
                f"row but the model returns {list(per_row)} per row"
            )
    if task == "embedding" and values.ndim != 2:
        raise PipelineError(
            f"embedding targets must be one vector per row; got shape {list(values.shape)}"
        )
    return values


def loss_function(task: str, label_smoothing: float, torch: Any) -> Any:
    """loss(outputs, targets) -> the batch's mean loss, computed in fp32."""
    functional = torch.nn.functional
    if task == "classification":
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        return lambda out, target: criterion(out.float(), target)
    if task == "regression":
        return lambda out, target: functional.mse_loss(out.float(), target)
    # embedding: 1 - cosine similarity to the target vectors
    return lambda out, target: (
        1.0 - functional.cosine_similarity(out.float(), target, dim=-1)
    ).mean()


def dim_sizes(specs: list[TensorSpec], data: SplitData) -> dict[str, int]:
    """Sizes of the named non-batch dims as the data has them, for the ONNX example input."""
    sizes: dict[str, int] = {}
    for spec in specs:
        array = data.inputs.get(spec.name)
        if array is None:
            continue
        for axis, dim in enumerate(spec.shape):
            if axis > 0 and isinstance(dim, str) and axis < array.ndim:
                sizes.setdefault(dim, int(array.shape[axis]))
    return sizes
