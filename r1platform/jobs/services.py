"""Actions on jobs: launch (idempotent), claim, progress, finish, cancel, and the reaper.

Single-row state changes are conditional UPDATEs so that two workers, or a worker and a user
pressing cancel, can never both win. A job is sent to its worker by task name, and its end is
announced with ``jobs.signals``: the apps above ``jobs`` listen, ``jobs`` never calls them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from pipelines.certification.profiles import compatibility_problem
from pipelines.certification.test_cases import check_cases_fit
from pipelines.core import DatasetRef, PipelineError, StageConfigError
from pipelines.datasets import check_fits
from pipelines.stages import default_pipeline, validate_pipeline
from r1platform.celery import app
from r1platform.core import tracking
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import dataset_ids_in, dataset_ref
from r1platform.jobs.models import FINISHED, LOG_TAIL_CHARS, Job, JobStatus
from r1platform.jobs.signals import certification_reported, job_finished
from r1platform.queues import TaskName, profile_of, queue_for
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import input_specs
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import lost_workers, serving_problem

# The certify setting that names a test-case dataset.
TEST_CASES_SETTING = "test_cases_dataset_id"

log = logging.getLogger(__name__)


class LaunchRefused(Exception):
    """The pipeline cannot run on that version; nothing was queued."""


class IdempotencyConflict(LaunchRefused):
    """The idempotency key was used before for a different launch."""


def launch_job(
    *,
    version: ModelVersion,
    user: object,
    stages: list[dict] | None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate the stages and queue a job; the same key twice gives the first job back.

    Returns the job and whether it was created by this call. The job's message is sent when the
    transaction commits; if the broker does not take it, the job stays stored and unsent
    (``is_unsent``) and is sent again by ``send_unsent_jobs``, or by the same key asked again.
    """
    if stages is None:
        stages = default_pipeline(version.format, version.precision)
    try:
        planned = validate_pipeline(version.format, stages, version.precision)
    except StageConfigError as exc:
        raise LaunchRefused(str(exc)) from None
    normalized = [p.to_dict() for p in planned]
    check_datasets(version, normalized)
    check_profile(version, normalized)
    key = (idempotency_key or "").strip() or uuid.uuid4().hex
    if len(key) > 100:
        raise LaunchRefused("idempotency_key is longer than 100 characters")

    existing = Job.objects.filter(team_id=version.team_id, idempotency_key=key).first()
    if existing is not None:
        return _launched_again(existing, version, normalized), False
    try:
        with transaction.atomic():
            job = Job.objects.create(
                team_id=version.team_id,
                version=version,
                stages=normalized,
                queue=queue_for(normalized),
                idempotency_key=key,
                created_by=user if getattr(user, "is_authenticated", False) else None,
            )
            transaction.on_commit(lambda: enqueue(job))
    except IntegrityError:
        # A concurrent request with the same key won the insert.
        existing = Job.objects.get(team_id=version.team_id, idempotency_key=key)
        return _launched_again(existing, version, normalized), False
    return job, True


def check_datasets(version: ModelVersion, stages: list[dict]) -> None:
    """Every dataset the settings name exists in the version's team and fits the model's input."""
    ids = dataset_ids_in(stages)
    found = {d.pk: d for d in Dataset.objects.filter(team_id=version.team_id, pk__in=ids)}
    # Test cases are judged case by case (the certification's scenario), not read as rows.
    case_ids = {
        int(value)
        for stage in stages
        for key, value in (stage.get("settings") or {}).items()
        if key == TEST_CASES_SETTING and value is not None
    }
    for dataset_id in ids:
        dataset = found.get(dataset_id)
        if dataset is None:
            raise LaunchRefused(f"dataset {dataset_id} does not exist in this team")
        try:
            if dataset_id in case_ids:
                check_cases_fit(dataset_ref(dataset), version.format, input_specs(version))
            else:
                check_fits(dataset_ref(dataset), version.format, input_specs(version))
        except PipelineError as exc:
            raise LaunchRefused(str(exc)) from None


def check_profile(version: ModelVersion, stages: list[dict]) -> None:
    """A pipeline that must run on a hardware profile (it certifies) needs a live worker of it.

    Where the version itself is what gets certified (certify is the first stage), it must also be
    able to run on that profile: a TensorRT engine on the compute capability it was built for.
    """
    key = profile_of(stages)
    if key is None:
        return
    problem = serving_problem(key)
    if problem is not None:
        raise LaunchRefused(problem)
    if stages[0]["name"] == "certify":
        profile = HardwareProfile.objects.get(key=key).as_pipeline()
        problem = compatibility_problem(profile, version.format, version.details)
        if problem is not None:
            raise LaunchRefused(f"{version} cannot be certified on this profile: {problem}")


def _same_launch_or_conflict(job: Job, version: ModelVersion, stages: list[dict]) -> Job:
    if job.version_id != version.pk or job.stages != stages:
        raise IdempotencyConflict(
            "this idempotency_key was already used for a different launch "
            f"(job {job.pk}); use a new key for a new job"
        )
    return job


def _launched_again(job: Job, version: ModelVersion, stages: list[dict]) -> Job:
    """The job a key already launched; if the broker never took it, its send is tried again."""
    job = _same_launch_or_conflict(job, version, stages)
    if is_unsent(job):
        transaction.on_commit(lambda: send_unsent(job))
    return job


# -- sending: the outbox -------------------------------------------------------------------------
#
# A job is stored first and sent when its transaction commits. ``sent_at`` records that the
# broker took the message; while it is empty (the broker was down, the process died mid-send) the
# sweep sends it again. A job sent twice runs once: ``claim_job`` is a conditional UPDATE.


def is_unsent(job: Job) -> bool:
    """Whether the job waits in the queue without the broker having taken its message."""
    return job.status == JobStatus.QUEUED and job.sent_at is None


def waits_for_broker(job: Job) -> bool:
    """Whether the job's send was tried and the broker did not take it (it is down): the job is
    stored, and the sweep sends it once the broker is back. (A job whose transaction has not
    committed yet has not been tried: it is not waiting.)"""
    return is_unsent(job) and job.send_attempts > 0


def enqueue(job: Job) -> bool:
    """Send the job's message to its queue now; whether the broker took it. Never raises.

    Sent by task name (the task module lives with the workers, which this side never imports),
    with no retry: a broker that refuses fails at once, one that hangs after
    ``R1_BROKER_TIMEOUT_SECONDS``. A failed send leaves ``sent_at`` empty for the sweep.
    """
    Job.objects.filter(pk=job.pk).update(send_attempts=F("send_attempts") + 1)
    job.send_attempts += 1
    return _send(job)


def _send(job: Job) -> bool:
    try:
        app.send_task(
            TaskName.RUN_JOB.value,
            args=[job.pk],
            queue=job.queue,
            retry=True,
            retry_policy={"max_retries": 0},
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the job for the sweep
        Job.objects.filter(pk=job.pk).update(sent_at=None)
        job.sent_at = None
        log.warning(
            "job %s: the broker did not take its message (send %s): %s; it stays queued and "
            "is sent again when the broker is back",
            job.pk,
            job.send_attempts,
            exc,
        )
        return False
    job.sent_at = timezone.now()
    Job.objects.filter(pk=job.pk).update(sent_at=job.sent_at)
    return True


def send_unsent(job: Job) -> bool:
    """Send an unsent job unless someone else is sending it now; whether this call sent it.

    Whoever moves ``send_attempts`` on from what it read takes the send (a conditional UPDATE),
    so two sweeps, or a sweep and a retried launch, do not both send it.
    """
    return _take_send(job) and _send(job)


def _take_send(job: Job) -> bool:
    taken = Job.objects.filter(
        pk=job.pk,
        status=JobStatus.QUEUED,
        sent_at__isnull=True,
        send_attempts=job.send_attempts,
    ).update(send_attempts=F("send_attempts") + 1)
    if taken != 1:
        job.refresh_from_db(fields=["status", "sent_at", "send_attempts"])
        return False
    job.send_attempts += 1
    return True


def send_unsent_jobs(limit: int = 500) -> int:
    """Send again the queued jobs the broker never took (beat, and each worker once it is ready);
    how many were sent.

    A job younger than twice ``R1_BROKER_TIMEOUT_SECONDS`` may still be being sent by the request
    that launched it, and is left for the next sweep.
    """
    young = timezone.now() - timedelta(seconds=2 * settings.R1_BROKER_TIMEOUT_SECONDS)
    unsent = Job.objects.filter(
        status=JobStatus.QUEUED, sent_at__isnull=True, created_at__lt=young
    ).order_by("send_attempts", "created_at")
    sent = 0
    for job in unsent[:limit]:
        if not _take_send(job):
            continue  # sent or being sent by someone else
        if not _send(job):
            break  # the broker is still down: the next sweep goes on
        sent += 1
    if sent:
        log.info("sent %s queued job(s) the broker had not taken", sent)
    return sent


def dataset_refs(job: Job) -> dict[str, DatasetRef]:
    """The datasets the job's stage settings name, as the pipeline reads them (by id)."""
    ids = dataset_ids_in(job.stages)
    found = Dataset.objects.filter(team_id=job.team_id, pk__in=ids)
    return {str(d.pk): dataset_ref(d) for d in found}


def claim_job(job_id: int, worker_host: str) -> Job | None:
    """Take the job for this worker if it is queued, or running with a stale heartbeat.

    Exactly one caller gets the row: the UPDATE's WHERE clause is the lock.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=settings.R1_HEARTBEAT_STALE)
    claimed = Job.objects.filter(
        Q(status=JobStatus.QUEUED) | Q(status=JobStatus.RUNNING, heartbeat_at__lt=stale),
        pk=job_id,
        cancel_requested=False,
    ).update(
        status=JobStatus.RUNNING,
        worker_host=worker_host,
        started_at=now,
        heartbeat_at=now,
        attempts=F("attempts") + 1,
        error="",
    )
    return Job.objects.get(pk=job_id) if claimed == 1 else None


def heartbeat(job_id: int) -> None:
    Job.objects.filter(pk=job_id, status=JobStatus.RUNNING).update(heartbeat_at=timezone.now())


def record_progress(
    job: Job, *, progress: float, stage: str, line: str | None = None, stage_results=None
) -> None:
    """Write the job's progress, current stage and log tail, and beat its heartbeat."""
    job.progress = max(0.0, min(1.0, progress))
    job.current_stage = stage
    job.heartbeat_at = timezone.now()
    fields = ["progress", "current_stage", "heartbeat_at"]
    if line:
        append_log(job, line)
        fields.append("log_tail")
    if stage_results is not None:
        job.stage_results = stage_results
        fields.append("stage_results")
    job.save(update_fields=fields)


def append_log(job: Job, line: str) -> None:
    """Add a time-stamped line to the job's log tail (in memory; the caller saves it)."""
    stamp = timezone.now().strftime("%H:%M:%S")
    job.log_tail = (job.log_tail + f"{stamp} {line}\n")[-LOG_TAIL_CHARS:]


def cancel_requested(job_id: int) -> bool:
    return Job.objects.filter(pk=job_id, cancel_requested=True).exists()


def finish_job(job: Job, status: str, error: str = "") -> None:
    """Record the job's end, then announce it (``jobs.signals.job_finished``)."""
    job.status = status
    job.error = error[:4000]
    job.finished_at = timezone.now()
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
    job.save(update_fields=["status", "error", "finished_at", "progress", "log_tail"])
    for receiver, outcome in job_finished.send_robust(sender=Job, job=job):
        if isinstance(outcome, Exception):
            log.error(
                "job %s: %s could not handle its end",
                job.pk,
                getattr(receiver, "__qualname__", receiver),
                exc_info=outcome,
            )


def report_certification(job: Job, version: ModelVersion, report: Mapping[str, Any]) -> list:
    """Hand a certify stage's suite report on ``version`` to whoever records certifications.

    Returns what the receivers recorded (a certification); their errors are raised, so a report
    that cannot be recorded fails the job as the stage itself failing would.
    """
    responses = certification_reported.send(
        sender=Job, job=job, version=version, report=dict(report)
    )
    return [recorded for _, recorded in responses]


def fail_poison(job_id: int, reason: str) -> None:
    Job.objects.filter(pk=job_id).exclude(status__in=FINISHED).update(
        status=JobStatus.FAILED, error=reason, finished_at=timezone.now()
    )


def cancel_job(job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next progress step."""
    now = timezone.now()
    if Job.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
        status=JobStatus.CANCELLED, finished_at=now, cancel_requested=True
    ):
        pass
    else:
        Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(cancel_requested=True)
    job.refresh_from_db()
    return job


class Recovered(StrEnum):
    """What became of a job whose worker died under it (lost, or restarted under its name)."""

    REQUEUED = "requeued"
    FAILED = "failed"
    CANCELLED = "cancelled"


def end_job(job: Job, status: str, error: str = "") -> None:
    """Every end of a job, whoever ends it (its worker, the reaper, a restarted worker).

    Records and announces it (``finish_job``: certification and schedules listen), then closes
    its MLflow run, best effort: the job's own outcome is already recorded.
    """
    finish_job(job, status, error)
    if job.mlflow_run_id:
        try:
            tracking.finish_run(job.mlflow_run_id, succeeded=status == JobStatus.SUCCEEDED)
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: could not close MLflow run %s: %s", job.pk, job.mlflow_run_id, exc)


def recover_from_lost_worker(job_id: int, hostname: str) -> Recovered | None:
    """Move a job left running by the lost worker ``hostname``; None if it was not left there.

    Only a job still running on ``hostname`` whose heartbeat is older than
    ``R1_HEARTBEAT_STALE`` moves, and the UPDATE's WHERE clause is the lock: a job a live worker
    claimed meanwhile (its heartbeat is fresh) or one another reaper moved first is left alone.
    """
    stale = timezone.now() - timedelta(seconds=settings.R1_HEARTBEAT_STALE)
    left = Job.objects.filter(
        pk=job_id, status=JobStatus.RUNNING, worker_host=hostname, heartbeat_at__lt=stale
    )
    return _recover(left, f"worker {hostname} lost", f"the worker {hostname} was lost")


def recover_restarted_worker(hostname: str, started_at: datetime) -> list[tuple[int, Recovered]]:
    """Move the jobs the previous process named ``hostname`` held when it died.

    A worker that starts holds nothing, so every job still running under its name that was
    claimed before ``started_at`` (when this process started) was left by an earlier process of
    that name, killed before it could hand the job back: compose restarts ``cpu@%h`` under the
    same name, and the reaper, which looks for lost workers, never sees one. The broker would
    deliver its unacknowledged message again only after the visibility timeout (hours); when it
    does, the job has moved on and that delivery finds nothing to do (``claim_job``).
    """
    held = Job.objects.filter(
        status=JobStatus.RUNNING, worker_host=hostname, started_at__lt=started_at
    )
    moved = []
    for job_id in held.values_list("pk", flat=True):
        why = f"worker {hostname} restarted"
        outcome = _recover(held.filter(pk=job_id), why, f"the {why}")
        if outcome is not None:
            log.warning("job %s held by %s before it restarted: %s", job_id, hostname, outcome)
            moved.append((job_id, outcome))
    return moved


def _recover(left: QuerySet[Job], why: str, event: str) -> Recovered | None:
    """Move the one job in ``left``, a running job whose worker died (``why`` for its log,
    ``event`` for its error): back to the queue and enqueued again, unless it has been claimed
    ``R1_MAX_JOB_ATTEMPTS`` times already (failed as poison) or its cancel was asked (cancelled).
    An end goes through ``end_job`` like any other. The conditional UPDATE is the lock: a job
    moved or claimed meanwhile is left alone (None).
    """
    job = left.first()
    if job is None:
        return None
    if job.cancel_requested:
        outcome, status, error = Recovered.CANCELLED, JobStatus.CANCELLED, ""
    elif job.attempts >= settings.R1_MAX_JOB_ATTEMPTS:
        outcome, status = Recovered.FAILED, JobStatus.FAILED
        error = (
            f"{event} while running this job; its workers were lost or died {job.attempts} times "
            f"(R1_MAX_JOB_ATTEMPTS={settings.R1_MAX_JOB_ATTEMPTS}), so it is not re-queued again"
        )
    else:
        outcome, status, error = Recovered.REQUEUED, JobStatus.QUEUED, ""
    values: dict[str, object] = {"status": status}
    if status != JobStatus.QUEUED:
        values.update(error=error, finished_at=timezone.now())
    if left.filter(attempts=job.attempts).update(**values) != 1:
        return None
    job.refresh_from_db()
    line = f"re-queued: {why}" if outcome is Recovered.REQUEUED else f"{outcome}: {why}"
    append_log(job, line)
    if outcome is Recovered.REQUEUED:
        job.save(update_fields=["log_tail"])
        enqueue(job)
    else:
        end_job(job, status, error)
    return outcome


# -- the reaper --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaped:
    job_id: int
    hostname: str
    outcome: str  # Recovered: requeued, failed or cancelled


def reap_lost_workers() -> list[Reaped]:
    """Recover the running jobs of every lost worker whose job heartbeat is stale too.

    The worker stays lost (it may come back and beat again). Each job moves by one conditional
    UPDATE (``_recover``), so reapers running at once, or a live worker claiming the job
    meanwhile, never move it twice. It lives with jobs, above the workers' state it reads. A
    worker restarted under the same name is not lost: it moves what its previous process held
    itself (``recover_restarted_worker``).
    """
    reaped = []
    for hostname in lost_workers().values_list("hostname", flat=True):
        running = Job.objects.filter(status=JobStatus.RUNNING, worker_host=hostname)
        for job_id in running.values_list("pk", flat=True):
            outcome = recover_from_lost_worker(job_id, hostname)
            if outcome is not None:
                log.warning("job %s of lost worker %s: %s", job_id, hostname, outcome)
                reaped.append(Reaped(job_id, hostname, str(outcome)))
    return reaped
