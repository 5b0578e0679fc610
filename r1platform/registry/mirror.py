"""Versions mirrored to the MLflow Model Registry: best effort now, caught up later.

A version is registered in MLflow once (its number kept on the row). An uploaded version gets an
"upload" run of its own holding the file; a version a job made is logged under the job's run.
When MLflow is down the upload and the job go on: the version stays ``pending`` with the reason,
and beat's ``r1.mirror_versions`` (:func:`mirror_pending`) tries again. A job that started while
MLflow was down has no run: once it has ended, its versions are mirrored under a run opened for
it then (its parameters and benchmark numbers logged from the database). A version MLflow
refused ``R1_MLFLOW_MIRROR_ATTEMPTS`` times (not merely unreachable) is marked ``failed``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

from r1platform.accounts.models import Team
from r1platform.core import storage, tracking
from r1platform.registry.models import BenchmarkResult, MirrorState, ModelVersion

log = logging.getLogger(__name__)

MIRROR_BATCH = 100  # versions per tick of r1.mirror_versions


class JobRunNotYet(Exception):
    """The version's job has no MLflow run yet and has not ended: mirrored after it ends."""


def mlflow_name(team: Team, name: str) -> str:
    return f"{team.slug}.{name}"


def mlflow_tags(version: ModelVersion) -> dict[str, str]:
    tags = {
        "r1.version_id": str(version.pk),
        "r1.version": str(version.number),
        "format": version.format,
        "precision": version.precision,
        "sha256": version.sha256,
    }
    if version.backend:
        tags["backend"] = version.backend
    if version.parent_id:
        tags["parent_version"] = str(version.parent.number)
    if version.job_id:
        tags["r1.job_id"] = str(version.job_id)
    return tags


def mirror_to_mlflow(version: ModelVersion, run_id: str | None = None) -> str:
    """Register the version's file in the MLflow Model Registry (once); its number, or "" when
    MLflow could not take it now (the version then says why, and stays pending)."""
    if version.mlflow_version:
        return version.mlflow_version
    try:
        number, run_id = _mirror(version, run_id)
    except Exception as exc:  # noqa: BLE001 - the tracking store is optional for the version
        _record_failure(version, exc)
        return ""
    ModelVersion.objects.filter(pk=version.pk).update(
        mlflow_version=number,
        mlflow_run_id=run_id,
        mlflow_state=MirrorState.MIRRORED,
        mlflow_error="",
    )
    version.mlflow_version, version.mlflow_run_id = number, run_id
    version.mlflow_state, version.mlflow_error = MirrorState.MIRRORED, ""
    return number


def retry_mirror(version: ModelVersion) -> str:
    """Mirror one version now, a failed one too (its refusals are counted afresh)."""
    ModelVersion.objects.filter(pk=version.pk, mlflow_version="").update(
        mlflow_state=MirrorState.PENDING, mlflow_attempts=0
    )
    version.refresh_from_db()
    return mirror_to_mlflow(version)


def mirror_pending(limit: int = MIRROR_BATCH) -> int:
    """Mirror the versions still pending, oldest first; how many got an MLflow number."""
    pending = (
        ModelVersion.objects.filter(mlflow_state=MirrorState.PENDING, mlflow_version="")
        .select_related("model__team", "job", "parent")
        .order_by("pk")[:limit]
    )
    return sum(1 for version in pending if mirror_to_mlflow(version))


def _mirror(version: ModelVersion, run_id: str | None) -> tuple[str, str]:
    model = version.model
    file = storage.media_path(version.file)
    artifact_path = f"versions/v{version.number}"
    if not run_id and version.job_id is None:
        experiment = tracking.experiment_id(f"team-{model.team.slug}")
        run_id = tracking.start_run(
            experiment, f"upload {model.name} v{version.number}", {"r1.kind": "upload"}
        )
        tracking.log_params(run_id, {"sha256": version.sha256, "format": version.format})
        source = tracking.log_artifact(run_id, file, artifact_path)
        tracking.finish_run(run_id, succeeded=True)
    else:
        run_id = run_id or _job_run(version.job)
        source = tracking.log_artifact(run_id, file, artifact_path)
    number = tracking.register_model_version(
        model.mlflow_name or mlflow_name(model.team, model.name),
        source=source,
        run_id=run_id,
        tags=mlflow_tags(version),
    )
    return number, run_id


def _job_run(job: Any) -> str:
    """The job's MLflow run; opened now for an ended job that started while MLflow was down."""
    if job.mlflow_run_id:
        return job.mlflow_run_id
    if not job.is_finished:
        raise JobRunNotYet(
            f"waiting for job {job.pk} to end: MLflow was unreachable when it started, so its "
            "run is opened after it ends"
        )
    version = job.version
    experiment = tracking.experiment_id(f"team-{job.team.slug}")
    run_id = tracking.start_run(
        experiment,
        f"job-{job.pk} {version.model.name} v{version.number}",
        {"r1.job_id": str(job.pk), "r1.model": version.model.name, "r1.mirrored_late": "1"},
    )
    tracking.log_params(
        run_id,
        {
            "input_version": version.number,
            "input_format": version.format,
            "stages": ",".join(s.get("name", "") for s in job.stages),
        },
    )
    metrics: dict[str, float] = {}
    for row in BenchmarkResult.objects.filter(job_id=job.pk).select_related("version"):
        prefix = f"bench.v{row.version.number}.b{row.batch_size}"
        metrics.update({f"{prefix}.p50_ms": row.p50_ms, f"{prefix}.p99_ms": row.p99_ms})
        metrics[f"{prefix}.throughput"] = row.throughput
    if metrics:
        tracking.log_metrics(run_id, metrics)
    tracking.finish_run(run_id, succeeded=job.status == "succeeded")
    # Another mirror may have opened one at the same time: the first one written is kept.
    Job = type(job)
    if not Job.objects.filter(pk=job.pk, mlflow_run_id="").update(
        mlflow_run_id=run_id, mlflow_experiment_id=experiment
    ):
        job.refresh_from_db(fields=["mlflow_run_id", "mlflow_experiment_id"])
        return job.mlflow_run_id
    job.mlflow_run_id, job.mlflow_experiment_id = run_id, experiment
    return run_id


def _record_failure(version: ModelVersion, exc: Exception) -> None:
    """Keep the version pending with the reason; failed after too many refusals."""
    waiting = isinstance(exc, JobRunNotYet) or tracking.is_unreachable_error(exc)
    attempts = version.mlflow_attempts + (0 if waiting else 1)
    failed = attempts >= settings.R1_MLFLOW_MIRROR_ATTEMPTS
    if isinstance(exc, JobRunNotYet):
        why = str(exc)
    elif waiting:
        why = f"MLflow unreachable; the mirror task tries again: {exc}"
    else:
        why = f"MLflow refused it ({type(exc).__name__}: {exc})"
        if failed:
            why += f"; gave up after {attempts} attempts"
    state = MirrorState.FAILED if failed else MirrorState.PENDING
    log.warning("could not mirror %s to MLflow: %s", version, why)
    ModelVersion.objects.filter(pk=version.pk, mlflow_version="").update(
        mlflow_state=state, mlflow_error=why[:2000], mlflow_attempts=attempts
    )
    version.mlflow_state, version.mlflow_error, version.mlflow_attempts = state, why, attempts
