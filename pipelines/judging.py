"""A produced model judged against its parent on the same inputs, with or without a dataset.

Quantize and compile make a new version from a parent; before it is registered it must still
answer like the parent. Where the stage names a dataset, its rows are the inputs; where none is
named (the default pipeline), inputs are *generated* from the parent's declared input specs, so
no version is registered unjudged.

The score is the one the task allows without labels:

* classification: **top-1 agreement**, the share of rows (positions, for an output with more
  than two axes) whose argmax over the last axis of the first output matches the parent's,
  a near-tie in the parent's own scores forgiven (:data:`TIE_TOLERANCE`; the strict share is
  recorded beside it);
* anything else: the **minimum per-row cosine** between the two models' outputs (every output,
  flattened and joined per row); the mean is recorded beside it.

Generated inputs: floats are standard normal; integer inputs are ids in [0, 10)
(:func:`pipelines.onnx_io.random_array`), valid for any embedding table of ten rows or more, so
a model whose integer input means something larger is judged on small values only; named dims
other than the batch take the caller's sizes or :data:`DEFAULT_DIM` (a sequence length), and the
judgement records which sizes it used and where they came from.

Models are loaded and run by :mod:`pipelines.engines` only. A search over candidates (the
quantization sensitivity search) scores many against one parent: :func:`reference_outputs` runs
the parent once and :func:`score_candidate` scores each candidate against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.core import Artifact, PipelineError, TensorSpec
from pipelines.engines.base import EngineOptions
from pipelines.onnx_io import random_array

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "DEFAULT_ROWS",
    "TIE_TOLERANCE",
    "Judgement",
    "Reference",
    "Unjudgeable",
    "fixed_dims",
    "generated_inputs",
    "judge",
    "judge_against",
    "reference_outputs",
    "score_candidate",
    "top1_agreement",
]

# 128 rows: at a 99% threshold one flipped row of 128 still passes (99.2%), two do not.
DEFAULT_ROWS = 128
# Rows per call: several batches, so a batch-dependent kernel is exercised more than once.
DEFAULT_BATCH = 32
# The size of a named dim other than the batch (a sequence length) when the caller gives none.
DEFAULT_DIM = 16
_EPS = 1e-12
# Classes the parent scores within this share of a row's score range count as tied (see
# top1_agreement): int8 noise is about 1/127 of a tensor's range.
TIE_TOLERANCE = 0.01
# The parent is the reference: run as written, as every reference in the platform is.
_AS_WRITTEN = EngineOptions(optimization="none")


class Unjudgeable(PipelineError):
    """The parent itself cannot run the inputs, so there is nothing to judge against."""


@dataclass
class Reference:
    """The inputs a candidate is judged on and the parent's outputs for them (run once)."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    output_names: list[str]
    judged_on: str  # "generated", or "dataset 3 (validation)"
    # Sizes of the named dims other than the batch, and where each came from ("default":
    # DEFAULT_DIM, else the setting that gave it).
    dims: dict[str, int] = field(default_factory=dict)
    dims_from: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {name: list(a.shape) for name, a in self.inputs.items()}


@dataclass
class Judgement:
    """A candidate against its parent: ``value`` of ``metric`` is what a threshold is held to.

    ``metric`` is "agreement" (classification) or "cosine" (the minimum per-row cosine);
    ``value`` is a fraction, 1.0 meaning the candidate answers as the parent does.
    """

    metric: str
    value: float
    min_cosine: float
    mean_cosine: float
    agreement: float | None  # near-ties forgiven (see top1_agreement)
    strict_agreement: float | None
    max_abs_diff: float
    rows: int
    shapes: dict[str, list[int]]
    judged_on: str
    dims: dict[str, int] = field(default_factory=dict)
    dims_from: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``top-1 agreement`` or ``min cosine``: the metric as the dashboard says it."""
        return "top-1 agreement" if self.metric == "agreement" else "min cosine"

    def passes(self, threshold: float) -> bool:
        return bool(np.isfinite(self.value)) and self.value >= threshold

    def shown(self, value: float, other: float | None = None) -> str:
        """A value of this metric as the dashboard shows it: ``98.4%`` agreement, ``0.9871``
        cosine (more digits when they would show ``other`` the same)."""
        if self.metric == "agreement":
            return pct(value, other)
        for digits in (4, 5, 6):
            text = f"{value:.{digits}f}"
            if other is None or text != f"{other:.{digits}f}":
                return text
        return f"{value:.6f}"

    def describe(self) -> str:
        """``top-1 agreement 98.4% on 128 generated rows`` (a cosine with its mean)."""
        where = "generated rows" if self.judged_on == "generated" else f"rows of {self.judged_on}"
        text = f"{self.label} {self.shown(self.value)} on {self.rows} {where}"
        if self.metric == "cosine":
            text += f" (mean {self.mean_cosine:.4f})"
        elif self.strict_agreement is not None and self.strict_agreement != self.value:
            text += f" ({pct(self.strict_agreement)} strict, near-ties forgiven)"
        return text

    def verdict(self, threshold: float) -> str:
        """``top-1 agreement 96.3% < 99.0%``: why a candidate is not kept."""
        return (
            f"{self.label} {self.shown(self.value, threshold)} < "
            f"{self.shown(threshold, self.value)}"
        )

    def meta(self) -> dict[str, Any]:
        """JSON-safe record for an artifact's meta: what it was judged on, and the result."""
        return {
            "judged_on": self.judged_on,
            "metric": self.metric,
            "value": self.value,
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "agreement": self.agreement,
            "strict_agreement": self.strict_agreement,
            "tie_tolerance": TIE_TOLERANCE if self.agreement is not None else None,
            "max_abs_diff": self.max_abs_diff,
            "rows": self.rows,
            "shapes": self.shapes,
            "dims": self.dims,
            "dims_from": self.dims_from,
        }

    def metrics(self) -> dict[str, float]:
        """Numbers for the artifact's and stage's metrics (``judged_`` keys, finite only)."""
        values = {
            f"judged_{self.metric}": self.value,
            "judged_min_cosine": self.min_cosine,
            "judged_mean_cosine": self.mean_cosine,
            "judged_rows": float(self.rows),
        }
        if self.agreement is not None and self.strict_agreement is not None:
            values["judged_agreement"] = self.agreement
            values["judged_strict_agreement"] = self.strict_agreement
        return {k: float(v) for k, v in values.items() if np.isfinite(v)}


def pct(fraction: float, other: float | None = None) -> str:
    """``97.4%``; more digits when one digit would show it equal to ``other``."""
    for digits in (1, 2, 3, 4):
        text = f"{fraction * 100:.{digits}f}"
        if other is None or text != f"{other * 100:.{digits}f}":
            return text + "%"
    return f"{fraction * 100:.4f}%"


def generated_inputs(
    specs: Sequence[TensorSpec],
    rows: int = DEFAULT_ROWS,
    dim_sizes: Mapping[str, int] | None = None,
    default_dim: int = DEFAULT_DIM,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``rows`` generated rows for every input of ``specs``, and the sizes given named dims.

    The first dim of every input is the row (a fixed first dim too: the engine's batch range
    takes the rows in calls of that size); a named dim used as the batch elsewhere is the batch.
    """
    if not specs:
        raise Unjudgeable("the model declares no inputs to generate")
    sizes = dict(dim_sizes or {})
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    used: dict[str, int] = {}
    for spec in specs:
        if not spec.shape:
            raise Unjudgeable(f"input {spec.name!r} is a scalar: it has no rows to generate")
        shape = [rows]
        for dim in spec.shape[1:]:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in batch_names:
                shape.append(rows)
            else:
                used[dim] = int(sizes.get(dim, default_dim))
                shape.append(used[dim])
        arrays[spec.name] = random_array(shape, spec.dtype, rng)
    return arrays, used


def _run(
    artifact: Artifact,
    inputs: Mapping[str, np.ndarray],
    device: str,
    batch_size: int,
    options: EngineOptions | None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every output of ``artifact`` on ``inputs`` (loaded fresh: its file may be a staged one)."""
    from pipelines.engines import load_engine, run_rows

    if any(t.dtype == "bfloat16" for t in artifact.inputs):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for the cast)
    engine = load_engine(artifact, device, options=options)
    outputs = run_rows(engine, inputs, batch_size, cast=True)
    names = [n for n in engine.output_names if n in outputs] or list(outputs)
    return outputs, names


def fixed_dims(parent: Sequence[TensorSpec], candidate: Sequence[TensorSpec]) -> dict[str, int]:
    """Named dims of ``parent`` that ``candidate`` fixed (a compiled model's static dims): the
    generated inputs must take those sizes or the candidate cannot run them."""
    theirs = {s.name: s.shape for s in candidate}
    fixed: dict[str, int] = {}
    for spec in parent:
        other = theirs.get(spec.name)
        if other is None or len(other) != len(spec.shape):
            continue
        for mine, their in zip(spec.shape[1:], other[1:], strict=True):
            if isinstance(mine, str) and isinstance(their, int):
                fixed[mine] = their
    return fixed


def reference_outputs(
    parent: Artifact,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    judged_on: str = "generated",
    rows: int = DEFAULT_ROWS,
    dim_sizes: Mapping[str, int] | None = None,
    dim_sources: Mapping[str, str] | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    device: str = "cpu",
) -> Reference:
    """The parent run once, as written (no graph optimisation), on the first ``rows`` of
    ``inputs`` (dataset rows, ``judged_on`` naming them) or on generated ones.

    ``dim_sizes`` give named dims their sizes, ``dim_sources`` say where each came from (a
    setting's name; unlisted: "settings"). Unjudgeable when the parent cannot run the inputs.
    """
    dims: dict[str, int] = {}
    sources: dict[str, str] = {}
    if inputs is None:
        inputs, dims = generated_inputs(parent.inputs, rows, dim_sizes, seed=seed)
        judged_on = "generated"
        given, named = dict(dim_sizes or {}), dict(dim_sources or {})
        sources = {d: named.get(d, "settings") if d in given else "default" for d in dims}
    else:
        inputs = {k: np.asarray(v)[:rows] for k, v in inputs.items()}
    try:
        outputs, names = _run(parent, inputs, device, batch_size, _AS_WRITTEN)
    except PipelineError as exc:
        raise Unjudgeable(f"the parent cannot run the judging inputs: {exc}") from exc
    return Reference(dict(inputs), outputs, names, judged_on, dims, sources)


def _flat_rows(outputs: Sequence[np.ndarray], rows: int) -> np.ndarray:
    parts = [np.asarray(o, np.float64).reshape(rows, -1) for o in outputs]
    return np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0))


def _cosines(parent: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine; two all-zero rows agree (1.0), a non-finite candidate row scores 0."""
    finite = np.all(np.isfinite(candidate), axis=1)
    candidate = np.where(np.isfinite(candidate), candidate, 0.0)
    dot = np.sum(parent * candidate, axis=1)
    norm_p = np.linalg.norm(parent, axis=1)
    norm_c = np.linalg.norm(candidate, axis=1)
    cos = dot / np.maximum(norm_p * norm_c, _EPS)
    both_zero = (norm_p < _EPS) & (norm_c < _EPS)
    return np.where(finite, np.where(both_zero, 1.0, cos), 0.0)


def _class_scores(outputs: np.ndarray) -> np.ndarray:
    """[rows, classes] scores over the last axis; a single score (binary) becomes two columns,
    a probability split at 0.5, a logit at 0 (as :mod:`pipelines.metrics` reads them)."""
    last = outputs.shape[-1] if outputs.ndim > 1 else 1
    scores = np.asarray(outputs, np.float64).reshape(-1, last)
    if last == 1:
        single = scores[:, 0]
        threshold = 0.5 if np.all((single >= 0) & (single <= 1)) else 0.0
        scores = np.stack([threshold - single, single - threshold], axis=1)
    return scores


def top1_agreement(parent: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement with near-ties forgiven, strict top-1 agreement) over the last axis.

    A row whose candidate class the parent scores within :data:`TIE_TOLERANCE` of that row's
    score range below its own top class is a tie the parent itself barely breaks: it counts as
    agreeing. Random inputs make such rows far more often than real data does (an untrained or
    out-of-distribution input has near-equal logits), and int8 noise flips them at random.
    """
    ref = _class_scores(parent)
    got = np.nan_to_num(_class_scores(candidate), nan=-np.inf)
    if len(ref) == 0:
        return 1.0, 1.0
    picked = got.argmax(axis=1)
    strict = float(np.mean(picked == ref.argmax(axis=1)))
    top = ref.max(axis=1)
    tolerance = TIE_TOLERANCE * (top - ref.min(axis=1))
    tied = ref[np.arange(len(ref)), picked] >= top - tolerance
    return float(np.mean(tied)), strict


def judge_against(
    reference: Reference,
    candidate: Artifact,
    task: str,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: str = "cpu",
    options: EngineOptions | None = None,
) -> Judgement:
    """``candidate`` run on the reference's inputs and scored against the parent's outputs.

    ``options``: how the candidate is opened (default: as it is served). A candidate that does
    not run, or whose outputs differ in number or shape, is a PipelineError: that is a broken
    model, not a low score.
    """
    got, names = _run(candidate, reference.inputs, device, batch_size, options)
    ref_list = [reference.outputs[n] for n in reference.output_names]
    by_name = all(n in got for n in reference.output_names)
    got_list = [got[n] for n in reference.output_names] if by_name else [got[n] for n in names]
    if len(got_list) != len(ref_list):
        raise PipelineError(
            f"{candidate.key!r} returns {len(got_list)} outputs but its parent {len(ref_list)}"
        )
    for name, ref, out in zip(reference.output_names, ref_list, got_list, strict=True):
        if ref.shape != out.shape:
            raise PipelineError(
                f"output {name!r} of {candidate.key!r} has shape {list(out.shape)} but its "
                f"parent's has {list(ref.shape)}"
            )
    rows = reference.rows
    cos = _cosines(_flat_rows(ref_list, rows), _flat_rows(got_list, rows))
    diffs = [
        float(np.nanmax(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(ref_list, got_list, strict=True)
        if np.asarray(a).size
    ]
    agreement, strict = (None, None)
    if task == "classification":
        agreement, strict = top1_agreement(ref_list[0], got_list[0])
    min_cos = float(cos.min()) if len(cos) else 1.0
    return Judgement(
        metric="agreement" if agreement is not None else "cosine",
        value=agreement if agreement is not None else min_cos,
        min_cosine=min_cos,
        mean_cosine=float(cos.mean()) if len(cos) else 1.0,
        agreement=agreement,
        strict_agreement=strict,
        max_abs_diff=max(diffs, default=0.0),
        rows=rows,
        shapes=reference.shapes,
        judged_on=reference.judged_on,
        dims=dict(reference.dims),
        dims_from=dict(reference.dims_from),
    )


def judge(
    parent: Artifact,
    candidate: Artifact,
    task: str,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    judged_on: str = "generated",
    rows: int = DEFAULT_ROWS,
    dim_sizes: Mapping[str, int] | None = None,
    dim_sources: Mapping[str, str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    parent_device: str = "cpu",
    candidate_device: str = "cpu",
    candidate_options: EngineOptions | None = None,
) -> Judgement:
    """``candidate`` judged against ``parent`` on dataset rows (``inputs``) or generated ones.

    Generated inputs give a named dim the candidate fixed (a compiled model's static dim) its
    fixed size, else ``dim_sizes``, else :data:`DEFAULT_DIM`.
    """
    sizes, sources = dict(dim_sizes or {}), dict(dim_sources or {})
    for name, size in fixed_dims(parent.inputs, candidate.inputs).items():
        sizes[name], sources[name] = size, "the candidate's fixed shape"
    reference = reference_outputs(
        parent,
        inputs=inputs,
        judged_on=judged_on,
        rows=rows,
        dim_sizes=sizes,
        dim_sources=sources,
        batch_size=batch_size,
        device=parent_device,
    )
    return judge_against(
        reference,
        candidate,
        task,
        batch_size=batch_size,
        device=candidate_device,
        options=candidate_options,
    )


def score_candidate(
    parent: Artifact | Reference,
    candidate: Artifact,
    task: str,
    **kwargs: Any,
) -> float:
    """The judgement's value (agreement or min cosine) of ``candidate``: a score to search on.

    Pass a :class:`Reference` (from :func:`reference_outputs`) to run the parent only once
    across many candidates; ``kwargs`` go to :func:`judge` / :func:`judge_against`.
    """
    if isinstance(parent, Reference):
        return judge_against(parent, candidate, task, **kwargs).value
    return judge(parent, candidate, task, **kwargs).value
