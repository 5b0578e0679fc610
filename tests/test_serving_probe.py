"""The certification suite's serving-contract check, run with the platform's serving runtime."""

from __future__ import annotations

import pytest

from pipelines.certification import serving_probe
from pipelines.certification.profiles import detect_profiles
from pipelines.core import Artifact, PipelineContext
from pipelines.onnx_io import read_tensor_specs
from pipelines.stages.certify import Certify
from r1platform.serving.probe import serving_probe as platform_probe


@pytest.fixture
def registered():
    before = serving_probe.registered()
    serving_probe.register(platform_probe)
    yield
    serving_probe.register(before)


def _certify(tmp_path, path) -> dict:
    key = next(p.key for p in detect_profiles() if p.backend == "onnxruntime")
    inputs, outputs = read_tensor_specs(path)
    ctx = PipelineContext.start(
        tmp_path / "work",
        Artifact(key="input", path=str(path), format="onnx", precision="fp32",
                 inputs=inputs, outputs=outputs),
    )  # fmt: skip
    ctx.workdir.mkdir(parents=True)
    settings = {"profile": key, "level": "performance"}
    result = Certify().run(ctx, "01-certify", settings, lambda fraction, message: None)
    return {c["id"]: c for c in result.details["checks"]}


def test_the_runtime_serves_the_engine_and_answers_as_the_engine_does(
    registered, tmp_path, mlp_onnx
):
    serving = _certify(tmp_path, mlp_onnx)["serving"]
    assert serving["verdict"] == "pass", serving
    measured = {m["name"]: m for m in serving["measurements"]}
    assert measured["ready"]["value"] is True
    assert measured["outputs_returned"]["passed"] is True
    assert measured["max_abs_difference"]["value"] <= 1e-5
    assert serving["details"]["runtime"].startswith("r1platform serving")


def test_a_runtime_that_answers_differently_fails_the_contract(tmp_path, mlp_onnx):
    # The real runtime serves the engine; its answer is then shifted, as a runtime that mangled
    # a tensor (wrong layout, wrong dtype round trip) would return it.
    def mangling(artifact, device, feeds):
        result = platform_probe(artifact, device, feeds)
        result.outputs = {name: value + 1.0 for name, value in result.outputs.items()}
        return result

    before = serving_probe.registered()
    serving_probe.register(mangling)
    try:
        serving = _certify(tmp_path, mlp_onnx)["serving"]
    finally:
        serving_probe.register(before)
    assert serving["verdict"] == "fail", serving
    measured = {m["name"]: m for m in serving["measurements"]}
    assert measured["max_abs_difference"]["value"] == pytest.approx(1.0)
    assert measured["max_abs_difference"]["passed"] is False


def test_without_a_runtime_the_contract_is_not_run(tmp_path, mlp_onnx):
    before = serving_probe.registered()
    serving_probe.register(None)
    try:
        serving = _certify(tmp_path, mlp_onnx)["serving"]
    finally:
        serving_probe.register(before)
    assert serving["verdict"] == "not_run"
    assert serving["summary"].startswith("no serving runtime on this machine")
