"""Pipeline templates, the schedules that run them on a model, and every run with its decision.

A schedule's timing is a django-celery-beat ``PeriodicTask`` row (cron or interval), kept in step
by ``schedules.services``; everything the platform needs to decide a run lives here.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from r1platform.accounts.models import Team


class PipelineTemplate(models.Model):
    """A team's reusable list of stages (as a job's), e.g. fine-tune → INT8 static → compile →
    certify. Settings ending in ``dataset_id`` that a template leaves out, or that name a version
    of the schedule's training dataset, are filled with that dataset's newest version at run time.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="pipeline_templates")
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=300, blank=True)
    stages = models.JSONField(help_text='[{"name": ..., "settings": {...}}, ...]')
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="one_template_name_per_team")
        ]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def stage_names(self) -> list[str]:
        return [str(stage.get("name", "?")) for stage in self.stages]


class Schedule(models.Model):
    """Run a template on a model's newest training data, then champion/challenger in a pool."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=100)
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.CASCADE, related_name="schedules"
    )
    template = models.ForeignKey(
        PipelineTemplate, on_delete=models.PROTECT, related_name="schedules"
    )
    # The training dataset by name: each run takes its newest version.
    dataset_name = models.CharField(max_length=100)
    # The split of that dataset both champion and challenger are scored on.
    eval_split = models.CharField(max_length=20, default="test")
    pool = models.ForeignKey(
        "deployments.ServingPool", on_delete=models.PROTECT, related_name="schedules"
    )
    # Exactly one of the two is set: a five-field cron expression (UTC) or an interval.
    cron = models.CharField(max_length=100, blank=True)
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    # How much the challenger must beat the champion by, in the task metric's own units
    # (accuracy points for classifiers: 0.01 is one point; MSE for regression, lower is better).
    margin = models.FloatField(default=0.0)
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="r1_schedule",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="one_schedule_name_per_team"),
            models.CheckConstraint(
                condition=(
                    (models.Q(cron="") & models.Q(interval_seconds__isnull=False))
                    | (~models.Q(cron="") & models.Q(interval_seconds__isnull=True))
                ),
                name="schedule_cron_xor_interval",
            ),
        ]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("schedules:schedule_detail", args=[self.pk])

    @property
    def timing(self) -> str:
        return self.cron if self.cron else f"every {self.interval_seconds} s"


class Decision(models.TextChoices):
    RUNNING = "running"  # the job was launched; no decision yet
    SKIPPED = "skipped"  # nothing launched: the data has not changed, or the last run still goes
    PROMOTED = "promoted"  # the challenger now serves in production
    REQUESTED = "requested"  # a promotion request waits for approval
    KEPT = "kept"  # the champion stays: the challenger did not win, or holds no valid certificate
    FAILED = "failed"  # the job failed, or the decision could not be made


DECIDED = (Decision.SKIPPED, Decision.PROMOTED, Decision.REQUESTED, Decision.KEPT, Decision.FAILED)


class ScheduleRun(models.Model):
    """One tick of a schedule (or a "run now"): what it ran, what it decided, and why."""

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="runs")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    trigger = models.CharField(max_length=10, default="beat")  # beat | manual
    dataset = models.ForeignKey(
        "datasets.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    job = models.OneToOneField(
        "jobs.Job",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="schedule_run",
    )
    decision = models.CharField(
        max_length=10, choices=Decision.choices, default=Decision.RUNNING, db_index=True
    )
    reason = models.TextField(blank=True)
    champion = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    challenger = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    metric = models.CharField(max_length=40, blank=True)
    champion_score = models.FloatField(null=True, blank=True)
    challenger_score = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.schedule}: {self.decision}"


class BeatLease(models.Model):
    """Who may send scheduled tasks: the one beat process whose lease has not expired.

    ``schedules.beat.LeaderScheduler`` takes the row with a conditional UPDATE (free when expired,
    or already its own) and renews it on every tick; a second beat started by mistake finds it
    held and sends nothing until the first stops renewing.
    """

    name = models.CharField(max_length=40, primary_key=True)
    holder = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField()
    acquired_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"beat lease {self.name}: {self.holder or 'free'} until {self.expires_at}"
