"""Serving pools, what each model serves in them (staging, production), and every decision made.

A pool serves one hardware profile. A ``Deployment`` row says which version of a model a pool
serves at a stage; only ``deployments.services`` writes it, through the certification gate.
"""

from __future__ import annotations

from django.conf import settings as django_settings
from django.db import models
from django.utils import timezone

from r1platform.accounts.models import Team
from r1platform.certification.models import Level


class ServingPool(models.Model):
    """Serving processes (`manage.py serve --pool NAME`) for one hardware profile."""

    name = models.SlugField(max_length=60, unique=True)
    profile = models.ForeignKey(
        "workers.HardwareProfile", on_delete=models.PROTECT, related_name="pools"
    )
    description = models.CharField(max_length=200, blank=True)
    # Dynamic batching: a request waits at most this long for others to fill a batch.
    max_queue_delay_ms = models.FloatField(default=5.0)
    max_batch_size = models.PositiveIntegerField(default=32)
    # Where the dashboard reaches the pool's serving process (the playground), e.g.
    # http://127.0.0.1:8100; empty: the dashboard does not reach it.
    url = models.URLField(blank=True, default="")
    # What decodes a language model here: the serving process's own engine (ONNX Runtime GenAI or
    # transformers on the CPU), or an engine server it starts, supervises and proxies to.
    text_engine = models.CharField(
        max_length=16,
        choices=[("builtin", "built in"), ("vllm", "vLLM"), ("trtllm", "TensorRT-LLM")],
        default="builtin",
    )
    # Engine servers per language-model deployment behind the serving process (vllm, trtllm).
    engine_replicas = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PromotionPolicy(models.Model):
    """What a team requires before a version serves: a certificate level, and maybe approval."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="promotion_policy")
    required_level = models.CharField(max_length=12, choices=Level.choices, default=Level.BASIC)
    require_approval = models.BooleanField(
        default=False, help_text="a promotion waits for another member of the team to approve it"
    )

    def __str__(self) -> str:
        return f"{self.team}: {self.required_level}{' + approval' if self.require_approval else ''}"


class Stage(models.TextChoices):
    STAGING = "staging"
    PRODUCTION = "production"


class Deployment(models.Model):
    """The version a pool serves for a model at a stage (one row per model, pool and stage)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="deployments")
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.CASCADE, related_name="deployments"
    )
    pool = models.ForeignKey(ServingPool, on_delete=models.PROTECT, related_name="deployments")
    stage = models.CharField(max_length=12, choices=Stage.choices)
    version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="deployments"
    )
    # What served before: the target of a rollback.
    previous_version = models.ForeignKey(
        "registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    certification = models.ForeignKey(
        "certification.Certification", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Bumped on every change, so a serving process sees a swap with one cheap query.
    generation = models.PositiveIntegerField(default=1)
    updated_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "pool", "stage"], name="one_deployment")
        ]
        ordering = ["model", "pool", "stage"]

    def __str__(self) -> str:
        return f"{self.model} {self.stage} on {self.pool}: v{self.version.number}"


class RequestStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"  # and applied
    REJECTED = "rejected"
    REFUSED = "refused"  # approved, but the gate refused it when applied
    SUPERSEDED = "superseded"  # another promotion of the same slot happened first


class PromotionRequest(models.Model):
    """A promotion waiting for another member of the team to approve it."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="promotion_requests")
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.CASCADE, related_name="promotion_requests"
    )
    pool = models.ForeignKey(ServingPool, on_delete=models.CASCADE, related_name="+")
    stage = models.CharField(max_length=12, choices=Stage.choices)
    version = models.ForeignKey("registry.ModelVersion", on_delete=models.CASCADE, related_name="+")
    status = models.CharField(
        max_length=12, choices=RequestStatus.choices, default=RequestStatus.PENDING, db_index=True
    )
    reason = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_label = models.CharField(max_length=200, blank=True)
    decided_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    decision_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"request #{self.pk}: {self.version} to {self.stage} on {self.pool} ({self.status})"


class Action(models.TextChoices):
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    REQUESTED = "requested"
    APPROVED = "approved"
    REJECTED = "rejected"


class AuditEvent(models.Model):
    """Every promotion, rollback, refusal and approval: who, when, what and why."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="audit_events")
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.CASCADE, related_name="audit_events"
    )
    pool = models.ForeignKey(ServingPool, null=True, on_delete=models.SET_NULL, related_name="+")
    stage = models.CharField(max_length=12, choices=Stage.choices, blank=True)
    action = models.CharField(max_length=12, choices=Action.choices, db_index=True)
    version = models.ForeignKey(
        "registry.ModelVersion", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    previous_version = models.ForeignKey(
        "registry.ModelVersion", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor = models.ForeignKey(
        django_settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Who, when it is not a signed-in person: "token <name>", "schedule 3", "admin".
    actor_label = models.CharField(max_length=200, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.action} {self.model} {self.stage} ({self.created_at:%Y-%m-%d %H:%M})"
