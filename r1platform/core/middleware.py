"""Request bodies are bounded before anything reads them.

:class:`BodyLimitMiddleware` is the first middleware. A request whose ``Content-Length`` is over
the route's limit (``R1_MAX_UPLOAD_BYTES`` plus the form's framing on the upload routes,
``DATA_UPLOAD_MAX_MEMORY_SIZE`` everywhere else) is answered 413 without a byte of its body being
read, and the connection is closed rather than drained: Django's multipart parser drains a refused
body line by line (a multi-GB "line" of zeros held whole in memory), and the dev server reads
what is left of a body in one ``read()`` before it answers the next request.

A body sent without ``Content-Length`` (``Transfer-Encoding: chunked``) is answered 411: Django
reads no body it does not know the length of, so such an upload would silently arrive empty.

How the connection gets closed:

- gunicorn's sync worker (``gunicorn.conf.py``) closes every connection after its one request,
  with ``Connection: close``, and reads at most 64 KiB of what is left before closing.
- Django's dev server keeps connections alive unless the response has no ``Content-Length``; for
  a request whose body may be left unread, this middleware removes that header (the dev server
  then answers ``Connection: close``) and empties the server's own view of the body, so nothing
  is drained. (``wsgiref`` refuses a ``Connection`` header from the application itself.)
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.urls import Resolver404, resolve

from r1platform.core.storage import FORM_OVERHEAD, human_size

#: The views that take a model or dataset file (URL names, namespaced).
UPLOAD_VIEWS = frozenset(
    {
        "registry:model_upload",
        "datasets:dataset_upload",
        "api:create_model",
        "api:create_dataset",
    }
)


def takes_uploads(request: HttpRequest) -> bool:
    try:
        return resolve(request.path_info).view_name in UPLOAD_VIEWS
    except Resolver404:
        return False


def body_limit(request: HttpRequest) -> int | None:
    """The most bytes of body this request may have (None: no limit)."""
    if takes_uploads(request):
        return settings.R1_MAX_UPLOAD_BYTES + FORM_OVERHEAD
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def declared_length(request: HttpRequest) -> int | None:
    """The body's Content-Length; None when there is none; -1 when it is not a number."""
    raw = request.META.get("CONTENT_LENGTH", "")
    if raw in ("", None):
        return None
    try:
        length = int(raw)
    except ValueError:
        return -1
    return length if length >= 0 else -1


def _refusal(request: HttpRequest, status: int, message: str) -> HttpResponse:
    if request.path_info.startswith("/api/"):
        return JsonResponse({"detail": message}, status=status)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


def close_without_draining(request: HttpRequest, response: HttpResponseBase) -> None:
    """Make the server close this connection and not read what is left of the body."""
    stream = request.META.get("wsgi.input")
    if isinstance(stream, LimitedStream):  # Django's dev server wraps the socket in one
        stream.limit = 0  # its close() reads what is left: now nothing
        if response.has_header("Content-Length"):
            del response["Content-Length"]  # no length: the dev server says Connection: close


class BodyLimitMiddleware:
    """Refuses, unread, a body over its route's limit or one of unknown length."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        length = declared_length(request)
        refused = self._check(request, length)
        if refused is not None:
            close_without_draining(request, refused)
            return refused
        response = self.get_response(request)
        if length:
            # A view may answer before reading the whole body (a refused file, a failed login).
            close_without_draining(request, response)
        return response

    def _check(self, request: HttpRequest, length: int | None) -> HttpResponse | None:
        if length == -1:
            return _refusal(request, 400, "the Content-Length header is not a number")
        if length is None:
            if "HTTP_TRANSFER_ENCODING" in request.META:
                return _refusal(
                    request,
                    411,
                    "send the body with a Content-Length header (chunked bodies are not read)",
                )
            return None
        limit = body_limit(request)
        if limit is None or length <= limit:
            return None
        if takes_uploads(request):
            message = (
                f"the upload is {human_size(length)}, over the "
                f"{human_size(settings.R1_MAX_UPLOAD_BYTES)} limit; upload a smaller file"
            )
        else:
            message = (
                f"the request body is {human_size(length)}, over the {human_size(limit)} limit"
            )
        return _refusal(request, 413, message)
