"""The suite's inputs: the golden set, the sizes of dynamic dims, and the edge inputs.

The golden set is the rows of a team's dataset (``golden_dataset_id``, its ``golden_split``, at
most ``golden_rows``) or, without one, seeded random inputs of the declared shapes
(:data:`GENERATED_ROWS` rows, seed :data:`GENERATED_SEED`: standard-normal floats, ints 0..9).
Every check that needs "the golden outputs" runs these same rows, through
:func:`pipelines.engines.run_rows` (the one way rows are batched and padded for an engine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.certification.settings import CertifySettings
from pipelines.core import Artifact, PipelineContext, PipelineError, TensorSpec
from pipelines.onnx_io import concrete_shapes, numpy_dtype, random_inputs

GENERATED_ROWS = 64
GENERATED_SEED = 0
# Float inputs of a generated golden set have no declared range: the edge inputs of the finite
# check use [-1, 1], the range most models' inputs are normalised to (set input_range otherwise).
GENERATED_FLOAT_RANGE = (-1.0, 1.0)


@dataclass
class Golden:
    """The golden rows, their labels or expected outputs if the dataset has a target, and where
    they came from (``SuiteReport.golden``)."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray | None
    rows: int
    record: dict[str, Any]

    @property
    def generated(self) -> bool:
        return self.record.get("source") == "generated"

    def head(self, rows: int) -> dict[str, np.ndarray]:
        return {name: array[:rows] for name, array in self.inputs.items()}


def batch_names(specs: Sequence[TensorSpec]) -> set[str]:
    """Names of the inputs' dynamic first dims (the batch)."""
    return {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}


def has_batch(specs: Sequence[TensorSpec]) -> bool:
    """Whether every input is batch-first (rank 1 or more); the suite assumes so."""
    return bool(specs) and all(s.shape for s in specs)


def batch_first(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """``specs`` with every first dim named "batch", to make any number of rows of them."""
    return [TensorSpec(s.name, ["batch", *s.shape[1:]], s.dtype) for s in specs]


def tensorrt_profiles(artifact: Artifact) -> dict[str, list[list[int]]]:
    """A TensorRT engine's optimisation profile: input -> [min, opt, max] shapes ({} if none)."""
    profiles = artifact.meta.get("profiles")
    return profiles if isinstance(profiles, dict) else {}


def dynamic_dims(
    specs: Sequence[TensorSpec],
    requested: Mapping[str, Sequence[int]],
    profiles: Mapping[str, list[list[int]]],
) -> dict[str, list[int]]:
    """Sizes to cover for each named non-batch dim: the setting's, else the TensorRT profile's
    min/opt/max, else [1] (nothing says what else the model takes)."""
    batch = batch_names(specs)
    sizes: dict[str, list[int]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if axis == 0 or not isinstance(dim, str) or dim in batch or dim in sizes:
                continue
            if dim in requested and requested[dim]:
                sizes[dim] = sorted({int(v) for v in requested[dim]})
            elif spec.name in profiles:
                sizes[dim] = sorted({int(shape[axis]) for shape in profiles[spec.name]})
            else:
                sizes[dim] = [1]
    return sizes


def middle(sizes: Mapping[str, list[int]]) -> dict[str, int]:
    """The middle size of each dim (the opt of a min/opt/max triple)."""
    return {name: values[len(values) // 2] for name, values in sizes.items()}


def load_golden(
    ctx: PipelineContext,
    settings: CertifySettings,
    specs: list[TensorSpec],
    dims: Mapping[str, int],
) -> Golden:
    """The golden set for ``specs``; a PipelineError if the dataset does not fit the model."""
    if settings.golden_dataset_id is None:
        rows = min(GENERATED_ROWS, settings.golden_rows)
        inputs = random_inputs(batch_first(specs), rows, dims, default_dim=1, seed=GENERATED_SEED)
        record = {"source": "generated", "seed": GENERATED_SEED, "rows": rows}
        return Golden(inputs=inputs, targets=None, rows=rows, record=record)

    from pipelines.datasets import load_split

    ref = ctx.dataset(settings.golden_dataset_id, "golden set")
    data = load_split(ref, settings.golden_split, batch_first(specs))
    if data.rows == 0:
        raise PipelineError(
            f"the {settings.golden_split} split of golden dataset {ref.id} has no rows; pick "
            "another golden_split"
        )
    rows = min(data.rows, settings.golden_rows)
    inputs = {name: np.ascontiguousarray(a[:rows]) for name, a in data.inputs.items()}
    targets = None if data.targets is None else data.targets[:rows]
    record = {
        "source": "dataset",
        "dataset_id": settings.golden_dataset_id,
        "split": settings.golden_split,
        "rows": rows,
    }
    return Golden(inputs=inputs, targets=targets, rows=rows, record=record)


def inputs_for(
    arrays: Mapping[str, np.ndarray], given: Sequence[TensorSpec], wanted: Sequence[TensorSpec]
) -> dict[str, np.ndarray]:
    """``arrays`` (keyed by ``given``'s names) keyed for a model taking ``wanted``.

    By name when every wanted name is there, else by position when the counts agree.
    """
    if all(spec.name in arrays for spec in wanted):
        return {spec.name: arrays[spec.name] for spec in wanted}
    if len(given) == len(wanted):
        return {w.name: arrays[g.name] for g, w in zip(given, wanted, strict=True)}
    raise PipelineError(
        f"the reference takes inputs {[s.name for s in wanted]} and the engine "
        f"{[s.name for s in given]}: they cannot be matched by name or position"
    )


def edge_ranges(
    golden: Golden, specs: Sequence[TensorSpec], input_range: tuple[float, float] | None
) -> dict[str, tuple[float, float]]:
    """[low, high] of each input for the edge inputs of the finite check.

    Floats: ``input_range`` if set, else the golden set's min and max (a generated set:
    GENERATED_FLOAT_RANGE). Ints: the golden set's min and max. Bools: 0 and 1.
    """
    ranges: dict[str, tuple[float, float]] = {}
    for spec in specs:
        array = golden.inputs[spec.name]
        kind = numpy_dtype(spec.dtype).kind
        if kind == "b":
            ranges[spec.name] = (0.0, 1.0)
        elif kind == "f" and input_range is not None:
            ranges[spec.name] = (float(input_range[0]), float(input_range[1]))
        elif kind == "f" and golden.generated:
            ranges[spec.name] = GENERATED_FLOAT_RANGE
        elif array.size:
            ranges[spec.name] = (float(array.min()), float(array.max()))
        else:
            ranges[spec.name] = (0.0, 0.0)
    return ranges


def edge_inputs(
    specs: Sequence[TensorSpec],
    batch: int,
    dims: Mapping[str, int],
    ranges: Mapping[str, tuple[float, float]],
    case: str,
) -> dict[str, np.ndarray]:
    """Inputs filled with one value each: "low", "high", or "zeros" (ints and bools: their low)."""
    shapes = concrete_shapes(specs, batch, dims, default_dim=1)
    arrays: dict[str, np.ndarray] = {}
    for spec, shape in zip(specs, shapes, strict=True):
        dtype = numpy_dtype(spec.dtype)
        low, high = ranges[spec.name]
        if case == "high":
            value = high
        elif case == "zeros" and dtype.kind == "f":
            value = 0.0
        else:
            value = low
        arrays[spec.name] = np.full(shape, value, dtype=dtype)
    return arrays
