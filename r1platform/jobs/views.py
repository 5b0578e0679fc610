from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from pipelines.core import StageConfigError
from pipelines.stages import default_pipeline, family_of, stage_schemas
from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.core import tracking
from r1platform.core.charts.training import stage_training_charts
from r1platform.core.demo import demo_pipeline
from r1platform.datasets.models import Dataset
from r1platform.jobs.forms import LaunchForm, dataset_label
from r1platform.jobs.launch_fields import split_datasets
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import LaunchRefused, cancel_job, launch_job, waits_for_broker
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import input_specs

PAGE_SIZE = 25
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
DETAIL = "jobs/job_detail.html"


def _get_job_for_user(request, pk: int) -> Job:
    """The job if it belongs to one of the user's teams; 404 otherwise."""
    qs = Job.objects.select_related("team", "version__model")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _get_version_for_user(request, raw_pk: str | None) -> ModelVersion:
    if not raw_pk or not raw_pk.isdigit():
        raise Http404("no such version")
    qs = ModelVersion.objects.select_related("model", "team")
    return get_scoped_or_404(qs, teams_for(request.user), pk=int(raw_pk))


def _team_datasets(version: ModelVersion):
    """The datasets a launch on ``version`` may name: its team's, for the pickers."""
    return Dataset.objects.filter(team_id=version.team_id).order_by("name", "-version")


def _demo_preset(request, version: ModelVersion, datasets, schemas) -> list[dict] | None:
    """The demo pipeline on the dataset ``?dataset=`` names, for ``?preset=demo``; else None.

    It starts with finetune, which takes TorchScript, so only TorchScript versions get it.
    """
    raw = request.GET.get("dataset", "")
    if request.GET.get("preset") != "demo" or version.format != "torchscript" or not raw.isdigit():
        return None
    dataset = next((d for d in datasets if d.pk == int(raw)), None)
    if dataset is None:
        return None
    known = {s["name"] for s in schemas}
    return [stage for stage in demo_pipeline(dataset.pk) if stage["name"] in known]


def _job_context(job: Job) -> dict:
    """Everything the live section of the job page shows."""
    produced = list(job.produced.select_related("parent").order_by("number"))
    by_id = {v.pk: v for v in produced}
    stages = [
        {**r, "produced": [by_id[pk] for pk in r.get("versions", []) if pk in by_id]}
        for r in job.stage_results
    ]
    benchmarks = job.benchmarks.select_related("version").order_by(
        "version__number", "batch_size", "backend"
    )
    run_url = ""
    if job.mlflow_run_id and job.mlflow_experiment_id:
        proxy = reverse("mlflow:job_run", args=[job.pk])
        run_url = tracking.run_url(job.mlflow_experiment_id, job.mlflow_run_id, proxy)
    return {
        "job": job,
        "stages": stages,
        "produced": produced,
        "benchmarks": benchmarks,
        "run_url": run_url,
        # Markup built by training_chart_svg, which escapes every piece of text it writes.
        "training": stage_training_charts(job.stage_results),
    }


def _wants_partial(request) -> bool:
    """An htmx swap asks for the partial; a history restore after a cache miss needs the page."""
    return bool(request.htmx) and not request.htmx.history_restore_request


@login_required
@vary_on_headers("HX-Request")
def job_list(request):
    jobs = scoped(Job.objects.select_related("version__model", "team"), teams_for(request.user))
    status = request.GET.get("status", "")
    if status in JobStatus.values:
        jobs = jobs.filter(status=status)
    else:
        status = ""
    page = Paginator(jobs.order_by("-created_at", "-pk"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    polling = any(job.status in ACTIVE for job in page)
    context = {"page": page, "status": status, "statuses": JobStatus.choices, "polling": polling}
    if _wants_partial(request):
        html = render_to_string("jobs/job_list.html#table-section", context, request=request)
        if request.htmx.trigger == "jobs-table" and not polling:
            return HttpResponseStopPolling(html)
        return HttpResponse(html)
    return render(request, "jobs/job_list.html", context)


@login_required
def job_new(request):
    version = _get_version_for_user(
        request, request.GET.get("version") or request.POST.get("version")
    )
    schemas = stage_schemas(family_of(version.format))
    try:
        defaults = default_pipeline(version.format, version.precision)
    except StageConfigError:  # a compiled engine (TensorRT, AOTInductor) has no default pipeline
        defaults = []
    # Only the datasets that fit the model are offered; the others are listed with the reason.
    datasets, unfit = split_datasets(_team_datasets(version), input_specs(version), version.format)
    pickers = {"datasets": datasets, "unfit_datasets": unfit}
    template_name = "jobs/job_new.html"
    if _wants_partial(request):
        template_name += "#launch-form"
    if request.method == "POST":
        form = LaunchForm(request.POST, schemas=schemas, defaults=defaults, **pickers)
        if form.is_valid():
            try:
                job, created = launch_job(
                    version=version,
                    user=request.user,
                    stages=form.cleaned_data["stages"],
                    idempotency_key=form.cleaned_data["idempotency_key"],
                )
            except LaunchRefused as exc:
                form.add_error(None, str(exc))
            else:
                if waits_for_broker(job):
                    messages.warning(request, _unsent_message(job))
                elif created:
                    messages.success(request, f"Launched job {job.pk} on {version}.")
                else:
                    messages.info(request, f"Job {job.pk} was already launched with this form.")
                if request.htmx:
                    return HttpResponseClientRedirect(job.get_absolute_url())
                return redirect(job)
        context = {"form": form, "version": version}
        return render(request, template_name, context, status=400)
    preset = _demo_preset(request, version, datasets, schemas)
    form = LaunchForm(schemas=schemas, defaults=preset or defaults, **pickers)
    context = {"form": form, "version": version, "preset": "demo" if preset else ""}
    if version.format == "torchscript":
        context["demo_choices"] = [(d.pk, dataset_label(d)) for d in form.datasets]
    return render(request, template_name, context)


def _unsent_message(job: Job) -> str:
    return (
        f"Job {job.pk} is saved, but the job queue (the broker) cannot be reached right now. "
        "It will start by itself once the broker is back; nothing else to do."
    )


@login_required
@vary_on_headers("HX-Request")
def job_detail(request, pk: int):
    job = _get_job_for_user(request, pk)
    context = _job_context(job)
    if _wants_partial(request):
        # The last poll clears the flash messages, which described the job before its end.
        context["clear_messages"] = job.is_finished
        html = render_to_string(DETAIL + "#job-live", context, request=request)
        if job.is_finished:
            # 286: htmx swaps in this final state and stops polling; the final markup carries
            # no polling trigger either, so nothing starts again after the swap.
            return HttpResponseStopPolling(html)
        return HttpResponse(html)
    return render(request, DETAIL, context)


@login_required
@require_POST
def job_cancel(request, pk: int):
    job = cancel_job(_get_job_for_user(request, pk))
    if request.htmx:
        return render(request, DETAIL + "#job-live", _job_context(job))
    if job.status == JobStatus.CANCELLED:
        messages.success(request, f"Job {job.pk} was cancelled.")
    elif job.is_finished:
        messages.info(request, f"Job {job.pk} had already finished ({job.status}).")
    else:
        messages.info(request, f"Job {job.pk} will stop at its next progress step.")
    return redirect(job)
