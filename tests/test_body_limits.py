"""Request bodies over the limit are refused unread, on a real gunicorn and a real dev server.

Each test starts the server as a process on a free port and talks raw HTTP over a socket, so a
declared length can be far larger than what is sent: a server that reads (or drains) the body
waits for bytes that never come, and the client times out. The web process's memory is read
from ``/proc`` (VmHWM, its peak) before and after.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from django.test import RequestFactory

from r1platform.core.middleware import BodyLimitMiddleware
from tests.conftest import ROOT, platform_env, stop_process_group

MiB = 1024 * 1024
LIMIT = 8 * MiB  # R1_MAX_UPLOAD_BYTES of the servers started here
BOUNDARY = "r1-test-boundary"


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen
    port: int
    log: Path

    def web_pid(self) -> int:
        """The process that runs Django: gunicorn's (one) worker, or the dev server itself."""
        if self.kind == "runserver":
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def memory_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.web_pid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc status")

    def reset_peak(self) -> None:
        # Writing 5 to clear_refs resets VmHWM to the current RSS.
        Path(f"/proc/{self.web_pid()}/clear_refs").write_text("5")


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(kind: str, port: int) -> list[str]:
    if kind == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "r1platform.wsgi"]
    return [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]


@pytest.fixture(params=["gunicorn", "runserver"])
def server(request, transactional_db, tmp_path) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / "server.log"
    env = platform_env(
        R1_WEB_BIND=f"127.0.0.1:{port}",
        R1_WEB_WORKERS="1",
        R1_MAX_UPLOAD_BYTES=str(LIMIT),
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _command(request.param, port),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = Server(request.param, proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            with suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=20).ok:
                    break
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield srv
    finally:
        stop_process_group(proc)


def http(
    srv: Server,
    method: str,
    path: str,
    head: bytes,
    headers: dict[str, str],
    *,
    send: int = 0,
    filler: bytes = b"\0",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send a request line, ``headers``, ``head`` then ``send`` bytes of ``filler`` (from a
    thread, as a client uploading would, ignoring the server hanging up), and read the answer."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    with closing(sock):
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: 127.0.0.1",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + head)

        def body() -> None:
            chunk = filler * (64 * 1024 // len(filler))
            with suppress(OSError):
                for _ in range(send // len(chunk)):
                    sock.sendall(chunk)

        sender = threading.Thread(target=body, daemon=True)
        sender.start()
        answer = b""
        # Until the server closes the connection: one that keeps it open times out here.
        with suppress(ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
        assert answer, "the server answered nothing"
        status_line, _, rest = answer.partition(b"\r\n")
        header_block, _, content = rest.partition(b"\r\n\r\n")
        parsed = {}
        for line in header_block.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            parsed[key.strip().lower()] = value.strip()
        return int(status_line.split()[1]), parsed, content


def multipart_head(filename: str = "model.onnx") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def upload_headers(token: str, length: int) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# -- real servers ---------------------------------------------------------------------------------


def test_a_declared_3_gb_upload_is_refused_unread_and_memory_stays_flat(server, token):
    server.reset_peak()
    before = server.memory_kib("VmRSS")

    for filler in (b"\0", b"\n"):  # one "line" of zeros; newlines, each a line
        started = time.monotonic()
        status, headers, content = http(
            server, "POST", "/api/v1/models", multipart_head(), upload_headers(token, 3 * 1024**3),
            send=6 * MiB, filler=filler,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert status == 413, content
        assert b"over the 8.0 MiB limit" in content
        assert headers.get("connection") == "close"
        assert elapsed < 5, f"the refusal took {elapsed:.1f} s"

    grown_mib = (server.memory_kib("VmHWM") - before) / 1024
    assert grown_mib < 50, f"the web process grew by {grown_mib:.0f} MiB"


def test_a_multipart_upload_over_the_limit_leaves_no_file(server, token, media):
    # Declared over the limit: refused before the file is read.
    status, headers, _ = http(
        server, "POST", "/api/v1/models", multipart_head(), upload_headers(token, LIMIT + 2 * MiB),
        send=LIMIT + MiB,
    )  # fmt: skip
    assert status == 413 and headers.get("connection") == "close"

    # Declared within the form's margin, the file itself over the limit: cut while streamed.
    size = LIMIT + 256 * 1024
    head, tail = multipart_head(), f"\r\n--{BOUNDARY}--\r\n".encode()
    status, headers, content = http(
        server, "POST", "/api/v1/models", head, upload_headers(token, len(head) + size + len(tail)),
        send=size,
    )  # fmt: skip
    assert status == 413, content
    assert b"limit" in content
    assert headers.get("connection") == "close"
    assert files_under(media) == []


def test_other_routes_are_bounded_and_chunked_bodies_refused(server, token):
    started = time.monotonic()
    status, headers, content = http(
        server, "POST", "/api/v1/jobs", b"{",
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
         "Content-Length": str(600 * MiB)},
        send=4 * MiB, filler=b"\n",
    )  # fmt: skip
    assert status == 413, content
    assert b"over the 2.0 MiB limit" in content
    assert headers.get("connection") == "close"
    assert time.monotonic() - started < 5

    # A body of unknown length (chunked) is refused too: Django would read none of it.
    chunked = upload_headers(token, 0)
    del chunked["Content-Length"]
    chunked["Transfer-Encoding"] = "chunked"
    status, headers, content = http(
        server, "POST", "/api/v1/models", b"10000\r\n", chunked, send=4 * MiB
    )
    assert status == 411, content
    assert b"Content-Length" in content
    assert headers.get("connection") == "close"


# -- the middleware alone -------------------------------------------------------------------------


def test_the_middleware_refuses_without_calling_the_view(settings):
    settings.R1_MAX_UPLOAD_BYTES = 1000
    called = []
    middleware = BodyLimitMiddleware(lambda request: called.append(request))
    factory = RequestFactory()

    over = factory.post("/models/upload/", b"x", content_type="text/plain")
    over.META["CONTENT_LENGTH"] = str(1000 + 2 * MiB)
    response = middleware(over)
    assert response.status_code == 413
    assert "over the 1000 B limit" in response.content.decode()

    bad = factory.post("/api/v1/jobs", b"x", content_type="application/json")
    bad.META["CONTENT_LENGTH"] = "12abc"
    assert middleware(bad).status_code == 400
    assert called == []

    within = factory.post("/models/upload/", b"x" * 10, content_type="text/plain")
    middleware(within)
    assert called == [within]
