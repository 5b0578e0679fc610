from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.vary import vary_on_headers

from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.core import tracking
from r1platform.jobs.models import Job
from r1platform.registry.forms import UploadForm
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import UploadRefused, mlflow_name, upload_model

PAGE_SIZE = 25
RECENT_JOBS = 10


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
def model_detail(request, pk: int):
    model = _get_model_for_user(request, pk)
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
        "versions": versions,
        "lineage": _lineage(versions),
        "jobs": jobs,
    }
    return render(request, "registry/model_detail.html", context)


@login_required
def version_detail(request, pk: int):
    version = _get_version_for_user(request, pk)
    context = {
        "version": version,
        "model": version.model,
        "children": version.children.order_by("number"),
        "benchmarks": version.benchmarks.select_related("job").order_by(
            "batch_size", "backend", "job_id"
        ),
        "mlflow_url": (
            tracking.model_version_url(_mlflow_name(version.model), version.mlflow_version)
            if version.mlflow_version
            else ""
        ),
        "jobs": version.jobs.select_related("version__model").order_by("-created_at", "-pk")[
            :RECENT_JOBS
        ],
    }
    return render(request, "registry/version_detail.html", context)
