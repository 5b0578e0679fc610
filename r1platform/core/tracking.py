"""The one MLflow helper: experiments per team, a run per job, model versions per produced file.

The tracking store is whatever ``MLFLOW_TRACKING_URI`` names: a local SQLite file by default, a
tracking server in production. The same store is the model registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


@lru_cache(maxsize=4)
def _client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client() -> MlflowClient:
    return _client(settings.MLFLOW_TRACKING_URI)


def _is_local() -> bool:
    return not settings.MLFLOW_TRACKING_URI.startswith(("http://", "https://", "databricks"))


def experiment_id(name: str) -> str:
    c = client()
    existing = c.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if _is_local():
        location = (Path(settings.MLFLOW_ARTIFACT_ROOT) / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process created it between our look-up and create.
        again = c.get_experiment_by_name(name)
        if again is None:
            raise
        return again.experiment_id


def start_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    run = client().create_run(experiment, run_name=run_name, tags=tags)
    return run.info.run_id


def log_params(run_id: str, params: dict[str, object]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client().log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), MAX_METRICS_PER_BATCH):
        client().log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])


def log_artifact(run_id: str, path: Path, artifact_path: str) -> str:
    """Log a file and return the URI it now has in the run's artifact store."""
    c = client()
    c.log_artifact(run_id, str(path), artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}/{Path(path).name}"


def finish_run(run_id: str, succeeded: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if succeeded else RunStatus.FAILED)
    client().set_terminated(run_id, status)


def register_model_version(
    model_name: str, source: str, run_id: str | None, tags: dict[str, str]
) -> str:
    """Register ``source`` as a version of ``model_name``, once per ``r1.version_id`` tag."""
    c = client()
    with contextlib.suppress(MlflowException):  # it exists already
        c.create_registered_model(model_name, tags={"r1.platform": "r1platform"})
    version_id = tags.get("r1.version_id")
    if version_id:
        for mv in c.search_model_versions(f"name = '{_quote(model_name)}'"):
            if mv.tags.get("r1.version_id") == version_id:
                return str(mv.version)
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)


def set_model_version_tags(model_name: str, version: str, tags: dict[str, str]) -> None:
    """Tag one registered model version (e.g. with the certificates it holds)."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, version, k, v)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client().set_tag(run_id, k, v)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def run_url(experiment: str, run_id: str) -> str:
    return f"{settings.MLFLOW_UI_URL}/#/experiments/{experiment}/runs/{run_id}"


def model_version_url(model_name: str, version: str) -> str:
    return f"{settings.MLFLOW_UI_URL}/#/models/{model_name}/versions/{version}"


def flatten(prefix: str, values: dict[str, object]) -> Iterable[tuple[str, object]]:
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(name, value)
        else:
            yield name, value
