"""The one MLflow helper: experiments per team, a run per job, model versions per produced file.

The tracking store is whatever ``MLFLOW_TRACKING_URI`` names: a local SQLite file by default, a
tracking server in production. The same store is the model registry.

MLflow is best effort. Every HTTP call gives up after ``R1_MLFLOW_TIMEOUT_SECONDS`` with no
retry loop (MLflow's own default is 120 s and 7 retries: about four minutes), and a store found
unreachable is skipped for ``R1_MLFLOW_RETRY_SECONDS`` by this process: calls then raise
:class:`TrackingUnavailable` at once instead of each waiting for its timeout. Run logging
(params, metrics, tags, the end of a run) never raises; what must be mirrored (a model version)
is recorded as pending by the registry and mirrored again by beat's ``r1.mirror_versions``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


class TrackingUnavailable(Exception):
    """The tracking store cannot be reached now (refused, timed out, or skipped after that)."""


_down_until: dict[str, float] = {}  # tracking URI -> monotonic time to try it again
_down_lock = threading.Lock()


def is_unreachable_error(exc: BaseException) -> bool:
    """Whether ``exc`` says MLflow could not be reached, rather than that it refused a request."""
    if isinstance(exc, TrackingUnavailable | OSError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        message = str(exc.message)
        return message.startswith("API request to") or exc.error_code in (
            "TEMPORARILY_UNAVAILABLE",
            "REQUEST_LIMIT_EXCEEDED",
        )
    return type(exc).__module__.startswith(("requests", "urllib3"))


def _check_reachable() -> None:
    uri = settings.MLFLOW_TRACKING_URI
    until = _down_until.get(uri)
    if until is not None and time.monotonic() < until:
        raise TrackingUnavailable(
            f"MLflow at {_safe_uri(uri)} was unreachable moments ago; retried after "
            f"{settings.R1_MLFLOW_RETRY_SECONDS} s"
        )


def _note(exc: BaseException) -> None:
    """Remember an unreachable store, so the next calls do not each wait for a timeout."""
    if is_unreachable_error(exc) and not isinstance(exc, TrackingUnavailable):
        with _down_lock:
            _down_until[settings.MLFLOW_TRACKING_URI] = (
                time.monotonic() + settings.R1_MLFLOW_RETRY_SECONDS
            )


def reset() -> None:
    """Forget that a store was unreachable (tests; the mirror task tries again anyway)."""
    with _down_lock:
        _down_until.clear()


@contextlib.contextmanager
def guard():
    """Fail fast while the store is known to be down; remember it when a call finds it down."""
    _check_reachable()
    try:
        yield
    except Exception as exc:
        _note(exc)
        raise


def _safe_uri(uri: str) -> str:
    """The URI without a password, for messages."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://…@{rest.rsplit('@', 1)[1]}"
    return uri


@lru_cache(maxsize=4)
def _client(uri: str) -> MlflowClient:
    # MLflow reads these at each request: a short timeout and no retry loop, unless set.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.R1_MLFLOW_TIMEOUT_SECONDS))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client() -> MlflowClient:
    return _client(settings.MLFLOW_TRACKING_URI)


def _is_local() -> bool:
    return not settings.MLFLOW_TRACKING_URI.startswith(("http://", "https://", "databricks"))


def experiment_id(name: str) -> str:
    with guard():
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
    with guard():
        run = client().create_run(experiment, run_name=run_name, tags=tags)
    return run.info.run_id


def open_run(experiment_name: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Best effort: (experiment id, run id) of a new run, or ("", "") if MLflow is unreachable
    or refuses (logged; nothing else is lost: the registry mirrors its versions later)."""
    try:
        experiment = experiment_id(experiment_name)
        return experiment, start_run(experiment, run_name, tags)
    except Exception as exc:  # noqa: BLE001 - tracking is best effort
        log.warning("MLflow run %r not started: %s", run_name, exc)
        return "", ""


def _best_effort(what: str, run_id: str, fn, *args) -> bool:
    """Call ``fn`` under the guard; log and return False if it fails (or there is no run)."""
    if not run_id:
        return False
    try:
        with guard():
            fn(*args)
    except Exception as exc:  # noqa: BLE001 - run logging never fails the caller
        log.warning("MLflow %s of run %s skipped: %s", what, run_id, exc)
        return False
    return True


def log_params(run_id: str, params: dict[str, object]) -> bool:
    """Best effort (False when skipped)."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]

    def send() -> None:
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client().log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    return _best_effort("params", run_id, send)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> bool:
    """Best effort (False when skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def send() -> None:
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            client().log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    return _best_effort("metrics", run_id, send)


def log_artifact(run_id: str, path: Path, artifact_path: str) -> str:
    """Log a file and return the URI it now has in the run's artifact store."""
    with guard():
        c = client()
        c.log_artifact(run_id, str(path), artifact_path)
        return f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}/{Path(path).name}"


def finish_run(run_id: str, succeeded: bool) -> bool:
    """Best effort (False when skipped)."""
    status = RunStatus.to_string(RunStatus.FINISHED if succeeded else RunStatus.FAILED)
    return _best_effort("end", run_id, client().set_terminated, run_id, status)


def register_model_version(
    model_name: str, source: str, run_id: str | None, tags: dict[str, str]
) -> str:
    """Register ``source`` as a version of ``model_name``, once per ``r1.version_id`` tag."""
    with guard():
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
    with guard():
        c = client()
        for k, v in tags.items():
            c.set_model_version_tag(model_name, version, k, v)


def set_tags(run_id: str, tags: dict[str, str]) -> bool:
    """Best effort (False when skipped)."""

    def send() -> None:
        for k, v in tags.items():
            client().set_tag(run_id, k, v)

    return _best_effort("tags", run_id, send)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


# --- links: MLflow's own UI (R1_MLFLOW_LINKS="ui") or the platform's /mlflow/ pages ("proxy") ---


def _link(ui_fragment: str, proxy_path: str) -> str:
    if settings.R1_MLFLOW_LINKS == "proxy":
        return proxy_path
    return f"{settings.MLFLOW_UI_URL}/{ui_fragment}"


def run_url(experiment: str, run_id: str, proxy_path: str) -> str:
    return _link(f"#/experiments/{experiment}/runs/{run_id}", proxy_path)


def model_url(model_name: str, proxy_path: str) -> str:
    return _link(f"#/models/{quote(model_name, safe='')}", proxy_path)


def model_version_url(model_name: str, version: str, proxy_path: str) -> str:
    return _link(f"#/models/{quote(model_name, safe='')}/versions/{version}", proxy_path)


def flatten(prefix: str, values: dict[str, object]) -> Iterable[tuple[str, object]]:
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(name, value)
        else:
            yield name, value
