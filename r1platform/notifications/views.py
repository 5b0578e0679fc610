"""The notifications page: each of the user's teams' channels, a test button, recent deliveries."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers

from r1platform.accounts.models import Team
from r1platform.accounts.scoping import get_scoped_or_404, scoped, teams_for
from r1platform.notifications import services
from r1platform.notifications.forms import NotificationSettingsForm
from r1platform.notifications.models import Delivery, NotificationSettings

PAGE = "notifications/index.html"
RECENT = 20


def _get_team_for_user(request, pk: int) -> Team:
    """The team if the user is a member; 404 otherwise."""
    return get_scoped_or_404(Team.objects.all(), teams_for(request.user), field="pk", pk=pk)


def _page(request, bound: NotificationSettingsForm | None = None, status: int = 200):
    teams = list(teams_for(request.user).order_by("name"))
    saved = {c.team_id: c for c in NotificationSettings.objects.filter(team__in=teams)}
    panels = []
    for team in teams:
        config = saved.get(team.pk) or NotificationSettings(team=team)
        if bound is not None and bound.team == team:
            form = bound  # the one just posted, with its errors
        else:
            form = NotificationSettingsForm(team=team, config=config)
        panels.append({"team": team, "config": config, "form": form})
    context = {"panels": panels, "deliveries": _recent(teams)}
    return render(request, PAGE, context, status=status)


def _recent(teams: list[Team]) -> list[Delivery]:
    return list(scoped(Delivery.objects.select_related("team"), teams)[:RECENT])


@login_required
@vary_on_headers("HX-Request")
def index(request) -> HttpResponse:
    # An htmx poll asks for the deliveries table; a history restore after a cache miss needs the
    # page.
    if request.htmx and not request.htmx.history_restore_request:
        teams = list(teams_for(request.user))
        return render(request, PAGE + "#deliveries", {"deliveries": _recent(teams)})
    return _page(request)


@login_required
@require_POST
def save_settings(request, pk: int) -> HttpResponse:
    team = _get_team_for_user(request, pk)
    form = NotificationSettingsForm(request.POST, team=team, config=services.settings_for(team))
    if form.is_valid() and form.save() is not None:
        messages.success(request, f"Notification settings of {team.name} saved.")
        return redirect("notifications:index")
    return _page(request, bound=form, status=400)


@login_required
@require_POST
def send_test(request, pk: int) -> HttpResponse:
    team = _get_team_for_user(request, pk)
    queued = services.send_test(team, request.user)
    if queued:
        channels = " and ".join(d.channel for d in queued)
        messages.success(request, f"Test sent to {team.name}'s {channels}: see its delivery below.")
    else:
        messages.warning(
            request, f"Nothing to send: give {team.name} a webhook URL or an email recipient first."
        )
    return redirect("notifications:index")
