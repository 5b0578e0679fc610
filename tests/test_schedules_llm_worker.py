"""Scheduled retraining of a language model end to end on a real worker: a LoRA fine-tune on the
newest version of a text dataset, certified on the pool's CPU profile through the serving
process, promoted when there is no champion, then judged against the champion by perplexity."""

from __future__ import annotations

import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from pipelines.certification.profiles import detect_profiles
from r1platform.certification.models import Certification
from r1platform.deployments.models import Deployment, ServingPool
from r1platform.registry.models import ModelVersion
from r1platform.schedules import pipeline_templates, runs, services
from r1platform.schedules.models import Decision, ScheduleRun
from r1platform.workers.models import HardwareProfile
from tests.llm_fixtures import CORPUS
from tests.test_certification_worker import _wait_reported
from tests.test_schedules_worker import _decided
from tests.text_models import ascii_llama

pytestmark = pytest.mark.worker


def _texts(api, path: Path, rows: list[str]) -> int:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    with open(path, "rb") as f:
        response = api.post("/api/v1/datasets", {"name": "corpus", "file": f})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _why(run: ScheduleRun) -> str:
    """The run's reason, with its certificate's failed checks as the report holds them."""
    cert = Certification.objects.filter(job_id=run.job_id).order_by("-pk").first()
    checks = (cert.report or {}).get("checks", []) if cert else []
    failed = [c for c in checks if c.get("status") not in ("passed", "not_run")]
    return f"{run.reason}: {json.dumps(failed, default=str)[:4000]}"


def test_a_schedule_fine_tunes_certifies_promotes_and_judges_a_language_model(
    worker, api, team, user, tmp_path
):
    key = next(p.key for p in detect_profiles() if p.backend == "torch")
    _wait_reported(key)
    folder = ascii_llama(tmp_path / "llm")  # its greedy text is valid UTF-8: no decode failure
    archive = tmp_path / "llm.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname="llm")
    with open(archive, "rb") as f:
        response = api.post("/api/v1/models", {"name": "llm-retrain", "file": f})
    assert response.status_code == 201, response.content
    model = ModelVersion.objects.get(pk=response.json()["versions"][0]["id"]).model
    _texts(api, tmp_path / "corpus-1.jsonl", CORPUS * 4)
    pool = ServingPool.objects.create(
        name="cpu-llm-e2e", profile=HardwareProfile.objects.get(key=key)
    )
    # A gentle adapter: certified on the stream checks of a random model, it must keep its text.
    finetune = {"rank": 4, "max_steps": 2, "batch_size": 4, "max_seq_length": 32,
                "learning_rate": 1e-5, "checkpoint_every_steps": 2}  # fmt: skip
    certify = {"stream_requests": 60, "stream_concurrency": 4, "stream_max_tokens": 8,
               "min_output_tokens_per_card": 0.1, "ttft_p99_budget_ms": 60000,
               "tpot_budget_ms": 60000}  # fmt: skip
    template = pipeline_templates.create_template(
        team=team, user=user, name="llm-retrain",
        stages=[{"name": "finetune", "settings": finetune},
                {"name": "certify", "settings": certify}],
    )  # fmt: skip
    schedule = services.create_schedule(
        team=team, user=user, name="llm-nightly", model=model, template=template,
        dataset_name="corpus", pool=pool, cron="0 3 * * *", margin=0.0,
    )  # fmt: skip

    first = _decided(runs.run_schedule(schedule.pk, trigger="beat"), timeout=400)
    assert first.decision == Decision.PROMOTED, _why(first)
    assert first.challenger.format == "lora_adapter" and first.job.queue == f"profile.{key}"
    assert Deployment.objects.get(pool=pool, stage="production").version == first.challenger

    # New data: trained again, certified, then scored against the champion on perplexity.
    _texts(api, tmp_path / "corpus-2.jsonl", list(reversed(CORPUS)) * 4)
    ScheduleRun.objects.update(created_at=timezone.now() - timedelta(hours=1))
    second = _decided(runs.run_schedule(schedule.pk, trigger="beat"), timeout=400)
    assert second.decision in (Decision.PROMOTED, Decision.KEPT), second.reason
    assert second.metric == "perplexity", _why(second)
    assert second.champion == first.challenger
    assert 1 < second.champion_score < 1000 and 1 < second.challenger_score < 1000
    assert f"challenger {second.challenger_score:.4g} vs champion" in second.reason
