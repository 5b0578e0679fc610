"""The model page's playground panel, rendered where the page includes it."""

from __future__ import annotations

from django import template

from r1platform.serving.forms import PlaygroundForm
from r1platform.serving.playground import playground_for

register = template.Library()


@register.inclusion_tag("serving/partials/playground.html", takes_context=True)
def playground_panel(context, model):
    """Nothing for a model that is not a language model (one query otherwise)."""
    state = playground_for(model)
    return {
        "model": model,
        "playground": state,
        "form": PlaygroundForm(playground=state) if state.shown and not state.problem else None,
        "csrf_token": context.get("csrf_token"),
    }
