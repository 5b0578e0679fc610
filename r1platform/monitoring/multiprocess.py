"""prometheus-client's multiprocess mode, for the processes that write metrics.

A process is in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set before it first imports
prometheus-client. Its folder must exist before the first sample is written; the processes that
start the platform wipe it when they start (``manage.py up``, gunicorn's master for its own files),
because files of an earlier run would otherwise be added to this one's.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def ensure_folder() -> Path | None:
    """Create this process's folder if multiprocess mode is on; its path, else None."""
    path = folder()
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path


def wipe(path: Path, recursive: bool = False) -> None:
    """Remove the sample files under ``path`` (only them: the folder may be a mount point)."""
    if not path.is_dir():
        return
    for file in path.rglob("*.db") if recursive else path.glob("*.db"):
        file.unlink(missing_ok=True)


def process_dead(pid: int) -> None:
    """A process of this folder ended: drop its live gauges (prometheus-client's bookkeeping)."""
    path = folder()
    if path is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))
