from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from pipelines.llm.kinds import is_text_format
from r1platform.accounts.models import Team


class Task(models.TextChoices):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    EMBEDDING = "embedding"
    TEXT_GENERATION = "text-generation", "Text generation"  # language models (pipelines.llm)
    OTHER = "other"


class Format(models.TextChoices):
    ONNX = "onnx", "ONNX"
    TORCHSCRIPT = "torchscript", "TorchScript"
    AOTINDUCTOR = "aotinductor", "AOTInductor"
    TENSORRT = "tensorrt", "TensorRT"
    # Language models (task text-generation): folders are stored as one tar.
    HF_CHECKPOINT = "hf_checkpoint", "Hugging Face checkpoint"
    GGUF = "gguf", "GGUF"
    ORT_GENAI = "ort_genai", "ONNX Runtime GenAI"
    LORA_ADAPTER = "lora_adapter", "LoRA adapter"


class MirrorState(models.TextChoices):
    """Where a version stands with the MLflow Model Registry (best effort, caught up by beat)."""

    PENDING = "pending"
    MIRRORED = "mirrored"
    FAILED = "failed"


class RegisteredModel(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=100)
    task = models.CharField(max_length=20, choices=Task.choices, default=Task.OTHER)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # Kept on the row so the models list never counts versions: it stays fast at 100k versions.
    latest_version = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)
    mlflow_name = models.CharField(max_length=200, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="model_name_per_team")]
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("registry:model_detail", args=[self.pk])


class ModelVersion(models.Model):
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="versions")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    format = models.CharField(max_length=20, choices=Format.choices)
    precision = models.CharField(max_length=10, default="fp32")
    backend = models.CharField(max_length=30, blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="produced"
    )
    # The pipeline artifact this version was made from; with ``job`` it makes registration
    # idempotent when a job is delivered again.
    artifact_key = models.CharField(max_length=80, blank=True)
    file = models.CharField(max_length=500, help_text="path relative to MEDIA_ROOT")
    original_name = models.CharField(max_length=200, blank=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    inputs = models.JSONField(default=list)
    outputs = models.JSONField(default=list)
    details = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    mlflow_version = models.CharField(max_length=20, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    # Pending until mirrored; why the last try did not; failed once MLflow refused it
    # R1_MLFLOW_MIRROR_ATTEMPTS times (unreachable tries are not counted).
    mlflow_state = models.CharField(
        max_length=10, choices=MirrorState.choices, default=MirrorState.PENDING, db_index=True
    )
    mlflow_error = models.TextField(blank=True)
    mlflow_attempts = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "number"], name="version_number_per_model"),
            models.UniqueConstraint(
                fields=["job", "artifact_key"],
                condition=models.Q(job__isnull=False),
                name="one_version_per_job_artifact",
            ),
        ]
        ordering = ["model", "-number"]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("registry:version_detail", args=[self.pk])

    @property
    def is_language_model(self) -> bool:
        """A text-generation version: its benchmark rows are requests by concurrency, tokens/s."""
        return is_text_format(self.format)

    @property
    def label(self) -> str:
        parts = [self.get_format_display(), self.precision.upper()]
        if self.backend:
            parts.append(self.backend)
        return " · ".join(parts)


class BenchmarkResult(models.Model):
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="benchmarks")
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="benchmarks")
    backend = models.CharField(max_length=30)
    device = models.CharField(max_length=200, blank=True)
    batch_size = models.PositiveIntegerField()
    p50_ms = models.FloatField()
    p90_ms = models.FloatField(null=True, blank=True)
    p95_ms = models.FloatField()
    p99_ms = models.FloatField()
    throughput = models.FloatField(help_text="samples per second")
    iterations = models.PositiveIntegerField()
    windows = models.PositiveIntegerField(default=1)
    converged = models.BooleanField(default=True, help_text="three windows agreed within 10%")
    peak_rss_mb = models.FloatField(null=True, blank=True)
    model_rss_mb = models.FloatField(null=True, blank=True)
    gpu_mem_mb = models.FloatField(null=True, blank=True)
    # Each input's shape as timed ({"input_ids": [32, 128]}): dynamic dims included.
    shapes = models.JSONField(default=dict, blank=True)
    # (max - min) / min of the p50 of the windows the row pools: 0.04 = they agreed within 4%.
    spread = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["version", "batch_size"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "version", "backend", "batch_size"], name="one_benchmark_row"
            )
        ]

    def __str__(self) -> str:
        return f"{self.version} batch {self.batch_size} on {self.backend}"
