"""Runs one job: claims it, drives `pipelines` over its stages, writes everything back.

The runner talks to ``jobs.services`` (claim, heartbeat, progress, the end, a certify stage's
report) and the registry (``registry.registration``: versions, metrics, benchmark rows), plus the
MLflow helper (one run per job). It calls no other app: what follows a job's end is announced by
``jobs.services.finish_job`` and the apps that care listen. A job delivered again after its
worker died picks up the saved pipeline context, skips the stages already done, and registers
nothing twice. A database outage (a restart) is ridden out: progress lines and heartbeats are
skipped while it lasts, a stage's result and the job's end are retried (``gpu_workers.dbretry``).
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from gpu_workers import devices
from gpu_workers.dbretry import best_effort, reset_connection, retry_db
from pipelines.certification import serving_probe
from pipelines.core import (
    Artifact,
    Cancelled,
    PipelineContext,
    PipelineError,
    StageResult,
    StageStatus,
)
from pipelines.pipeline import run_pipeline
from pipelines.stages import validate_pipeline
from r1platform.core import storage, tracking
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.monitoring import metrics
from r1platform.registry import services as registry
from r1platform.registry.models import ModelVersion
from r1platform.registry.registration import JobOutputs, ancestor_artifacts
from r1platform.serving.probe import serving_probe as _serving_probe
from r1platform.serving.probe import serving_server as _serving_server

log = logging.getLogger(__name__)

# The certification suite's serving-contract check serves engines with the platform's runtime.
serving_probe.register(_serving_probe)
serving_probe.register_server(_serving_server)

PROGRESS_WRITE_SECONDS = 0.5
CANCEL_CHECK_SECONDS = 1.0
MAX_HISTORY = 2000  # training-curve entries kept per stage in the job's stage results


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUSY = "busy"  # another live worker holds it
    NOTHING = "nothing"  # finished already, cancelled before start, or gone


def execute_job(job_id: int, worker_host: str) -> Outcome:
    # Celery's Django fix-up closes stale database connections before and after each task; a
    # delivery during a database outage waits for it rather than dropping the job.
    job = retry_db(lambda: Job.objects.filter(pk=job_id).first(), f"reading job {job_id}")
    if job is None or job.is_finished:
        return Outcome.NOTHING
    if job.status == JobStatus.RUNNING and job.attempts >= settings.R1_MAX_JOB_ATTEMPTS:
        # Each earlier attempt ended with its worker dying mid-job: a poison job, stop here.
        claimed = jobs.claim_job(job_id, worker_host)
        if claimed is not None:
            reason = (
                f"the worker died {job.attempts} times while running this job "
                f"(last in stage {job.current_stage or 'start'}); not retried again"
            )
            # The end every job takes: announced, and its MLflow run closed.
            jobs.end_job(claimed, JobStatus.FAILED, reason)
            return Outcome.FAILED
        return Outcome.BUSY
    claimed = retry_db(lambda: jobs.claim_job(job_id, worker_host), f"claiming job {job_id}")
    if claimed is None:
        job.refresh_from_db()
        return Outcome.NOTHING if job.is_finished or job.cancel_requested else Outcome.BUSY
    return JobRun(claimed).run()


class Heartbeat(threading.Thread):
    """Beats the job's heartbeat while a long step runs without reporting progress."""

    def __init__(self, job_id: int) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id = job_id
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(settings.R1_HEARTBEAT_SECONDS):
                best_effort(lambda: jobs.heartbeat(self.job_id), "beating the job", None)
        finally:
            reset_connection()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class JobRun:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.version: ModelVersion = job.version
        self.workdir = Path(settings.R1_WORK_DIR) / f"job-{job.pk}"
        self.outputs = JobOutputs(job, self.version)
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._n_stages = max(1, len(job.stages))
        self._stage_index: dict[str, int] = {}

    def run(self) -> Outcome:
        job = self.job
        heart = Heartbeat(job.pk)
        heart.start()
        try:
            self._log(f"claimed by {job.worker_host} (attempt {job.attempts}) on {devices.label()}")
            ctx = self._context()
            planned = validate_pipeline(self.version.format, job.stages, self.version.precision)
            self._stage_index = {p.stage_id: i for i, p in enumerate(planned)}
            self._start_mlflow_run(planned)
            run_pipeline(ctx, planned, progress=self._progress, on_stage_done=self._stage_done)
        except Cancelled:
            return self._end(JobStatus.CANCELLED, "cancelled by a user")
        except SoftTimeLimitExceeded:
            limit = settings.CELERY_TASK_SOFT_TIME_LIMIT
            return self._end(JobStatus.FAILED, f"timed out: the job ran past its {limit} s limit")
        except PipelineError as exc:
            return self._end(JobStatus.FAILED, str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.pk)
            return self._end(JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            heart.stop()
        return self._end(JobStatus.SUCCEEDED, "")

    # --- set-up ---

    def _context(self) -> PipelineContext:
        ctx = PipelineContext.load(self.workdir)
        if ctx is not None:
            self._log("resuming from the saved pipeline context")
            self.outputs.recover()
            return ctx
        source = storage.media_path(self.version.file)
        sha, _ = storage.sha256_file(source)
        if sha != self.version.sha256:
            raise PipelineError(
                f"the stored file of {self.version} no longer matches its sha256; it will not be "
                "loaded. Upload the model again."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        ancestors = ancestor_artifacts(self.version)
        source_artifact = registry.version_artifact(self.version, "input")
        source_artifact.parent = next(iter(ancestors), None)
        ctx = PipelineContext.start(
            self.workdir,
            source_artifact,
            task=self.version.model.task,
            datasets=jobs.dataset_refs(self.job),
        )
        ctx.ancestors = ancestors
        ctx.save()
        return ctx

    def _start_mlflow_run(self, planned) -> None:
        job = self.job
        if not job.mlflow_run_id:
            # Best effort: with MLflow down the job runs on without a run; its versions are
            # mirrored under a run opened after it ends (registry.mirror).
            experiment, run_id = tracking.open_run(
                f"team-{job.team.slug}",
                f"job-{job.pk} {self.version.model.name} v{self.version.number}",
                {"r1.job_id": str(job.pk), "r1.model": self.version.model.name},
            )
            if not run_id:
                self._log("MLflow is unreachable: its run is opened after the job ends")
                registry.mirror_to_mlflow(self.version)
                return
            params: dict[str, object] = {
                "input_version": self.version.number,
                "input_format": self.version.format,
                "stages": ",".join(p.name for p in planned),
                "device": devices.label(),
            }
            for p in planned:
                params.update(tracking.flatten(p.stage_id, p.settings.model_dump(mode="json")))
            tracking.log_params(run_id, params)
            Job.objects.filter(pk=job.pk).update(
                mlflow_run_id=run_id, mlflow_experiment_id=experiment
            )
            job.mlflow_run_id, job.mlflow_experiment_id = run_id, experiment
        registry.mirror_to_mlflow(self.version)

    # --- callbacks from the pipeline ---

    def _progress(self, index: int, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_CHECK_SECONDS:
            self._last_cancel_check = now
            asked = best_effort(
                lambda: jobs.cancel_requested(self.job.pk), "checking cancel", False
            )
            if asked:
                raise Cancelled()
        if now - self._last_write < PROGRESS_WRITE_SECONDS and fraction not in (0.0, 1.0):
            return
        self._last_write = now
        stage = self.job.stages[index]["name"] if index < len(self.job.stages) else ""
        overall = (index + fraction) / self._n_stages
        line = message if fraction in (0.0, 1.0) else None
        best_effort(
            lambda: jobs.record_progress(self.job, progress=overall, stage=stage, line=line),
            "writing the job's progress",
            None,
        )

    def _stage_done(self, result: StageResult, ctx: PipelineContext) -> None:
        # Each write is safe to repeat (a version is registered once per artifact key, a
        # benchmark row once per version, backend and batch size): retried across an outage.
        produced = retry_db(
            lambda: [self._register(ctx.artifacts[key]) for key in result.outputs],
            f"registering the outputs of stage {result.stage_id}",
        )
        retry_db(lambda: self.outputs.sync_metrics(ctx.artifacts), "saving metrics")
        if result.name == "benchmark":
            retry_db(
                lambda: self.outputs.record_benchmarks(ctx.benchmarks, devices.label()),
                "saving benchmark rows",
            )
        if result.name == "certify" and result.details:
            self._record_certification(result, ctx)
        for entry in result.history if result.status is StageStatus.SUCCEEDED else []:
            step_metrics = {f"{result.stage_id}.{k}": v for k, v in entry["metrics"].items()}
            tracking.log_metrics(self.job.mlflow_run_id, step_metrics, step=int(entry["step"]))
        if result.metrics and result.status.done:  # a NOT_KEPT stage says why in numbers too
            tracking.log_metrics(
                self.job.mlflow_run_id,
                {f"{result.stage_id}.{k}": v for k, v in result.metrics.items()},
            )
        if not any(r["stage_id"] == result.stage_id for r in self.job.stage_results):
            # Counted once: a re-delivered job hands over the stages its last attempt finished.
            metrics.record_stage(result.name, result.status.value, result.seconds)
        results = self._with_result(result, [v.pk for v in produced])
        index = self._stage_index.get(result.stage_id, 0)
        summary = f"{result.name}: {result.status.value} in {result.seconds:.1f}s"
        if result.message:
            summary += f" ({result.message})"
        retry_db(
            lambda: jobs.record_progress(
                self.job,
                progress=(index + 1) / self._n_stages,
                stage=result.name,
                line=summary,
                stage_results=results,
            ),
            f"writing the result of stage {result.stage_id}",
        )

    def _record_certification(self, result: StageResult, ctx: PipelineContext) -> None:
        key = str(result.details.get("engine", {}).get("key") or ctx.current)
        version = self.outputs.get(key)
        if version is None and key in ctx.artifacts:
            version = self._register(ctx.artifacts[key])
        if version is None:
            raise PipelineError(f"certify reported on {key!r}, which this job does not know")
        for cert in jobs.report_certification(self.job, version, result.details):
            self._log(f"certification {cert.pk} of {version}: {cert.status}")

    def _with_result(self, result: StageResult, version_ids: list[int]) -> list[dict]:
        entry = {
            "stage_id": result.stage_id,
            "name": result.name,
            "status": result.status.value,
            "seconds": result.seconds,
            "message": result.message,
            "versions": version_ids,
            # A training curve, drawn on the job and version pages (bounded: a long run keeps
            # its last entries).
            "history": result.history[-MAX_HISTORY:],
        }
        kept = [r for r in self.job.stage_results if r["stage_id"] != result.stage_id]
        return sorted(kept + [entry], key=lambda r: self._stage_index.get(r["stage_id"], 0))

    def _register(self, artifact: Artifact) -> ModelVersion:
        """The version for this artifact, registering it (file, registry, MLflow) the first time."""
        version, fresh = self.outputs.register(artifact)
        if fresh:
            self._log(f"registered {version} ({version.label})")
        return version

    # --- the end ---

    def _end(self, status: str, error: str) -> Outcome:
        """Record the job's end, retried across a database outage so it never stays running."""
        job = self.job
        fields = ["log_tail", "stage_results", "progress"]
        retry_db(lambda: job.refresh_from_db(fields=fields), "reading the job before its end")
        if status != JobStatus.SUCCEEDED:
            # The stage that failed (or was cancelled) reported no result: take it from the
            # saved context, so the dashboard shows which stage it was.
            saved = PipelineContext.load(self.workdir)
            for result in saved.results.values() if saved else []:
                if result.status is StageStatus.FAILED:
                    job.stage_results = self._with_result(result, [])
                    metrics.record_stage(result.name, result.status.value, result.seconds)
            retry_db(lambda: job.save(update_fields=["stage_results"]), "saving the failed stage")
        if error:
            self._log(f"{status}: {error}", write=False)
        else:
            self._log("finished", write=False)
        # The end every job takes: recorded, announced (certification and schedules listen),
        # and its MLflow run closed.
        retry_db(lambda: jobs.end_job(job, status, error), "recording the job's end")
        metrics.record_job_finished(str(status))
        return Outcome(status)

    def _log(self, line: str, write: bool = True) -> None:
        log.info("job %s: %s", self.job.pk, line)
        jobs.append_log(self.job, line)
        if write:
            self.job.save(update_fields=["log_tail"])
