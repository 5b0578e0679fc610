"""Exactly one beat sends: two real beat processes, a schedule every 10 s and a real worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django_celery_beat.models import PeriodicTask

from r1platform.core.storage import spool_local_file
from r1platform.deployments.models import ServingPool
from r1platform.registry.services import upload_model
from r1platform.schedules import pipeline_templates, services
from r1platform.schedules.models import ScheduleRun
from r1platform.workers.models import HardwareProfile
from tests.certification_data import make_dataset
from tests.conftest import ROOT, platform_env
from tests.test_certification_worker import _onnxruntime_profile, _wait_reported

pytestmark = pytest.mark.worker

LEASE_SECONDS = 4


def _start_beat(tmp_path: Path, name: str) -> subprocess.Popen:
    log_path = tmp_path / f"{name}.log"
    env = platform_env(R1_BEAT_LEASE_SECONDS=str(LEASE_SECONDS))
    cmd = [
        sys.executable, "-m", "celery", "-A", "r1platform", "beat", "--loglevel", "INFO",
        "-s", str(tmp_path / f"{name}-schedule"),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def _log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in _log(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{text!r} not in the beat's log:\n{_log(proc)[-3000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sends(proc: subprocess.Popen, task_name: str) -> int:
    return _log(proc).count(f"Sending due task {task_name} ")


def test_a_second_beat_sends_nothing_until_the_first_stops(worker, team, user, tmp_path, mlp_onnx):
    key = _onnxruntime_profile()
    _wait_reported(key)
    version = upload_model(
        team=team, user=user, name="mlp", task="classification",
        uploaded=spool_local_file(mlp_onnx),
    )  # fmt: skip
    make_dataset(team, user, tmp_path, "mlp-data", 16, True)
    pool = ServingPool.objects.create(name="cpu-beat", profile=HardwareProfile.objects.get(key=key))
    template = pipeline_templates.create_template(
        team=team, user=user, name="compile",
        stages=[{"name": "compile", "settings": {"backend": "onnxruntime"}}],
    )  # fmt: skip

    first = _start_beat(tmp_path, "beat-1")
    second = None
    try:
        _wait_for(first, "leader, sending")
        second = _start_beat(tmp_path, "beat-2")
        _wait_for(second, "standby")
        schedule = services.create_schedule(
            team=team, user=user, name="every-10s", model=version.model, template=template,
            dataset_name="mlp-data", pool=pool, interval_seconds=10,
        )  # fmt: skip
        task_name = f"r1-schedule-{schedule.pk}"
        time.sleep(26)  # ticks at about 10 s and 20 s after the schedule was saved
        sent_by_first = _sends(first, task_name)
        assert _sends(second, task_name) == 0, _log(second)[-3000:]
        assert sent_by_first >= 2, _log(first)[-3000:]

        # The leader stops (releasing its lease): the standby takes over and keeps time.
        _stop(first)
        _wait_for(second, "leader, sending", timeout=LEASE_SECONDS * 3)
        deadline = time.monotonic() + 15
        while _sends(second, task_name) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _sends(second, task_name) >= 1, _log(second)[-3000:]
    finally:
        _stop(first)
        if second is not None:
            _stop(second)

    sent = _sends(first, task_name) + _sends(second, task_name)
    # Every tick sent became exactly one run (launched, or skipped while the last goes on).
    deadline = time.monotonic() + 20
    while ScheduleRun.objects.filter(schedule=schedule).count() < sent:
        assert time.monotonic() < deadline, "the worker did not take every tick"
        time.sleep(0.5)
    runs = list(ScheduleRun.objects.filter(schedule=schedule).order_by("pk"))
    assert len(runs) == sent
    assert runs[0].job is not None and {r.trigger for r in runs} == {"beat"}
    # Two ticks (one from each leader) never came within half an interval of each other.
    gaps = [
        (b.created_at - a.created_at).total_seconds() for a, b in zip(runs, runs[1:], strict=False)
    ]
    assert all(gap > 5 for gap in gaps), gaps
    # The static CELERY_BEAT_SCHEDULE (the reaper) is among what the scheduler sends.
    reaper = PeriodicTask.objects.get(name="reap-lost-workers")
    assert reaper.task == "r1.reap" and reaper.enabled and reaper.interval.every == 60
