"""Schedules listen for the end of every job: a schedule's job ending moves its run on."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from r1platform.jobs.models import Job
from r1platform.jobs.signals import job_finished
from r1platform.schedules import runs


@receiver(job_finished, dispatch_uid="schedules.job_ended")
def job_ended(sender: object, job: Job, **kwargs: Any) -> None:
    runs.job_ended(job)
