"""Every answer under ``/api/`` is JSON, errors included; a job the broker did not take is a 503.

``unexpected`` is the API's handler for any exception a view raises (ninja's default lets Django
answer with its HTML 500 page); ``bad_request`` .. ``server_error`` are Django's error views
(``handler400`` .. ``handler500`` in ``r1platform.urls``), answering JSON for ``/api/`` paths and
Django's own pages elsewhere (an unknown ``/api/`` path, an error in a middleware).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from ninja import Schema, Status

from r1platform.jobs.models import Job

log = logging.getLogger("django.request")

API_PREFIX = "/api/"
INTERNAL_ERROR = (
    "internal error: the request could not be handled; it was logged. Try again later, and tell "
    "the platform's operators if it keeps failing"
)


class UnsentOut(Schema):
    detail: str
    job_id: int
    idempotency_key: str


# Answered when a job was stored but the broker (the job queue) did not take it.
Unsent = {503: UnsentOut}


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PREFIX)


def unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    """A view's unhandled exception: logged with its traceback, answered with a JSON 500."""
    log.error("Internal Server Error: %s", request.path, exc_info=exc)
    return JsonResponse({"detail": INTERNAL_ERROR}, status=500)


def unsent(job: Job, response: HttpResponse) -> Status:
    """503 with ``Retry-After``: the job is stored, and is sent once the broker is back."""
    response["Retry-After"] = str(settings.R1_OUTBOX_SWEEP_SECONDS)
    detail = (
        f"job {job.pk} is stored but the job queue (the broker) cannot be reached now; it will be "
        "sent when the broker is back. Retry with the same idempotency_key to get it"
    )
    body = {"detail": detail, "job_id": job.pk, "idempotency_key": job.idempotency_key}
    return Status(503, body)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "bad request"}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "permission denied"}, status=403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": f"no such API path: {request.path}"}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": INTERNAL_ERROR}, status=500)
    return defaults.server_error(request)
