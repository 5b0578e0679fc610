"""Template helpers of the certification pages and of the version page's certification section."""

from __future__ import annotations

from datetime import datetime

from django import template

from r1platform.certification.forms import CertifyEverywhereForm, CertifyForm, threshold_help
from r1platform.certification.tables import version_certifications

register = template.Library()


@register.filter
def when(value) -> str:
    """An ISO 8601 time (or datetime) as 2026-11-22 07:15:02 UTC; — when empty."""
    if not value:
        return "—"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


@register.inclusion_tag("certification/partials/version_section.html", takes_context=True)
def certification_section(context, version):
    """The version page's section: its certifications per profile, the Certify form and the
    "Certify on every profile" form."""
    return {
        "version": version,
        "rows": version_certifications(version),
        "form": CertifyForm(version=version),
        "everywhere_form": CertifyEverywhereForm(version=version),
        "threshold_help": threshold_help(),
        "csrf_token": context.get("csrf_token"),
        "request": context.get("request"),
    }
