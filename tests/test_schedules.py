"""Scheduled retraining: validation, the PeriodicTask kept in step, ticks, and decisions made
with real certifications and real models scored on a real dataset (no worker: the broker is a
list, and the worker's part is played by the same services a worker calls)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from django.test import TestCase
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from pipelines.certification.report import CheckId
from pipelines.engines import predict
from r1platform.certification.recording import record_suite
from r1platform.core.storage import spool_local_file, store_copy
from r1platform.datasets.services import upload_dataset
from r1platform.deployments import services as deployments
from r1platform.deployments.models import AuditEvent, Deployment, PromotionRequest
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import finish_job
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import register_version, upload_model
from r1platform.schedules import pipeline_templates, planning, runs, services
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.models import Decision, Schedule, ScheduleRun
from r1platform.workers.services import beat
from tests.certification_data import WORKER, suite_report
from tests.conftest import export_mlp
from tests.promotion_data import (  # noqa: F401 - fixtures, registered by name
    carol_fixture,
    certify,
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    set_policy,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

COMPILE = [{"name": "compile", "settings": {"backend": "onnxruntime"}}]


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def better_onnx(tmp_path_factory) -> Path:
    """Another 16 -> 4 classifier: the dataset's labels are its answers, so it scores 1.0."""
    return export_mlp(tmp_path_factory.mktemp("models") / "better.onnx", seed=1)


@pytest.fixture
def upload_data(team, user, tmp_path, better_onnx):
    """Upload a version of a 16-feature dataset labelled by ``better_onnx``'s answers."""
    from pipelines.core import Artifact, TensorSpec

    spec = TensorSpec("features", ["batch", 16], "float32")
    better = Artifact("better", str(better_onnx), "onnx", "fp32", [spec], [])
    counter = iter(range(100))

    def upload(name: str = "mlp-data", rows: int = 200):
        seed = next(counter)
        x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
        labels = predict(better, {"features": x}).argmax(axis=1)
        path = tmp_path / f"{name}-{seed}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([f"f{i}" for i in range(16)] + ["label"])
            for row, label in zip(x, labels, strict=True):
                writer.writerow([f"{v:.6f}" for v in row] + [int(label)])
        return upload_dataset(
            team=team, user=user, name=name, uploaded=spool_local_file(path),
            target="label", splits=None,
        )  # fmt: skip

    return upload


@pytest.fixture
def template(team, user):
    return pipeline_templates.create_template(team=team, user=user, name="compile", stages=COMPILE)


@pytest.fixture
def schedule(team, user, version, template, pool, upload_data):
    upload_data()
    return services.create_schedule(
        team=team, user=user, name="nightly", model=version.model, template=template,
        dataset_name="mlp-data", pool=pool, interval_seconds=3600, margin=0.01,
    )  # fmt: skip


@pytest.fixture
def decisions(monkeypatch) -> list[tuple[int, str]]:
    """No broker: the (run id, queue) of each decision that would be sent."""
    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(runs, "send_decision", lambda run_id, queue: sent.append((run_id, queue)))
    return sent


@pytest.fixture
def notified(monkeypatch) -> list[tuple[str, dict]]:
    from r1platform.notifications import services as notifications

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(notifications, "notify", lambda team, event, p: calls.append((event, p)))
    return calls


def launch(schedule: Schedule, trigger: str = "manual") -> ScheduleRun:
    beat(WORKER)  # the profile's worker is live, however long the set-up took
    with TestCase.captureOnCommitCallbacks(execute=True):  # the broker sends after commit
        run = runs.run_schedule(schedule.pk, trigger=trigger)
    assert run is not None
    return run


def produce(run: ScheduleRun, source: Path, *, failing: CheckId | None = None) -> ModelVersion:
    """What the worker does with the run's job: register what it made, certify it, end."""
    job = run.job
    relative, sha, size = store_copy(source, kind="models", team_id=job.team_id, suffix=".onnx")
    made = register_version(
        job.version.model, relative_file=relative, sha256=sha, size_bytes=size, format="onnx",
        precision="fp32", inputs=job.version.inputs, outputs=job.version.outputs,
        parent=job.version, job=job, artifact_key="01-compile", user=None,
    )  # fmt: skip
    certify_settings = job.stages[-1]["settings"]
    report = suite_report(
        profile=run.schedule.pool.profile.as_pipeline().to_dict(),
        engine_sha256=sha,
        level=certify_settings["level"],
        failing=failing,
    )
    record_suite(job, made, report)
    finish_job(job, JobStatus.SUCCEEDED)
    with TestCase.captureOnCommitCallbacks(execute=True):
        runs.job_ended(job)
    return made


def serve(version: ModelVersion, pool) -> None:
    """Make ``version`` the production champion, through the gate."""
    certify(version, pool.profile)
    outcome = deployments.promote(
        model=version.model, version=version, pool=pool, stage="production", actor=None
    )
    assert outcome.status == "promoted", outcome.reason


# -- validation ------------------------------------------------------------------------------------


def make(schedule_kwargs: dict, **changes) -> Schedule:
    return services.create_schedule(**{**schedule_kwargs, **changes})


@pytest.fixture
def kwargs(team, user, version, template, pool, upload_data) -> dict:
    upload_data()
    return dict(
        team=team, user=user, name="nightly", model=version.model, template=template,
        dataset_name="mlp-data", pool=pool, interval_seconds=3600,
    )  # fmt: skip


def refused(kwargs: dict, **changes) -> str:
    with pytest.raises(ScheduleRefused) as caught:
        make(kwargs, **changes)
    assert not Schedule.objects.exists()
    assert not PeriodicTask.objects.filter(name__startswith="r1-schedule-").exists()
    return str(caught.value)


def test_it_refuses_a_cron_expression_that_does_not_parse_naming_the_field(kwargs):
    message = refused(kwargs, interval_seconds=None, cron="0 25 * * *")
    assert message.startswith("cron field 2 (hour) '25' does not parse") and "0-23" in message
    message = refused(kwargs, interval_seconds=None, cron="*/x 3 * * *")
    assert "cron field 1 (minute)" in message
    assert "needs five" in refused(kwargs, interval_seconds=None, cron="0 3 * *")


def test_it_wants_exactly_one_of_cron_and_interval(kwargs):
    assert "not both" in refused(kwargs, cron="0 3 * * *")
    assert "give cron" in refused(kwargs, interval_seconds=None)
    assert "at least 10" in refused(kwargs, interval_seconds=5)


def test_it_refuses_a_bad_margin_split_dataset_or_pool(kwargs, pool):
    assert "finite number at least 0" in refused(kwargs, margin=-0.1)
    assert "finite number at least 0" in refused(kwargs, margin=float("nan"))
    message = refused(kwargs, eval_split="holdout")
    assert "'holdout' is not a split of mlp-data v1" in message
    assert "train, validation, test, all" in message
    assert "no dataset named 'nope'" in refused(kwargs, dataset_name="nope")
    pool.delete()
    assert "pool does not exist" in refused(kwargs)


def test_it_refuses_a_template_naming_an_unknown_stage(team, user):
    with pytest.raises(ScheduleRefused) as caught:
        pipeline_templates.create_template(
            team=team, user=user, name="t", stages=[{"name": "finetuen"}]
        )
    message = str(caught.value)
    assert "stage 1: unknown stage 'finetuen' (did you mean 'finetune'?)" in message
    assert "known stages: export_onnx, quantize, compile" in message
    with pytest.raises(ScheduleRefused, match="epochs"):
        pipeline_templates.create_template(
            team=team, user=user, name="t", stages=[{"name": "finetune", "settings": {"epochs": 0}}]
        )
    assert not team.pipeline_templates.exists()


def test_template_names_are_unique_per_team(team, user, template):
    with pytest.raises(ScheduleRefused, match="already has a template named 'compile'"):
        pipeline_templates.create_template(team=team, user=user, name="compile", stages=COMPILE)


def test_it_refuses_a_template_that_cannot_run_on_the_model(kwargs, team, user):
    # The model is ONNX: finetune needs TorchScript, and no version of the model is one.
    finetune = pipeline_templates.create_template(
        team=team, user=user, name="ft", stages=[{"name": "finetune", "settings": {"epochs": 1}}]
    )
    message = refused(kwargs, template=finetune)
    assert "cannot run on mlp v1 (the newest version)" in message
    assert "needs a torchscript model" in message


def test_it_refuses_a_certify_stage_on_another_profile(kwargs, team, user, profiles):
    other = profiles["torch"].key
    stages = [*COMPILE, {"name": "certify", "settings": {"profile": other}}]
    elsewhere = pipeline_templates.create_template(
        team=team, user=user, name="elsewhere", stages=stages
    )
    message = refused(kwargs, template=elsewhere)
    assert f"certifies on {other}, but pool cpu-a serves" in message


# -- the PeriodicTask ------------------------------------------------------------------------------


def test_the_periodic_task_follows_the_schedule(kwargs):
    schedule = make(kwargs)
    task = PeriodicTask.objects.get(name=f"r1-schedule-{schedule.pk}")
    assert schedule.periodic_task_id == task.pk
    assert task.task == "r1.run_schedule" and json.loads(task.args) == [schedule.pk]
    assert task.interval.every == 3600 and task.crontab is None
    assert task.enabled and not task.one_off

    services.update_schedule(schedule, cron="30 2 * * 1-5")
    task.refresh_from_db()
    assert schedule.interval_seconds is None and schedule.cron == "30 2 * * 1-5"
    assert task.interval is None
    cron = task.crontab
    assert (cron.minute, cron.hour, cron.day_of_week, str(cron.timezone)) == (
        "30",
        "2",
        "1-5",
        "UTC",
    )

    services.update_schedule(schedule, enabled=False)
    task.refresh_from_db()
    assert not task.enabled and not Schedule.objects.get().enabled

    with pytest.raises(ScheduleRefused, match="field 5"):
        services.update_schedule(schedule, cron="0 3 * * 9")
    task.refresh_from_db()
    assert task.crontab.day_of_week == "1-5" and not task.enabled

    services.delete_schedule(schedule)
    assert not Schedule.objects.exists()
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()


def test_a_template_in_use_cannot_be_deleted(schedule, template):
    with pytest.raises(ScheduleRefused, match="used by schedule"):
        pipeline_templates.delete_template(template)


# -- ticks -----------------------------------------------------------------------------------------


def test_a_run_launches_the_template_with_the_data_and_certify_filled_in(schedule, enqueued, ort):
    run = launch(schedule, trigger="beat")
    dataset = run.dataset
    assert run.decision == Decision.RUNNING and run.job is not None and run.trigger == "beat"
    job = run.job
    assert job.idempotency_key == f"schedule-{schedule.pk}-run-{run.pk}"
    assert [s["name"] for s in job.stages] == ["compile", "certify"]
    certify_settings = job.stages[1]["settings"]
    # The team requires basic (no policy row): the pool's profile at that level, on the data.
    assert certify_settings["profile"] == ort.key and certify_settings["level"] == "basic"
    assert certify_settings["golden_dataset_id"] == dataset.pk
    assert job.queue == f"profile.{ort.key}" and enqueued == [job.pk]


def test_it_skips_while_the_last_run_is_still_going(schedule):
    first = launch(schedule)
    second = launch(schedule)
    assert second.decision == Decision.SKIPPED and second.job is None
    assert second.reason == f"run {first.pk} (job {first.job_id}) is still going"
    assert Job.objects.count() == 1


def test_it_skips_when_the_data_has_not_changed_unless_asked(
    schedule, decisions, better_onnx, upload_data
):
    first = launch(schedule)
    produce(first, better_onnx)
    runs.decide_run(first.pk)
    skipped = launch(schedule, trigger="beat")
    assert skipped.decision == Decision.SKIPPED
    assert skipped.reason == f"the data has not changed since run {first.pk} (mlp-data v1)"

    # "Run now" runs anyway; new data runs on the next tick.
    assert launch(schedule, trigger="manual").decision == Decision.RUNNING
    ScheduleRun.objects.filter(decision=Decision.RUNNING).update(decision=Decision.KEPT)
    upload_data()
    ScheduleRun.objects.update(created_at=timezone.now() - timezone.timedelta(hours=1))
    fresh = launch(schedule, trigger="beat")
    assert fresh.decision == Decision.RUNNING and str(fresh.dataset) == "mlp-data v2"
    assert fresh.job.stages[1]["settings"]["golden_dataset_id"] == fresh.dataset.pk


def test_a_duplicate_tick_or_a_paused_schedule_records_nothing(schedule):
    assert launch(schedule, trigger="beat").decision == Decision.RUNNING
    assert runs.run_schedule(schedule.pk, trigger="beat") is None
    services.update_schedule(schedule, enabled=False)
    ScheduleRun.objects.update(created_at=timezone.now() - timezone.timedelta(hours=1))
    assert runs.run_schedule(schedule.pk, trigger="beat") is None
    assert ScheduleRun.objects.count() == 1


def test_a_launch_refused_fails_the_run_and_notifies(schedule, notified, profiles):
    from r1platform.workers.models import Worker

    Worker.objects.update(last_seen=timezone.now() - timezone.timedelta(hours=1))
    run = runs.run_schedule(schedule.pk, trigger="manual")
    assert run.decision == Decision.FAILED and run.job is None
    assert run.reason.startswith("no live worker serves profile"), run.reason
    assert [event for event, _ in notified] == ["schedule.run.failed"]


def test_dataset_settings_are_filled_and_the_start_version_found(
    team, user, pool, tmp_path, digits_torchscript, mlp_onnx
):
    from tests.certification_data import make_dataset

    v1 = upload_model(
        team=team, user=user, name="digits", task="classification",
        uploaded=spool_local_file(digits_torchscript), input_shape="batch,64",
    )  # fmt: skip
    old = make_dataset(team, user, tmp_path, "digits-data", 64, True)
    other = make_dataset(team, user, tmp_path, "holdout", 64, True)
    newest = make_dataset(team, user, tmp_path, "digits-data", 64, True)
    # A newer ONNX version the template cannot start from (fine-tuning needs TorchScript).
    relative, sha, size = store_copy(mlp_onnx, kind="models", team_id=team.pk, suffix=".onnx")
    register_version(
        v1.model, relative_file=relative, sha256=sha, size_bytes=size, format="onnx",
        precision="fp32", inputs=v1.inputs, outputs=v1.outputs, parent=v1, user=None,
    )  # fmt: skip
    stages = [
        {"name": "finetune", "settings": {"epochs": 1, "dataset_id": old.pk}},
        {"name": "quantize", "settings": {"mode": "int8_static"}},
        {"name": "evaluate", "settings": {"dataset_id": other.pk}},
    ]
    template = pipeline_templates.create_template(
        team=team, user=user, name="retrain", stages=stages
    )
    schedule = services.create_schedule(
        team=team, user=user, name="digits", model=v1.model, template=template,
        dataset_name="digits-data", pool=pool, cron="0 3 * * *",
    )  # fmt: skip
    plan = planning.plan_run(schedule, newest)
    assert plan.version == v1 and plan.champion is None
    settings = {s["name"]: s["settings"] for s in plan.stages}
    assert settings["finetune"]["dataset_id"] == newest.pk  # an older version of it: the newest
    assert settings["quantize"]["calibration_dataset_id"] == newest.pk  # left out: filled
    assert settings["evaluate"]["dataset_id"] == other.pk  # another dataset: kept
    assert settings["certify"]["golden_dataset_id"] == newest.pk
    assert [s["name"] for s in plan.stages] == ["finetune", "quantize", "evaluate", "certify"]


# -- decisions -------------------------------------------------------------------------------------


def test_with_no_champion_the_certified_challenger_is_promoted(
    schedule, decisions, notified, better_onnx, ort
):
    run = launch(schedule)
    made = produce(run, better_onnx)
    assert decisions == [(run.pk, f"profile.{ort.key}")]

    run = runs.decide_run(run.pk)
    assert run.decision == Decision.PROMOTED and run.reason == "no production version yet"
    assert run.challenger == made and run.champion is None and run.decided_at is not None
    deployment = Deployment.objects.get(model=schedule.model, pool=schedule.pool)
    assert deployment.version == made and deployment.stage == "production"
    event = AuditEvent.objects.get(action="promoted")
    assert event.actor_label == "schedule nightly" and f"scheduled run {run.pk}" in event.reason

    (event_name, payload), *_ = notified
    assert event_name == "schedule.run.promoted"
    assert payload["schedule"] == {"id": schedule.pk, "name": "nightly"}
    assert payload["challenger_version"] == made.number and payload["job_id"] == run.job_id
    assert payload["url"].endswith(f"/schedules/{schedule.pk}/")
    json.dumps(payload)

    # The same decision delivered again changes nothing.
    runs.decide_run(run.pk)
    assert AuditEvent.objects.filter(action="promoted").count() == 1 and len(notified) == 1


def test_a_challenger_that_beats_the_champion_by_the_margin_is_promoted(
    schedule, version, pool, decisions, better_onnx
):
    serve(version, pool)
    run = launch(schedule)
    made = produce(run, better_onnx)
    run = runs.decide_run(run.pk)
    assert run.decision == Decision.PROMOTED, run.reason
    assert run.metric == "accuracy" and run.challenger_score == 1.0
    assert run.champion == version and run.champion_score < 0.99
    assert run.reason.startswith(f"challenger 1 vs champion {run.champion_score:.4g} (accuracy")
    assert Deployment.objects.get().version == made


def test_a_challenger_that_does_not_win_by_the_margin_is_kept_and_why(
    schedule, version, pool, decisions
):
    from r1platform.core.storage import media_path

    serve(version, pool)
    run = launch(schedule)
    made = produce(run, media_path(version.file))  # the same weights: the same score
    run = runs.decide_run(run.pk)
    assert run.decision == Decision.KEPT
    score = f"{run.champion_score:.4g}"
    assert run.challenger_score == run.champion_score
    assert run.reason == (
        f"challenger {score} vs champion {score} (accuracy on mlp-data v1 test, margin 0.01)"
    )
    assert run.challenger == made and Deployment.objects.get().version == version


def test_a_team_that_requires_approval_gets_a_request(
    schedule, team, decisions, notified, better_onnx
):
    set_policy(team, approval=True)
    run = launch(schedule)
    made = produce(run, better_onnx)
    run = runs.decide_run(run.pk)
    assert run.decision == Decision.REQUESTED
    request = PromotionRequest.objects.get()
    assert request.version == made and request.status == "pending"
    assert f"request #{request.pk} waits" in run.reason
    assert not Deployment.objects.exists()
    assert [event for event, _ in notified] == ["schedule.run.requested"]


def test_a_challenger_whose_certificate_failed_is_not_promoted(
    schedule, decisions, notified, better_onnx
):
    run = launch(schedule)
    made = produce(run, better_onnx, failing=CheckId.PARITY)
    run = runs.decide_run(run.pk)
    assert run.decision == Decision.KEPT
    assert run.reason == f"challenger v{made.number}'s certificate failed (checks failed: parity)"
    assert not Deployment.objects.exists() and notified == []


def test_the_gate_refusing_keeps_the_champion_with_its_reason(
    schedule, team, decisions, better_onnx
):
    run = launch(schedule)
    produce(run, better_onnx)
    set_policy(team, level="performance")  # raised after the challenger was certified at basic
    run = runs.decide_run(run.pk)
    assert run.decision == Decision.KEPT and run.reason.startswith("the gate refused")
    assert "requires performance" in run.reason and not Deployment.objects.exists()


def test_a_failed_job_fails_its_run_and_a_notification_error_changes_nothing(
    schedule, monkeypatch, decisions
):
    from r1platform.notifications import services as notifications

    def broken(team, event, payload):
        raise RuntimeError("the webhook service is down")

    monkeypatch.setattr(notifications, "notify", broken)
    run = launch(schedule)
    finish_job(run.job, JobStatus.FAILED, "compile: onnxruntime could not optimize the model")
    runs.job_ended(run.job)
    run.refresh_from_db()
    assert run.decision == Decision.FAILED and decisions == []
    assert run.reason == (
        f"job {run.job_id} failed: compile: onnxruntime could not optimize the model"
    )
    # The next tick is not blocked by it.
    assert launch(schedule).decision == Decision.RUNNING


def test_a_job_cancelled_outside_the_runner_does_not_block_the_schedule(schedule):
    from r1platform.jobs.services import cancel_job

    run = launch(schedule)
    cancel_job(run.job)  # still queued: cancelled at once, no runner involved
    nxt = launch(schedule)
    run.refresh_from_db()
    assert run.decision == Decision.FAILED and "cancelled" in run.reason
    assert nxt.decision == Decision.RUNNING
