"""Mapping a dataset's columns (or arrays) onto a model's inputs: one place for the rules.

:func:`plan_inputs` decides which columns feed which input and which is the target; the worker's
loading (:func:`pipelines.datasets.loading.load_split`) follows the plan, and
:func:`check_compatible` applies it to the stored schema alone, so a job that could never run is
refused before it is queued. The rules are in the package's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.datasets.columns import (
    DATASET_FORMATS,
    FEATURES_NAME,
    Column,
    default_target,
    shorten,
)
from pipelines.datasets.splits import split_fractions


@dataclass
class InputPlan:
    spec: TensorSpec
    sources: list[str]
    row_shape: tuple[int, ...]


@dataclass
class Plan:
    target: str | None
    inputs: list[InputPlan]


def _values(n: int) -> str:
    return "1 value" if n == 1 else f"{n} values"


def _fmt_shape(shape: list[int | str] | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def columns_from_schema(ref: DatasetRef) -> list[Column] | None:
    schema = ref.schema or {}
    try:
        if ref.format == "npz" and schema.get("arrays"):
            return [
                Column(str(a["name"]), str(a["dtype"]), tuple(int(d) for d in a["shape"][1:]))
                for a in schema["arrays"]
            ]
        if ref.format in ("csv", "jsonl") and schema.get("columns"):
            return [
                Column(str(c["name"]), str(c["dtype"]), tuple(int(d) for d in c.get("shape", [])))
                for c in schema["columns"]
            ]
    except (KeyError, TypeError, ValueError, IndexError):
        raise PipelineError(f"dataset {ref.id} has a malformed stored schema") from None
    return None


def check_format(ref: DatasetRef) -> None:
    if ref.format not in DATASET_FORMATS:
        raise PipelineError(
            f"dataset {ref.id} has format {ref.format!r}; known formats: "
            + ", ".join(DATASET_FORMATS)
        )


def check_not_test_cases(ref: DatasetRef) -> None:
    """Refuse a tensor test-case dataset (``schema["test_cases"]``) where rows are read.

    Its cases are one suite for the certification's scenario level
    (:mod:`pipelines.certification.test_cases`), not rows to train, calibrate or score on.
    """
    if (ref.schema or {}).get("test_cases"):
        raise PipelineError(
            f"dataset {ref.id} holds test cases for the certification's scenario level, not "
            "rows: training, calibration and evaluation read CSV, numeric JSON Lines or npz"
        )


def resolve_dims(
    spec: TensorSpec, n_values: int, source_shape: tuple[int, ...], has: str
) -> tuple[int, ...]:
    """The non-batch dims of ``spec`` for rows of ``n_values`` values, or a PipelineError.

    ``has`` begins the message: "dataset 3 has 32 feature columns".
    """
    dims = list(spec.shape[1:])
    takes = f"model input {spec.name!r} takes {_fmt_shape(spec.shape)}"
    fixed = math.prod(d for d in dims if isinstance(d, int))
    named = [d for d in dims if isinstance(d, str)]
    if not named:
        if fixed != n_values:
            raise PipelineError(f"{has} but {takes} ({fixed} values per row)")
        return tuple(int(d) for d in dims)
    if len(named) == 1:
        if fixed == 0 or n_values == 0 or n_values % fixed:
            raise PipelineError(f"{has} but {takes} (a multiple of {fixed} values per row)")
        return tuple(int(d) if isinstance(d, int) else n_values // fixed for d in dims)
    if len(source_shape) == len(dims) and all(
        isinstance(d, str) or d == s for d, s in zip(dims, source_shape, strict=True)
    ):
        return source_shape
    raise PipelineError(
        f"{has} (shape {_fmt_shape(source_shape)}) but {takes}: with several named dims "
        f"({', '.join(named)}) each row's value must already have that shape"
    )


def plan_inputs(ref: DatasetRef, columns: list[Column], specs: list[TensorSpec]) -> Plan:
    """Decide which columns feed which input and the target; PipelineError on any mismatch."""
    what = "array" if ref.format == "npz" else "column"
    by_name = {c.name: c for c in columns}
    listing = shorten(", ".join(by_name), 200)
    if not specs:
        raise PipelineError("the model declares no inputs, so no dataset can be mapped onto it")
    for spec in specs:
        if not spec.shape:
            raise PipelineError(
                f"model input {spec.name!r} has no batch dim (shape []); rows cannot be fed to it"
            )

    if ref.target is not None:
        if ref.target not in by_name:
            raise PipelineError(
                f"dataset {ref.id} has no {what} {ref.target!r} (its target); its {what}s: "
                f"{listing}"
            )
        target: str | None = ref.target
    else:
        target = default_target(by_name)
    features = [c for c in columns if c.name != target]
    if not features:
        raise PipelineError(
            f"dataset {ref.id} has no feature {what}s besides the target {target!r}"
        )

    def named(spec: TensorSpec, column: Column) -> InputPlan:
        has = (
            f"dataset {ref.id} {what} {column.name!r} has {_values(column.size)} per row "
            f"(shape {_fmt_shape(column.shape)})"
        )
        return InputPlan(spec, [column.name], resolve_dims(spec, column.size, column.shape, has))

    if len(specs) > 1:
        missing = [s.name for s in specs if s.name not in by_name or s.name == target]
        if missing:
            inputs = ", ".join(repr(s.name) for s in specs)
            raise PipelineError(
                f"the model has inputs {inputs}; dataset {ref.id} has no {what} named "
                f"{', '.join(map(repr, missing))} (its {what}s: {listing}). A model with several "
                f"inputs needs one {what} per input, named after it"
                + (": use JSON Lines or npz" if ref.format == "csv" else "")
            )
        return Plan(target, [named(s, by_name[s.name]) for s in specs])

    spec = specs[0]
    if ref.format != "csv":
        for name in (spec.name, FEATURES_NAME):
            column = by_name.get(name)
            # A JSON Lines number named like the input is one feature among the columns, not
            # the input's whole value: only a list (or an npz array) stands for the input.
            if column is not None and name != target and (ref.format == "npz" or column.shape):
                return Plan(target, [named(spec, column)])
    if ref.format == "npz":
        if len(features) != 1:
            raise PipelineError(
                f"dataset {ref.id} has {len(features)} non-target arrays ({listing}) and none "
                f"is named {spec.name!r} (the model's input) or {FEATURES_NAME!r}; name the "
                "input array after the model input"
            )
        return Plan(target, [named(spec, features[0])])
    n_values = sum(c.size for c in features)
    if all(not c.shape for c in features):
        has = f"dataset {ref.id} has {n_values} feature columns"
    else:
        has = (
            f"dataset {ref.id} has {n_values} feature values per row (columns "
            f"{shorten(', '.join(c.name for c in features), 120)})"
        )
    source_shape = features[0].shape if len(features) == 1 else (n_values,)
    row_shape = resolve_dims(spec, n_values, source_shape, has)
    return Plan(target, [InputPlan(spec, [c.name for c in features], row_shape)])


def check_compatible(ref: DatasetRef, input_specs: list[TensorSpec]) -> None:
    """Whether the dataset can feed a model with ``input_specs``, from ``ref.schema`` alone.

    Reads no file: it is meant for the web process, before a job is queued. Raises the same
    PipelineError as :func:`load_split` would; a ref without a stored schema is not checked.
    """
    check_format(ref)
    check_not_test_cases(ref)
    split_fractions(ref)
    columns = columns_from_schema(ref)
    if columns is None:
        return
    plan_inputs(ref, columns, input_specs)
