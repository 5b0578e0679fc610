"""gunicorn's settings for the web service (``gunicorn -c gunicorn.conf.py r1platform.wsgi``).

With ``PROMETHEUS_MULTIPROC_DIR`` set, each gunicorn worker writes its metric samples to a file
of its own there, and ``/metrics`` (any worker) adds every file up.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("R1_WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("R1_WEB_WORKERS", "3"))
# Uploads of large models are streamed to disk inside one request.
timeout = int(os.environ.get("R1_WEB_TIMEOUT", "300"))
# One request per connection, then the connection is closed ("Connection: close"): a request
# refused before its body was read (over the size limit, see core.middleware) is never drained.
# A keep-alive worker class (gthread) would read the refused body to reach the next request.
worker_class = "sync"


def on_starting(server: Any) -> None:
    # The master, before any worker exists: files left by an earlier run of this service would be
    # added to this run's. Only this folder's own files go; services that share the volume keep
    # theirs in folders below it.
    from r1platform.monitoring.multiprocess import ensure_folder, wipe

    path = ensure_folder()
    if path is not None:
        wipe(path)


def child_exit(server: Any, worker: Any) -> None:
    # prometheus-client's bookkeeping for a worker that ended (its live gauges are dropped).
    from r1platform.monitoring.multiprocess import process_dead

    process_dead(worker.pid)
