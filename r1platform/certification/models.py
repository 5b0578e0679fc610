"""Certificates: the verdict of the certification suite on one version, for one profile."""

from __future__ import annotations

from django.conf import settings as django_settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from r1platform.accounts.models import Team


class Level(models.TextChoices):
    BASIC = "basic"
    PERFORMANCE = "performance"
    SCENARIO = "scenario"


class CertStatus(models.TextChoices):
    PENDING = "pending"  # its job is queued or running
    PASSED = "passed"  # every check of the level passed (not_run checks do not fail it)
    FAILED = "failed"  # a check failed: a verdict, with a full report
    ERROR = "error"  # the job ended without a report (see job.error)


class Certification(models.Model):
    """One run of the suite. A passed one is a certificate while ``validity`` says so."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="certifications")
    version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="certifications"
    )
    profile = models.ForeignKey(
        "workers.HardwareProfile", on_delete=models.PROTECT, related_name="certifications"
    )
    level = models.CharField(max_length=12, choices=Level.choices)
    status = models.CharField(
        max_length=10, choices=CertStatus.choices, default=CertStatus.PENDING, db_index=True
    )
    job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="certifications"
    )
    # The certify stage's settings as validated (thresholds as asked; the report holds them with
    # every default filled in).
    settings = models.JSONField(default=dict)
    golden_dataset = models.ForeignKey(
        "datasets.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # What the certificate binds, copied when the suite finished.
    engine_sha256 = models.CharField(max_length=64, blank=True)
    profile_snapshot = models.JSONField(default=dict, blank=True)
    suite_version = models.CharField(max_length=20, blank=True)
    report = models.JSONField(null=True, blank=True, help_text="pipelines SuiteReport, as JSON")
    # The rendered reports, relative to MEDIA_ROOT.
    report_json = models.CharField(max_length=500, blank=True)
    report_html = models.CharField(max_length=500, blank=True)
    report_pdf = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # A job certifies a version once, however often the job is delivered.
            models.UniqueConstraint(
                fields=["job", "version"],
                condition=models.Q(job__isnull=False),
                name="one_certification_per_job_version",
            )
        ]
        indexes = [models.Index(fields=["version", "profile", "status"])]

    def __str__(self) -> str:
        return f"certification {self.pk} of {self.version} ({self.level}, {self.status})"

    def get_absolute_url(self) -> str:
        return reverse("certification:detail", args=[self.pk])


class CriteriaPolicy(models.Model):
    """A team's certification criteria where they differ from the source's (99.9% API success,
    500 QPS per card). A certification's own thresholds still override them; the success rate
    can only be raised (CertifySettings refuses less than 0.999)."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="criteria_policy")
    min_success_rate = models.FloatField(
        null=True, blank=True, help_text="API success rate a certificate needs (0.999 to 1)"
    )
    min_qps_per_card = models.FloatField(
        null=True, blank=True, help_text="QPS per card a performance certificate needs"
    )

    def __str__(self) -> str:
        found = [
            f"{label} {value:g}"
            for label, value in (
                ("success rate", self.min_success_rate),
                ("QPS per card", self.min_qps_per_card),
            )
            if value is not None
        ]
        return f"{self.team}: {', '.join(found) or 'the source criteria'}"

    def thresholds(self) -> dict[str, float]:
        """The certify thresholds this policy sets."""
        found = {
            "min_success_rate": self.min_success_rate,
            "min_qps_per_card": self.min_qps_per_card,
        }
        return {name: value for name, value in found.items() if value is not None}
