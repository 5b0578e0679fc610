"""Prepare a fresh database for an outage test, in a process of its own; prints the job's id.

``python -m tests.outage_seed MODEL.onnx STAGES_JSON`` with ``DATABASE_URL`` naming that database:
creates its tables, a team, a member and version 1 of an ONNX model, and launches one job with
those stages (queued on the test's broker). The test process keeps its own database, so it
cannot do this itself. The tables are made from the models in one pass (as pytest-django's
``--nomigrations`` does): running every migration costs several times as long.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class _NoMigrations(dict):
    def __contains__(self, app: object) -> bool:
        return True

    def __getitem__(self, app: str) -> None:
        return None


def main(model: Path, stages: list[dict]) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from r1platform.accounts.models import Membership, Team
    from r1platform.core.storage import spool_local_file
    from r1platform.jobs.services import launch_job
    from r1platform.registry.services import upload_model

    settings.MIGRATION_MODULES = _NoMigrations()
    call_command("migrate", verbosity=0, interactive=False, run_syncdb=True)
    team = Team.objects.create(name="Outage", slug="outage")
    user = get_user_model().objects.create_user("outage", password="pw-outage-123")
    Membership.objects.create(team=team, user=user)
    version = upload_model(
        team=team, user=user, name="mlp", task="classification", uploaded=spool_local_file(model)
    )
    job, _ = launch_job(version=version, user=user, stages=stages)
    return job.pk


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), json.loads(sys.argv[2])))
