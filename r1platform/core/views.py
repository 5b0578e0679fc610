"""The /mlflow/ pages: a team's MLflow runs, models and artifacts, for its members only.

MLflow has no login, so production keeps it internal and links here (``R1_MLFLOW_LINKS="proxy"``).
Every page starts from a database row found through ``accounts.scoping`` (another team's object
is a 404, as if it did not exist) and reads only that row's run or model from MLflow; requests
are GETs and nothing is written to MLflow. Artifacts are sent as attachments, never rendered in
the platform's origin.
"""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe
from mlflow.exceptions import MlflowException

from r1platform.accounts.scoping import get_scoped_or_404, teams_for
from r1platform.core import mlflow_proxy, tracking
from r1platform.jobs.models import Job
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import mlflow_name

log = logging.getLogger(__name__)

RECENT = 50
TEMPLATE = "mlflow/page.html"


def _unreachable(exc: Exception) -> str:
    if tracking.is_unreachable_error(exc):
        return "MLflow cannot be reached right now; try again in a minute."
    return f"MLflow could not show this: {getattr(exc, 'message', exc)}"


@login_required
@require_safe
def index(request):
    return render(request, TEMPLATE, {"kind": "index", "teams": teams_for(request.user)})


@login_required
@require_safe
def experiment(request, pk: int):
    """A team's experiment: its models and the runs of its jobs and uploads."""
    team = teams_for(request.user).filter(pk=pk).first()
    if team is None:
        raise Http404("no such team")
    context: dict[str, Any] = {
        "kind": "experiment",
        "team": team,
        "models": RegisteredModel.objects.filter(team=team).order_by("name"),
        "jobs": Job.objects.filter(team=team)
        .exclude(mlflow_run_id="")
        .select_related("version__model")
        .order_by("-pk")[:RECENT],
        "uploads": ModelVersion.objects.filter(team=team, job__isnull=True)
        .exclude(mlflow_run_id="")
        .select_related("model")
        .order_by("-pk")[:RECENT],
    }
    return render(request, TEMPLATE, context)


@login_required
@require_safe
def job_run(request, pk: int):
    job = get_scoped_or_404(
        Job.objects.select_related("version__model"), teams_for(request.user), pk=pk
    )
    title = f"job {job.pk} · {job.version.model.name} v{job.version.number}"
    return _run_page(request, job.mlflow_run_id, title, job.version.model)


@login_required
@require_safe
def version_run(request, pk: int):
    version = get_scoped_or_404(
        ModelVersion.objects.select_related("model"), teams_for(request.user), pk=pk
    )
    title = f"the run holding {version.model.name} v{version.number}"
    return _run_page(request, version.mlflow_run_id, title, version.model)


@login_required
@require_safe
def model(request, pk: int):
    registered = get_scoped_or_404(RegisteredModel.objects.all(), teams_for(request.user), pk=pk)
    context: dict[str, Any] = {
        "kind": "model",
        "model": registered,
        "versions": registered.versions.order_by("-number"),
    }
    try:
        context["aliases"] = mlflow_proxy.model_aliases(_name(registered))
    except Exception as exc:  # noqa: BLE001 - shown on the page
        context["problem"] = _unreachable(exc)
    return render(request, TEMPLATE, context)


@login_required
@require_safe
def model_version(request, pk: int):
    version = get_scoped_or_404(
        ModelVersion.objects.select_related("model", "job"), teams_for(request.user), pk=pk
    )
    context: dict[str, Any] = {"kind": "model_version", "version": version, "model": version.model}
    if version.mlflow_version:
        try:
            context["facts"] = mlflow_proxy.version_facts(
                _name(version.model), version.mlflow_version
            )
        except Exception as exc:  # noqa: BLE001 - shown on the page
            context["problem"] = _unreachable(exc)
    return render(request, TEMPLATE, context)


def _name(registered: RegisteredModel) -> str:
    return registered.mlflow_name or mlflow_name(registered.team, registered.name)


def _run_page(request, run_id: str, title: str, owner: RegisteredModel) -> HttpResponse:
    """The run's facts and the artifacts in ``?path=``; a file named by ``?path=`` is sent."""
    path = request.GET.get("path", "")
    context: dict[str, Any] = {"kind": "run", "title": title, "model": owner, "run_id": run_id}
    if not run_id:
        return render(request, TEMPLATE, context)
    try:
        entry = mlflow_proxy.file_entry(run_id, path) if path else None
        if entry is not None:
            return _send(run_id, entry)
        context["facts"] = mlflow_proxy.run_facts(run_id, path)
    except mlflow_proxy.ArtifactRefused as exc:
        raise Http404(str(exc)) from None
    except (MlflowException, tracking.TrackingUnavailable, OSError) as exc:
        log.warning("MLflow run %s not shown: %s", run_id, exc)
        context["problem"] = _unreachable(exc)
        return render(request, TEMPLATE, context, status=503)
    return render(request, TEMPLATE, context)


def _send(run_id: str, entry: mlflow_proxy.Entry) -> FileResponse:
    local = mlflow_proxy.download(run_id, entry)
    handle = local.open("rb")
    mlflow_proxy.remove_download(local)  # the open handle still reads it
    response = FileResponse(handle, as_attachment=True, filename=entry.name)
    response["Content-Type"] = "application/octet-stream"
    return response
