from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_POST

from r1platform.accounts.scoping import get_scoped_or_404, teams_for
from r1platform.registry.models import RegisteredModel
from r1platform.serving.forms import PlaygroundForm
from r1platform.serving.playground import PlaygroundRefused, open_answer, playground_for, relay


def _refuse(status: int, message: str) -> HttpResponse:
    """What the playground panel shows instead of an answer."""
    return JsonResponse({"error": message}, status=status)


@login_required
@require_POST
def playground(request, pk: int):
    """The production version's answer to a member's prompt, relayed as server-sent events."""
    qs = RegisteredModel.objects.select_related("team")
    model = get_scoped_or_404(qs, teams_for(request.user), pk=pk)
    state = playground_for(model)
    if state.problem:
        return _refuse(409, state.problem)
    form = PlaygroundForm(request.POST, playground=state)
    if not form.is_valid():
        return _refuse(400, form.error_text())
    try:
        answer = open_answer(form.deployment(), form.ask(), request.user.pk)
    except PlaygroundRefused as exc:
        return _refuse(exc.status, str(exc))
    response = StreamingHttpResponse(relay(answer), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the tokens back
    return response
