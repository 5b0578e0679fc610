from __future__ import annotations

import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.certification.forms import CertifyEverywhereForm, CertifyForm, threshold_help
from r1platform.certification.models import Certification, CertStatus
from r1platform.certification.reports import report_context, stored_report
from r1platform.certification.services import (
    LAUNCH_SETTINGS,
    Everywhere,
    launch_certification,
    launch_everywhere,
    with_test_cases,
)
from r1platform.certification.tables import compatibility_matrix, rows
from r1platform.jobs.services import LaunchRefused
from r1platform.registry.models import ModelVersion, RegisteredModel

PAGE_SIZE = 25
DETAIL = "certification/detail.html"
CERTIFY = "certification/certify.html"
RECERTIFY_STATES = ("invalid", "failed", "error")


def _get_version_for_user(request, pk: int) -> ModelVersion:
    qs = ModelVersion.objects.select_related("model", "team")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _get_cert_for_user(request, pk: int) -> Certification:
    """The certification if it belongs to one of the user's teams; 404 otherwise."""
    qs = Certification.objects.select_related(
        "version__model__team", "profile", "job", "created_by", "golden_dataset"
    )
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _wants_partial(request) -> bool:
    return bool(request.htmx) and not request.htmx.history_restore_request


def _detail_context(cert: Certification) -> dict:
    context = report_context(cert, live=True)
    context["can_recertify"] = context["validity"]["state"] in RECERTIFY_STATES
    context["recertify_key"] = uuid.uuid4().hex
    context["downloads"] = [
        (kind, kind.upper()) for kind in ("html", "pdf", "json") if getattr(cert, f"report_{kind}")
    ]
    return context


@login_required
@vary_on_headers("HX-Request")
def certification_detail(request, pk: int):
    cert = _get_cert_for_user(request, pk)
    context = _detail_context(cert)
    if _wants_partial(request):
        # The last poll clears the flash messages ("queued"), which are over by then.
        context["clear_messages"] = cert.status != CertStatus.PENDING
        html = render_to_string(DETAIL + "#cert-live", context, request=request)
        if cert.status != CertStatus.PENDING:
            return HttpResponseStopPolling(html)  # 286: the final state, and polling stops
        return HttpResponse(html)
    return render(request, DETAIL, context)


@login_required
def report_download(request, pk: int, kind: str):
    report = stored_report(_get_cert_for_user(request, pk), kind)
    if report is None:
        raise Http404("this report does not exist yet")
    response = HttpResponse(report.data, content_type=report.content_type)
    # The HTML report opens in the browser (``?download=1`` saves it); the others download.
    inline = kind == "html" and "download" not in request.GET
    disposition = "inline" if inline else "attachment"
    response["Content-Disposition"] = f'{disposition}; filename="{report.filename}"'
    if kind == "html":
        # A self-contained document: its own inline styles, nothing to run or fetch.
        response["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
        )
    return response


@login_required
def certify(request, pk: int):
    version = _get_version_for_user(request, pk)
    template_name = CERTIFY + ("#certify-form" if _wants_partial(request) else "")
    form = CertifyForm(request.POST if request.method == "POST" else None, version=version)
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                cert = launch_certification(
                    version=version,
                    profile_key=data["profile"],
                    level=data["level"],
                    user=request.user,
                    thresholds=with_test_cases(data["thresholds"], data["test_cases"]),
                    golden_dataset_id=data["golden_dataset"],
                    idempotency_key=data["idempotency_key"],
                )
            except LaunchRefused as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, f"Certification {cert.pk} of {version} is queued.")
                if request.htmx:
                    return HttpResponseClientRedirect(cert.get_absolute_url())
                return redirect(cert)
        context = {"form": form, "version": version, "threshold_help": threshold_help()}
        return render(request, template_name, context, status=400)
    context = {"form": form, "version": version, "threshold_help": threshold_help()}
    return render(request, template_name, context)


@login_required
@require_POST
def certify_everywhere(request, pk: int):
    version = _get_version_for_user(request, pk)
    form = CertifyEverywhereForm(request.POST, version=version)
    if form.is_valid():
        data = form.cleaned_data
        try:
            done = launch_everywhere(
                version,
                data["level"],
                request.user,
                golden_dataset_id=data["golden_dataset"],
                thresholds=with_test_cases(None, data["test_cases"]),
                idempotency_key=data["idempotency_key"],
            )
        except LaunchRefused as exc:
            refusal = str(exc)
        else:
            messages.success(request, _everywhere_message(version, done))
            # The matrix shows a pending cell per launched certification, filled as jobs end.
            return redirect("certification:matrix", version.model_id)
    else:
        refusal = "; ".join(
            f"{k}: {e[0]['message']}" for k, e in form.errors.get_json_data().items()
        )
    messages.error(request, f"Could not certify {version} on every profile: {refusal}")
    return redirect(version.get_absolute_url() + "#certifications")


def _everywhere_message(version: ModelVersion, done: Everywhere) -> str:
    count = len(done.launched)
    profiles = ", ".join(cert.profile.key for cert in done.launched)
    message = f"Queued {count} certification{'s' if count > 1 else ''} of {version} on: {profiles}."
    if done.skipped:
        skipped = "; ".join(f"{key} ({reason})" for key, reason in done.skipped)
        message += f" Skipped: {skipped}."
    return message


@login_required
@require_POST
def recertify(request, pk: int):
    cert = _get_cert_for_user(request, pk)
    try:
        new = launch_certification(
            version=cert.version,
            profile_key=cert.profile.key,
            level=cert.level,
            user=request.user,
            thresholds={k: v for k, v in cert.settings.items() if k not in LAUNCH_SETTINGS},
            golden_dataset_id=cert.golden_dataset_id,
            idempotency_key=request.POST.get("idempotency_key") or None,
        )
    except LaunchRefused as exc:
        messages.error(request, f"Could not re-certify: {exc}")
        return redirect(cert)
    messages.success(request, f"Re-certification {new.pk} is queued.")
    if request.htmx:
        return HttpResponseClientRedirect(new.get_absolute_url())
    return redirect(new)


@login_required
def model_matrix(request, pk: int):
    qs = RegisteredModel.objects.select_related("team")
    model = get_scoped_or_404(qs, teams_for(request.user), pk=pk)
    return render(
        request,
        "certification/matrix.html",
        {"model": model, "matrix": compatibility_matrix(model)},
    )


@login_required
def certification_list(request):
    certs = scoped(
        Certification.objects.select_related("version__model", "profile", "job"),
        teams_for(request.user),
    )
    status = request.GET.get("status", "")
    if status in CertStatus.values:
        certs = certs.filter(status=status)
    else:
        status = ""
    page = Paginator(certs.order_by("-created_at", "-pk"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    context = {
        "page": page,
        "rows": rows(page.object_list),
        "status": status,
        "statuses": CertStatus.choices,
    }
    return render(request, "certification/list.html", context)
