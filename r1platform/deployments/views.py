from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers

from r1platform.accounts.scoping import get_scoped_or_404, teams_for
from r1platform.deployments import services
from r1platform.deployments.forms import DecisionForm, PromoteForm, RollbackForm
from r1platform.deployments.models import Action, AuditEvent, PromotionRequest
from r1platform.deployments.tables import section_context
from r1platform.registry.models import RegisteredModel

SECTION = "deployments/partials/section.html"
PAGE_SIZE = 50
LEVEL = {
    "promoted": messages.SUCCESS,
    "rolled_back": messages.SUCCESS,
    "pending": messages.INFO,
    "rejected": messages.INFO,
    "refused": messages.ERROR,
}


def _get_model_for_user(request, pk: int) -> RegisteredModel:
    """The model if it belongs to one of the user's teams; 404 otherwise."""
    qs = RegisteredModel.objects.select_related("team")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _get_request_for_user(request, pk: int) -> PromotionRequest:
    qs = PromotionRequest.objects.select_related("model__team", "pool", "version")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _wants_partial(request) -> bool:
    return bool(request.htmx) and not request.htmx.history_restore_request


def _answer(
    request, model: RegisteredModel, text: str, level: int, form=None, status: int = 200
) -> HttpResponse:
    """The section again with the outcome (htmx), or the outcome as a message and a redirect."""
    if _wants_partial(request):
        notice = {"text": text, "tag": messages.DEFAULT_TAGS[level]}
        context = {**section_context(model, form), "notice": notice}
        return render(request, SECTION, context, status=status)
    messages.add_message(request, level, text)
    return redirect(reverse("registry:model_detail", args=[model.pk]) + "#deployments")


def _outcome_text(outcome: services.PromotionOutcome) -> str:
    if outcome.status == "refused":
        return f"Refused: {outcome.reason}"
    d = outcome.deployment
    if outcome.status in ("promoted", "rolled_back") and d is not None:
        verb = "Rolled back" if outcome.status == "rolled_back" else "Promoted"
        return f"{verb}: v{d.version.number} now serves {d.stage} on {d.pool.name}."
    return outcome.reason[:1].upper() + outcome.reason[1:] + "."


@login_required
@vary_on_headers("HX-Request")
def model_deployments(request, pk: int):
    model = _get_model_for_user(request, pk)
    if _wants_partial(request):
        return render(request, SECTION, section_context(model))
    return render(request, "deployments/model.html", section_context(model))


@login_required
@require_POST
def promote(request, pk: int):
    model = _get_model_for_user(request, pk)
    form = PromoteForm(request.POST, model=model)
    if not form.is_valid():
        errors = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
        return _answer(request, model, f"Not promoted: {errors}", messages.ERROR, form, 400)
    data = form.cleaned_data
    outcome = services.promote(
        model=model,
        version=data["version"],
        pool=data["pool"],
        stage=data["stage"],
        actor=request.user,
        reason=data["reason"],
    )
    # A refusal keeps what was chosen, so the user can fix one thing and send it again.
    kept = form if outcome.status == "refused" else None
    return _answer(request, model, _outcome_text(outcome), LEVEL[outcome.status], kept)


@login_required
@require_POST
def rollback(request, pk: int):
    model = _get_model_for_user(request, pk)
    form = RollbackForm(request.POST)
    if not form.is_valid():
        return _answer(
            request, model, "Not rolled back: choose a pool and a stage.", messages.ERROR
        )
    outcome = services.rollback(
        model=model,
        pool=form.cleaned_data["pool"],
        stage=form.cleaned_data["stage"],
        actor=request.user,
        reason=form.cleaned_data["reason"],
    )
    return _answer(request, model, _outcome_text(outcome), LEVEL[outcome.status])


Decide = Callable[[PromotionRequest, object, str], services.PromotionOutcome]


def _decide(request, pk: int, decide: Decide) -> HttpResponse:
    promotion = _get_request_for_user(request, pk)
    form = DecisionForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    outcome = decide(promotion, request.user, reason)
    return _answer(request, promotion.model, _outcome_text(outcome), LEVEL[outcome.status])


@login_required
@require_POST
def approve(request, pk: int):
    return _decide(request, pk, services.approve)


@login_required
@require_POST
def reject(request, pk: int):
    return _decide(request, pk, services.reject)


@login_required
@vary_on_headers("HX-Request")
def audit_log(request, pk: int):
    model = _get_model_for_user(request, pk)
    events = AuditEvent.objects.filter(model=model).select_related(
        "pool", "version", "previous_version", "actor"
    )
    action = request.GET.get("action", "")
    if action in Action.values:
        events = events.filter(action=action)
    else:
        action = ""
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    context = {"model": model, "page": page, "action": action, "actions": Action.choices}
    template_name = "deployments/audit.html"
    if _wants_partial(request):
        template_name += "#audit-section"
    return render(request, template_name, context)
