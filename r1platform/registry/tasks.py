"""The registry's Celery task (found by ``app.autodiscover_tasks``); beat sends it every minute."""

from __future__ import annotations

from r1platform.celery import app
from r1platform.queues import TaskName
from r1platform.registry.mirror import mirror_pending


@app.task(name=TaskName.MIRROR_VERSIONS.value, ignore_result=True)
def mirror_versions() -> int:
    """Mirror to MLflow the versions whose mirror is pending (MLflow was down at the time)."""
    return mirror_pending()
