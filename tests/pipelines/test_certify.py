"""The certify stage and its suite, on real models run by real onnxruntime and torch.

Profiles are the ones this machine offers (its CPU's onnxruntime and torch); lineage comes from
real export_onnx and quantize stages or from ``ctx.ancestors`` as the worker fills it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from pipelines.certification.profiles import HardwareProfile, detect_profiles
from pipelines.certification.report import CHECKS, CheckResult, SuiteReport
from pipelines.certification.settings import CertifySettings
from pipelines.certification.suite import find_reference, run_suite
from pipelines.core import (
    Artifact,
    Cancelled,
    DatasetRef,
    PipelineContext,
    PipelineError,
    StageResult,
    StageStatus,
)
from pipelines.engines import cuda_available
from pipelines.onnx_io import read_tensor_specs
from pipelines.stages import Certify, ExportOnnx, Quantize, validate_pipeline

from .conftest import ModelFile

REPO = Path(__file__).resolve().parents[2]
MakeCtx = Callable[..., PipelineContext]


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a small shared CPU: one thread is several times faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_profiles() -> dict[str, HardwareProfile]:
    """This machine's CPU profiles by runtime: "onnxruntime" and "torch"."""
    return {p.backend: p for p in detect_profiles() if p.device_kind == "cpu"}


@pytest.fixture
def ort_key(cpu_profiles: dict[str, HardwareProfile]) -> str:
    return cpu_profiles["onnxruntime"].key


@pytest.fixture
def make_ctx(tmp_path: Path) -> MakeCtx:
    """A context over an artifact (or a ModelFile's), in a fresh workdir of its own."""
    counter = iter(range(1_000))

    def make(
        source: ModelFile | Artifact,
        task: str = "other",
        datasets: dict[str, DatasetRef] | None = None,
    ) -> PipelineContext:
        workdir = tmp_path / "jobs" / f"job-{next(counter)}"
        workdir.mkdir(parents=True)
        artifact = source.fresh_artifact() if isinstance(source, ModelFile) else source
        return PipelineContext.start(workdir, artifact, task=task, datasets=datasets)

    return make


def onnx_artifact(path: Path, precision: str = "fp32", **extra: Any) -> Artifact:
    inputs, outputs = read_tensor_specs(path)
    return Artifact("input", str(path), "onnx", precision, inputs, outputs, **extra)


def save_graph(path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def report_of(result: StageResult) -> SuiteReport:
    # The details are stored as JSON: they must be strict JSON (no NaN or Infinity literals).
    json.dumps(result.details, allow_nan=False)
    return SuiteReport.model_validate(result.details)


def checks_of(report: SuiteReport) -> dict[str, CheckResult]:
    return {c.id.value: c for c in report.checks}


def values(check: CheckResult) -> dict[str, Any]:
    return {m.name: m.value for m in check.measurements}


def verdicts(report: SuiteReport) -> dict[str, str]:
    return {c.id.value: c.verdict.value for c in report.checks}


def certify(ctx: PipelineContext, settings: dict[str, Any], calls: list | None = None) -> Any:
    progress = (lambda f, m: calls.append((f, m))) if calls is not None else noop
    return Certify().run(ctx, "09-certify", settings, progress)


# -- basic level -----------------------------------------------------------------------------------


def test_it_passes_basic_on_an_fp32_onnx_child_of_a_torchscript_parent(
    ts_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str
) -> None:
    ctx = make_ctx(ts_mlp)
    ExportOnnx().run(ctx, "01-export_onnx", {}, noop)
    calls: list[tuple[float, str]] = []

    result = certify(ctx, {"profile": ort_key}, calls)
    report = report_of(result)

    assert result.status is StageStatus.SUCCEEDED
    assert result.message == f"passed basic on {ort_key}"
    assert report.verdict == "passed" and report.level == "basic"
    assert [c.id for c in report.checks] == list(CHECKS)  # every check, in report order
    assert verdicts(report) == {
        "loads": "pass", "parity": "pass", "shapes": "pass", "finite": "pass",
        "determinism": "pass", "api_success": "not_run", "performance": "not_run",
        "serving": "not_run", "qps": "not_run", "scenario": "not_run",
    }  # fmt: skip
    # pipelines alone has no serving runtime: the API success rate is said not run, with why.
    assert "no serving runtime" in checks_of(report)["api_success"].summary
    child = Path(ctx.current_artifact.path)
    assert report.engine["sha256"] == hashlib.sha256(child.read_bytes()).hexdigest()
    assert report.engine["size_bytes"] == child.stat().st_size
    assert (report.engine["format"], report.engine["backend"]) == ("onnx", "onnxruntime")
    assert report.reference is not None
    assert (report.reference["key"], report.reference["format"]) == ("input", "torchscript")
    assert report.golden == {"source": "generated", "seed": 0, "rows": 64}
    parity = checks_of(report)["parity"]
    assert values(parity)["output.normalised_error_elementwise"] <= 1.0
    histogram = parity.details["histograms"]["output"]
    assert sum(histogram["counts"]) + histogram["zeros"] == 64 * 10
    assert report.thresholds["tolerances"] == {
        "output": {"atol": 1e-4, "rtol": 1e-3, "statistic": "elementwise"}
    }
    assert report.thresholds["opt_batch"] == 8 and report.thresholds["determinism_atol"] == 0.0
    assert values(checks_of(report)["determinism"])["max_abs_difference"] == 0.0
    assert result.metrics["certify.passed"] == 1.0 and result.metrics["certify.checks_failed"] == 0
    assert "certify.parity.max_abs_error" in result.metrics
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_it_fails_finite_on_a_graph_that_outputs_nan_and_still_reports_every_check(
    tmp_path: Path, make_ctx: MakeCtx, ort_key: str
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    path = save_graph(tmp_path / "log.onnx", [helper.make_node("Log", ["x"], ["y"])], [x], [y])
    ctx = make_ctx(onnx_artifact(path))

    result = certify(ctx, {"profile": ort_key})
    report = report_of(result)

    assert result.status is StageStatus.SUCCEEDED  # a failed check is a verdict, not an error
    assert result.message.startswith("failed: finite (basic on ")
    assert report.verdict == "failed" and len(report.checks) == len(CHECKS)
    assert verdicts(report) == {
        "loads": "pass", "parity": "not_run", "shapes": "pass", "finite": "fail",
        "determinism": "pass", "api_success": "not_run", "performance": "not_run",
        "serving": "not_run", "qps": "not_run", "scenario": "not_run",
    }  # fmt: skip
    finite = values(checks_of(report)["finite"])
    assert finite["golden.nonfinite_values"] > 0  # log of the negative half of the golden rows
    assert finite["low.nonfinite_values"] == 4 * 8  # every element at -1: NaN
    assert finite["zeros.nonfinite_values"] == 4 * 8  # log(0) = -inf
    assert finite["high.nonfinite_values"] == 0
    assert "this is the FP32 reference" in checks_of(report)["parity"].summary
    assert result.metrics["certify.passed"] == 0.0 and result.metrics["certify.checks_failed"] == 1


def test_it_runs_nothing_else_when_the_engine_does_not_load_and_run(
    tmp_path: Path, make_ctx: MakeCtx, ort_key: str
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    node = helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)
    ctx = make_ctx(onnx_artifact(save_graph(tmp_path / "sum.onnx", [node], [x], [total])))

    report = report_of(certify(ctx, {"profile": ort_key}))

    checks = checks_of(report)
    assert checks["loads"].verdict == "fail" and "not batch-first" in checks["loads"].summary
    assert values(checks["loads"])["batch_first"] is False
    for name in ("parity", "shapes", "finite", "determinism"):
        assert checks[name].verdict == "not_run"
        assert checks[name].summary == "not run: the engine did not load and run"
    assert report.verdict == "failed"


def test_it_fails_a_check_that_raises_and_runs_the_ones_after_it(
    onnx_mlp: ModelFile, tmp_path: Path, make_ctx: MakeCtx, ort_key: str
) -> None:
    broken = tmp_path / "reference.onnx"
    broken.write_bytes(b"this is not an onnx file")
    artifact = onnx_mlp.fresh_artifact()
    artifact.precision, artifact.parent = "fp16", "version-12"  # as the worker sets it
    ctx = make_ctx(artifact)
    ctx.ancestors = {"version-12": Artifact("version-12", str(broken), "onnx", "fp32", [], [])}

    report = report_of(certify(ctx, {"profile": ort_key}))

    parity = checks_of(report)["parity"]
    assert parity.verdict == "fail"
    assert parity.summary.startswith("failed with an error: cannot load version-12 (onnx)")
    assert report.reference is not None and report.reference["key"] == "version-12"
    assert {v for k, v in verdicts(report).items() if k in ("shapes", "finite", "determinism")} == {
        "pass"
    }


def test_it_finds_the_nearest_fp32_ancestor_that_runs_here(
    onnx_mlp: ModelFile, ts_mlp: ModelFile, make_ctx: MakeCtx
) -> None:
    artifact = onnx_mlp.fresh_artifact()
    artifact.precision, artifact.parent = "int8", "version-3"
    ctx = make_ctx(artifact)
    path = str(onnx_mlp.path)
    ctx.ancestors = {
        "version-3": Artifact("version-3", path, "onnx", "fp16", [], [], parent="version-2"),
        "version-2": Artifact("version-2", path, "tensorrt", "fp32", [], [], parent="version-1"),
        "version-1": Artifact("version-1", str(ts_mlp.path), "torchscript", "fp32", [], []),
    }

    reference = find_reference(ctx, ctx.current_artifact)

    assert reference is not None and reference.key == "version-1"


# -- parity by precision ---------------------------------------------------------------------------


def test_it_passes_fp16_with_its_defaults_and_fails_it_at_zero_tolerance(
    onnx_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str
) -> None:
    ctx = make_ctx(onnx_mlp)
    Quantize().run(ctx, "01-quantize", {"mode": "fp16"}, noop)

    default = report_of(certify(ctx, {"profile": ort_key}))
    tight = report_of(
        certify(ctx, {"profile": ort_key, "tolerances": {"*": {"atol": 0.0, "rtol": 0.0}}})
    )

    assert checks_of(default)["parity"].verdict == "pass"
    assert default.thresholds["tolerances"] == {
        "output": {"atol": 1e-2, "rtol": 1e-2, "statistic": "p99"}
    }
    parity = checks_of(tight)["parity"]
    assert parity.verdict == "fail" and tight.verdict == "failed"
    assert tight.thresholds["tolerances"]["output"] == {
        "atol": 0.0,
        "rtol": 0.0,
        "statistic": "p99",
    }
    measured = {m.name: m for m in parity.measurements}
    assert measured["output.normalised_error_p99"].value == "inf"  # stored as a JSON string
    assert measured["output.normalised_error_p99"].passed is False
    assert 0 < measured["output.max_abs_error"].value < 1e-2  # recorded, not judged
    assert measured["output.max_abs_error"].passed is None
    assert "output.normalised_error_p99" in parity.summary


@pytest.fixture(scope="module")
def digits_int8(
    trained_digits: ModelFile, digits_labelled_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> PipelineContext:
    """The trained digits classifier, exported to ONNX, then int8 (dynamic) quantized."""
    workdir = tmp_path_factory.mktemp("digits") / "job-1"
    workdir.mkdir()
    datasets = {"1": DatasetRef(id="1", path=str(digits_labelled_csv), format="csv")}
    ctx = PipelineContext.start(
        workdir, trained_digits.fresh_artifact(), task="classification", datasets=datasets
    )
    ExportOnnx().run(ctx, "01-export_onnx", {}, noop)
    Quantize().run(ctx, "02-quantize", {"mode": "int8_dynamic"}, noop)
    assert ctx.current_artifact.precision == "int8"
    return ctx


def test_it_judges_int8_on_accuracy_retention_and_passes_the_scenario(
    digits_int8: PipelineContext, ort_key: str
) -> None:
    settings = {
        "profile": ort_key,
        "level": "scenario",
        "golden_dataset_id": 1,
        "min_retention": 0.95,
    }

    report = report_of(certify(digits_int8, settings))

    checks = checks_of(report)
    assert report.verdict == "passed", {c.id: c.summary for c in report.checks}
    assert report.golden == {
        "source": "dataset",
        "dataset_id": 1,
        "split": "validation",
        "rows": 180,
    }
    assert report.reference is not None and report.reference["key"] == "01-export_onnx"
    parity = {m.name: m for m in checks["parity"].measurements}
    assert parity["engine.accuracy"].value > 0.85
    assert parity["retention"].value >= 0.95 and parity["retention"].passed is True
    assert parity["output.max_abs_error"].passed is None  # int8: recorded only
    assert not any(name.startswith("output.normalised") for name in parity)
    assert report.thresholds["parity"] == {"judged_by": "accuracy retention", "min_retention": 0.95}
    scenario = {m.name: m for m in checks["scenario"].measurements}
    reference_accuracy = scenario["reference.accuracy"].value
    assert scenario["accuracy"].threshold == pytest.approx(reference_accuracy * 0.95)
    assert scenario["accuracy"].passed is True
    assert checks["performance"].verdict == "pass"
    # No serving runtime registered in a bare pipelines process: the check says so.
    assert checks["serving"].verdict == "not_run"
    assert checks["serving"].summary.startswith("no serving runtime on this machine")


def test_it_judges_unlabelled_int8_classification_on_top1_agreement(
    digits_int8: PipelineContext, cpu_profiles: dict[str, HardwareProfile]
) -> None:
    profile = cpu_profiles["onnxruntime"]
    settings = CertifySettings(profile=profile.key, min_retention=0.5)

    report = run_suite(digits_int8.current_artifact, digits_int8, settings, profile, noop)

    parity = {m.name: m for m in checks_of(report)["parity"].measurements}
    assert report.thresholds["parity"]["judged_by"] == "top-1 agreement"
    assert parity["top1_agreement"].threshold == 0.5
    assert parity["top1_agreement"].passed == (parity["top1_agreement"].value >= 0.5)
    assert "retention" not in parity


# -- shapes and performance -----------------------------------------------------------------------


def test_it_covers_a_dynamic_sequence_axis_and_refuses_what_is_out_of_range(
    tmp_path: Path, make_ctx: MakeCtx, ort_key: str
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)
    ctx = make_ctx(onnx_artifact(save_graph(tmp_path / "seq.onnx", [node], [x], [y])))

    settings = {"profile": ort_key, "dynamic_dims": {"seq": [16, 1, 5]}, "max_batch": 16}
    report = report_of(certify(ctx, settings))

    shapes = checks_of(report)["shapes"]
    assert shapes.verdict == "pass", shapes.summary
    cases = {(c["batch"], c["dims"]["seq"]) for c in shapes.details["cases"]}
    assert cases == {(1, 5), (4, 5), (8, 5), (12, 5), (16, 5), (8, 1), (8, 16)}
    assert all(c["ok"] for c in shapes.details["cases"])
    assert report.thresholds["dynamic_dims"] == {"seq": [1, 5, 16]}
    assert report.thresholds["batches"] == [1, 4, 8, 12, 16]
    refusals = {r["input"]: r for r in shapes.details["refusals"]}
    assert refusals["batch 17"]["refused"] and "outside" in refusals["batch 17"]["error"]
    assert refusals["input 'x' with an extra dim"]["refused"]
    assert values(shapes)["out_of_range_refused"] is True


def test_it_covers_the_one_batch_size_of_a_fixed_batch_model(
    onnx_fixed_batch: ModelFile, make_ctx: MakeCtx, ort_key: str
) -> None:
    report = report_of(certify(make_ctx(onnx_fixed_batch), {"profile": ort_key}))

    shapes = checks_of(report)["shapes"]
    assert report.verdict == "passed", {c.id: c.summary for c in report.checks}
    assert report.thresholds["batch_range"] == [1, 1] and report.thresholds["batches"] == [1]
    assert [r["input"] for r in shapes.details["refusals"]][0] == "batch 2"
    assert values(checks_of(report)["finite"])["golden.nonfinite_values"] == 0


def test_it_measures_p99_and_fails_a_budget_nothing_can_meet(
    onnx_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str
) -> None:
    settings = {"profile": ort_key, "level": "performance", "p99_budget_ms": 1e-6}

    result = certify(make_ctx(onnx_mlp), settings)
    report = report_of(result)

    performance = checks_of(report)["performance"]
    measured = {m.name: m for m in performance.measurements}
    assert performance.verdict == "fail" and report.verdict == "failed"
    assert measured["p99_ms"].value > 1e-6 and measured["p99_ms"].passed is False
    assert measured["throughput"].value > 1.0 and measured["throughput"].passed is True
    assert 0 < measured["peak_memory_mb"].value <= measured["peak_memory_mb"].threshold
    assert report.thresholds["serving_batch"] == 8
    assert checks_of(report)["serving"].verdict == "not_run"
    assert result.message.startswith("failed: performance (performance on ")
    assert result.metrics["certify.p99_ms"] == measured["p99_ms"].value


# -- refusals before any check ---------------------------------------------------------------------


def test_it_refuses_the_scenario_level_when_the_golden_set_has_no_target(
    onnx_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str, tmp_path: Path
) -> None:
    path = tmp_path / "unlabelled.npz"
    with path.open("wb") as f:
        np.savez(f, x=np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32))
    ctx = make_ctx(onnx_mlp, datasets={"4": DatasetRef(id="4", path=str(path), format="npz")})
    calls: list[tuple[float, str]] = []

    with pytest.raises(PipelineError, match="golden dataset 4 has no target"):
        certify(ctx, {"profile": ort_key, "level": "scenario", "golden_dataset_id": 4}, calls)
    assert calls == [(0.0, "preparing the golden set")]  # no check started


def test_it_refuses_a_profile_this_worker_does_not_offer_or_that_cannot_run_the_model(
    onnx_mlp: ModelFile, make_ctx: MakeCtx, cpu_profiles: dict[str, HardwareProfile]
) -> None:
    ctx = make_ctx(onnx_mlp)

    with pytest.raises(PipelineError) as refused:
        certify(ctx, {"profile": "tensorrt-cuda-elsewhere-00000000"})
    message = str(refused.value)
    assert message.startswith("this worker does not offer profile tensorrt-cuda-elsewhere")
    assert cpu_profiles["onnxruntime"].key in message
    with pytest.raises(PipelineError, match="a onnx model runs on onnxruntime"):
        certify(ctx, {"profile": cpu_profiles["torch"].key})


def test_it_refuses_a_file_whose_sha256_differs_from_the_recorded_one(
    onnx_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str
) -> None:
    ctx = make_ctx(onnx_artifact(onnx_mlp.path, meta={"sha256": "0" * 64}))

    with pytest.raises(PipelineError, match="does not match the sha256 recorded"):
        certify(ctx, {"profile": ort_key})


def test_it_lets_a_cancel_through(onnx_mlp: ModelFile, make_ctx: MakeCtx, ort_key: str) -> None:
    def cancel_at_parity(fraction: float, message: str) -> None:
        if "parity" in message:
            raise Cancelled()

    with pytest.raises(Cancelled):
        Certify().run(make_ctx(onnx_mlp), "09-certify", {"profile": ort_key}, cancel_at_parity)


# -- registration ----------------------------------------------------------------------------------


def test_it_is_a_registered_stage_that_keeps_the_model_and_stays_light_to_import() -> None:
    planned = validate_pipeline(
        "torchscript",
        [{"name": "export_onnx"}, {"name": "certify", "settings": {"profile": "onnxruntime-x"}}],
    )
    assert [p.name for p in planned] == ["export_onnx", "certify"]
    assert Certify.produces is None
    code = (
        "import sys, pipelines.stages\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'pipelines.certification.suite') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_it_fails_a_scenario_without_a_threshold_to_judge_it_by(
    trained_digits: ModelFile,
    digits_labelled_csv: Path,
    make_ctx: MakeCtx,
    cpu_profiles: dict[str, HardwareProfile],
) -> None:
    datasets = {"1": DatasetRef(id="1", path=str(digits_labelled_csv), format="csv")}
    ctx = make_ctx(trained_digits, task="classification", datasets=datasets)
    settings = {"profile": cpu_profiles["torch"].key, "level": "scenario", "golden_dataset_id": 1}

    unset = report_of(certify(ctx, settings))
    given = report_of(certify(ctx, {**settings, "scenario_threshold": 0.8}))

    scenario = checks_of(unset)["scenario"]
    assert scenario.verdict == "fail" and "set scenario_threshold" in scenario.summary
    assert unset.engine["backend"] == "torch" and unset.reference is None
    assert checks_of(unset)["parity"].verdict == "not_run"  # the FP32 upload is the reference
    measured = {m.name: m for m in checks_of(given)["scenario"].measurements}
    assert measured["accuracy"].value > 0.9 and measured["accuracy"].threshold == 0.8
    assert given.verdict == "passed", {c.id: c.summary for c in given.checks}


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_it_certifies_torchscript_on_the_gpus_torch_profile(
    ts_mlp: ModelFile, make_ctx: MakeCtx
) -> None:
    profile = next(p for p in detect_profiles() if (p.backend, p.device_kind) == ("torch", "cuda"))

    report = report_of(certify(make_ctx(ts_mlp), {"profile": profile.key}))

    assert (report.engine["backend"], report.engine["device"]) == ("torch-cuda", "cuda")
    assert report.thresholds["determinism_atol"] == 1e-5
    assert report.verdict == "passed", {c.id: c.summary for c in report.checks}
