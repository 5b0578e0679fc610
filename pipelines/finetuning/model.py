"""The TorchScript model a fine-tune run trains: loaded, its weights checked, its inputs fed.

torch is imported inside the functions (or passed in), so this module stays light to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import PipelineError
from pipelines.onnx_io import describe_inputs, first_error_line

if TYPE_CHECKING:
    import torch


def load_trainable(path: str, device: str) -> tuple[Any, list[Any]]:
    """(the ScriptModule on ``device``, its trainable parameters); fp32 weights only."""
    import torch

    try:
        model = torch.jit.load(path, map_location=device)
    except Exception as exc:
        raise PipelineError(
            f"could not load {path} as TorchScript: {first_error_line(exc)}"
        ) from exc
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PipelineError("the model has no trainable parameters, so it cannot be fine-tuned")
    floats = {p.dtype for p in params}
    if floats != {torch.float32}:
        raise PipelineError(
            f"fine-tuning needs fp32 weights; this model's are {sorted(map(str, floats))}"
        )
    return model, params


def to_tensors(names: list[str], inputs: dict[str, np.ndarray], device: str) -> list[torch.Tensor]:
    """The model's inputs, in its order, as tensors on ``device``."""
    import torch

    missing = [name for name in names if name not in inputs]
    if missing:
        raise PipelineError(f"the dataset gives no data for the model input(s) {missing}")
    return [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in names]


def first_tensor(value: Any, torch: Any) -> Any:
    """The model's output tensor: the tensor itself, or the first of a tuple/list it returns."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise PipelineError(
        f"the model returns a {type(value).__name__}; fine-tuning needs forward to return a "
        "tensor (or a tuple whose first item is the tensor the loss applies to)"
    )


def probe_output_shape(
    model: Any,
    tensors: Callable[[dict[str, np.ndarray]], list[Any]],
    rows: dict[str, np.ndarray],
    dataset_id: int,
) -> tuple[int, ...]:
    """One forward pass on two rows: checks the inputs fit and tells the output's shape."""
    import torch

    probe = {name: array[:2] for name, array in rows.items()}
    model.eval()
    try:
        with torch.no_grad():
            out = first_tensor(model(*tensors(probe)), torch)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(
            f"the model rejected dataset {dataset_id}'s rows ({describe_inputs(probe)}): "
            f"{first_error_line(exc)}"
        ) from exc
    return tuple(out.shape)
