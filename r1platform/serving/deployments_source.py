"""The ``ModelSource`` of `manage.py serve`: one pool's deployments at one stage, and the tokens.

Read once a second: the deployments (with their versions and pool) by the serving process's
poller thread, the usable API tokens' hashes and teams by its tokens thread. The stats thread
writes the serving history here too (``record_windows``), on its own connection.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from pipelines.backends import cache_root_for
from r1platform.accounts.models import ApiToken
from r1platform.deployments.models import Deployment, ServingPool, Stage
from r1platform.registry.services import adapter_base, version_artifact
from r1platform.serving.models import ServingWindow
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import Window

# Serving history older than this is deleted by the process that wrote it.
KEEP_DAYS = 30
PRUNE_EVERY_SECONDS = 3600


def model_spec(deployment: Deployment) -> ModelSpec:
    """What a deployment serves, on its pool's device and batching settings."""
    version, pool = deployment.version, deployment.pool
    name = deployment.model.name
    return ModelSpec(
        team_id=deployment.team_id,
        team=deployment.team.slug,
        name=name,
        version=version.number,
        artifact=version_artifact(version, f"{name} v{version.number}"),
        sha256=version.sha256,
        revision=deployment.generation,
        device="cuda" if pool.profile.device_kind == "cuda" else "cpu",
        max_batch_size=pool.max_batch_size,
        max_queue_delay_ms=pool.max_queue_delay_ms,
        cache_root=cache_root_for(settings.R1_WORK_DIR / "serving"),
        model_id=deployment.model_id,
        version_id=version.pk,
        base=adapter_base(version),
        text_engine=pool.text_engine,
        engine_replicas=pool.engine_replicas,
    )


def window_row(window: Window, pool_id: int, stage: str) -> ServingWindow:
    return ServingWindow(
        pool_id=pool_id,
        stage=stage,
        model_id=window.spec.model_id,
        version_id=window.spec.version_id,
        started_at=datetime.fromtimestamp(window.started, UTC),
        seconds=window.seconds,
        requests=window.requests,
        errors_4xx=window.errors_4xx,
        errors_5xx=window.errors_5xx,
        p50_ms=window.quantile_ms(0.50),
        p95_ms=window.quantile_ms(0.95),
        p99_ms=window.quantile_ms(0.99),
        batches=window.batches,
        batch_rows=window.batch_rows,
        latency_histogram={str(k): v for k, v in sorted(window.latency.items())},
    )


def pool_deployments(pool: str, stage: str = Stage.PRODUCTION):  # -> QuerySet[Deployment]
    return Deployment.objects.filter(pool__name=pool, stage=stage).select_related(
        "team", "model", "version", "pool__profile"
    )


class DeploymentSource:
    def __init__(self, pool: str, stage: str = Stage.PRODUCTION) -> None:
        self.pool, self.stage = pool, stage
        self._pool_id: int | None = None
        self._pruned_at = -math.inf

    def models(self) -> list[ModelSpec]:
        # The poller thread lives for the whole process: drop a connection the server closed.
        close_old_connections()
        return [model_spec(d) for d in pool_deployments(self.pool, self.stage)]

    def token_teams(self) -> dict[str, int]:
        """Only usable tokens: not revoked, of active users still in the token's team."""
        # Read from the tokens thread (``serving.tokens``), on its own connection.
        close_old_connections()
        return dict(ApiToken.objects.usable().values_list("token_hash", "team_id"))

    def record_windows(self, windows: list[Window]) -> None:
        """One ``ServingWindow`` row per model version; rows past ``KEEP_DAYS`` go, hourly."""
        # The stats thread lives for the whole process: drop a connection the server closed.
        close_old_connections()
        if self._pool_id is None:
            self._pool_id = ServingPool.objects.values_list("pk", flat=True).get(name=self.pool)
        rows = [window_row(w, self._pool_id, self.stage) for w in windows if w.spec.version_id]
        ServingWindow.objects.bulk_create(rows)
        now = time.monotonic()
        if now - self._pruned_at > PRUNE_EVERY_SECONDS:
            cutoff = timezone.now() - timedelta(days=KEEP_DAYS)
            ServingWindow.objects.filter(pool_id=self._pool_id, started_at__lt=cutoff).delete()
            self._pruned_at = now

    def close(self) -> None:
        connection.close()
