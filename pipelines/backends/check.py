"""Running a model a stage or backend just made, once, next to the model it was made from.

Export, compile and quantize each prove their output runs and say how far it moved from its
source. The models are loaded and run by ``pipelines.engines`` (as workers and servers run them);
this module only picks the feeds a model takes and measures the difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.core import PipelineError
from pipelines.engines import Engine
from pipelines.engines.feeds import cast_rows
from pipelines.onnx_io import first_error_line

__all__ = ["cause", "max_abs_diff", "run_once"]


def run_once(
    engine: Engine, arrays: Mapping[str, np.ndarray], *, cast: bool = False
) -> list[np.ndarray]:
    """Every output of one call of ``engine`` on the arrays it takes, in its output order.

    An exporter drops inputs the graph never reads, so the model may take fewer than the arrays
    hold; one it needs and they lack is a PipelineError. ``cast``: the arrays are the platform's
    own (random or calibration rows), cast to the input dtypes whatever the values.
    """
    missing = [spec.name for spec in engine.inputs if spec.name not in arrays]
    if missing:
        raise PipelineError(
            f"the ONNX model needs input(s) {missing} that the artifact does not declare "
            f"(declared: {sorted(arrays)})"
        )
    if cast:
        feeds = cast_rows(engine.inputs, arrays)
    else:
        feeds = {spec.name: arrays[spec.name] for spec in engine.inputs}
    return list(engine.run(feeds).values())


def cause(exc: BaseException) -> str:
    """The runtime's own first error line (an engine's error wraps it, naming the model)."""
    return first_error_line(exc.__cause__ or exc)


def max_abs_diff(reference: Sequence[Any], other: Sequence[Any]) -> float:
    """The largest absolute difference over outputs paired in order (0.0 for none)."""
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(reference, other, strict=False)
        if np.asarray(a).size
    ]
    return max(diffs, default=0.0)
