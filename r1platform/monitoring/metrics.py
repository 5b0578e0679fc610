"""The metrics platform processes record as things happen: stage runs and finished jobs.

They are observed in Celery's prefork children, where each job runs. prometheus-client chooses
how values are stored when it is first imported: with ``PROMETHEUS_MULTIPROC_DIR`` set, every
process writes its own mmap file in that folder (a forked child notices its new pid and starts
its own), and the web process's ``/metrics`` adds the files up (``views.py``). Without it, values
live in this process's default registry.

Only counters and histograms are written here, on purpose: they add up across processes with no
choice to make, and a child that dies keeps its counts (its file stays; Prometheus's ``rate``
needs them to never go down). Everything that is a level now (jobs by status, queue depth,
workers, GPUs) is a gauge read from the database and the broker when Prometheus scrapes
(``collectors.py``), so no process-written gauge needs a multiprocess mode, and none goes stale
when its process dies.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Stages take from under a second (a skipped stage, a small benchmark) to hours (fine-tuning).
STAGE_BUCKETS = (
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0, 28800.0,
)  # fmt: skip

stage_duration = Histogram(
    "r1_stage_duration_seconds",
    "Time each pipeline stage ran, by stage and outcome",
    ["stage", "status"],
    buckets=STAGE_BUCKETS,
)
stage_runs = Counter(
    "r1_stage_runs",
    "Pipeline stages that ended, by stage and outcome (succeeded, not_kept, skipped, failed)",
    ["stage", "status"],
)
jobs_finished = Counter(
    "r1_jobs_finished",
    "Jobs that ended on a worker, by final status",
    ["status"],
)

# Every family this module records, as Prometheus names it (tests check rules against them).
FAMILIES = ("r1_stage_duration_seconds", "r1_stage_runs", "r1_jobs_finished")


def record_stage(stage: str, status: str, seconds: float) -> None:
    stage_duration.labels(stage, status).observe(max(0.0, seconds))
    stage_runs.labels(stage, status).inc()


def record_job_finished(status: str) -> None:
    jobs_finished.labels(status).inc()
