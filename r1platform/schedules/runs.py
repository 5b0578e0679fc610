"""A schedule's runs: one tick, the end of its job, and the champion/challenger decision.

A run goes: ``run_schedule`` (a beat tick or "run now") launches the template's job on the newest
version of the training dataset, or records why it did not; ``job_ended`` (a receiver of
``jobs.signals.job_finished``: every job that ends) queues the decision on a worker of the pool's
hardware profile; ``decide_run`` scores champion and challenger there and promotes, requests
approval, or keeps the champion, always saying why. The Celery tasks ``r1.run_schedule`` and
``r1.decide_schedule_run`` (``schedules.tasks``) call ``run_schedule`` and ``decide_run``; the
decision is sent by task name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import NoReverseMatch
from django.utils import timezone

from pipelines.core import PipelineError
from r1platform.celery import app
from r1platform.certification.models import Certification
from r1platform.certification.services import validity
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import dataset_ref
from r1platform.deployments.models import Stage
from r1platform.deployments.services import promote
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import LaunchRefused, launch_job
from r1platform.notifications import services as notifications
from r1platform.queues import TaskName, profile_queue
from r1platform.registry.services import adapter_base, version_artifact
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.models import Decision, Schedule, ScheduleRun
from r1platform.schedules.planning import champion_of, newest_dataset, plan_run

log = logging.getLogger(__name__)

# A beat tick delivered twice (a second beat, a redelivered message) within this share of the
# interval is the same tick; cron schedules fire at most once a minute.
DUPLICATE_TICK_SHARE = 0.5
CRON_DUPLICATE_SECONDS = 30
# A run whose job ended this long ago without a decision lost its decision message: queue it again.
DECISION_LOST_SECONDS = 600


# -- runs ------------------------------------------------------------------------------------------


def run_schedule(schedule_id: int, trigger: str = "beat") -> ScheduleRun | None:
    """One tick: skip (recorded, with the reason) when the data is unchanged since the last run
    or the last run is still going; else launch the template's job on the newest data.

    ``trigger`` is "beat" (the PeriodicTask) or "manual" ("run now": it runs a paused schedule and
    unchanged data too). None when nothing is recorded: the schedule is gone, a beat tick of a
    paused schedule, or a duplicate of a tick already taken.
    """
    with transaction.atomic():
        # The row lock makes two deliveries of a tick take turns (select_for_update on
        # PostgreSQL; SQLite's IMMEDIATE transactions already serialize writers).
        schedule = (
            Schedule.objects.select_for_update()
            .select_related("team", "model", "template", "pool__profile")
            .filter(pk=schedule_id)
            .first()
        )
        if schedule is None:
            log.info("schedule %s is gone; tick ignored", schedule_id)
            return None
        if trigger == "beat" and not schedule.enabled:
            log.info("schedule %s is paused; tick ignored", schedule_id)
            return None
        if trigger == "beat" and _duplicate_tick(schedule):
            log.info("schedule %s: a tick was taken moments ago; duplicate ignored", schedule_id)
            return None
        run = _tick(schedule, trigger)
    if run.decision == Decision.FAILED:
        _notify(run)
    return run


def _duplicate_tick(schedule: Schedule) -> bool:
    if schedule.interval_seconds:
        window = schedule.interval_seconds * DUPLICATE_TICK_SHARE
    else:
        window = CRON_DUPLICATE_SECONDS
    since = timezone.now() - timedelta(seconds=window)
    return schedule.runs.filter(trigger="beat", created_at__gt=since).exists()


def _tick(schedule: Schedule, trigger: str) -> ScheduleRun:
    going = schedule.runs.filter(decision=Decision.RUNNING).select_related("job").first()
    busy = _still_going(going) if going is not None else None
    if busy is not None:
        return _record(schedule, trigger, Decision.SKIPPED, busy)
    dataset = newest_dataset(schedule.team_id, schedule.dataset_name)
    if dataset is None:
        why = f"no dataset named {schedule.dataset_name!r} in {schedule.team}; upload it"
        return _record(schedule, trigger, Decision.FAILED, why)
    last = schedule.runs.filter(job__isnull=False, dataset__isnull=False).first()
    if trigger != "manual" and last is not None and last.dataset_id == dataset.pk:
        why = f"the data has not changed since run {last.pk} ({dataset})"
        return _record(schedule, trigger, Decision.SKIPPED, why, dataset=dataset)
    try:
        plan = plan_run(schedule, dataset)
    except ScheduleRefused as exc:
        return _record(schedule, trigger, Decision.FAILED, str(exc), dataset=dataset)
    run = _record(schedule, trigger, Decision.RUNNING, "", dataset=dataset)
    try:
        job, _ = launch_job(
            version=plan.version,
            user=None,
            stages=plan.stages,
            idempotency_key=f"schedule-{schedule.pk}-run-{run.pk}",
        )
    except LaunchRefused as exc:
        run.decision, run.reason, run.decided_at = Decision.FAILED, str(exc), timezone.now()
        run.save(update_fields=["decision", "reason", "decided_at"])
        return run
    run.job = job
    run.reason = f"job {job.pk} on {plan.version} with {dataset}"
    run.save(update_fields=["job", "reason"])
    log.info("schedule %s: run %s launched job %s", schedule.pk, run.pk, job.pk)
    return run


def _still_going(run: ScheduleRun) -> str | None:
    """Why ``run`` still blocks the next one, or None once it is settled here.

    A job can end without the runner (cancelled while queued, failed as poison by the reaper):
    its run is failed now instead of blocking the schedule for ever.
    """
    job = run.job
    if job is None:
        _conclude(run, Decision.FAILED, "its job was deleted before it was decided")
        return None
    if not job.is_finished:
        return f"run {run.pk} (job {job.pk}) is still going"
    if job.status != JobStatus.SUCCEEDED:
        job_ended(job)
        return None
    waited = (timezone.now() - (job.finished_at or timezone.now())).total_seconds()
    if waited > DECISION_LOST_SECONDS:
        # The decision message was lost (no worker of the profile took it): ask again.
        transaction.on_commit(lambda: _queue_decision(run))
        return f"run {run.pk} (job {job.pk}) still waits for its decision; asked again"
    return f"run {run.pk} (job {job.pk}) is still being decided"


def _record(
    schedule: Schedule, trigger: str, decision: str, reason: str, dataset: Dataset | None = None
) -> ScheduleRun:
    now = timezone.now()
    return ScheduleRun.objects.create(
        schedule=schedule,
        team_id=schedule.team_id,
        trigger=trigger,
        dataset=dataset,
        decision=decision,
        reason=reason,
        created_at=now,
        decided_at=None if decision == Decision.RUNNING else now,
    )


def job_ended(job: Job) -> None:
    """Called for every job that ends (``schedules.signals``); a schedule's job queues its decision.

    A failed or cancelled job fails its run (and notifies). A succeeded one is decided on a worker
    of the pool's profile: scoring runs the engines on the hardware they will serve on.
    """
    run = (
        ScheduleRun.objects.filter(job=job, decision=Decision.RUNNING)
        .select_related("schedule__pool__profile", "schedule__model", "schedule__team", "job")
        .first()
    )
    if run is None:
        return
    if job.status != JobStatus.SUCCEEDED:
        why = job.error or ("cancelled" if job.status == JobStatus.CANCELLED else job.status)
        if _conclude(run, Decision.FAILED, f"job {job.pk} {job.status}: {why}"):
            _notify(run)
        return
    transaction.on_commit(lambda: _queue_decision(run))


def _queue_decision(run: ScheduleRun) -> None:
    send_decision(run.pk, profile_queue(run.schedule.pool.profile.key))


def send_decision(run_id: int, queue: str) -> None:
    """Send ``r1.decide_schedule_run`` by name (the task lives in ``schedules.tasks``).

    Never raises: with the broker down the decision is not sent, and the schedule's next tick
    asks again once the run has waited ``DECISION_LOST_SECONDS`` (``_still_going``).
    """
    try:
        app.send_task(
            TaskName.DECIDE_SCHEDULE_RUN.value,
            args=[run_id],
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 0},
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure: the next tick asks again
        log.warning("schedule run %s: its decision could not be queued now: %s", run_id, exc)


def _conclude(run: ScheduleRun, decision: str, reason: str, **fields: Any) -> bool:
    """Record the decision if the run is still undecided; whether this call recorded it."""
    now = timezone.now()
    values = {"decision": decision, "reason": reason, "decided_at": now, **fields}
    done = ScheduleRun.objects.filter(pk=run.pk, decision=Decision.RUNNING).update(**values)
    for field, value in values.items():
        setattr(run, field, value)
    return done == 1


# -- deciding --------------------------------------------------------------------------------------


@dataclass
class _Verdict:
    decision: str
    reason: str
    fields: dict[str, Any]


def decide_run(run_id: int) -> ScheduleRun:
    """Champion/challenger on the run's evaluation split, then promote, request or keep.

    Scoring runs outside any transaction (it takes seconds); then, with the run's row locked and
    still undecided, the promotion (through the gate) and the decision are written together, so
    a decision delivered twice promotes once.
    """
    run = ScheduleRun.objects.select_related(
        "schedule__pool__profile", "schedule__model", "schedule__team", "job", "dataset"
    ).get(pk=run_id)
    if run.decision != Decision.RUNNING:
        return run
    try:
        verdict = _judge(run)
    except Exception as exc:  # noqa: BLE001 - whatever happened is the run's recorded reason
        log.exception("schedule run %s: deciding failed", run.pk)
        why = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        verdict = _Verdict(Decision.FAILED, f"the decision could not be made: {why}", {})
    try:
        recorded = _apply(run, verdict)
    except Exception as exc:  # noqa: BLE001 - a gate error is recorded, not retried forever
        log.exception("schedule run %s: promoting failed", run.pk)
        verdict = _Verdict(
            Decision.FAILED, f"the promotion failed: {type(exc).__name__}: {exc}", {}
        )
        recorded = _conclude(run, verdict.decision, verdict.reason, **verdict.fields)
    run.refresh_from_db()
    if recorded and run.decision in (Decision.PROMOTED, Decision.REQUESTED, Decision.FAILED):
        _notify(run)
    return run


def _judge(run: ScheduleRun) -> _Verdict:
    """What the run should decide, before anything is written: challenger, champion, scores."""
    # Here, not at the top: it loads the engines, which the web process never needs.
    from pipelines.challenge import challenge

    schedule = run.schedule
    profile = schedule.pool.profile
    cert = (
        Certification.objects.filter(job_id=run.job_id, profile=profile)
        .select_related("version", "profile")
        .order_by("-pk")
        .first()
    )
    if cert is None:
        return _Verdict(Decision.FAILED, f"job {run.job_id} certified nothing on {profile.key}", {})
    challenger = cert.version
    fields: dict[str, Any] = {"challenger": challenger}
    checked = validity(cert)
    if not checked.valid:
        reasons = "; ".join(checked.reasons)
        why = f"challenger v{challenger.number}'s certificate {checked.state} ({reasons})"
        return _Verdict(Decision.KEPT, why, fields)
    champion = champion_of(schedule.model, schedule.pool)
    fields["champion"] = champion
    if champion is None:
        return _Verdict(Decision.PROMOTED, "no production version yet", fields)
    if champion.pk == challenger.pk:
        return _Verdict(Decision.KEPT, f"v{challenger.number} already serves in production", fields)
    if run.dataset is None:
        return _Verdict(Decision.FAILED, "the run's dataset was deleted; cannot score", fields)
    result = challenge(
        version_artifact(champion, f"champion-v{champion.number}"),
        version_artifact(challenger, f"challenger-v{challenger.number}"),
        dataset_ref(run.dataset),
        schedule.eval_split,
        schedule.model.task,
        bases=(adapter_base(champion), adapter_base(challenger)),
    )
    fields.update(
        metric=result.metric,
        champion_score=result.champion,
        challenger_score=result.challenger,
    )
    why = (
        f"challenger {result.challenger:.4g} vs champion {result.champion:.4g} "
        f"({result.metric} on {run.dataset} {result.split}, margin {schedule.margin:g})"
    )
    if result.margin_won(schedule.margin):
        return _Verdict(Decision.PROMOTED, why, fields)
    return _Verdict(Decision.KEPT, why, fields)


def _apply(run: ScheduleRun, verdict: _Verdict) -> bool:
    """Promote (when the verdict says so) and record the decision, with the run's row locked."""
    schedule = run.schedule
    with transaction.atomic():
        locked = ScheduleRun.objects.select_for_update().filter(pk=run.pk).first()
        if locked is None or locked.decision != Decision.RUNNING:
            return False
        decision, reason = verdict.decision, verdict.reason
        if decision == Decision.PROMOTED:
            outcome = promote(
                model=schedule.model,
                version=verdict.fields["challenger"],
                pool=schedule.pool,
                stage=Stage.PRODUCTION,
                actor=None,
                actor_label=f"schedule {schedule.name}",
                reason=f"scheduled run {run.pk}: {reason}",
            )
            if outcome.status == "pending":
                decision, reason = Decision.REQUESTED, f"{reason}; {outcome.reason}"
            elif outcome.status != "promoted":
                decision, reason = Decision.KEPT, f"the gate refused: {outcome.reason}"
        return _conclude(run, decision, reason, **verdict.fields)


# -- notifications ---------------------------------------------------------------------------------


def run_url(run: ScheduleRun) -> str:
    try:
        path = run.schedule.get_absolute_url()
    except NoReverseMatch:
        path = f"/schedules/{run.schedule_id}/"
    return settings.R1_PUBLIC_URL + path


def notification_payload(run: ScheduleRun) -> dict[str, Any]:
    """What a webhook receives about a run: plain JSON, every version by number."""
    schedule = run.schedule
    return {
        "schedule": {"id": schedule.pk, "name": schedule.name},
        "run_id": run.pk,
        "model": schedule.model.name,
        "pool": schedule.pool.name,
        "decision": run.decision,
        "reason": run.reason,
        "champion_version": run.champion.number if run.champion else None,
        "challenger_version": run.challenger.number if run.challenger else None,
        "metric": run.metric or None,
        "champion_score": run.champion_score,
        "challenger_score": run.challenger_score,
        "job_id": run.job_id,
        "dataset": str(run.dataset) if run.dataset else None,
        "url": run_url(run),
    }


def _notify(run: ScheduleRun) -> None:
    """Tell the team; a notification that cannot be sent is logged and changes no decision."""
    events = {
        Decision.FAILED: notifications.SCHEDULE_RUN_FAILED,
        Decision.PROMOTED: notifications.SCHEDULE_RUN_PROMOTED,
        Decision.REQUESTED: notifications.SCHEDULE_RUN_REQUESTED,
    }
    event = events.get(run.decision)
    if event is None:
        return
    try:
        notifications.notify(run.schedule.team, event, notification_payload(run))
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("schedule run %s: could not notify %s", run.pk, event)
