"""A stage that ran but whose result was not kept: the job succeeds, nothing is registered for
it, and the job page shows it amber, "not kept", with the reason, never as a green success."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_workers.runner import Outcome, execute_job
from r1platform.core.storage import spool_local_file
from r1platform.jobs import services as jobs
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import upload_model
from tests.pipelines.test_judging import export_collapsing
from tests.test_dashboard import make_job, make_model, make_version

pytestmark = pytest.mark.usefixtures("enqueued")


def test_the_job_page_shows_a_not_kept_stage_amber_with_its_reason(member_client, team) -> None:
    source = make_version(make_model(team))
    job = make_job(source, status=JobStatus.SUCCEEDED)
    job.stage_results = [
        {"stage_id": "01-quantize", "name": "quantize", "status": "not_kept", "seconds": 2.0,
         "message": "not kept: retention 96.3% < 99.0%; accuracy 0.9100 vs 0.9450",
         "versions": [], "history": []},
        {"stage_id": "02-compile", "name": "compile", "status": "succeeded", "seconds": 1.0,
         "message": "compiled", "versions": [], "history": []},
    ]  # fmt: skip
    job.save(update_fields=["stage_results"])

    body = member_client.get(job.get_absolute_url()).content.decode()
    row = body.split('data-stage="quantize"', 1)[1].split("</tr>", 1)[0]
    assert 'data-status="not_kept"' in row
    assert '<span class="badge badge-not_kept">not kept</span>' in row
    assert "badge-succeeded" not in row
    assert "not kept: retention 96.3% &lt; 99.0%" in row


def test_a_job_whose_quantize_is_not_kept_succeeds_and_registers_nothing_for_it(
    transactional_db, team, user, member_client, tmp_path: Path
) -> None:
    model = export_collapsing(tmp_path / "collapsing.onnx")
    source = upload_model(
        team=team, user=user, name="collapsing", task="classification",
        uploaded=spool_local_file(model),
    )  # fmt: skip
    stages = [{"name": "quantize", "settings": {"sensitivity_search": False}}]
    job = jobs.launch_job(version=source, user=user, stages=stages)[0]

    assert execute_job(job.pk, "w1") is Outcome.SUCCEEDED
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    (stage,) = job.stage_results
    assert stage["status"] == "not_kept" and stage["versions"] == []
    assert stage["message"].startswith("not kept: top-1 agreement ")
    assert not ModelVersion.objects.filter(job=job).exists()
    assert "quantize: not_kept in " in job.log_tail

    body = member_client.get(job.get_absolute_url()).content.decode()
    assert '<span class="badge badge-not_kept">not kept</span>' in body
