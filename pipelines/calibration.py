"""Calibration data for static int8 quantization: rows of a dataset split, fed in batches.

``quantize_static`` runs the model over these rows to record the range of every activation it
quantizes; the ranges become the activations' scales. A few hundred representative rows are
enough: more rows cost time and rarely move the ranges.

onnxruntime is imported at module level: only the quantize stage imports this module, inside run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from pipelines.core import PipelineError, TensorSpec

if TYPE_CHECKING:
    from pipelines.datasets import SplitData


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_fits(data: SplitData, specs: Sequence[TensorSpec], what: str) -> None:
    """A PipelineError naming both shapes unless every input of ``specs`` is in ``data`` and fits.

    The first dim is the batch (any number of rows fits it); every other fixed dim must match.
    ``what`` names the data for the message, e.g. "calibration dataset 3 (train split)".
    """
    for spec in specs:
        array = data.inputs.get(spec.name)
        if array is None:
            have = ", ".join(sorted(data.inputs)) or "none"
            raise PipelineError(
                f"{what} has no input {spec.name!r}, which the model takes (it has: {have})"
            )
        got = list(array.shape)
        want = list(spec.shape)
        fits = len(got) == len(want) and all(
            not isinstance(w, int) or w == g for w, g in zip(want[1:], got[1:], strict=True)
        )
        if not fits:
            raise PipelineError(
                f"{what} gives {spec.name!r} as {_shape_text(got)} {array.dtype} but the model "
                f"takes {_shape_text(want)} {spec.dtype}: pick a dataset whose rows have the "
                "model's input shape"
            )


class SplitCalibrationReader(CalibrationDataReader):
    """Feeds onnxruntime the first ``samples`` rows of a split, ``batch_size`` rows at a time.

    Only ``input_names`` are fed (exporters drop inputs the graph never reads, and onnxruntime
    refuses a feed it does not know). With ``full_batches`` (a model whose batch dim is fixed) a
    last, shorter batch is left out.
    """

    def __init__(
        self,
        data: SplitData,
        input_names: Sequence[str],
        samples: int,
        batch_size: int,
        full_batches: bool = False,
    ) -> None:
        if batch_size < 1 or samples < 1 or not input_names:
            raise ValueError("samples and batch_size must be at least 1, with an input name")
        self._data = data
        self._names = list(input_names)
        self.batch_size = batch_size
        rows = min(samples, data.rows)
        self.samples = rows - rows % batch_size if full_batches else rows
        self.fed = 0  # rows handed out since the last rewind
        self._batches: Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]] = iter(())
        self.rewind()

    def rewind(self) -> None:
        """Start again from the first row (calibrators that read the data twice call this)."""
        from pipelines.datasets import iter_batches

        self._batches = iter_batches(self._data, self.batch_size, shuffle=False)
        self.fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.fed >= self.samples:
            return None
        batch = next(self._batches, None)
        if batch is None:
            return None
        inputs, _ = batch
        take = min(len(inputs[self._names[0]]), self.samples - self.fed)
        self.fed += take
        return {name: np.ascontiguousarray(inputs[name][:take]) for name in self._names}

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)
