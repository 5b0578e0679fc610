from __future__ import annotations

import math
import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers

from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.core import tracking
from r1platform.core.charts.benchmarks import latency_chart_svg
from r1platform.core.charts.training import stage_training_charts
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job
from r1platform.registry import tables as compare_tables
from r1platform.registry.forms import UploadForm
from r1platform.registry.history import add_row_speedups, benchmark_history, slower_than_upload
from r1platform.registry.mirror import retry_mirror
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel, Task
from r1platform.registry.services import UploadRefused, lineage, mlflow_name, upload_model
from r1platform.schedules.tables import schedules_with_last_run
from r1platform.serving.history import serving_history

PAGE_SIZE = 25
RECENT_JOBS = 10

# Evaluation metrics the version page shows as tiles, in this order: key -> (label, kind).
# "fraction" reads as a percentage; "error" and "score" as plain numbers.
EVALUATION_METRICS = {
    "accuracy": ("Accuracy", "fraction"),
    "agreement": ("Agreement with parent", "fraction"),
    "mse": ("MSE", "error"),
    "rmse": ("RMSE", "error"),
    "mae": ("MAE", "error"),
    "cosine": ("Cosine similarity", "score"),
}
TOP_K = re.compile(r"^top(\d+)$")


def _get_model_for_user(request, pk: int) -> RegisteredModel:
    """The model if it belongs to one of the user's teams; 404 otherwise."""
    qs = RegisteredModel.objects.select_related("team")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _get_version_for_user(request, pk: int) -> ModelVersion:
    qs = ModelVersion.objects.select_related("model__team", "parent", "job")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _mlflow_name(model: RegisteredModel) -> str:
    return model.mlflow_name or mlflow_name(model.team, model.name)


def _lineage(versions: list[ModelVersion]) -> list[dict]:
    """The versions as a flat list of tree tokens (item / open / close), roots first.

    Built iteratively from parent links so a long chain of versions never recurses.
    """
    by_id = {v.pk: v for v in versions}
    children: dict[int | None, list[ModelVersion]] = {}
    for v in versions:
        parent = v.parent_id if v.parent_id in by_id else None
        children.setdefault(parent, []).append(v)
    for kids in children.values():
        kids.sort(key=lambda v: v.number)

    tokens: list[dict] = []
    stack: list[object] = list(reversed(children.get(None, [])))
    while stack:
        node = stack.pop()
        if node == "close":
            tokens.append({"kind": "close"})
            continue
        kids = children.get(node.pk, [])
        tokens.append({"kind": "item", "version": node, "has_children": bool(kids)})
        if kids:
            tokens.append({"kind": "open"})
            stack.append("close")
            stack.extend(reversed(kids))
    return tokens


@login_required
@vary_on_headers("HX-Request")
def model_list(request):
    q = request.GET.get("q", "").strip()
    models = scoped(RegisteredModel.objects.select_related("team"), teams_for(request.user))
    if q:
        models = models.filter(name__icontains=q)
    page = Paginator(models.order_by("-updated_at", "-pk"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    template_name = "registry/model_list.html"
    if request.htmx and not request.htmx.history_restore_request:
        template_name += "#table-section"
    return render(request, template_name, {"page": page, "q": q})


@login_required
def model_upload(request):
    if request.method == "POST":
        data, files = request.POST, request.FILES  # parsing the body is what sets the refusal
        refusal = getattr(request, "upload_refusal", None)
        form = UploadForm(request.user, data, files, refusal=refusal)
        if form.is_valid():
            data = form.cleaned_data
            try:
                version = upload_model(
                    team=data["team"],
                    user=request.user,
                    name=data["name"],
                    task=data["task"],
                    uploaded=data["file"],
                    input_shape=data["input_shape"],
                    input_dtype=data["input_dtype"],
                )
            except UploadRefused as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(
                    request,
                    f"Uploaded {version.model.name} v{version.number} "
                    f"({version.get_format_display()}, sha256 {version.sha256[:12]}…)",
                )
                return redirect(version.model)
        return render(request, "registry/model_upload.html", {"form": form}, status=400)
    return render(request, "registry/model_upload.html", {"form": UploadForm(request.user)})


@login_required
@vary_on_headers("HX-Request", "HX-Target")
def model_detail(request, pk: int):
    model = _get_model_for_user(request, pk)
    if request.htmx and request.htmx.target == "serving-section":
        # The serving section refreshing itself: only its own query.
        context = {"model": model, "serving": serving_history(model)}
        return render(request, "registry/model_detail.html#serving-section", context)
    versions = list(
        model.versions.select_related("job")
        .defer("inputs", "outputs", "details", "metrics")
        .order_by("-number")
    )
    by_id = {v.pk: v for v in versions}
    for v in versions:
        if v.parent_id in by_id:
            v.parent = by_id[v.parent_id]  # fills the relation cache: no query per row
    jobs = (
        Job.objects.filter(version__model=model)
        .select_related("version__model")
        .order_by("-created_at", "-pk")[:RECENT_JOBS]
    )
    context = {
        "model": model,
        "mlflow_name": _mlflow_name(model),
        "mlflow_model_url": tracking.model_url(
            _mlflow_name(model), reverse("mlflow:model", args=[model.pk])
        ),
        "versions": versions,
        "lineage": _lineage(versions),
        "jobs": jobs,
        "serving": serving_history(model),
        "history": benchmark_history(model),
        # The model's team's schedules only, each with its last run's decision: one query.
        "schedules": schedules_with_last_run(model.schedules.filter(team_id=model.team_id)),
    }
    if model.task == Task.TEXT_GENERATION:  # the first version's facts: one small query
        first = model.versions.order_by("number").values_list("number", "details__llm").first()
        context["llm_version"], context["llm"] = first or (None, None)
    return render(request, "registry/model_detail.html", context)


def _percent(value: float) -> str:
    return f"{value * 100:.2f}%"


def _metric_text(value: float, kind: str) -> str:
    if kind == "fraction":
        return _percent(value)
    if kind == "score":
        return f"{value:.4f}"
    return f"{value:.4g}"


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _evaluation(version: ModelVersion) -> dict | None:
    """The version's evaluation metrics as display tiles, and the metrics left for the raw table.

    Keys such as ``parent_accuracy`` become the tile's parent value; ``retention`` (child over
    parent on the task's primary metric) and ``size_ratio`` read as percentages.
    """
    metrics = version.metrics or {}
    used: set[str] = set()
    tiles: list[dict] = []

    def add(key: str, label: str, kind: str) -> None:
        value = _finite(metrics.get(key))
        if value is None:
            return
        parent = _finite(metrics.get(f"parent_{key}"))
        used.update({key, f"parent_{key}"} if parent is not None else {key})
        tiles.append(
            {
                "key": key,
                "label": label,
                "value": _metric_text(value, kind),
                "parent": _metric_text(parent, kind) if parent is not None else "",
            }
        )

    add("accuracy", *EVALUATION_METRICS["accuracy"])
    for k in sorted(int(m.group(1)) for m in map(TOP_K.match, metrics) if m):
        add(f"top{k}", f"Top-{k} accuracy", "fraction")
    for key in ("agreement", "mse", "rmse", "mae", "cosine"):
        add(key, *EVALUATION_METRICS[key])

    retention = _finite(metrics.get("retention"))
    retained = None
    if retention is not None:
        used.add("retention")
        # The metric it was measured on: the first one that also has a parent value.
        basis = next(
            (t for t in tiles if t["parent"] and t["key"] in ("accuracy", "mse", "cosine")), None
        ) or next((t for t in tiles if t["parent"]), None)
        retained = {
            "value": _percent(retention),
            "metric": basis["label"].lower() if basis else "",
            "parent": basis["parent"] if basis else "",
            "child": basis["value"] if basis else "",
            "low": retention < 0.99,
        }
    size_ratio = _finite(metrics.get("size_ratio"))
    if size_ratio is not None:
        used.add("size_ratio")
    rows = _finite(metrics.get("eval_rows"))
    if rows is not None:
        used.add("eval_rows")
    if not tiles and retained is None and size_ratio is None:
        return None

    dataset = None
    evaluation_meta = (version.details or {}).get("evaluation") or {}
    dataset_id = evaluation_meta.get("dataset_id")
    if isinstance(dataset_id, int) and not isinstance(dataset_id, bool):
        dataset = (
            Dataset.objects.filter(team_id=version.team_id, pk=dataset_id)
            .only("pk", "name", "version")
            .first()
        )
    return {
        "tiles": tiles,
        "retention": retained,
        "size_ratio": _percent(size_ratio) if size_ratio is not None else "",
        "smaller": f"{1 / size_ratio:.1f}" if size_ratio else "",
        "rows": int(rows) if rows is not None else None,
        "dataset": dataset,
        "split": evaluation_meta.get("split", ""),
        "other": {k: v for k, v in metrics.items() if k not in used},
    }


def _latest_job_rows(rows: list[BenchmarkResult]) -> list[BenchmarkResult]:
    """The rows of the newest job among ``rows`` (which have ``job`` selected)."""
    if not rows:
        return []
    latest = max(rows, key=lambda r: (r.job.created_at, r.job_id))
    return [r for r in rows if r.job_id == latest.job_id]


@login_required
def version_detail(request, pk: int):
    version = _get_version_for_user(request, pk)
    benchmarks = list(
        version.benchmarks.select_related("job").order_by("batch_size", "backend", "job_id")
    )
    chart_rows = _latest_job_rows(benchmarks)
    context = {
        "version": version,
        "model": version.model,
        "children": version.children.order_by("number"),
        "benchmarks": benchmarks,
        # vs_parent / vs_upload on each row, from the same job's rows only.
        "show_speedup": add_row_speedups(version, benchmarks),
        "upload": lineage(version)[0] if version.parent_id else None,
        # Markup built by latency_chart_svg, which escapes every piece of text it writes.
        "latency_chart": latency_chart_svg(chart_rows),
        "chart_job_id": chart_rows[0].job_id if chart_rows else None,
        "evaluation": _evaluation(version),
        "slower_than_upload": slower_than_upload(version.model).get(version.pk, []),
        # The training curves of the job that made this version (escaped markup).
        "training": stage_training_charts(version.job.stage_results) if version.job else [],
        "mlflow_url": (
            tracking.model_version_url(
                _mlflow_name(version.model),
                version.mlflow_version,
                reverse("mlflow:model_version", args=[version.pk]),
            )
            if version.mlflow_version
            else ""
        ),
        "jobs": version.jobs.select_related("version__model").order_by("-created_at", "-pk")[
            :RECENT_JOBS
        ],
    }
    return render(request, "registry/version_detail.html", context)


@login_required
def compare(request, pk: int):
    qs = RegisteredModel.objects.select_related("team")
    model = get_scoped_or_404(qs, teams_for(request.user), pk=pk)
    versions, problem = compare_tables.chosen_versions(model, request.GET.getlist("v"))
    context = {
        "model": model,
        "all_versions": model.versions.order_by("-number"),
        "chosen": {v.pk for v in versions},
        "versions": versions,
        "problem": problem,
    }
    if len(versions) >= 2:
        context |= {
            "metrics": compare_tables.metric_lines(versions),
            "benchmarks": compare_tables.benchmark_lines(versions),
            "certifications": compare_tables.certification_lines(versions),
        }
    return render(request, "registry/compare.html", context)


@login_required
@require_POST
def version_mirror(request, pk: int):
    """Try the version's MLflow mirror again now (a failed one included); say how it went."""
    version = _get_version_for_user(request, pk)
    number = retry_mirror(version)
    if number:
        messages.success(request, f"v{version.number} is MLflow model version {number}.")
    else:
        version.refresh_from_db()
        messages.warning(
            request,
            f"MLflow did not take v{version.number} yet ({version.mlflow_error or 'unreachable'}); "
            "beat tries again every minute.",
        )
    return redirect(version)
