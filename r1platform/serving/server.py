"""Running the serving app on uvicorn: in the foreground (`manage.py serve`) or in a thread.

One process per pool: dynamic batching gathers the requests one process receives, so more
processes would each batch apart. uvicorn uses httptools when it is installed (it is a
dependency), which parses HTTP several times faster than its pure-Python fallback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    # No access log: a line per request costs more than the protocol work at high rates.
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on"
    )


def serve(app: Starlette, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; queued requests are answered before the engines close."""
    uvicorn.Server(uvicorn_config(app, host, port)).run()


@contextmanager
def serving_in_thread(
    app: Starlette, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0
) -> Iterator[str]:
    """Serve ``app`` from a thread (port 0: a free one) and yield its base URL."""
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the serving app did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
