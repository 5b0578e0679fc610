"""Fixtures shared by the whole suite: teams and members, tokens, real model files, a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from r1platform.accounts.models import ApiToken, Membership, Team
from r1platform.core.storage import spool_local_file
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import upload_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_storage(settings, tmp_path):
    """Each test gets its own file storage and job folders, so leftovers can be asserted."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.R1_WORK_DIR = tmp_path / "work"
    spool = settings.MEDIA_ROOT / "tmp"
    spool.mkdir(parents=True)
    settings.FILE_UPLOAD_TEMP_DIR = str(spool)


@pytest.fixture
def media(settings) -> Path:
    """This test's MEDIA_ROOT (set by ``isolated_storage``), for asserting what was stored."""
    return Path(settings.MEDIA_ROOT)


@pytest.fixture
def team(db) -> Team:
    return Team.objects.create(name="Team A", slug="team-a")


@pytest.fixture
def other_team(db) -> Team:
    return Team.objects.create(name="Team B", slug="team-b")


@pytest.fixture
def user(team, django_user_model):
    member = django_user_model.objects.create_user("alice", password="pw-alice-123")
    Membership.objects.create(team=team, user=member)
    return member


@pytest.fixture
def outsider(other_team, django_user_model):
    member = django_user_model.objects.create_user("bob", password="pw-bob-123")
    Membership.objects.create(team=other_team, user=member)
    return member


@pytest.fixture
def member_client(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def token(user, team) -> str:
    return ApiToken.issue(user, team)[1]


@pytest.fixture
def outsider_token(outsider, other_team) -> str:
    return ApiToken.issue(outsider, other_team)[1]


@pytest.fixture
def api(client, token):
    """A test client that sends team A's bearer token."""
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    """No broker: the ids of the jobs ``jobs.services`` would have sent, in order (``enqueue``,
    and the outbox's ``send_unsent``), each recorded as sent.

    A test asks for it to assert what was queued; a module whose every test must queue nothing
    for real uses it throughout with ``pytestmark = pytest.mark.usefixtures("enqueued")``.
    """
    from django.utils import timezone

    from r1platform.jobs.models import Job

    sent: list[int] = []

    def record(job: Job) -> bool:
        sent.append(job.pk)
        job.sent_at = timezone.now()
        Job.objects.filter(pk=job.pk).update(sent_at=job.sent_at)
        return True

    monkeypatch.setattr("r1platform.jobs.services._send", record)
    return sent


@pytest.fixture(scope="session")
def digits_torchscript(tmp_path_factory) -> Path:
    """The demo's digits classifier, trained once per session (about 3 s)."""
    from pipelines.demo import build_digits_classifier

    path = tmp_path_factory.mktemp("models") / "digits_mlp.pt"
    build_digits_classifier(path, epochs=15)
    return path


def export_mlp(path: Path, seed: int = 0) -> Path:
    """A small 16 -> 4 ONNX classifier with a dynamic batch axis, exported from torch."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 16),),
        str(path),
        dynamo=False,
        input_names=["features"],
        output_names=["logits"],
        dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )
    return path


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    return export_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture
def version(team, user, mlp_onnx) -> ModelVersion:
    """Version 1 of team A's "mlp": the ONNX classifier, uploaded the way the dashboard does."""
    return upload_model(
        team=team, user=user, name="mlp", task="classification", uploaded=spool_local_file(mlp_onnx)
    )


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{user}{password}@{host}/{db['NAME']}"


def platform_env(**extra: str) -> dict[str, str]:
    """The environment of a child process (worker, beat, server) sharing this test's database,
    broker and files."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(),
        "R1_HOME": str(settings.R1_HOME),
        "R1_MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "R1_WORK_DIR": str(settings.R1_WORK_DIR),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def stop_process_group(proc: subprocess.Popen) -> None:
    """Kill a child started with ``start_new_session=True`` and everything it started (a
    worker's pool children), and reap it."""
    # Even when the leader has exited its children may not have: the group is killed anyway.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def running_worker(
    log_path: Path,
    *,
    concurrency: int = 1,
    prefix: str = "test",
    name: str | None = None,
    **env: str,
) -> Iterator[subprocess.Popen]:
    """A real Celery worker process (prefork) on the test database and broker, until the block
    ends; its log is printed after it stops. ``name`` fixes its node name (as compose's
    ``cpu@%h`` does), else it is ``prefix`` and a random part.

    The worker and its pool children are killed outright when the block ends, not shut down
    warm: a warm shutdown costs 5-7 s even when idle (the filesystem broker has no event loop,
    so Celery's blocking loop notices the signal only between 2 s ``drain_events`` waits, then
    joins its timer thread and unwinds torch and onnxruntime), and waits for a task still
    running. Nothing a test checks happens after its block, and a killed worker cannot hand a
    task it was running back to the queue (``acks_late``) for the next test's worker to find.
    """
    cmd = [
        sys.executable, "-m", "celery", "-A", "r1platform", "worker", "-Q", "cpu",
        "-c", str(concurrency), "-n", name or f"{prefix}-{uuid.uuid4().hex[:8]}@%h",
        "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=platform_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the worker did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    try:
        yield proc
    finally:
        stop_process_group(proc)
        tail = log_path.read_text()[-3000:]
        sys.stderr.write(f"\n--- worker log (last 3000 chars) ---\n{tail}\n")


@pytest.fixture
def worker(transactional_db, tmp_path):
    """A real Celery worker process (prefork, one child) on the test database and broker."""
    with running_worker(tmp_path / "worker.log") as proc:
        yield proc


def wait_for_job(job_id: int, timeout: float = 240.0):
    """Poll the database until the job ends; returns it."""
    from r1platform.jobs.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = Job.objects.get(pk=job_id)
        if job.is_finished:
            return job
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} did not finish in {timeout} s: {Job.objects.get(pk=job_id)}"
    )


def wait_for_run_status(run_id: str, timeout: float = 20.0) -> str:
    """The MLflow run's status once it is no longer RUNNING (or RUNNING after ``timeout``).

    A worker records the job's end first and closes its MLflow run after, so a test that saw the
    job end may look at the run a moment before it is closed.
    """
    from r1platform.core import tracking

    deadline = time.monotonic() + timeout
    while True:
        status = tracking.client().get_run(run_id).info.status
        if status != "RUNNING" or time.monotonic() > deadline:
            return status
        time.sleep(0.25)
