"""The ``ModelSource`` of `manage.py serve`: one pool's deployments at one stage, and the tokens.

Read by the serving process's poller thread once a second: two small queries, the deployments
(with their versions and pool) and every API token's hash and team.
"""

from __future__ import annotations

from django.conf import settings
from django.db import close_old_connections, connection

from pipelines.backends import cache_root_for
from r1platform.accounts.models import ApiToken
from r1platform.deployments.models import Deployment, Stage
from r1platform.registry.services import version_artifact
from r1platform.serving.source import ModelSpec


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
    )


def pool_deployments(pool: str, stage: str = Stage.PRODUCTION):  # -> QuerySet[Deployment]
    return Deployment.objects.filter(pool__name=pool, stage=stage).select_related(
        "team", "model", "version", "pool__profile"
    )


class DeploymentSource:
    def __init__(self, pool: str, stage: str = Stage.PRODUCTION) -> None:
        self.pool, self.stage = pool, stage

    def models(self) -> list[ModelSpec]:
        # The poller thread lives for the whole process: drop a connection the server closed.
        close_old_connections()
        return [model_spec(d) for d in pool_deployments(self.pool, self.stage)]

    def token_teams(self) -> dict[str, int]:
        return dict(ApiToken.objects.values_list("token_hash", "team_id"))

    def close(self) -> None:
        connection.close()
