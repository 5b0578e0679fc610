"""What a job produces becomes registry rows: its versions, their metrics, its benchmark rows.

The worker's runner hands every stage's artifacts here (it imports no other app for it). A job
delivered again after its worker died registers nothing twice: ``(job, artifact_key)`` is unique
on versions and ``(job, version, backend, batch_size)`` on benchmark rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from django.db import IntegrityError

from pipelines.core import Artifact, BenchmarkRow, ModelFormat, TensorSpec
from pipelines.formats import ARCHIVE_SUFFIX, has_external_data, pack_onnx
from pipelines.llm import FOLDER_FORMATS, MARKER
from pipelines.llm.folders import pack_folder
from r1platform.core import storage, tracking
from r1platform.registry.mirror import mirror_to_mlflow
from r1platform.registry.models import BenchmarkResult, ModelVersion
from r1platform.registry.services import lineage, register_version, version_artifact

# The artifact key of a registered ancestor handed to a job (``ctx.ancestors``).
ANCESTOR_PREFIX = "version-"

# BenchmarkRow fields copied onto BenchmarkResult rows, when the row has them.
BENCHMARK_FIELDS = (
    "p50_ms", "p90_ms", "p95_ms", "p99_ms", "throughput", "iterations",
    "windows", "converged", "peak_rss_mb", "model_rss_mb", "gpu_mem_mb", "shapes", "spread",
)  # fmt: skip


class ProducingJob(Protocol):
    """The job fields registration reads (a ``jobs.Job``; registry sits below jobs)."""

    pk: Any
    team_id: int
    created_by: Any
    mlflow_run_id: str


class JobOutputs:
    """The versions one job has made, by pipeline artifact key ("input" is the job's version)."""

    def __init__(self, job: ProducingJob, source: ModelVersion) -> None:
        self.job = job
        self.source = source
        self.versions: dict[str, ModelVersion] = {"input": source}

    def recover(self) -> None:
        """Take back the versions an earlier delivery of this job registered."""
        for version in ModelVersion.objects.filter(job_id=self.job.pk):
            self.versions[version.artifact_key] = version

    def get(self, key: str) -> ModelVersion | None:
        return self.versions.get(key)

    def register(self, artifact: Artifact) -> tuple[ModelVersion, bool]:
        """The version for this artifact, registered (file, registry, MLflow) the first time;
        whether this call registered it."""
        job = self.job
        version = self.versions.get(artifact.key)
        if version is None:
            version = ModelVersion.objects.filter(job_id=job.pk, artifact_key=artifact.key).first()
        fresh = version is None
        if version is None:
            relative, sha, size, details = _store(artifact, job.team_id)
            try:
                version = register_version(
                    self.source.model,
                    relative_file=relative,
                    sha256=sha,
                    size_bytes=size,
                    format=artifact.format,
                    precision=artifact.precision,
                    backend=artifact.backend,
                    inputs=[_spec(t) for t in artifact.inputs],
                    outputs=[_spec(t) for t in artifact.outputs],
                    # Copies: stages such as evaluate update the artifact's dicts in place later,
                    # and sync_metrics must see the difference to save it.
                    details=details,
                    metrics=dict(artifact.metrics),
                    parent=self.versions.get(artifact.parent or "input", self.source),
                    job=job,
                    artifact_key=artifact.key,
                    user=job.created_by,
                )
            except IntegrityError:  # registered by a concurrent delivery of the same job
                storage.remove(relative)
                version = ModelVersion.objects.get(job_id=job.pk, artifact_key=artifact.key)
        self.versions[artifact.key] = version
        # Best effort: when MLflow is down the version stays pending and is mirrored later.
        mirror_to_mlflow(version, run_id=job.mlflow_run_id)
        return version, fresh

    def sync_metrics(self, artifacts: Mapping[str, Artifact]) -> None:
        """Stages such as evaluate add metrics to artifacts already registered: copy them over."""
        for key, artifact in artifacts.items():
            version = self.versions.get(key)
            if version is None or not artifact.metrics or version.metrics == artifact.metrics:
                continue
            version.metrics = {**version.metrics, **artifact.metrics}
            version.save(update_fields=["metrics"])

    def record_benchmarks(self, rows: Iterable[BenchmarkRow], device: str) -> None:
        """One BenchmarkResult per measured (version, backend, batch size), and MLflow metrics."""
        rows = list(rows)
        ancestors = self._ancestors({r.artifact for r in rows})
        metrics: dict[str, float] = {}
        for row in rows:
            version = self.versions.get(row.artifact) or ancestors.get(row.artifact)
            if version is None:
                continue
            BenchmarkResult.objects.update_or_create(
                job_id=self.job.pk,
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
        if metrics:  # best effort; the rows above are what the platform keeps
            tracking.log_metrics(self.job.mlflow_run_id, metrics)

    def _ancestors(self, keys: set[str]) -> dict[str, ModelVersion]:
        """The versions behind ``version-<pk>`` keys (the input's ancestors, timed in the same run
        as the job's own models), this model's only: one query."""
        pks = {int(k[len(ANCESTOR_PREFIX) :]) for k in keys if _is_ancestor_key(k)}
        if not pks:
            return {}
        found = ModelVersion.objects.filter(pk__in=pks, model_id=self.source.model_id)
        return {f"{ANCESTOR_PREFIX}{v.pk}": v for v in found}


def _store(artifact: Artifact, team_id: int) -> tuple[str, str, int, dict[str, Any]]:
    """Store the artifact's file: (relative path, sha256, size, the version's details).

    An ONNX file whose weights sit in data files beside it (quantize writes them for models
    over 2 GB) is stored as one tar of the model and those files, as such an upload is, so the
    version is one stored object that downloads, mirrors and unpacks whole. A model folder
    (a checkpoint, an ONNX Runtime GenAI folder, a LoRA adapter: the artifact's path is the
    folder) is stored the same way, as one tar of its files (:func:`pipelines.llm.folders.
    pack_folder`); a GGUF is one file.
    """
    path = Path(artifact.path)
    details = dict(artifact.meta)
    if artifact.format in FOLDER_FORMATS:
        marker = MARKER[artifact.format]
        details.pop("stored_file", None)  # the input's archive, when the stage copied its meta
        relative, sha, size, details["model_archive"] = storage.store_built(
            lambda out: pack_folder(path, out, marker),
            kind="models",
            team_id=team_id,
            suffix=ARCHIVE_SUFFIX["tar"],
        )
        return relative, sha, size, details
    if artifact.format == ModelFormat.GGUF.value:
        relative, sha, size = storage.store_copy(
            path, kind="models", team_id=team_id, suffix=".gguf"
        )
        return relative, sha, size, details
    if artifact.format == ModelFormat.ONNX.value and has_external_data(path):
        relative, sha, size, details["model_archive"] = storage.store_built(
            lambda out: pack_onnx(path, out),
            kind="models",
            team_id=team_id,
            suffix=ARCHIVE_SUFFIX["tar"],
        )
        return relative, sha, size, details
    relative, sha, size = storage.store_copy(
        path, kind="models", team_id=team_id, suffix=path.suffix
    )
    return relative, sha, size, details


def _is_ancestor_key(key: str) -> bool:
    return key.startswith(ANCESTOR_PREFIX) and key[len(ANCESTOR_PREFIX) :].isdigit()


def ancestor_artifacts(version: ModelVersion) -> dict[str, Artifact]:
    """The version's registered ancestors as artifacts, nearest first, each naming its parent."""
    chain: dict[str, Artifact] = {}
    for ancestor in reversed(lineage(version)[:-1]):
        artifact = version_artifact(ancestor, f"{ANCESTOR_PREFIX}{ancestor.pk}")
        artifact.parent = f"{ANCESTOR_PREFIX}{ancestor.parent_id}" if ancestor.parent_id else None
        chain[artifact.key] = artifact
    return chain


def _spec(tensor: TensorSpec) -> dict:
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": tensor.dtype}
