"""A PostgreSQL restart in the middle of a job: beat stays up, the worker reconnects, the job ends.

The test runs its own PostgreSQL server (``tests.own_postgres``) so it can stop and start it, and
points a real worker and a real beat process at it; it runs the same on either CI configuration.
Before the fix beat exited on its first tick without the database, the worker's beat thread kept
its dead connection for good (the worker shown lost, certifications refused), and the job stayed
``running``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from tests.conftest import ROOT, platform_env, running_worker, stop_process_group
from tests.own_postgres import OwnPostgres, available

pytestmark = [
    pytest.mark.worker,
    pytest.mark.skipif(available() is not None, reason=f"no private PostgreSQL: {available()}"),
]

OUTAGE_SECONDS = 10
# A benchmark of the upload alone, about 1.5 s per batch size: it runs on across the outage.
SLOW_BENCHMARK = {
    "name": "benchmark",
    "settings": {
        "batch_sizes": list(range(1, 17)),
        "warmup": 2,
        "iterations": 5,
        "min_seconds": 0.4,
        "agreement": 0.0,
        "max_windows": 3,
    },
}


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        server.start()
        server.wait_ready()
        server.create_database("r1_outage")
        yield server
    finally:
        server.remove()


def _query(url: str, sql: str, *args: object) -> tuple:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return conn.execute(sql, args).fetchone()


def _start_beat(tmp_path, env: dict[str, str]) -> subprocess.Popen:
    log_path = tmp_path / "beat.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", "r1platform", "beat", "--loglevel", "INFO",
        "-s", str(tmp_path / "beat-schedule"),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def _wait(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_database_restart_mid_job_is_survived(own_postgres, mlp_onnx, tmp_path):
    url = own_postgres.url("r1_outage")
    env = {"DATABASE_URL": url, "R1_BEAT_LEASE_SECONDS": "4"}
    # Seeding and the worker's start each spend most of their time importing: side by side.
    seed = subprocess.Popen(
        [sys.executable, "-m", "tests.outage_seed", str(mlp_onnx), json.dumps([SLOW_BENCHMARK])],
        cwd=ROOT,
        env=platform_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    beat = None
    try:
        with running_worker(tmp_path / "worker.log", **env) as worker:
            out, err = seed.communicate(timeout=120)
            assert seed.returncode == 0, err[-3000:]
            job_id = int(out.split()[-1])
            beat = _start_beat(tmp_path, platform_env(**env))
            _wait("beat to lead", lambda: "leader, sending" in beat.log_path.read_text(), 60)
            _wait(
                "the job to run",
                lambda: _query(url, "SELECT progress FROM jobs_job WHERE id = %s", job_id)[0] > 0,
                60,
            )
            finished = _query(url, "SELECT finished_at FROM jobs_job WHERE id = %s", job_id)[0]
            assert finished is None, "the job ended before the outage: make it longer"
            # Recorded even though it was ready before its tables existed (the seed ran late).
            _wait(
                "the worker to be recorded",
                lambda: _query(url, "SELECT count(*) FROM workers_worker")[0] == 1,
                10,
            )

            own_postgres.stop()
            time.sleep(OUTAGE_SECONDS)
            own_postgres.start()
            back = datetime.now(UTC)

            # The worker beats on a new connection: it is live again, not lost.
            _wait(
                "the worker's beat",
                lambda: _query(url, "SELECT max(last_seen) FROM workers_worker")[0] > back,
                15,
            )
            # Beat is still up, and took the lease again on a new connection.
            assert beat.poll() is None, f"beat exited:\n{beat.log_path.read_text()[-3000:]}"
            _wait(
                "beat to lead again",
                lambda: beat.log_path.read_text().count("leader, sending") >= 2,
                15,
            )

            _wait(
                "the job's end",
                lambda: _query(url, "SELECT finished_at FROM jobs_job WHERE id = %s", job_id)[0],
                60,
            )
            status, error, attempts = _query(
                url, "SELECT status, error, attempts FROM jobs_job WHERE id = %s", job_id
            )
            assert (status, error, attempts) == ("succeeded", "", 1)
            rows = _query(
                url, "SELECT count(*) FROM registry_benchmarkresult WHERE job_id = %s", job_id
            )
            assert rows == (len(SLOW_BENCHMARK["settings"]["batch_sizes"]),)
            assert worker.poll() is None
            assert beat.poll() is None, beat.log_path.read_text()[-3000:]
    finally:
        if seed.poll() is None:
            seed.kill()
            seed.wait()
        if beat is not None:
            _stop_beat(beat)


def _stop_beat(beat: subprocess.Popen) -> None:
    if beat.poll() is None:
        os.killpg(beat.pid, signal.SIGTERM)
        try:
            beat.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process_group(beat)
    else:
        stop_process_group(beat)
    sys.stderr.write(f"\n--- beat log ---\n{beat.log_path.read_text()[-3000:]}\n")
