"""The source's three certification criteria, measured through the platform's real serving runtime:
the API success rate (basic), QPS per card (performance), and the criteria table of the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import r1platform.serving.probe as platform_probe
from pipelines.certification import serving_probe
from pipelines.certification.profiles import cards_of, detect_profiles
from pipelines.core import Artifact, PipelineContext
from pipelines.onnx_io import read_tensor_specs
from pipelines.stages.certify import Certify
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    certify_stage_fixture,
    ort_fixture,
    profiles_fixture,
)


@pytest.fixture
def runtime() -> Iterator[None]:
    before = serving_probe.registered(), serving_probe.registered_server()
    serving_probe.register(platform_probe.serving_probe)
    serving_probe.register_server(platform_probe.serving_server)
    yield
    serving_probe.register(before[0])
    serving_probe.register_server(before[1])


def _certify(tmp_path, path, level: str = "basic", **thresholds) -> dict:
    key = next(p.key for p in detect_profiles() if p.backend == "onnxruntime")
    inputs, outputs = read_tensor_specs(path)
    source = Artifact("input", str(path), "onnx", "fp32", inputs, outputs)
    ctx = PipelineContext.start(tmp_path / "work", source)
    ctx.workdir.mkdir(parents=True)
    settings = {"profile": key, "level": level, **thresholds}
    result = Certify().run(ctx, "01-certify", settings, lambda fraction, message: None)
    return result.details


def _measured(check: dict) -> dict:
    return {m["name"]: m for m in check["measurements"]}


class FailEvery:
    """An ASGI wrapper that answers every ``n``-th infer request 500, as a faulty runtime would."""

    def __init__(self, app, n: int) -> None:
        self.app, self.n, self.count = app, n, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            self.count += 1
            if self.count % self.n == 0:
                body = orjson.dumps({"error": "injected fault"})
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def test_basic_passes_when_every_request_through_the_runtime_answers_right(
    runtime, tmp_path, mlp_onnx
):
    report = _certify(tmp_path, mlp_onnx, api_requests=1000, api_concurrency=4)
    checks = {c["id"]: c for c in report["checks"]}
    api = checks["api_success"]
    assert api["verdict"] == "pass", api["summary"]
    measured = _measured(api)
    assert measured["requests"]["value"] == 1000
    assert measured["success_rate"]["value"] == 1.0
    assert measured["success_rate"]["threshold"] == 0.999
    assert measured["failures"]["value"] == 0
    # Every covered batch size was in the mix, and the latency distribution is recorded.
    batches = {case["batch"] for case in api["details"]["mix"]}
    assert batches == set(report["thresholds"]["batches"]) and len(batches) >= 3
    assert api["details"]["latency"]["p99_ms"] >= api["details"]["latency"]["p50_ms"] > 0
    assert sum(api["details"]["latency_histogram_s"]["counts"]) > 0
    # The criteria table comes first: basic measured, the two others not part of this level.
    criteria = report["criteria"]
    assert [c["level"] for c in criteria] == ["basic", "performance", "scenario"]
    assert criteria[0]["title"] == "API call success rate"
    assert (criteria[0]["value"], criteria[0]["threshold"]) == (1.0, 0.999)
    assert criteria[0]["verdict"] == "pass"
    assert [c["verdict"] for c in criteria[1:]] == ["not_run", "not_run"]
    assert report["verdict"] == "passed"


def test_a_runtime_failing_one_request_in_500_fails_basic_at_99_8_percent(
    runtime, tmp_path, mlp_onnx, monkeypatch
):
    real_build = platform_probe.build_app
    failing = lambda source: FailEvery(real_build(source), 500)  # noqa: E731
    monkeypatch.setattr(platform_probe, "build_app", failing)

    report = _certify(tmp_path, mlp_onnx)  # the default 2,000 requests

    api = {c["id"]: c for c in report["checks"]}["api_success"]
    measured = _measured(api)
    assert measured["requests"]["value"] == 2000
    assert measured["failures"]["value"] == 4
    assert measured["success_rate"]["value"] == pytest.approx(0.998)
    assert measured["success_rate"]["passed"] is False
    assert api["verdict"] == "fail"
    assert api["details"]["failures"]["by_cause"] == {"HTTP 500: injected fault": 4}
    assert "99.80%" in api["summary"]
    assert report["verdict"] == "failed"
    assert report["criteria"][0]["verdict"] == "fail"


def test_answers_that_differ_from_the_engine_are_failures_not_successes(
    runtime, tmp_path, mlp_onnx, monkeypatch
):
    class Shifting:
        """Adds 1 to every number of one answer in 100: a 200 with wrong outputs."""

        def __init__(self, app) -> None:
            self.app, self.count = app, 0

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] != "http" or not scope["path"].endswith("/infer"):
                return await self.app(scope, receive, send)
            self.count += 1
            shift = self.count % 100 == 0

            held = []

            async def sending(message):
                if not shift:
                    return await send(message)
                if message["type"] == "http.response.start":
                    held.append(message)  # sent with the changed body's length
                    return None
                answer = orjson.loads(message["body"])
                for output in answer["outputs"]:
                    output["data"] = [x + 1.0 for x in output["data"]]
                body = orjson.dumps(answer)
                start = held.pop()
                headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({**message, "body": body})

            await self.app(scope, receive, sending)

    real_build = platform_probe.build_app
    monkeypatch.setattr(platform_probe, "build_app", lambda source: Shifting(real_build(source)))
    report = _certify(tmp_path, mlp_onnx, api_requests=1000)
    api = {c["id"]: c for c in report["checks"]}["api_success"]
    assert _measured(api)["failures"]["value"] == 10
    (cause,) = api["details"]["failures"]["by_cause"]
    assert cause.startswith("output ") and "differs" in cause
    assert api["verdict"] == "fail"


def test_performance_measures_qps_per_card_through_the_runtime(runtime, tmp_path, mlp_onnx):
    report = _certify(
        tmp_path,
        mlp_onnx,
        level="performance",
        api_requests=1000,
        qps_seconds=2,
        qps_concurrency=8,
        min_qps_per_card=1,
        p99_budget_ms=5000,
    )
    qps = {c["id"]: c for c in report["checks"]}["qps"]
    assert qps["verdict"] == "pass", qps["summary"]
    measured = _measured(qps)
    cards, card = cards_of(next(p for p in detect_profiles() if p.backend == "onnxruntime"))
    assert measured["cards"]["value"] == cards and card == "CPU socket"
    assert measured["qps"]["value"] > 1
    per_card = measured["qps"]["value"] / cards
    assert measured["qps_per_card"]["value"] == pytest.approx(per_card, 0.01)
    assert measured["qps_per_card"]["threshold"] == 1
    assert measured["error_rate"]["value"] == 0.0
    assert 1.5 < measured["seconds"]["value"] < 10
    assert report["thresholds"]["qps_seconds"] == 2
    criteria = {c["level"]: c for c in report["criteria"]}
    assert criteria["performance"]["value"] == measured["qps_per_card"]["value"]
    assert criteria["performance"]["verdict"] == "pass"


def test_the_source_thresholds_are_the_defaults_and_cannot_be_lowered(tmp_path, mlp_onnx):
    from pipelines.certification.settings import CertifySettings

    settings = CertifySettings(profile="p")
    assert (settings.api_requests, settings.min_success_rate) == (2000, 0.999)
    assert (settings.min_qps_per_card, settings.qps_seconds) == (500.0, 30.0)
    with pytest.raises(ValueError, match="min_success_rate"):
        CertifySettings(profile="p", min_success_rate=0.99)
    with pytest.raises(ValueError, match="api_requests"):
        CertifySettings(profile="p", api_requests=999)


def test_without_a_runtime_the_load_checks_are_not_run(tmp_path, mlp_onnx):
    before = serving_probe.registered_server()
    serving_probe.register_server(None)
    try:
        report = _certify(tmp_path, mlp_onnx)
    finally:
        serving_probe.register_server(before)
    api = {c["id"]: c for c in report["checks"]}["api_success"]
    assert api["verdict"] == "not_run"
    assert api["summary"].startswith("no serving runtime on this machine")


def test_a_team_policy_sets_its_criteria_and_a_certification_can_still_override_them(
    enqueued, version, user, ort, capsys
):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from r1platform.certification.services import CertificationRefused, launch_certification

    call_command("set_policy", version.team.slug, "--min-qps-per-card", "800")
    call_command("set_policy", version.team.slug, "--min-success-rate", "0.9995")
    assert "QPS per card 800" in capsys.readouterr().out
    with pytest.raises(CommandError, match="0.999"):
        call_command("set_policy", version.team.slug, "--min-success-rate", "0.99")

    def launch(**thresholds):
        return launch_certification(
            version=version, profile_key=ort.key, user=user, level="performance",
            thresholds=thresholds or None,
        )  # fmt: skip

    by_policy = launch()
    assert by_policy.settings["min_qps_per_card"] == 800
    assert by_policy.settings["min_success_rate"] == 0.9995
    overridden = launch(min_qps_per_card=100)
    assert overridden.settings["min_qps_per_card"] == 100
    assert overridden.settings["min_success_rate"] == 0.9995
    with pytest.raises(CertificationRefused, match="min_success_rate"):
        launch(min_success_rate=0.9)  # a certification cannot go under the source's 99.9%
    call_command("set_policy", version.team.slug, "--min-qps-per-card", "-1")
    assert "min_qps_per_card" not in launch().settings


def _cases_file(tmp_path, mlp_onnx, wrong_must: bool) -> Path:
    """Cases from the model's own answers: 8 right (2 of them must), 2 wrong (one must if
    ``wrong_must``)."""
    import json

    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(mlp_onnx)).run(None, {"features": x})[0]
    path = tmp_path / "cases.jsonl"
    with path.open("w") as f:
        for i, (row, out) in enumerate(zip(x, logits, strict=True)):
            right = int(out.argmax())
            expected = right if i < 8 else (right + 1) % 4
            tags = ["fraud"] + (["must"] if i in (0, 1) or (wrong_must and i == 9) else [])
            case = {"name": f"case-{i}", "input": row.tolist(), "expected": expected,
                    "check": "argmax", "tags": tags}  # fmt: skip
            f.write(json.dumps(case) + "\n")
    return path


def _certify_cases(tmp_path, mlp_onnx, cases: Path, **thresholds) -> dict:
    from pipelines.core import DatasetRef

    key = next(p.key for p in detect_profiles() if p.backend == "onnxruntime")
    inputs, outputs = read_tensor_specs(mlp_onnx)
    source = Artifact("input", str(mlp_onnx), "onnx", "fp32", inputs, outputs)
    datasets = {"7": DatasetRef("7", str(cases), "jsonl", schema={"test_cases": {"count": 10}})}
    ctx = PipelineContext.start(tmp_path / "work", source, "classification", datasets)
    ctx.workdir.mkdir(parents=True)
    settings = {
        "profile": key, "level": "scenario", "test_cases_dataset_id": 7,
        "api_requests": 1000, "qps_seconds": 1, "min_qps_per_card": 0, **thresholds,
    }  # fmt: skip
    return Certify().run(ctx, "01-certify", settings, lambda f, m: None).details


def test_scenario_judges_the_test_cases_must_first_and_lists_every_failed_case(
    runtime, tmp_path, mlp_onnx
):
    cases = _cases_file(tmp_path, mlp_onnx, wrong_must=False)
    report = _certify_cases(tmp_path, mlp_onnx, cases)
    scenario = {c["id"]: c for c in report["checks"]}["scenario"]
    measured = _measured(scenario)
    # 8/10 pass; with no FP32 ancestor the engine is its own reference: 0.8 x 0.99.
    assert measured["pass_rate"]["value"] == 0.8
    assert measured["pass_rate"]["threshold"] == pytest.approx(0.792)
    assert (measured["must_passed"]["value"], measured["must_passed"]["threshold"]) == (2, 2)
    assert scenario["verdict"] == "pass", scenario["summary"]
    failed = scenario["details"]["test_cases"]["failed"]
    assert [f["name"] for f in failed] == ["case-8", "case-9"]
    assert all("argmax" in f["got"] for f in failed) and all(f["reason"] for f in failed)
    assert scenario["details"]["test_cases"]["by_tag"]["fraud"] == [8, 10]
    assert report["criteria"][2]["value"] == 0.8 and report["criteria"][2]["verdict"] == "pass"

    # A failed must case fails the level whatever the overall rate; a team threshold too.
    wrong = _cases_file(tmp_path, mlp_onnx, wrong_must=True)
    scenario = {c["id"]: c for c in _certify_cases(tmp_path / "b", mlp_onnx, wrong)["checks"]}[
        "scenario"
    ]
    assert _measured(scenario)["must_passed"]["passed"] is False
    assert scenario["verdict"] == "fail"
    strict = _certify_cases(tmp_path / "c", mlp_onnx, cases, scenario_min_pass_rate=0.9)
    assert strict["criteria"][2]["verdict"] == "fail" and strict["verdict"] == "failed"


def test_the_reports_show_the_three_criteria_first(enqueued, version, user, ort, api):
    from r1platform.certification.reports import render_html
    from r1platform.certification.services import certificate_document, launch_certification
    from tests.certification_data import finish

    cert = launch_certification(
        version=version, profile_key=ort.key, user=user, level="performance"
    )
    cert = finish(cert)

    html = render_html(cert)
    criteria = html.index('data-testid="cert-criteria"')
    assert criteria < html.index('data-testid="cert-checks"')
    table = html[criteria : html.index("</table>", criteria)]
    assert table.index("API call success rate") < table.index("QPS per card")
    assert table.index("QPS per card") < table.index("Industry test cases")
    assert 'data-criterion="basic" data-verdict="pass"' in table
    assert "812.4 req/s" in table and "500 req/s" in table
    document = certificate_document(cert)
    assert [c["level"] for c in document["criteria"]] == ["basic", "performance", "scenario"]
    assert document["criteria"][1]["value"] == 812.4
    assert document["criteria"][1]["threshold"] == 500.0
    assert document["criteria"][2]["verdict"] == "not_run"
    body = api.get(f"/api/v1/certifications/{cert.pk}").json()
    assert [c["title"] for c in body["criteria"]] == [
        "API call success rate", "QPS per card", "Industry test cases",
    ]  # fmt: skip


def test_the_api_launches_the_scenario_on_a_test_case_dataset_and_refuses_other_datasets(
    enqueued, version, user, ort, api, tmp_path, mlp_onnx
):
    from r1platform.core.storage import spool_local_file
    from r1platform.datasets.services import upload_dataset
    from tests.certification_data import make_dataset

    cases = upload_dataset(
        team=version.team, user=user, name="fraud-cases",
        uploaded=spool_local_file(_cases_file(tmp_path, mlp_onnx, wrong_must=False)),
        target="", splits=None,
    )  # fmt: skip
    rows = make_dataset(version.team, user, tmp_path, "rows", features=16, target=False)

    def post(**body):
        payload = {"version_id": version.pk, "profile": ort.key, "level": "scenario", **body}
        return api.post("/api/v1/certifications", payload, content_type="application/json")

    from r1platform.certification.models import Certification

    launched = post(test_cases_dataset_id=cases.pk)
    assert launched.status_code == 201, launched.content
    cert = Certification.objects.get(pk=launched.json()["id"])
    assert cert.settings["test_cases_dataset_id"] == cases.pk
    # A golden set without a target is fine when the test cases judge the scenario.
    assert post(test_cases_dataset_id=cases.pk, golden_dataset_id=rows.pk).status_code == 201
    refused = post(test_cases_dataset_id=rows.pk)
    assert refused.status_code == 400 and "not a test-case dataset" in refused.json()["detail"]
    assert post().status_code == 400  # the scenario needs test cases or a golden target
