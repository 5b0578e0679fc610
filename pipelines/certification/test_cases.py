"""Test cases for tensor models: the certification's scenario level ("passes the industry's specific
test cases"), as a library.

A case (:class:`TestCase`, read and checked by :mod:`pipelines.datasets.tensor_cases`) feeds one
sample and says what the output must be. :func:`feeds_for` makes the sample a batch of one that
fits the model's inputs, :func:`judge` decides one case from the model's outputs and
:func:`judge_all` runs and judges every case, counting the ``must`` cases and each tag.
:func:`check_fits` refuses a file whose cases cannot feed a model before a job is queued.

Checks, on the output's first row (the batch of one) against ``expected``, both flattened:

* ``equals``: every value equal;
* ``argmax``: the output's argmax is the class (``expected`` an index, or a vector whose argmax
  it is);
* ``within``: ``|out - expected| <= atol + rtol * |expected|`` everywhere (NaN never passes);
* ``top_k``: the class is among the ``k`` largest values;
* ``cosine``: the cosine similarity is at least ``min_cosine``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.core import Cancelled, DatasetRef, PipelineError, TensorSpec
from pipelines.datasets.mapping import resolve_dims
from pipelines.datasets.tensor_cases import CHECKS, TestCase, parse_test_cases
from pipelines.onnx_io import numpy_dtype

__all__ = [
    "CHECKS",
    "CaseReport",
    "CaseResult",
    "TestCase",
    "check_cases_fit",
    "check_dataset_fits",
    "check_fits",
    "feeds_for",
    "judge",
    "judge_all",
    "parse_test_cases",
]

MAX_SHOWN = 16  # output values a result keeps
MUST = "must"  # the tag of a case that must pass

Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class CaseResult:
    """One case's verdict; ``got`` is a JSON-safe summary of the output (non-finite -> None)."""

    name: str
    passed: bool
    check: str
    tags: tuple[str, ...]
    got: dict[str, Any]
    reason: str


@dataclass
class CaseReport:
    """Every case's result, the pass rate, the ``must`` cases and ``by_tag``: (passed, total)."""

    results: list[CaseResult]
    pass_rate: float
    must_total: int
    must_passed: int
    by_tag: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (tuples become lists)."""
        data = asdict(self)
        data["by_tag"] = {tag: list(counts) for tag, counts in self.by_tag.items()}
        return data


# --- feeding a case to a model ------------------------------------------------------------------


def feeds_for(case: TestCase, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The case's inputs as a batch of one, each reshaped to its input's non-batch dims and cast
    to its dtype (the mapping rules of :func:`pipelines.datasets.mapping.resolve_dims`).

    A case that does not fit the model (an input missing or extra, a count of values the shape
    cannot take, fractions for an integer input) raises PipelineError naming the case.
    """
    where = f"test case {case.name!r}"
    if not specs:
        raise PipelineError(f"{where}: the model declares no inputs")
    if isinstance(case.inputs, dict):
        given = case.inputs
        wanted = {s.name for s in specs}
        if set(given) != wanted:
            raise PipelineError(
                f"{where} feeds inputs {sorted(given)} but the model takes {sorted(wanted)}"
            )
    elif len(specs) == 1:
        given = {specs[0].name: case.inputs}
    else:
        raise PipelineError(
            f"{where} has one 'input' but the model takes {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}): name each under 'inputs'"
        )
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        values = given[spec.name]
        if not spec.shape:
            raise PipelineError(f"{where}: model input {spec.name!r} has no batch dim")
        has = f"{where} gives input {spec.name!r} {values.size} value(s)"
        dims = resolve_dims(spec, values.size, values.shape, has)
        dtype = numpy_dtype(spec.dtype)
        if (
            dtype.kind in "iub"
            and values.dtype.kind == "f"
            and not np.all(values == np.round(values))
        ):
            raise PipelineError(
                f"{where}: model input {spec.name!r} takes {dtype} but the case gives "
                "fractional values"
            )
        batch = values.reshape(1, *dims).astype(dtype, copy=False)
        feeds[spec.name] = np.ascontiguousarray(batch)
    return feeds


def check_fits(cases: list[TestCase], specs: list[TensorSpec]) -> None:
    """Whether every case can feed a model with input ``specs``; PipelineError naming the first
    that cannot (meant for refusing a dataset before a job is queued)."""
    if not cases:
        raise PipelineError("the test-case dataset holds no cases")
    for case in cases:
        feeds_for(case, specs)


# --- judging ------------------------------------------------------------------------------------


def _safe(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _shown(out: np.ndarray) -> list[float | None]:
    return [_safe(float(v)) for v in out[:MAX_SHOWN]]


def _error_text(worst: float | None) -> str:
    return "NaN or infinite" if worst is None else f"{worst:.6g}"


def _class_verdict(case: TestCase, out: np.ndarray) -> tuple[bool, dict[str, Any], str]:
    """argmax and top_k: the class is the index, or the argmax of an ``expected`` vector."""
    exp = case.expected
    want = int(exp) if exp.ndim == 0 else int(np.argmax(exp))
    if want >= out.size:
        return False, {}, f"class {want} is out of range: the output has {out.size} values"
    if np.isnan(out).any():
        return False, {}, "the output holds NaN"
    if case.check == "argmax":
        got = int(np.argmax(out))
        return got == want, {"argmax": got}, f"argmax {got}, expected class {want}"
    k = int(case.params["k"])
    top = [int(i) for i in np.argsort(-out, kind="stable")[:k]]
    verb = "is" if want in top else "is not"
    return want in top, {"top_k": top}, f"class {want} {verb} in the top {k} {top}"


def _verdict(case: TestCase, out: np.ndarray) -> tuple[bool, dict[str, Any], str]:
    """(passed, summary, reason) of ``case`` for the flattened output row ``out``."""
    if case.check in ("argmax", "top_k"):
        return _class_verdict(case, out)
    expected = np.ravel(case.expected).astype(np.float64)
    if out.size != expected.size:
        return False, {}, f"the output has {out.size} values, expected {expected.size}"
    error = np.abs(out - expected)
    worst = None if np.isnan(error).any() else _safe(float(np.max(error)))
    if case.check == "equals":
        passed = bool(np.array_equal(out, expected))
        return passed, {"max_error": worst}, f"max |out - expected| = {_error_text(worst)}"
    if case.check == "within":
        atol, rtol = case.params["atol"], case.params["rtol"]
        passed = bool(np.all(error <= atol + rtol * np.abs(expected)))
        reason = f"max |out - expected| = {_error_text(worst)} (atol {atol}, rtol {rtol})"
        return passed, {"max_error": worst}, reason
    norm = float(np.linalg.norm(out)) * float(np.linalg.norm(expected))
    if not norm or not math.isfinite(norm):
        return False, {"cosine": None}, "the cosine is undefined (an all-zero or non-finite output)"
    cosine = float(np.dot(out, expected)) / norm
    least = case.params["min_cosine"]
    return cosine >= least, {"cosine": cosine}, f"cosine {cosine:.6f}, at least {least} needed"


def judge(case: TestCase, outputs: Mapping[str, np.ndarray]) -> CaseResult:
    """Judge ``case`` on the model's ``outputs`` for its batch of one (name -> array, batch first).

    The case's ``output`` names the output (default: the first); its first row is what is
    checked. A missing or non-numeric output is a failed case, with the reason.
    """

    def result(passed: bool, got: dict[str, Any], reason: str) -> CaseResult:
        return CaseResult(case.name, bool(passed), case.check, case.tags, got, reason)

    if not outputs:
        return result(False, {}, "the model returned no outputs")
    name = case.output or next(iter(outputs))
    if name not in outputs:
        return result(False, {}, f"the model has no output {name!r} (it has {sorted(outputs)})")
    try:
        array = np.asarray(outputs[name], dtype=np.float64)
    except (TypeError, ValueError):
        return result(False, {}, f"output {name!r} is not numeric")
    if array.ndim and not len(array):
        return result(False, {}, f"output {name!r} has no rows")
    row = array[0] if array.ndim else array
    out = np.ravel(row)
    passed, got, reason = _verdict(case, out)
    got = {"output": name, "shape": list(np.shape(row)), **got, "values": _shown(out)}
    return result(passed, got, reason)


def judge_all(cases: list[TestCase], run: Run, specs: list[TensorSpec]) -> CaseReport:
    """Run and judge every case; a case that cannot be fed or whose run raises fails, with the
    error as its reason, and the others still run (a Cancelled job stops at once).

    ``run`` takes the feeds of one case (a batch of one) and returns every output; for an engine
    of a fixed batch, pass one that pads, such as ``lambda f: run_rows(engine, f)``.
    """
    results: list[CaseResult] = []
    for case in cases:
        try:
            outputs = run(feeds_for(case, specs))
        except Cancelled:
            raise
        except Exception as exc:  # any failure of one case is that case's verdict
            message = str(exc) or type(exc).__name__
            results.append(CaseResult(case.name, False, case.check, case.tags, {}, message))
            continue
        results.append(judge(case, outputs))
    by_tag: dict[str, tuple[int, int]] = {}
    for r in results:
        for tag in r.tags:
            passed, total = by_tag.get(tag, (0, 0))
            by_tag[tag] = (passed + r.passed, total + 1)
    must = by_tag.get(MUST, (0, 0))
    passed = sum(r.passed for r in results)
    return CaseReport(
        results=results,
        pass_rate=passed / len(results) if results else 0.0,
        must_total=must[1],
        must_passed=must[0],
        by_tag=by_tag,
    )


def check_dataset_fits(ref: DatasetRef, specs: list[TensorSpec]) -> None:
    """From the stored schema alone: ``ref`` is a test-case dataset whose cases name inputs the
    model has (PipelineError with the reason), so a certification that could not judge them is
    refused before it is queued. The worker checks every case's shape when it runs them."""
    cases = (ref.schema or {}).get("test_cases")
    if not cases:
        raise PipelineError(
            f"dataset {ref.id} is not a test-case dataset: upload JSON Lines of cases with "
            '"name", "inputs" (or "input"), "expected" and "check"'
        )
    names = [spec.name for spec in specs]
    given = [name for name in cases.get("inputs", []) if name != "input"]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise PipelineError(
            f"test cases of dataset {ref.id} feed input(s) {', '.join(unknown)}, which the model "
            f"does not have (it has {', '.join(names)})"
        )
    if "input" in cases.get("inputs", []) and len(names) != 1:
        raise PipelineError(
            f'test cases of dataset {ref.id} give one "input", but the model has '
            f'{len(names)} inputs ({", ".join(names)}): name each under "inputs"'
        )


def check_cases_fit(ref: DatasetRef, model_format: str, specs: list[TensorSpec]) -> None:
    """A test-case dataset the model can be judged on, from the stored schema (PipelineError
    with the reason): a language model's are text test cases (prompt, expected, check), any
    other model's tensor cases that name its inputs (:func:`check_dataset_fits`)."""
    from pipelines.datasets.text_corpus import text_kind
    from pipelines.llm.kinds import is_text_format

    if not is_text_format(model_format):
        check_dataset_fits(ref, specs)
        return
    kind = text_kind(ref)
    if kind != "test_cases":
        what = f"a {kind} text dataset" if kind else "not a text dataset"
        raise PipelineError(
            f"dataset {ref.id} is {what}; a language model's test cases are JSON Lines of "
            '{"prompt", "expected", "check": "exact"|"contains"|"regex"|"json"} (tags such as '
            "must optional)"
        )
