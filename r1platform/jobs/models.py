from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from r1platform.accounts.models import Team

LOG_TAIL_CHARS = 8000


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="jobs")
    version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="jobs"
    )
    stages = models.JSONField(help_text='[{"name": ..., "settings": {...}}, ...]')
    status = models.CharField(
        max_length=12, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    progress = models.FloatField(default=0.0)
    current_stage = models.CharField(max_length=80, blank=True)
    stage_results = models.JSONField(default=list, blank=True)
    log_tail = models.TextField(blank=True)
    error = models.TextField(blank=True)
    queue = models.CharField(max_length=120)
    idempotency_key = models.CharField(max_length=100)
    cancel_requested = models.BooleanField(default=False)
    attempts = models.PositiveIntegerField(default=0)
    worker_host = models.CharField(max_length=200, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    mlflow_experiment_id = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The outbox: when the broker last took the job's message (null: not sent yet, or the last
    # send failed; ``send_unsent_jobs`` sends it again), and how many sends were tried.
    sent_at = models.DateTimeField(null=True, blank=True)
    send_attempts = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "idempotency_key"], name="one_job_per_key")
        ]
        # /metrics counts jobs by status, stage and queue on every scrape: from this index alone,
        # without reading a row (benchmarks/bench_metrics.py: at 100,000 jobs, a scrape took 370
        # ms without it).
        indexes = [
            models.Index(fields=["status", "current_stage", "queue"], name="job_status_stage_queue")
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("jobs:job_detail", args=[self.pk])

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()

    @property
    def progress_percent(self) -> int:
        return round(self.progress * 100)
