"""Runs one job: claims it, drives `pipelines` over its stages, writes everything back.

Everything the pipeline produces goes back through the registry services (versions, benchmark
rows) and the MLflow helper (one run per job). A job delivered again after its worker died picks
up the saved pipeline context, skips the stages already done, and registers nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import IntegrityError, connection

from gpu_workers import devices
from pipelines.certification import serving_probe
from pipelines.core import (
    Artifact,
    Cancelled,
    PipelineContext,
    PipelineError,
    StageResult,
    StageStatus,
    TensorSpec,
)
from pipelines.pipeline import run_pipeline
from pipelines.stages import validate_pipeline
from r1platform.core import storage, tracking
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import dataset_ids_in, dataset_ref
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.monitoring import metrics
from r1platform.registry import services as registry
from r1platform.registry.models import BenchmarkResult, ModelVersion
from r1platform.serving.probe import serving_probe as _serving_probe

log = logging.getLogger(__name__)

# The certification suite's serving-contract check serves engines with the platform's runtime.
serving_probe.register(_serving_probe)

PROGRESS_WRITE_SECONDS = 0.5
# BenchmarkRow fields copied onto BenchmarkResult rows, when the row has them.
BENCHMARK_FIELDS = (
    "p50_ms", "p90_ms", "p95_ms", "p99_ms", "throughput", "iterations",
    "windows", "converged", "peak_rss_mb", "model_rss_mb", "gpu_mem_mb",
)  # fmt: skip
CANCEL_CHECK_SECONDS = 1.0


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUSY = "busy"  # another live worker holds it
    NOTHING = "nothing"  # finished already, cancelled before start, or gone


def execute_job(job_id: int, worker_host: str) -> Outcome:
    # Celery's Django fix-up closes stale database connections before and after each task.
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.is_finished:
        return Outcome.NOTHING
    if job.status == JobStatus.RUNNING and job.attempts >= settings.R1_MAX_JOB_ATTEMPTS:
        # Each earlier attempt ended with its worker dying mid-job: a poison job, stop here.
        if jobs.claim_job(job_id, worker_host) is not None:
            jobs.fail_poison(
                job_id,
                f"the worker died {job.attempts} times while running this job "
                f"(last in stage {job.current_stage or 'start'}); not retried again",
            )
            return Outcome.FAILED
        return Outcome.BUSY
    claimed = jobs.claim_job(job_id, worker_host)
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
                jobs.heartbeat(self.job_id)
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class JobRun:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.version: ModelVersion = job.version
        self.workdir = Path(settings.R1_WORK_DIR) / f"job-{job.pk}"
        self.versions: dict[str, ModelVersion] = {"input": self.version}
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
            self._recover_versions(ctx)
            return ctx
        source = storage.media_path(self.version.file)
        sha, _ = storage.sha256_file(source)
        if sha != self.version.sha256:
            raise PipelineError(
                f"the stored file of {self.version} no longer matches its sha256; it will not be "
                "loaded. Upload the model again."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        ids = dataset_ids_in(self.job.stages)
        datasets = Dataset.objects.filter(team_id=self.job.team_id, pk__in=ids)
        ancestors = _lineage(self.version)
        source_artifact = registry.version_artifact(self.version, "input")
        source_artifact.parent = next(iter(ancestors), None)
        ctx = PipelineContext.start(
            self.workdir,
            source_artifact,
            task=self.version.model.task,
            datasets={str(d.pk): dataset_ref(d) for d in datasets},
        )
        ctx.ancestors = ancestors
        ctx.save()
        return ctx

    def _recover_versions(self, ctx: PipelineContext) -> None:
        for version in ModelVersion.objects.filter(job=self.job):
            self.versions[version.artifact_key] = version

    def _start_mlflow_run(self, planned) -> None:
        job = self.job
        if not job.mlflow_run_id:
            experiment = tracking.experiment_id(f"team-{job.team.slug}")
            run_id = tracking.start_run(
                experiment,
                f"job-{job.pk} {self.version.model.name} v{self.version.number}",
                {"r1.job_id": str(job.pk), "r1.model": self.version.model.name},
            )
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
            if jobs.cancel_requested(self.job.pk):
                raise Cancelled()
        if now - self._last_write < PROGRESS_WRITE_SECONDS and fraction not in (0.0, 1.0):
            return
        self._last_write = now
        stage = self.job.stages[index]["name"] if index < len(self.job.stages) else ""
        overall = (index + fraction) / self._n_stages
        line = message if fraction in (0.0, 1.0) else None
        jobs.record_progress(self.job, progress=overall, stage=stage, line=line)

    def _stage_done(self, result: StageResult, ctx: PipelineContext) -> None:
        produced = [self._register(ctx.artifacts[key]) for key in result.outputs]
        self._sync_metrics(ctx)
        if result.name == "benchmark":
            self._record_benchmarks(ctx)
        if result.name == "certify" and result.details:
            self._record_certification(result, ctx)
        for entry in result.history if result.status is StageStatus.SUCCEEDED else []:
            step_metrics = {f"{result.stage_id}.{k}": v for k, v in entry["metrics"].items()}
            tracking.log_metrics(self.job.mlflow_run_id, step_metrics, step=int(entry["step"]))
        if result.metrics and result.status is StageStatus.SUCCEEDED:
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
        jobs.record_progress(
            self.job,
            progress=(index + 1) / self._n_stages,
            stage=result.name,
            line=summary,
            stage_results=results,
        )

    def _record_certification(self, result: StageResult, ctx: PipelineContext) -> None:
        from r1platform.certification import services as certification

        key = str(result.details.get("engine", {}).get("key") or ctx.current)
        version = self.versions.get(key)
        if version is None and key in ctx.artifacts:
            version = self._register(ctx.artifacts[key])
        if version is None:
            raise PipelineError(f"certify reported on {key!r}, which this job does not know")
        cert = certification.record_suite(self.job, version, result.details)
        self._log(f"certification {cert.pk} of {version}: {cert.status}")

    def _sync_metrics(self, ctx: PipelineContext) -> None:
        """Stages such as evaluate add metrics to artifacts already registered: copy them over."""
        for key, artifact in ctx.artifacts.items():
            version = self.versions.get(key)
            if version is None or not artifact.metrics or version.metrics == artifact.metrics:
                continue
            version.metrics = {**version.metrics, **artifact.metrics}
            version.save(update_fields=["metrics"])

    def _with_result(self, result: StageResult, version_ids: list[int]) -> list[dict]:
        entry = {
            "stage_id": result.stage_id,
            "name": result.name,
            "status": result.status.value,
            "seconds": result.seconds,
            "message": result.message,
            "versions": version_ids,
        }
        kept = [r for r in self.job.stage_results if r["stage_id"] != result.stage_id]
        return sorted(kept + [entry], key=lambda r: self._stage_index.get(r["stage_id"], 0))

    def _register(self, artifact: Artifact) -> ModelVersion:
        """The version for this artifact, registering it (file, registry, MLflow) the first time."""
        version = self.versions.get(artifact.key)
        if version is None:
            version = ModelVersion.objects.filter(job=self.job, artifact_key=artifact.key).first()
        if version is None:
            path = Path(artifact.path)
            relative, sha, size = storage.store_copy(
                path, kind="models", team_id=self.job.team_id, suffix=path.suffix
            )
            try:
                version = registry.register_version(
                    self.version.model,
                    relative_file=relative,
                    sha256=sha,
                    size_bytes=size,
                    format=artifact.format,
                    precision=artifact.precision,
                    backend=artifact.backend,
                    inputs=[_spec(t) for t in artifact.inputs],
                    outputs=[_spec(t) for t in artifact.outputs],
                    # Copies: stages such as evaluate update the artifact's dicts in place later,
                    # and _sync_metrics must see the difference to save it.
                    details=dict(artifact.meta),
                    metrics=dict(artifact.metrics),
                    parent=self.versions.get(artifact.parent or "input", self.version),
                    job=self.job,
                    artifact_key=artifact.key,
                    user=self.job.created_by,
                )
            except IntegrityError:
                storage.remove(relative)
                version = ModelVersion.objects.get(job=self.job, artifact_key=artifact.key)
            self._log(f"registered {version} ({version.label})")
        self.versions[artifact.key] = version
        registry.mirror_to_mlflow(version, run_id=self.job.mlflow_run_id)
        return version

    def _record_benchmarks(self, ctx: PipelineContext) -> None:
        device = devices.label()
        metrics: dict[str, float] = {}
        for row in ctx.benchmarks:
            version = self.versions.get(row.artifact)
            if version is None:
                continue
            BenchmarkResult.objects.update_or_create(
                job=self.job,
                version=version,
                backend=row.backend,
                batch_size=row.batch_size,
                defaults={
                    "device": device,
                    **{f: getattr(row, f) for f in BENCHMARK_FIELDS if hasattr(row, f)},
                },
            )
            prefix = f"bench.v{version.number}.b{row.batch_size}"
            metrics.update({f"{prefix}.p50_ms": row.p50_ms, f"{prefix}.p99_ms": row.p99_ms})
            metrics[f"{prefix}.throughput"] = row.throughput
        if metrics:
            tracking.log_metrics(self.job.mlflow_run_id, metrics)

    # --- the end ---

    def _end(self, status: str, error: str) -> Outcome:
        job = self.job
        job.refresh_from_db(fields=["log_tail", "stage_results", "progress"])
        if status != JobStatus.SUCCEEDED:
            # The stage that failed (or was cancelled) reported no result: take it from the
            # saved context, so the dashboard shows which stage it was.
            saved = PipelineContext.load(self.workdir)
            for result in saved.results.values() if saved else []:
                if result.status is StageStatus.FAILED:
                    job.stage_results = self._with_result(result, [])
                    metrics.record_stage(result.name, result.status.value, result.seconds)
            job.save(update_fields=["stage_results"])
        if error:
            self._log(f"{status}: {error}", write=False)
        else:
            self._log("finished", write=False)
        jobs.finish_job(job, status, error)
        metrics.record_job_finished(str(status))
        from r1platform.certification import services as certification

        certification.job_ended(job)
        try:
            from r1platform.schedules import runs as schedules

            schedules.job_ended(job)
        except Exception:  # noqa: BLE001 - the job's own outcome is already recorded
            log.exception("job %s: could not hand its end to its schedule run", job.pk)
        if job.mlflow_run_id:
            try:
                tracking.finish_run(job.mlflow_run_id, succeeded=status == JobStatus.SUCCEEDED)
            except Exception as exc:  # noqa: BLE001 - the job's own outcome is already recorded
                log.warning("could not close MLflow run %s: %s", job.mlflow_run_id, exc)
        return Outcome(status)

    def _log(self, line: str, write: bool = True) -> None:
        log.info("job %s: %s", self.job.pk, line)
        jobs.append_log(self.job, line)
        if write:
            self.job.save(update_fields=["log_tail"])


def _lineage(version: ModelVersion) -> dict[str, Artifact]:
    """The version's registered ancestors as artifacts, nearest first, each naming its parent."""
    chain: dict[str, Artifact] = {}
    for ancestor in reversed(registry.lineage(version)[:-1]):
        artifact = registry.version_artifact(ancestor, f"version-{ancestor.pk}")
        artifact.parent = f"version-{ancestor.parent_id}" if ancestor.parent_id else None
        chain[artifact.key] = artifact
    return chain


def _spec(tensor: TensorSpec) -> dict:
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": tensor.dtype}
