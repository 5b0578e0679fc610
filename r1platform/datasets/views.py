from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.vary import vary_on_headers

from pipelines.datasets import TARGET_NAMES
from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.datasets.forms import DatasetUploadForm
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import (
    SPLIT_KEYS,
    DatasetRefused,
    dataset_ids_in,
    upload_dataset,
)
from r1platform.jobs.models import Job

PAGE_SIZE = 25
RECENT_JOBS = 10
# The jobs page of a dataset looks through this many of the team's latest jobs: the settings
# naming a dataset live in each job's stages JSON, which no portable index covers.
JOBS_SCANNED = 500


def _get_dataset_for_user(request, pk: int) -> Dataset:
    """The dataset if it belongs to one of the user's teams; 404 otherwise."""
    qs = Dataset.objects.select_related("team", "created_by")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _schema_rows(dataset: Dataset, target: str) -> list[dict]:
    """One row per column (CSV, JSON Lines) or array (npz): name, dtype, shape, is-target."""
    entries = dataset.schema.get("columns") or dataset.schema.get("arrays") or []
    return [
        {
            "name": e.get("name", ""),
            "dtype": e.get("dtype", ""),
            "shape": e.get("shape"),
            "is_target": bool(target) and e.get("name") == target,
        }
        for e in entries
    ]


# How the dataset page names each kind of text dataset (pipelines.datasets.text_corpus).
TEXT_KIND_LABELS = {
    "text": "text (language modelling, perplexity)",
    "prompt_completion": "prompt / completion (supervised fine-tuning)",
    "messages": "messages (chat)",
    "test_cases": "test cases (scenarios)",
}


def _text_summary(dataset: Dataset) -> dict | None:
    """A text dataset's kind, its label and the sample rows stored at upload; None otherwise."""
    kind = dataset.schema.get("text_kind")
    if not kind:
        return None
    samples = dataset.schema.get("samples") or []
    return {
        "kind": kind,
        "label": TEXT_KIND_LABELS.get(kind, kind),
        "chars": dataset.schema.get("chars"),
        "max_row_chars": dataset.schema.get("max_row_chars"),
        "samples": [s for s in samples if isinstance(s, dict)],
        "checks": sorted((dataset.schema.get("checks") or {}).items()),
        "tags": sorted((dataset.schema.get("tags") or {}).items()),
    }


def _effective_target(dataset: Dataset) -> tuple[str, bool]:
    """The target jobs read, and whether it was picked by name rather than given at upload."""
    if dataset.target:
        return dataset.target, False
    entries = dataset.schema.get("columns") or dataset.schema.get("arrays") or []
    names = {e.get("name") for e in entries}
    return next((n for n in TARGET_NAMES if n in names), ""), True


def _split_rows(dataset: Dataset) -> list[dict]:
    """Each split's fraction and about how many rows it gets (the worker rounds the same way)."""
    rows = []
    for key in SPLIT_KEYS:
        fraction = float(dataset.splits.get(key, 0) or 0)
        rows.append(
            {
                "name": key,
                "fraction": fraction,
                "percent": round(fraction * 100, 1),
                "rows": round(fraction * dataset.rows),
            }
        )
    return rows


def _jobs_using(dataset: Dataset) -> list[Job]:
    """The team's recent jobs whose stage settings name this dataset, newest first."""
    recent = (
        Job.objects.filter(team_id=dataset.team_id)
        .select_related("version__model")
        .order_by("-created_at", "-pk")[:JOBS_SCANNED]
    )
    found: list[Job] = []
    for job in recent:
        try:
            ids = dataset_ids_in(job.stages or [])
        except (TypeError, ValueError, AttributeError):
            continue
        if dataset.pk in ids:
            found.append(job)
            if len(found) == RECENT_JOBS:
                break
    return found


@login_required
@vary_on_headers("HX-Request")
def dataset_list(request):
    q = request.GET.get("q", "").strip()
    datasets = scoped(Dataset.objects.select_related("team"), teams_for(request.user))
    if q:
        datasets = datasets.filter(name__icontains=q)
    page = Paginator(datasets.order_by("-created_at", "-pk"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    template_name = "datasets/dataset_list.html"
    if request.htmx and not request.htmx.history_restore_request:
        template_name += "#table-section"
    return render(request, template_name, {"page": page, "q": q})


@login_required
def dataset_upload(request):
    if request.method == "POST":
        data, files = request.POST, request.FILES  # parsing the body is what sets the refusal
        refusal = getattr(request, "upload_refusal", None)
        form = DatasetUploadForm(request.user, data, files, refusal=refusal)
        if form.is_valid():
            data = form.cleaned_data
            try:
                dataset = upload_dataset(
                    team=data["team"],
                    user=request.user,
                    name=data["name"],
                    uploaded=data["file"],
                    target=data["target"],
                    splits=data["splits"],
                )
            except DatasetRefused as exc:
                form.add_error(None, str(exc))
            else:
                kind = dataset.schema.get("text_kind")
                what = f"{dataset.format} {kind}" if kind else dataset.format
                messages.success(
                    request,
                    f"Uploaded {dataset.name} v{dataset.version} ({what}, "
                    f"{dataset.rows:,} rows, sha256 {dataset.sha256[:12]}…)",
                )
                return redirect(dataset)
        return render(request, "datasets/dataset_upload.html", {"form": form}, status=400)
    # "Upload a new version" links prefill the name (and team) of the dataset they come from.
    initial = {k: request.GET[k] for k in ("name", "target") if request.GET.get(k)}
    team = request.GET.get("team", "")
    if team.isdigit() and teams_for(request.user).filter(pk=int(team)).exists():
        initial["team"] = int(team)
    form = DatasetUploadForm(request.user, initial=initial)
    return render(request, "datasets/dataset_upload.html", {"form": form})


@login_required
def dataset_detail(request, pk: int):
    dataset = _get_dataset_for_user(request, pk)
    target, target_guessed = _effective_target(dataset)
    versions = (
        Dataset.objects.filter(team_id=dataset.team_id, name=dataset.name)
        .only("pk", "name", "version", "format", "rows", "size_bytes", "sha256", "created_at")
        .order_by("-version")
    )
    context = {
        "dataset": dataset,
        "target": target,
        "target_guessed": target_guessed,
        "schema_kind": "arrays" if "arrays" in dataset.schema else "columns",
        "schema_rows": _schema_rows(dataset, target),
        "text": _text_summary(dataset),
        "splits": _split_rows(dataset),
        "seed": dataset.splits.get("seed", 0),
        "versions": versions,
        "jobs": _jobs_using(dataset),
    }
    return render(request, "datasets/dataset_detail.html", context)
