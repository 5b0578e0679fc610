"""Small template helpers shared by the dashboard pages."""

from __future__ import annotations

import json

from django import template

from r1platform.registry.history import shape_text

register = template.Library()


@register.simple_tag(takes_context=True)
def page_url(context, number: int) -> str:
    """The current URL's query string with ``page`` set to ``number`` (filters kept)."""
    params = context["request"].GET.copy()
    params["page"] = str(number)
    return "?" + params.urlencode()


@register.filter
def as_json(value) -> str:
    """A value as indented JSON, for settings and details shown in <pre>."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@register.filter
def shape(value) -> str:
    """A tensor shape as [batch, 3, 224, 224]."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(d) for d in value) + "]"
    return str(value)


@register.filter
def seconds(value) -> str:
    """A duration in seconds as 0.42 s, 12.3 s or 4 min 05 s."""
    if value is None or value == "":
        return "—"
    value = float(value)
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 120:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@register.filter
def ms(value) -> str:
    """A latency in milliseconds with three significant digits: 0.00579, 1.25, 812.4."""
    if value is None or value == "":
        return "—"
    value = float(value)
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.2e}"


@register.filter
def rate(value) -> str:
    """A throughput: 1,550,478 or 12.5."""
    if value is None or value == "":
        return "—"
    value = float(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


@register.filter
def num(value) -> str:
    """A metric: numbers with up to six significant digits, anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.6g}"


@register.filter
def shapes(value) -> str:
    """Each input's shape as timed: ``input 32×64`` (several inputs comma-separated)."""
    return shape_text(value)


@register.filter
def params(value) -> str:
    """A parameter count: 20,544, 0.1 M, 12 M, 270 M, 1.5 B, 70 B."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    if value < 100_000:
        return f"{value:,.0f}"
    if value < 1e9:
        millions = value / 1e6
        return f"{millions:.1f} M" if millions < 10 else f"{millions:.0f} M"
    billions = value / 1e9
    return f"{billions:.1f} B" if billions < 10 else f"{billions:.0f} B"
