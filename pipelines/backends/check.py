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

__all__ = ["ATOL", "RTOL", "cause", "compare_outputs", "max_abs_diff", "run_once"]

# How close a converted model (an ONNX export, an AOTInductor package) must stay to its source:
# the same float32 math in another order, not a lower precision.
RTOL = 1e-3
ATOL = 1e-4


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


def compare_outputs(
    reference: Sequence[Any],
    got: Sequence[Any],
    *,
    names: Sequence[str],
    made: str,
    source: str,
    hint: str = "",
) -> float:
    """Max abs difference of ``got`` (what ``made`` returns) against ``reference`` (what
    ``source`` returns), paired in order; a PipelineError naming the output when a count, shape
    or value is out of tolerance (``hint``: what to try then)."""
    if len(reference) != len(got):
        raise PipelineError(
            f"{made} returns {len(got)} outputs but {source} returns {len(reference)}"
        )
    worst = 0.0
    for name, ref, out in zip(names, reference, got, strict=True):
        ref_np, out_np = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        if ref_np.shape != out_np.shape:
            raise PipelineError(
                f"output {name!r} of {made} has shape {list(out_np.shape)} but {source}'s has "
                f"{list(ref_np.shape)}"
            )
        diff = float(np.max(np.abs(ref_np - out_np))) if ref_np.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(out_np, ref_np, rtol=RTOL, atol=ATOL, equal_nan=True):
            raise PipelineError(
                f"output {name!r} of {made} differs from {source}'s (max abs diff {diff:.3g}, "
                f"tolerance rtol {RTOL:g} atol {ATOL:g}){hint}"
            )
    return worst
