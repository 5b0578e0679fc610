"""Workers and the hardware profiles they report when they start."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from r1platform.queues import profile_queue


class HardwareProfile(models.Model):
    """One runtime on one kind of device (``pipelines.certification.profiles.HardwareProfile``).

    ``key`` names the hardware and runtime, not the runtime's version: a worker reporting a new
    version on the same hardware updates ``backend_version`` here, and certificates taken under
    the old version stop being valid.
    """

    key = models.CharField(max_length=100, unique=True)
    backend = models.CharField(max_length=30)
    backend_version = models.CharField(max_length=60)
    device_kind = models.CharField(max_length=10)
    device_name = models.CharField(max_length=200)
    compute_capability = models.CharField(max_length=10, blank=True)
    isa = models.JSONField(default=list, blank=True)
    driver_version = models.CharField(max_length=60, blank=True)
    cuda_version = models.CharField(max_length=30, blank=True)
    total_memory_mb = models.FloatField(default=0.0)
    extra = models.JSONField(default=dict, blank=True)
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["backend", "device_kind", "device_name"]

    def __str__(self) -> str:
        return self.key

    @property
    def queue(self) -> str:
        return profile_queue(self.key)

    @property
    def label(self) -> str:
        return self.as_pipeline().label

    def as_pipeline(self):  # -> pipelines.certification.profiles.HardwareProfile
        from pipelines.certification.profiles import HardwareProfile as Profile

        return Profile(
            backend=self.backend,
            backend_version=self.backend_version,
            device_kind=self.device_kind,
            device_name=self.device_name,
            compute_capability=self.compute_capability,
            isa=tuple(self.isa),
            driver_version=self.driver_version,
            cuda_version=self.cuda_version,
            total_memory_mb=self.total_memory_mb,
            extra=dict(self.extra),
        )


class Worker(models.Model):
    """A Celery worker as it reported itself: host, queues, profiles, and its last beat."""

    hostname = models.CharField(max_length=200, unique=True)
    queues = models.JSONField(default=list)
    profiles = models.ManyToManyField(HardwareProfile, related_name="workers", blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    # The GPUs' last sample, taken at the last beat (``gpu_workers.nvml.GpuSample.as_dict``
    # each); empty on a worker without a GPU. /metrics and the workers page read it.
    gpus = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname
