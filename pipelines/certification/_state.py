"""What the suite's checks share: the state of one run and the record of one check.

:class:`SuiteState` holds the engine once "loads" loaded it, the golden set and (computed once,
on first use) the engine's and the reference's outputs on it. :class:`CheckRecord` collects one
check's measurements; a check's verdict is FAIL when any judged measurement failed or it noted a
problem with no number to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pipelines.certification._golden as golden_io
from pipelines.backends import cache_root_for
from pipelines.certification._golden import Golden
from pipelines.certification.profiles import HardwareProfile
from pipelines.certification.report import CheckResult, CheckVerdict, Measurement
from pipelines.certification.settings import CertifySettings
from pipelines.core import (
    Artifact,
    Cancelled,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    TensorSpec,
)
from pipelines.engines import Engine, load_engine, padded, run_rows
from pipelines.onnx_io import first_error_line

# Formats a reference runs in here, eagerly and on the CPU.
REFERENCE_FORMATS = (ModelFormat.ONNX.value, ModelFormat.TORCHSCRIPT.value)


class NotRun(Exception):
    """A check that does not apply; its message is the summary."""


def json_value(value: Any) -> float | int | bool | str | None:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value  # type: ignore[no-any-return]


def compare(value: Any, comparison: str, threshold: Any) -> bool:
    if comparison == "==":
        return bool(value == threshold)
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return False
    if comparison == "<":
        return bool(value < threshold)
    return bool(value <= threshold) if comparison == "<=" else bool(value >= threshold)


@dataclass
class CheckRecord:
    """What one check records: measurements, problems without a measurement, details."""

    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def measure(
        self,
        name: str,
        value: Any,
        threshold: Any = None,
        comparison: str = "",
        unit: str = "",
    ) -> bool | None:
        value = value.item() if isinstance(value, np.generic) else value
        passed = compare(value, comparison, threshold) if comparison else None
        self.measurements.append(
            Measurement(
                name=name,
                value=json_value(value),
                threshold=json_value(threshold),
                comparison=comparison,  # type: ignore[arg-type]
                unit=unit,
                passed=passed,
            )
        )
        return passed

    @property
    def failed(self) -> list[str]:
        return [m.name for m in self.measurements if m.passed is False] + self.problems


@dataclass
class SuiteState:
    """Everything the checks share: the engine once loaded, the golden set and its outputs."""

    artifact: Artifact
    ctx: PipelineContext
    settings: CertifySettings
    profile: HardwareProfile
    specs: list[TensorSpec]
    golden: Golden
    dim_sizes: dict[str, list[int]]
    thresholds: dict[str, Any]
    engine: Engine | None = None
    batches: tuple[int, int, int] = (1, 1, 1)  # min, opt, max
    reference: Artifact | None = None
    # Progress inside the running check: (fraction of the check, message).
    progress: Callable[[float, str], None] = lambda fraction, message: None
    _outputs: dict[str, np.ndarray] | None = None
    _reference_outputs: dict[str, np.ndarray] | None = None

    @property
    def dims(self) -> dict[str, int]:
        return golden_io.middle(self.dim_sizes)

    @property
    def loaded(self) -> Engine:
        assert self.engine is not None, "the loads check sets the engine"
        return self.engine

    def golden_outputs(self) -> dict[str, np.ndarray]:
        if self._outputs is None:
            self._outputs = run_rows(self.loaded, self.golden.inputs)
        return self._outputs

    def reference_outputs(self) -> dict[str, np.ndarray]:
        if self._reference_outputs is None:
            assert self.reference is not None
            engine = load_engine(self.reference, "cpu", cache_root_for(self.ctx.workdir))
            feeds = golden_io.inputs_for(self.golden.inputs, self.specs, engine.inputs)
            self._reference_outputs = run_rows(engine, feeds)
        return self._reference_outputs

    def first_batch(self) -> dict[str, np.ndarray]:
        """The golden set's first batch of the opt size, padded to the engine's minimum."""
        return padded(self.loaded, self.golden.head(self.batches[1]))


def check_sha256(artifact: Artifact, described: Mapping[str, Any]) -> None:
    """PipelineError when the file a suite is about to certify is not the one recorded when it
    was made (``artifact.meta["sha256"]``, where there is one)."""
    expected = artifact.meta.get("sha256")
    if expected and expected != described["sha256"]:
        raise PipelineError(
            f"{artifact.key}'s file does not match the sha256 recorded when it was made "
            f"({described['sha256'][:12]} != {str(expected)[:12]}); it is not certified"
        )


def find_reference(ctx: PipelineContext, artifact: Artifact) -> Artifact | None:
    """The nearest ancestor of ``artifact`` that is FP32 and runs here (ONNX or TorchScript)."""
    for ancestor in ctx.lineage(artifact):
        if (
            ancestor.precision == Precision.FP32.value
            and ancestor.format in REFERENCE_FORMATS
            and Path(ancestor.path).is_file()
        ):
            return ancestor
    return None


def run_check(
    check_id: Any,
    state: Any,
    functions: Mapping[Any, Callable[[Any, CheckRecord], str]],
    titles: Mapping[Any, str],
) -> CheckResult:
    """One check of a suite (tensor or text), timed: a PASS or FAIL from what it recorded, a
    NOT_RUN it raised, or a FAIL holding the error of a check that could not complete."""
    started = time.perf_counter()
    c = CheckRecord()
    try:
        summary = functions[check_id](state, c)
        verdict = CheckVerdict.FAIL if c.failed else CheckVerdict.PASS
    except Cancelled:
        raise
    except NotRun as exc:
        summary, verdict = str(exc), CheckVerdict.NOT_RUN
    except Exception as exc:  # a check that cannot complete fails; the suite goes on
        summary, verdict = f"failed with an error: {first_error_line(exc)}", CheckVerdict.FAIL
    return CheckResult(
        id=check_id,
        title=titles[check_id],
        verdict=verdict,
        summary=summary,
        measurements=c.measurements,
        details=c.details,
        seconds=round(time.perf_counter() - started, 4),
    )


def not_run(check_id: Any, summary: str, titles: Mapping[Any, str]) -> CheckResult:
    return CheckResult(
        id=check_id, title=titles[check_id], verdict=CheckVerdict.NOT_RUN, summary=summary
    )
