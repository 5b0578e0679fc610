from __future__ import annotations

from django.db import models

from r1platform.deployments.models import ServingPool, Stage


class ServingWindow(models.Model):
    """What one pool's serving process answered for one model version over one window.

    Written by the process every ``R1_SERVING_STATS_SECONDS`` (``serving.stats``); a window whose
    write failed is folded into the next, so ``seconds`` may span several. ``latency_histogram``
    (bucket index -> count, see ``serving.stats.latency_bucket``) lets windows be added up into
    exact percentiles over any span; p50/p95/p99 are the window's own, for readers that need no
    more.
    """

    pool = models.ForeignKey(ServingPool, on_delete=models.CASCADE, related_name="windows")
    stage = models.CharField(max_length=12, choices=Stage.choices)
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.CASCADE, related_name="serving_windows"
    )
    version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="serving_windows"
    )
    started_at = models.DateTimeField()
    seconds = models.FloatField()
    requests = models.PositiveIntegerField(default=0)
    errors_4xx = models.PositiveIntegerField(default=0)
    errors_5xx = models.PositiveIntegerField(default=0)
    p50_ms = models.FloatField(null=True, blank=True)
    p95_ms = models.FloatField(null=True, blank=True)
    p99_ms = models.FloatField(null=True, blank=True)
    batches = models.PositiveIntegerField(default=0)
    batch_rows = models.PositiveBigIntegerField(default=0)
    latency_histogram = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["started_at", "pk"]
        indexes = [
            models.Index(fields=["model", "started_at"], name="window_model_time"),
            models.Index(fields=["pool", "started_at"], name="window_pool_time"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} v{self.version_id} on {self.pool_id} at {self.started_at}"

    @property
    def errors(self) -> int:
        return self.errors_4xx + self.errors_5xx

    @property
    def mean_batch_size(self) -> float | None:
        return self.batch_rows / self.batches if self.batches else None
