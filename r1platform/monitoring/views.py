"""``/metrics``: the platform's Prometheus metrics, for Prometheus rather than for people.

Not a dashboard page: no login. It is open unless ``R1_METRICS_TOKEN`` is set, in which case it
wants that token as a bearer token (Prometheus's ``authorization`` scrape setting).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# Imported for its families: this process's registry declares them even before any sample.
from r1platform.monitoring import metrics as _families  # noqa: F401
from r1platform.monitoring import multiprocess
from r1platform.monitoring.collectors import (
    DefaultRegistryCollector,
    PlatformCollector,
    ProcessFilesCollector,
)


def build_registry() -> CollectorRegistry:
    """A registry for one scrape: every process's samples (or this one's) and the platform's."""
    registry = CollectorRegistry()
    path = multiprocess.folder()
    if path is not None:
        registry.register(ProcessFilesCollector(path))
    else:
        registry.register(DefaultRegistryCollector())
    registry.register(PlatformCollector())
    return registry


def _authorized(request: HttpRequest) -> bool:
    token = settings.R1_METRICS_TOKEN
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse(
            "a bearer token is required\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(build_registry()), content_type=CONTENT_TYPE_LATEST)
