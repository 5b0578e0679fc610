"""What the platform's /mlflow/ pages read from the tracking store, bounded.

MLflow has no login of its own, so in production it stays on the internal network and people see
their MLflow objects through these pages (``R1_MLFLOW_LINKS="proxy"``). Nothing here decides who
may see what: the pages look up the run id or model name in the database, scoped to the user's
teams, and pass only that here. The one thing a user types, an artifact path, is accepted only
when the run's own listing has it. Every call goes through :mod:`tracking`, so it has the same
short timeout; an artifact larger than ``R1_MLFLOW_PROXY_MAX_BYTES`` is refused before download.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from r1platform.core import tracking

# Tags MLflow writes for itself: not worth a row on the page.
_SYSTEM_TAG = "mlflow."


class ArtifactRefused(Exception):
    """The path is not a file of this run, or the file is too large to hand out."""


@dataclass(frozen=True)
class Entry:
    path: str
    is_dir: bool
    size: int | None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


@dataclass
class RunFacts:
    run_id: str
    name: str
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    folder: str = ""
    artifacts: list[Entry] = field(default_factory=list)


@dataclass
class VersionFacts:
    name: str
    version: str
    status: str
    run_id: str
    tags: dict[str, str]
    aliases: list[str]


def clean_path(path: str) -> str:
    """A relative artifact path without tricks ("" for the run's root); ArtifactRefused if not."""
    if not path:
        return ""
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise ArtifactRefused("not a path inside the run")
    normal = posixpath.normpath(path)
    if normal in (".", "") or normal.startswith("..") or normal != path.rstrip("/"):
        raise ArtifactRefused("not a path inside the run")
    return normal


def _guarded(fn, *args, **kwargs):
    with tracking.guard():
        return fn(*args, **kwargs)


def run_facts(run_id: str, folder: str = "") -> RunFacts:
    """A run's name, status, params, metrics, tags and the artifacts in ``folder``."""
    folder = clean_path(folder)
    c = tracking.client()
    run = _guarded(c.get_run, run_id)
    return RunFacts(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        params=dict(sorted(run.data.params.items())),
        metrics=dict(sorted(run.data.metrics.items())),
        tags={k: v for k, v in sorted(run.data.tags.items()) if not k.startswith(_SYSTEM_TAG)},
        folder=folder,
        artifacts=list_folder(run_id, folder),
    )


def list_folder(run_id: str, folder: str) -> list[Entry]:
    infos = _guarded(tracking.client().list_artifacts, run_id, clean_path(folder) or None)
    return [Entry(i.path, i.is_dir, i.file_size) for i in infos]


def file_entry(run_id: str, path: str) -> Entry | None:
    """The entry for ``path`` if it is a file of the run (by the listing of its folder)."""
    path = clean_path(path)
    if not path:
        return None
    for entry in list_folder(run_id, posixpath.dirname(path)):
        if entry.path == path and not entry.is_dir:
            return entry
    return None


def download(run_id: str, entry: Entry) -> Path:
    """Fetch one file of the run into a fresh temporary folder; the caller removes the folder
    (``remove_download``). Refused when larger than R1_MLFLOW_PROXY_MAX_BYTES."""
    limit = settings.R1_MLFLOW_PROXY_MAX_BYTES
    if entry.size is None or entry.size > limit:
        raise ArtifactRefused(f"{entry.name} is larger than the {limit} bytes shown here")
    folder = Path(tempfile.mkdtemp(prefix="r1-mlflow-"))
    try:
        local = _guarded(
            tracking.client().download_artifacts, run_id, entry.path, dst_path=str(folder)
        )
        path = Path(local)
        if not path.is_file() or path.stat().st_size > limit:
            raise ArtifactRefused(f"{entry.name} is not a file of at most {limit} bytes")
        return path
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_download(path: Path) -> None:
    """Remove the temporary folder ``download`` made (an open handle still reads the file)."""
    for parent in path.parents:
        if parent.name.startswith("r1-mlflow-"):
            shutil.rmtree(parent, ignore_errors=True)
            return


def version_facts(name: str, version: str) -> VersionFacts:
    mv = _guarded(tracking.client().get_model_version, name, version)
    return VersionFacts(
        name=mv.name,
        version=str(mv.version),
        status=str(mv.status),
        run_id=mv.run_id or "",
        tags=dict(sorted(mv.tags.items())),
        aliases=sorted(getattr(mv, "aliases", []) or []),
    )


def model_aliases(name: str) -> dict[str, str]:
    """The registered model's aliases (alias -> version number)."""
    model = _guarded(tracking.client().get_registered_model, name)
    return dict(sorted((model.aliases or {}).items()))
