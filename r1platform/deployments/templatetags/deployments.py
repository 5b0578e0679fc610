"""The model page's deployments section, rendered where the page includes it."""

from __future__ import annotations

from django import template

from r1platform.deployments.tables import section_context

register = template.Library()


@register.inclusion_tag("deployments/partials/section.html", takes_context=True)
def deployments_section(context, model):
    return {
        **section_context(model),
        "user": context.get("user"),
        "csrf_token": context.get("csrf_token"),
        "request": context.get("request"),
    }
