"""The demo seed `./r1 up` runs: a new user's first pages are not empty; seeding twice is once."""

from __future__ import annotations

from django_celery_beat.models import PeriodicTask

from pipelines.certification.profiles import detect_profiles
from r1platform.core.demo import DEMO_CASES, DEMO_POOL, seed_demo
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job
from r1platform.schedules.models import Schedule
from r1platform.workers.services import report_worker


def test_it_seeds_a_certifying_job_and_a_nightly_schedule_once(db, settings):
    # Training the demo model takes longer than the tests' 5 s before a silent worker is lost.
    settings.R1_WORKER_LOST_SECONDS = 600
    profiles = [p for p in detect_profiles() if p.backend == "onnxruntime"]
    report_worker("demo-worker@test", ["cpu"], profiles)

    first = seed_demo()
    again = seed_demo()

    assert again == first
    (job,) = Job.objects.all()
    assert job.stages[-1]["name"] == "certify"
    assert job.stages[-1]["settings"]["profile"] == profiles[0].key
    # The demo certifies at the scenario level on its seeded industry test cases.
    cases = Dataset.objects.get(name=DEMO_CASES)
    assert cases.schema["test_cases"]["count"] == 40
    assert cases.schema["test_cases"]["tags"]["must"] == 10
    assert job.stages[-1]["settings"]["level"] == "scenario"
    assert job.stages[-1]["settings"]["test_cases_dataset_id"] == cases.pk
    (schedule,) = Schedule.objects.all()
    assert schedule.model_id == first.model_id
    assert (schedule.cron, schedule.enabled) == ("0 3 * * *", True)
    assert schedule.pool.name == DEMO_POOL and schedule.pool.profile.key == profiles[0].key
    assert schedule.template.stage_names == ["finetune", "quantize", "compile"]
    task = PeriodicTask.objects.get(pk=schedule.periodic_task_id)
    assert task.enabled and task.crontab.hour == "3"


def test_without_a_live_worker_it_seeds_no_schedule(db):
    seed_demo()

    assert Job.objects.count() == 1 and not Schedule.objects.exists()
