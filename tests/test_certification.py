"""Certification services without a worker: refusals before anything is queued, the launch,
the report a worker hands back (stored, rendered three ways, idempotent), validity, the level
gate, and the certificate document's committed schema."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from django.conf import settings
from pypdf import PdfReader

from pipelines.certification.report import CheckId
from r1platform.certification import recording, services
from r1platform.certification.document import SCHEMA_ID, CertificateDocument, json_schema
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import storage, tracking
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.services import mirror_to_mlflow, register_version
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import report_worker
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    finish,
    make_dataset,
    ort_fixture,
    profiles_fixture,
    suite_report,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

ROOT = Path(__file__).resolve().parent.parent


def launch(version, profile_key, user, **kwargs):
    return services.launch_certification(
        version=version, profile_key=profile_key, user=user, **{"level": "basic", **kwargs}
    )


def assert_nothing_queued(enqueued):
    assert not Job.objects.exists()
    assert not Certification.objects.exists()
    assert enqueued == []


# -- refusals --------------------------------------------------------------------------------------


def test_it_refuses_a_profile_no_worker_serves(version, user, enqueued):
    with pytest.raises(services.CertificationRefused, match="no worker has reported"):
        launch(version, "onnxruntime-cpu-nowhere-12345678", user)
    assert_nothing_queued(enqueued)


def test_it_refuses_a_profile_whose_worker_is_gone(version, user, ort, enqueued):
    from r1platform.workers.services import worker_stopped

    worker_stopped(WORKER)
    with pytest.raises(services.CertificationRefused, match="no live worker serves"):
        launch(version, ort.key, user)
    assert_nothing_queued(enqueued)


def test_it_refuses_a_format_the_profile_cannot_run(version, user, profiles, enqueued):
    with pytest.raises(services.CertificationRefused, match="runs on onnxruntime"):
        launch(version, profiles["torch"].key, user)
    assert_nothing_queued(enqueued)


def test_it_refuses_the_scenario_level_without_expected_outputs(
    version, user, team, ort, tmp_path, enqueued
):
    unlabelled = make_dataset(team, user, tmp_path, "unlabelled", features=16, target=False)
    with pytest.raises(services.CertificationRefused, match="has no target"):
        launch(version, ort.key, user, level="scenario", golden_dataset_id=unlabelled.pk)
    with pytest.raises(services.CertificationRefused, match="scenario level needs"):
        launch(version, ort.key, user, level="scenario")
    assert_nothing_queued(enqueued)


def test_it_refuses_a_golden_dataset_of_another_team(
    version, user, other_team, outsider, ort, tmp_path, enqueued
):
    theirs = make_dataset(other_team, outsider, tmp_path, "theirs", features=16, target=True)
    with pytest.raises(services.CertificationRefused, match="does not exist in this team"):
        launch(version, ort.key, user, golden_dataset_id=theirs.pk)
    assert_nothing_queued(enqueued)


def test_it_refuses_a_golden_dataset_that_does_not_fit_the_input(
    version, user, team, ort, tmp_path, enqueued
):
    narrow = make_dataset(team, user, tmp_path, "narrow", features=10, target=True)
    with pytest.raises(services.LaunchRefused, match="10 feature columns"):
        launch(version, ort.key, user, golden_dataset_id=narrow.pk)
    assert_nothing_queued(enqueued)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"p99_budget": 5}, "unknown threshold 'p99_budget'"),
        ({"p99_budget_ms": -1}, "p99_budget_ms: Input should be greater than 0"),
        ({"min_batch": 64, "max_batch": 8}, "min_batch 64 is above max_batch 8"),
        ({"profile": "elsewhere"}, "profile cannot be set in thresholds"),
        ({"tolerances": {"logits": {"atol": "loose"}}}, "tolerances.logits.atol"),
        (["p99_budget_ms", 5], "must be a JSON object"),
    ],
)
def test_it_refuses_bad_thresholds_with_a_readable_message(
    version, user, ort, enqueued, thresholds, message
):
    with pytest.raises(services.CertificationRefused) as refused:
        launch(version, ort.key, user, thresholds=thresholds)
    assert message in str(refused.value)
    assert_nothing_queued(enqueued)


def test_it_refuses_an_unknown_level(version, user, ort, enqueued):
    with pytest.raises(services.CertificationRefused, match="level: Input should be"):
        launch(version, ort.key, user, level="gold")
    assert_nothing_queued(enqueued)


# -- launch ----------------------------------------------------------------------------------------


def test_it_queues_a_job_on_the_profiles_queue_with_its_certification(
    version, user, team, ort, tmp_path, enqueued, django_capture_on_commit_callbacks
):
    golden = make_dataset(team, user, tmp_path, "golden", features=16, target=True)
    seen_at_enqueue: list[bool] = []
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        cert = launch(
            version,
            ort.key,
            user,
            level="scenario",
            golden_dataset_id=golden.pk,
            thresholds={"p99_budget_ms": 50},
        )
        # Nothing is sent before the transaction that made the job and its row commits.
        assert enqueued == []
        seen_at_enqueue.append(Certification.objects.filter(job=cert.job).exists())
    assert len(callbacks) == 1 and enqueued == [cert.job_id] and seen_at_enqueue == [True]
    job = cert.job
    assert job.queue == "profile." + ort.key
    assert [s["name"] for s in job.stages] == ["certify"]
    assert job.stages[0]["settings"]["p99_budget_ms"] == 50
    assert job.stages[0]["settings"]["profile"] == ort.key
    assert (cert.status, cert.level, cert.profile, cert.golden_dataset) == (
        CertStatus.PENDING,
        "scenario",
        ort,
        golden,
    )
    assert cert.settings["p99_budget_ms"] == 50 and cert.created_by == user


def test_the_same_idempotency_key_gives_the_same_certification(version, user, ort, enqueued):
    first = launch(version, ort.key, user, idempotency_key="nightly-1")
    again = launch(version, ort.key, user, idempotency_key="nightly-1")
    assert again.pk == first.pk
    assert Job.objects.count() == 1 and Certification.objects.count() == 1
    with pytest.raises(services.LaunchRefused, match="already used"):
        launch(version, ort.key, user, level="performance", idempotency_key="nightly-1")


# -- the worker's report ---------------------------------------------------------------------------


@pytest.fixture
def cert(version, user, ort):
    return launch(version, ort.key, user, level="performance")


def test_a_passed_suite_is_stored_and_rendered_three_ways(cert):
    cert = finish(cert)

    assert cert.status == CertStatus.PASSED and cert.finished_at is not None
    assert cert.engine_sha256 == cert.version.sha256
    assert cert.profile_snapshot["backend_version"] == cert.profile.backend_version
    assert cert.suite_version == "2.0.0"
    media = Path(settings.MEDIA_ROOT)
    for kind in ("json", "html", "pdf"):
        relative = getattr(cert, f"report_{kind}")
        assert relative == f"certificates/team-{cert.team_id}/cert-{cert.pk}.{kind}"
        assert (media / relative).is_file()
    assert not list(media.rglob("*.partial"))

    html = (media / cert.report_html).read_text()
    assert "Passed" in html and 'data-status="passed"' in html
    for check in cert.report["checks"]:
        assert check["title"] in html
    assert 'data-verdict="not_run"' in html and ">not run</span>" in html
    assert "The serving runtime does not exist yet" in html
    assert 'data-testid="parity-chart"' in html and html.count("<rect") >= 9
    assert "<link" not in html and "<script" not in html and 'src="' not in html

    pdf = (media / cert.report_pdf).read_bytes()
    assert pdf.startswith(b"%PDF")
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "passed" in text.lower() and "Numerical parity" in text

    document = json.loads((media / cert.report_json).read_text())
    parsed = CertificateDocument.model_validate(document)
    assert parsed.schema_id == SCHEMA_ID and parsed.certificate_id == cert.pk
    assert parsed.verdict == "passed" and parsed.validity.valid
    assert [c.id.value for c in parsed.checks] == [c["id"] for c in cert.report["checks"]]
    assert parsed.launched_by == "alice" and parsed.version.sha256 == cert.version.sha256


def test_a_failed_check_is_a_verdict_and_the_report_still_renders(cert):
    cert = finish(cert, failing=CheckId.PARITY)

    assert cert.status == CertStatus.FAILED
    html = (Path(settings.MEDIA_ROOT) / cert.report_html).read_text()
    assert "Failed" in html and 'data-verdict="fail"' in html
    assert "3.100e-01" in html or "0.31" in html
    assert (Path(settings.MEDIA_ROOT) / cert.report_pdf).read_bytes().startswith(b"%PDF")
    checked = services.validity(cert)
    assert (checked.valid, checked.state) == (False, "failed")
    assert "parity" in checked.reasons[0]
    assert not services.is_certified(cert.version, "basic", cert.profile.key).certified


def test_recording_the_same_report_twice_changes_nothing(cert):
    report = suite_report(
        profile=cert.profile.as_pipeline().to_dict(),
        engine_sha256=cert.version.sha256,
        level="performance",
    )
    first = recording.record_suite(cert.job, cert.version, report)
    html = storage.media_path(first.report_html)
    stamp = html.stat().st_mtime_ns

    again = recording.record_suite(cert.job, cert.version, report)

    assert again.pk == first.pk and Certification.objects.count() == 1
    assert again.finished_at == first.finished_at
    assert html.stat().st_mtime_ns == stamp


def test_a_certify_stage_inside_a_pipeline_gets_its_row_when_it_reports(version, user, ort):
    job = Job.objects.create(
        team=version.team,
        version=version,
        stages=[
            {"name": "quantize", "settings": {"mode": "int8_dynamic"}},
            {"name": "certify", "settings": {"profile": ort.key, "level": "basic"}},
        ],
        queue="profile." + ort.key,
        idempotency_key="pipeline-1",
        created_by=user,
        status=JobStatus.RUNNING,
    )
    source = storage.media_path(version.file)
    relative, sha, size = storage.store_copy(
        source, kind="models", team_id=version.team_id, suffix=".onnx"
    )
    int8 = register_version(
        version.model,
        relative_file=relative,
        sha256=sha,
        size_bytes=size,
        format="onnx",
        precision="int8",
        inputs=version.inputs,
        outputs=version.outputs,
        parent=version,
        job=job,
        artifact_key="quantize",
    )
    report = suite_report(profile=ort.as_pipeline().to_dict(), engine_sha256=sha)

    cert = recording.record_suite(job, int8, report)

    assert cert.version == int8 and cert.job == job and cert.profile == ort
    assert cert.settings["profile"] == ort.key and cert.created_by == user
    assert cert.status == CertStatus.PASSED
    document = services.certificate_document(cert)
    assert [v["number"] for v in document["lineage"]] == [1, 2]
    assert document["lineage"][0]["job_id"] is None and document["lineage"][1]["job_id"] == job.pk
    assert recording.record_suite(job, int8, report).pk == cert.pk


def test_a_job_that_ends_without_a_report_leaves_its_certification_in_error(cert):
    job = cert.job
    job.status, job.error = JobStatus.FAILED, "stage 1 (certify): the golden set does not fit"
    job.save()
    services.job_ended(job)
    cert.refresh_from_db()
    assert cert.status == CertStatus.ERROR and "does not fit" in cert.error
    assert services.validity(cert).state == "error"

    other = launch(cert.version, cert.profile.key, None)
    Job.objects.filter(pk=other.job_id).update(status=JobStatus.CANCELLED)
    services.job_ended(Job.objects.get(pk=other.job_id))
    other.refresh_from_db()
    assert (other.status, other.error) == (CertStatus.ERROR, "cancelled")


def test_mlflow_gets_the_reports_and_the_model_version_its_tags(cert):
    version = cert.version
    assert mirror_to_mlflow(version)
    experiment = tracking.experiment_id(f"team-{version.team.slug}")
    run_id = tracking.start_run(experiment, "certify", {})
    Job.objects.filter(pk=cert.job_id).update(mlflow_run_id=run_id)
    cert.job.refresh_from_db()

    cert = finish(cert)

    artifacts = [a.path for a in tracking.client().list_artifacts(run_id, "certification")]
    assert sorted(Path(a).suffix for a in artifacts) == [".html", ".json", ".pdf"]
    tags = (
        tracking.client().get_model_version(version.model.mlflow_name, version.mlflow_version).tags
    )
    assert tags["r1.certificate_id"] == str(cert.pk)
    assert tags["r1.certified_level"] == "performance"
    assert tags[f"r1.cert.{cert.profile.key}"] == f"performance #{cert.pk}"


def test_mlflow_being_down_does_not_lose_the_verdict(cert, monkeypatch):
    def down(*args, **kwargs):
        raise ConnectionError("the tracking server is down")

    monkeypatch.setattr(tracking, "log_artifact", down)
    monkeypatch.setattr(tracking, "set_model_version_tags", down)
    Job.objects.filter(pk=cert.job_id).update(mlflow_run_id="0" * 32)
    cert.job.refresh_from_db()
    cert.version.mlflow_version = "1"
    cert.version.save()

    cert = finish(cert)

    assert cert.status == CertStatus.PASSED and cert.report_pdf


# -- validity and the level gate -------------------------------------------------------------------


def test_a_certificate_stops_holding_when_the_file_changes(cert):
    cert = finish(cert)
    assert services.validity(cert).valid
    assert services.is_certified(cert.version, "basic", cert.profile.key).certified

    path = storage.media_path(cert.version.file)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # A later rewrite has a later mtime; coarse kernel timestamps could make an immediate one
    # equal, which is not what this test is about.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    checked = services.validity(cert)
    assert (checked.valid, checked.state) == (False, "invalid")
    assert "stored file changed" in checked.reasons[0]
    answer = services.is_certified(cert.version, "basic", cert.profile.key)
    assert not answer.certified and answer.certification is None
    assert "no longer valid" in answer.reason

    path.unlink()
    assert "missing" in services.validity(cert).reasons[0]


def test_a_certificate_stops_holding_when_the_profiles_runtime_changes(cert):
    cert = finish(cert)
    upgraded = replace(cert.profile.as_pipeline(), backend_version="99.0.0")
    report_worker(WORKER, ["cpu"], [upgraded])

    cert.profile.refresh_from_db()
    checked = services.validity(cert)
    assert not checked.valid and "99.0.0" in checked.reasons[0]
    assert not services.is_certified(cert.version, "basic", cert.profile.key).certified

    # Re-certified under the new runtime, it holds again.
    again = finish(launch(cert.version, cert.profile.key, None))
    assert services.validity(again).valid
    assert services.is_certified(cert.version, "basic", cert.profile.key).certification == again


def test_a_higher_level_satisfies_a_lower_one_and_not_the_reverse(cert, profiles):
    cert = finish(cert)  # performance
    key = cert.profile.key
    for level, certified in (("basic", True), ("performance", True), ("scenario", False)):
        answer = services.is_certified(cert.version, level, key)
        assert answer.certified is certified, (level, answer.reason)
    assert "below scenario" in services.is_certified(cert.version, "scenario", key).reason
    assert not services.is_certified(cert.version, "basic", profiles["torch"].key).certified
    assert "unknown level" in services.is_certified(cert.version, "gold", key).reason


def test_the_file_hash_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "engine.bin"
    path.write_bytes(b"abc")
    calls = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p: calls.append(p) or real(p))
    first = storage.sha256_cached(path)
    assert storage.sha256_cached(path) == first and len(calls) == 1
    path.write_bytes(b"abcd")
    assert storage.sha256_cached(path) != first and len(calls) == 2


# -- the document's schema -------------------------------------------------------------------------


def test_the_committed_schema_is_the_documents_schema():
    committed = json.loads((ROOT / "docs" / "certificate.schema.json").read_text())
    assert committed == json_schema(), (
        "regenerate it: python -m r1platform.certification.document > docs/certificate.schema.json"
    )


def test_a_pending_certification_has_a_document_too(cert):
    document = CertificateDocument.model_validate(services.certificate_document(cert))
    assert document.status == "pending" and document.verdict is None and document.checks == []
    assert document.validity.state == "pending"
    assert document.profile.key == cert.profile.key


def test_no_profile_row_is_orphaned_by_a_report_from_an_unknown_profile(cert):
    snapshot = replace(cert.profile.as_pipeline(), device_name="Elsewhere CPU").to_dict()
    job = cert.job
    report = suite_report(profile=snapshot, engine_sha256=cert.version.sha256)
    Certification.objects.filter(pk=cert.pk).delete()
    made = recording.record_suite(job, cert.version, report)
    assert made.profile.key == snapshot["key"]
    assert HardwareProfile.objects.filter(key=snapshot["key"]).count() == 1


def test_the_scenario_level_takes_a_target_found_as_evaluate_and_quantize_find_it(
    version, user, team, ort, tmp_path, enqueued
):
    import csv

    from r1platform.core.storage import spool_local_file
    from r1platform.datasets.services import upload_dataset

    path = tmp_path / "auto.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"f{i}" for i in range(16)] + ["label"])
        for row in range(40):
            writer.writerow([round((row + i) % 7 / 7, 2) for i in range(16)] + [row % 3])
    auto = upload_dataset(
        team=team, user=user, name="auto", uploaded=spool_local_file(path), target="", splits=None
    )
    assert not auto.target  # nothing named: the label column is found, as evaluate finds it

    cert = launch(version, ort.key, user, level="scenario", golden_dataset_id=auto.pk)

    assert cert.level == "scenario" and cert.golden_dataset_id == auto.pk
