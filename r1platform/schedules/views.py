from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.schedules import pipeline_templates, runs, services
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.forms import ScheduleForm, TemplateForm
from r1platform.schedules.models import PipelineTemplate, Schedule
from r1platform.schedules.tables import (
    free_name,
    has_undecided_run,
    next_run_at,
    runs_of,
    schedules_with_last_run,
)

DETAIL = "schedules/schedule_detail.html"
FORM = "schedules/schedule_form.html"
TEMPLATE_FORM = "schedules/template_form.html"
RUNS_SHOWN = 50


def _get_schedule_for_user(request, pk: int) -> Schedule:
    """The schedule if it belongs to one of the user's teams; 404 otherwise."""
    qs = schedules_with_last_run(Schedule.objects.all())
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _get_template_for_user(request, pk: int) -> PipelineTemplate:
    qs = PipelineTemplate.objects.select_related("team")
    return get_scoped_or_404(qs, teams_for(request.user), pk=pk)


def _wants_partial(request) -> bool:
    return bool(request.htmx) and not request.htmx.history_restore_request


def _posted(request):
    """The form data of a POST (an empty one too, so it is bound and shows its errors)."""
    return request.POST if request.method == "POST" else None


def _done(request, url: str) -> HttpResponse:
    """After a successful form post: a full redirect, for htmx too (the page changes)."""
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
def schedule_list(request):
    schedules = schedules_with_last_run(scoped(Schedule.objects.all(), teams_for(request.user)))
    return render(request, "schedules/schedule_list.html", {"schedules": schedules})


@login_required
def schedule_new(request):
    # ?model=<id> (the model page's "New schedule" link) pre-selects that model.
    initial = {"model": request.GET["model"]} if request.GET.get("model", "").isdigit() else {}
    form = ScheduleForm(_posted(request), user=request.user, initial=initial)
    if request.method == "POST" and form.is_valid():
        model = form.cleaned_data["model"]
        name = form.cleaned_data["name"].strip() or free_name(
            Schedule.objects.filter(team_id=model.team_id), f"{model.name} retraining"
        )
        try:
            schedule = services.create_schedule(
                team=model.team, user=request.user, name=name, **form.schedule_fields()
            )
        except ScheduleRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Schedule “{schedule.name}” created.")
            return _done(request, schedule.get_absolute_url())
    return _render_form(request, FORM, {"form": form, "schedule": None})


@login_required
def schedule_edit(request, pk: int):
    schedule = _get_schedule_for_user(request, pk)
    form = ScheduleForm(_posted(request), user=request.user, schedule=schedule)
    if request.method == "POST" and form.is_valid():
        name = form.cleaned_data["name"].strip() or schedule.name
        try:
            services.update_schedule(schedule, name=name, **form.schedule_fields())
        except ScheduleRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Schedule “{name}” saved.")
            return _done(request, schedule.get_absolute_url())
    return _render_form(request, FORM, {"form": form, "schedule": schedule})


def _render_form(request, template_name: str, context: dict) -> HttpResponse:
    """The form page, or only the form for htmx; 400 when a post was refused, so htmx swaps in
    the errors (see the htmx-config in base.html)."""
    if _wants_partial(request):
        template_name += "#form"
    status = 400 if request.method == "POST" else 200
    return render(request, template_name, context, status=status)


@login_required
@vary_on_headers("HX-Request")
def schedule_detail(request, pk: int):
    schedule = _get_schedule_for_user(request, pk)
    # Runs keep coming while the schedule is enabled, and a running one is decided later.
    polling = schedule.enabled or has_undecided_run(schedule)
    context = {
        "schedule": schedule,
        "runs": runs_of(schedule)[:RUNS_SHOWN],
        "next_run": next_run_at(schedule),
        "polling": polling,
    }
    if _wants_partial(request):
        html = render_to_string(DETAIL + "#runs-section", context, request=request)
        # 286: htmx swaps this last state in and stops; the markup carries no trigger either.
        return HttpResponse(html) if polling else HttpResponseStopPolling(html)
    return render(request, DETAIL, context)


def _refusal(request, exc: ScheduleRefused) -> None:
    messages.error(request, f"Refused: {exc}")


@login_required
@require_POST
def schedule_toggle(request, pk: int):
    schedule = _get_schedule_for_user(request, pk)
    try:
        schedule = services.update_schedule(schedule, enabled=not schedule.enabled)
    except ScheduleRefused as exc:
        _refusal(request, exc)
    else:
        state = "resumed" if schedule.enabled else "paused"
        messages.success(request, f"Schedule “{schedule.name}” {state}.")
    if request.POST.get("next") == "list":
        return redirect("schedules:schedule_list")
    return redirect(schedule)


@login_required
@require_POST
def schedule_run(request, pk: int):
    schedule = _get_schedule_for_user(request, pk)
    try:
        run = runs.run_schedule(schedule.pk, trigger="manual")
    except ScheduleRefused as exc:
        _refusal(request, exc)
    else:
        if run is None:
            messages.info(request, f"Schedule “{schedule.name}” did not run.")
        else:
            detail = f": {run.reason}" if run.reason else ""
            messages.info(request, f"Run {run.pk} {run.get_decision_display().lower()}{detail}")
    return redirect(schedule)


@login_required
@require_POST
def schedule_delete(request, pk: int):
    schedule = _get_schedule_for_user(request, pk)
    services.delete_schedule(schedule)
    messages.success(request, f"Schedule “{schedule.name}” deleted.")
    return redirect("schedules:schedule_list")


# -- templates -------------------------------------------------------------------------------------


@login_required
def template_list(request):
    templates = scoped(PipelineTemplate.objects.select_related("team"), teams_for(request.user))
    templates = templates.annotate(schedule_count=Count("schedules")).order_by("name")
    return render(request, "schedules/template_list.html", {"templates": templates})


@login_required
def template_new(request):
    form = TemplateForm(_posted(request), user=request.user)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            template = pipeline_templates.create_template(
                team=form.chosen_team(),
                user=request.user,
                name=data["name"].strip(),
                stages=data["stages"],
                description=data["description"],
            )
        except ScheduleRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Template “{template.name}” created.")
            return _done(request, reverse("schedules:template_list"))
    return _render_form(request, TEMPLATE_FORM, {"form": form, "template": None})


@login_required
def template_edit(request, pk: int):
    template = _get_template_for_user(request, pk)
    form = TemplateForm(_posted(request), user=request.user, template=template)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            pipeline_templates.update_template(
                template,
                name=data["name"].strip(),
                stages=data["stages"],
                description=data["description"],
            )
        except ScheduleRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Template “{data['name'].strip()}” saved.")
            return _done(request, reverse("schedules:template_list"))
    context = {"form": form, "template": template, "used_by": template.schedules.all()}
    return _render_form(request, TEMPLATE_FORM, context)


@login_required
@require_POST
def template_delete(request, pk: int):
    template = _get_template_for_user(request, pk)
    try:
        pipeline_templates.delete_template(template)
    except ScheduleRefused as exc:
        _refusal(request, exc)
    else:
        messages.success(request, f"Template “{template.name}” deleted.")
    return redirect("schedules:template_list")
