"""The ``ModelSource`` of `manage.py serve`: one pool's deployments at one stage, and the tokens.

Read by the serving process's poller thread once a second: two small queries, the deployments
(with their versions and pool) and every API token's hash and team.
"""

from __future__ import annotations

from django.conf import settings
from django.db import close_old_connections, connection

from pipelines.backends import cache_root_for
from pipelines.core import Artifact, TensorSpec
from r1platform.accounts.models import ApiToken
from r1platform.core.storage import media_path
from r1platform.deployments.models import Deployment, Stage
from r1platform.registry.models import ModelVersion
from r1platform.serving.source import ModelSpec


def version_artifact(version: ModelVersion, key: str) -> Artifact:
    """A stored version as the artifact an engine loads."""
    return Artifact(
        key=key,
        path=str(media_path(version.file)),
        format=version.format,
        precision=version.precision,
        inputs=[TensorSpec.from_dict(t) for t in version.inputs],
        outputs=[TensorSpec.from_dict(t) for t in version.outputs],
        backend=version.backend,
        meta=dict(version.details),
    )


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
