from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from r1platform.accounts.models import Team


def default_splits() -> dict[str, float]:
    return {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 0}


class Dataset(models.Model):
    """One uploaded file of a named dataset; uploading the same name again makes the next version.

    A row never changes after upload, so a job that names its id always reads the same data.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=100)
    version = models.PositiveIntegerField()
    format = models.CharField(max_length=10)
    file = models.CharField(max_length=500, help_text="path relative to MEDIA_ROOT")
    original_name = models.CharField(max_length=200, blank=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    rows = models.PositiveBigIntegerField()
    schema = models.JSONField(default=dict)
    target = models.CharField(max_length=100, blank=True)
    splits = models.JSONField(default=default_splits)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "name", "version"], name="dataset_version")
        ]
        ordering = ["name", "-version"]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    def get_absolute_url(self) -> str:
        return reverse("datasets:dataset_detail", args=[self.pk])
