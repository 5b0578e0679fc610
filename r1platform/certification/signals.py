"""Certification listens to jobs: a certify stage's report, and the end of every job.

``jobs`` sits below certification, so it announces (``jobs.signals``) and this module answers;
the worker's runner never imports certification.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from r1platform.certification import recording, services
from r1platform.certification.models import Certification
from r1platform.jobs.models import Job
from r1platform.jobs.signals import certification_reported, job_finished
from r1platform.registry.models import ModelVersion


@receiver(certification_reported, dispatch_uid="certification.record_suite")
def record_suite(
    sender: object, job: Job, version: ModelVersion, report: dict, **kwargs: Any
) -> Certification:
    return recording.record_suite(job, version, report)


@receiver(job_finished, dispatch_uid="certification.job_ended")
def job_ended(sender: object, job: Job, **kwargs: Any) -> None:
    services.job_ended(job)
