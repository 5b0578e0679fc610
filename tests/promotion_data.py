"""What the promotion tests share: a live profile, a pool on it, versions with real certificates.

Certificates are made the way production makes them: ``launch_certification`` queues the
certify job (the broker is replaced by a list), then ``record_suite`` takes the report a worker
would send, built from the pipelines' report models (``tests.certification_data``).
"""

from __future__ import annotations

import os

import pytest

from r1platform.accounts.models import Membership
from r1platform.certification.models import Certification
from r1platform.certification.services import launch_certification
from r1platform.core import storage
from r1platform.deployments.models import PromotionPolicy, ServingPool
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import register_version
from r1platform.workers.services import beat
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    finish,
    ort_fixture,
    profiles_fixture,
)


@pytest.fixture(name="pool")
def pool_fixture(ort) -> ServingPool:
    """A serving pool on this machine's onnxruntime profile."""
    return ServingPool.objects.create(name="cpu-a", profile=ort)


@pytest.fixture(name="carol")
def carol_fixture(team, django_user_model):
    """A second member of team A: the one who approves alice's requests."""
    member = django_user_model.objects.create_user("carol", password="pw-carol-123")
    Membership.objects.create(team=team, user=member)
    return member


def certify(version: ModelVersion, profile, level: str = "basic") -> Certification:
    """A passed certification of ``version`` on ``profile`` at ``level``, as a worker records it."""
    # The worker beats as a live one does (every second), however long the setup has taken.
    beat(WORKER)
    cert = launch_certification(
        version=version, profile_key=profile.key, level=level, user=version.created_by
    )
    return finish(cert)


def next_version(version: ModelVersion) -> ModelVersion:
    """The model's next version: a stored copy of ``version``'s file, as a job would register."""
    relative, sha, size = storage.store_copy(
        storage.media_path(version.file), kind="models", team_id=version.team_id, suffix=".onnx"
    )
    return register_version(
        version.model,
        relative_file=relative,
        sha256=sha,
        size_bytes=size,
        format=version.format,
        precision=version.precision,
        inputs=version.inputs,
        outputs=version.outputs,
        parent=version,
        user=version.created_by,
    )


def rewrite(version: ModelVersion) -> None:
    """Flip one byte of the version's stored file, so its certificates stop holding."""
    path = storage.media_path(version.file)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # A later rewrite has a later mtime; the hash cache keys on it (see test_certification).
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def set_policy(team, *, level: str = "basic", approval: bool = False) -> PromotionPolicy:
    policy, _ = PromotionPolicy.objects.update_or_create(
        team=team, defaults={"required_level": level, "require_approval": approval}
    )
    return policy
