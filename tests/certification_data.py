"""Suite reports as a worker would hand them back, built from the pipelines' report models.

Hand-made but realistic: the measurements, thresholds and parity histogram have the shapes the
certify stage writes, so the services and the renderers are tested on what they will receive.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipelines.certification.profiles import detect_profiles
from pipelines.certification.report import (
    CHECKS,
    LEVEL_CHECKS,
    CheckId,
    CheckResult,
    CheckVerdict,
    Level,
    Measurement,
    SuiteReport,
    criteria_of,
)
from pipelines.stages import REGISTRY
from pipelines.stages.certify import Certify
from r1platform.core.storage import spool_local_file
from r1platform.datasets.services import upload_dataset
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import report_worker

EDGES = [0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
COUNTS = [412, 96, 311, 1804, 3920, 1210, 181, 58, 0]
THRESHOLDS = {
    "tolerances": {"*": {"atol": 0.01, "rtol": 0.01, "statistic": "elementwise"}},
    "min_retention": 0.99,
    "min_batch": 1,
    "opt_batch": 8,
    "max_batch": 32,
    "determinism_atol": 0.0,
    "serving_batch": 8,
    "p99_budget_ms": 500.0,
    "min_throughput": 1.0,
    "max_memory_fraction": 0.85,
}


def _m(name, value, threshold=None, comparison="", unit="", passed=None) -> Measurement:
    return Measurement(
        name=name,
        value=value,
        threshold=threshold,
        comparison=comparison,
        unit=unit,
        passed=passed,
    )


def _check(check: CheckId, verdict: CheckVerdict, summary: str, measurements, **details):
    return CheckResult(
        id=check,
        title=CHECKS[check],
        verdict=verdict,
        summary=summary,
        measurements=measurements,
        details=details,
        seconds=0.4,
    )


def _checks(failing: CheckId | None) -> dict[CheckId, CheckResult]:
    parity_error = 0.31 if failing == CheckId.PARITY else 0.0021
    parity_ok = failing != CheckId.PARITY
    p99 = 812.0 if failing == CheckId.PERFORMANCE else 1.27
    perf_ok = failing != CheckId.PERFORMANCE
    PASS, FAIL, NOT_RUN = CheckVerdict.PASS, CheckVerdict.FAIL, CheckVerdict.NOT_RUN
    return {
        CheckId.LOADS: _check(
            CheckId.LOADS,
            PASS,
            "Loaded in 0.12 s and ran a batch of 8 on onnxruntime CPUExecutionProvider.",
            [_m("load_seconds", 0.12, unit="s"), _m("ran", True, True, "==", passed=True)],
        ),
        CheckId.PARITY: _check(
            CheckId.PARITY,
            PASS if parity_ok else FAIL,
            "Within tolerance of the FP32 reference on every output."
            if parity_ok
            else "logits differs from the FP32 reference by up to 0.31 (atol 0.01).",
            [
                _m("logits.max_abs_error", parity_error, 0.01, "<=", passed=parity_ok),
                _m(
                    "logits.p99_normalised_error",
                    0.18 if parity_ok else 9.4,
                    1.0,
                    "<=",
                    passed=parity_ok,
                ),
                _m("accuracy_retention", 0.9967, 0.99, ">=", passed=True),
            ],
            histograms={"logits": {"edges": EDGES, "counts": COUNTS}},
        ),
        CheckId.SHAPES: _check(
            CheckId.SHAPES,
            PASS,
            "Ran batch sizes 1, 8 and 32 with outputs of the declared shapes.",
            [_m("batch_sizes_run", 3, 3, ">=", passed=True)],
        ),
        CheckId.FINITE: _check(
            CheckId.FINITE,
            PASS,
            "No NaN or Inf on golden inputs and at the edges of the input range.",
            [_m("nan_count", 0, 0, "<=", passed=True), _m("inf_count", 0, 0, "<=", passed=True)],
        ),
        CheckId.DETERMINISM: _check(
            CheckId.DETERMINISM,
            PASS,
            "Two runs of the same inputs were bit-identical.",
            [_m("max_abs_difference", 0.0, 0.0, "<=", passed=True)],
        ),
        CheckId.API_SUCCESS: _check(
            CheckId.API_SUCCESS,
            PASS,
            "2000/2000 requests succeeded (100.00%, needs 99.9%) at concurrency 8 over 5 shapes.",
            [
                _m("success_rate", 1.0, 0.999, ">=", passed=True),
                _m("requests", 2000, 2000, ">=", passed=True),
            ],
        ),
        CheckId.QPS: _check(
            CheckId.QPS,
            PASS,
            "812 requests/s per CPU socket (needs 500) over 30.0 s, 32 clients.",
            [_m("qps_per_card", 812.4, 500.0, ">=", "req/s", True)],
        ),
        CheckId.PERFORMANCE: _check(
            CheckId.PERFORMANCE,
            PASS if perf_ok else FAIL,
            f"p99 {p99} ms at batch 8 (budget 500 ms).",
            [
                _m("p99_ms", p99, 500.0, "<=", "ms", perf_ok),
                _m("throughput", 6240.5, 1.0, ">=", "samples/s", True),
                _m("peak_memory_fraction", 0.021, 0.85, "<=", passed=True),
            ],
        ),
        CheckId.SERVING: _check(
            CheckId.SERVING,
            NOT_RUN,
            "The serving runtime does not exist yet; the contract is checked once it lands.",
            [],
        ),
        CheckId.SCENARIO: _check(
            CheckId.SCENARIO,
            PASS,
            "accuracy 0.978 on the golden set (threshold 0.968).",
            [_m("accuracy", 0.978, 0.968, ">=", passed=True)],
        ),
    }


def suite_report(
    *,
    profile: dict,
    engine_sha256: str,
    level: str = "basic",
    failing: CheckId | None = None,
    precision: str = "fp32",
) -> dict:
    """A SuiteReport as JSON: every check of ``level`` passes except ``failing``."""
    checks = _checks(failing)
    ids = LEVEL_CHECKS[Level(level)]
    report = SuiteReport(
        level=Level(level),
        verdict="failed" if failing in ids else "passed",
        profile=profile,
        engine={
            "sha256": engine_sha256,
            "size_bytes": 2411,
            "format": "onnx",
            "precision": precision,
            "backend": "",
        },
        reference={"version": 1, "sha256": "c" * 64, "format": "onnx", "precision": "fp32"},
        golden={"source": "generated", "rows": 64, "seed": 0},
        thresholds=THRESHOLDS,
        criteria=criteria_of([checks[c] for c in ids]),
        checks=[checks[c] for c in ids],
        started_at="2026-11-22T08:00:00+00:00",
        finished_at="2026-11-22T08:00:09+00:00",
    )
    return report.model_dump(mode="json")


# -- fixtures shared by the certification tests ---------------------------------------------------
# Each test module imports the *_fixture functions it needs; pytest registers them by their name.


WORKER = "cert-worker@host"


@pytest.fixture(autouse=True, name="certify_stage")
def certify_stage_fixture(monkeypatch):
    """The certify stage, registered while its suite is written (a no-op once it is)."""
    if "certify" not in REGISTRY:
        monkeypatch.setitem(REGISTRY, "certify", Certify)


@pytest.fixture(name="profiles")
def profiles_fixture(db) -> dict[str, HardwareProfile]:
    """This machine's profiles, served by a live worker: {"onnxruntime": row, "torch": row}."""
    found = detect_profiles()
    report_worker(WORKER, ["cpu"] + ["profile." + p.key for p in found], found)
    return {p.backend: HardwareProfile.objects.get(key=p.key) for p in found}


@pytest.fixture(name="ort")
def ort_fixture(profiles) -> HardwareProfile:
    return profiles["onnxruntime"]


def make_dataset(team, user, tmp_path: Path, name: str, features: int, target: bool):
    """A CSV dataset of ``features`` columns (and a ``label`` target column if asked)."""
    path = tmp_path / f"{name}.csv"
    header = [f"f{i}" for i in range(features)] + (["label"] if target else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in range(40):
            values = [round((row * 7 + i) % 11 / 10, 2) for i in range(features)]
            writer.writerow(values + ([row % 4] if target else []))
    return upload_dataset(
        team=team,
        user=user,
        name=name,
        uploaded=spool_local_file(path),
        target="label" if target else "",
        splits=None,
    )


def finish(cert, *, failing: CheckId | None = None, level: str | None = None):
    """Hand the certification the report its worker would send; returns it refreshed."""
    from r1platform.certification.recording import record_suite

    report = suite_report(
        profile=cert.profile.as_pipeline().to_dict(),
        engine_sha256=cert.version.sha256,
        level=level or cert.level,
        failing=failing,
    )
    record_suite(cert.job, cert.version, report)
    cert.refresh_from_db()
    return cert
