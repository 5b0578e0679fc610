"""The serving process's HTTP app: the Open Inference Protocol (KServe v2, as Triton speaks it).

| route | auth | answer |
| --- | --- | --- |
| `GET /v2` | none | server metadata (`extensions`: `binary_tensor_data`, `generate`) |
| `GET /v2/health/live` | none | 200 while the process runs |
| `GET /v2/health/ready` | none | 200 once the first poll has loaded what it could, else 503 |
| `GET /v2/models/{name}[/versions/{v}]` | token | model metadata; 503 when not ready |
| `GET /v2/models/{name}[/versions/{v}]/ready` | token | 200, or 503 with the reason |
| `POST /v2/models/{name}[/versions/{v}]/infer` | token | outputs; 400 bad input, 500 failed |
| `GET /metrics` | metrics token or token | Prometheus metrics (a team token: its models only) |
| `GET /v1/models`, `POST /v1/[chat/]completions` | token | OpenAI-compatible (``openai_api``) |
| `POST /v2/models/{name}[/versions/{v}]/generate[_stream]` | token | text (``generate_api``) |

Model names are a team's registered model names: a token sees only its own team's models, and
another team's model does not exist for it (404). Errors are ``{"error": "..."}``. A token works
while it is usable (``serving.tokens``: read again every second, refused with 503 when the
database could not be read for ``token_max_age_seconds``). ``/metrics`` also takes
``R1_METRICS_TOKEN`` as a bearer token, which sees every series.

Every answer of a served model is also counted in the serving history (``serving.stats``), which
a thread writes to the database per window for the model page's charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import orjson
from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipelines.core import PipelineError
from pipelines.engines import EngineInputError
from r1platform.serving.generate_api import GenerateApi
from r1platform.serving.memory import BodyBudget, mmap_large_buffers
from r1platform.serving.metrics import ServingMetrics, is_metrics_token
from r1platform.serving.openai_api import OpenAIApi
from r1platform.serving.openai_protocol import ApiError
from r1platform.serving.protocol import (
    JSON_LENGTH_HEADER,
    ProtocolError,
    check_request,
    encode_infer_response,
    error_body,
    parse_infer_request,
)
from r1platform.serving.runtime import ModelRuntime, ServedModel
from r1platform.serving.source import ModelSource, ModelSpec
from r1platform.serving.stats import ServingStats, WindowFlusher
from r1platform.serving.tokens import (
    DEFAULT_MAX_AGE_SECONDS,
    TokenCache,
    TokenRefresher,
    TokensUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Bodies above this are parsed in a thread, so a large request does not stall the others.
PARSE_IN_THREAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServingOptions:
    batching: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Large bodies (over PARSE_IN_THREAD_BYTES) held at once, all requests together; the next
    # one waits, unread, for room (see serving.memory).
    max_body_bytes_in_flight: int = 4 * DEFAULT_MAX_BODY_BYTES
    poll_seconds: float = 1.0
    # How often the serving history is written (None: R1_SERVING_STATS_SECONDS).
    stats_seconds: float | None = None
    # Tokens that could not be read again for this long are all refused (503).
    token_max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    # The bearer token /metrics takes for every series (None: R1_METRICS_TOKEN; "": none).
    metrics_token: str | None = None


class ServingError(Exception):
    """An answer other than 200, with the protocol's error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> Response:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return Response(error_body(message), status, headers, media_type="application/json")


def json_response(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


class _Api:
    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: ServingMetrics,
        options: ServingOptions,
        tokens: TokenCache,
    ) -> None:
        self.runtime, self.metrics, self.options, self.tokens = runtime, metrics, options, tokens
        self.stats = runtime.stats
        self.bodies = BodyBudget(max(options.max_body_bytes_in_flight, options.max_body_bytes))
        try:
            self.server_version = package_version("r1platform")
        except PackageNotFoundError:
            self.server_version = "unknown"

    # -- health and metadata -----------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return json_response(
            {
                "name": "r1platform",
                "version": self.server_version,
                "extensions": ["binary_tensor_data", "generate"],
            }
        )

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        if not self.runtime.synced.is_set():
            return error_response(503, "the models to serve have not been read yet")
        return Response(status_code=200)

    async def model_metadata(self, request: Request) -> Response:
        try:
            served = _ready(self._find(request))
        except ServingError as exc:
            return error_response(exc.status, str(exc))
        return json_response(served.metadata())

    async def model_ready(self, request: Request) -> Response:
        try:
            _ready(self._find(request))
        except ServingError as exc:
            return error_response(exc.status, str(exc))
        return Response(status_code=200)

    async def metrics_page(self, request: Request) -> Response:
        """Every series for the metrics token; a team's token: its own models' series only."""
        expected = self.options.metrics_token
        if expected is None:
            expected = settings.R1_METRICS_TOKEN
        if is_metrics_token(_bearer(request), expected):
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
        try:
            team = self._team(request)
        except ServingError as exc:
            return error_response(exc.status, str(exc))
        slugs = {m.spec.team for m in self.runtime.served() if m.spec.team_id == team}
        return Response(self.metrics.exposition(slugs), media_type=CONTENT_TYPE_LATEST)

    # -- inference ---------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter()
        label, version, status = "", "", 500
        spec: ModelSpec | None = None
        try:
            served = self._find(request)  # unknown or not ready: answered before the body
            spec = served.spec
            label, version = spec.label, str(spec.version)
            _ready(served)
            if served.text is not None:
                message = (
                    f"model {spec.name!r} is a text-generation model: call /v1/completions, "
                    f"/v1/chat/completions or /v2/models/{spec.name}/generate"
                )
                raise ServingError(400, message)
            async with self.bodies.hold(self._large_body_size(request)):
                body = await self._body(request)
                header_length = request.headers.get(JSON_LENGTH_HEADER)
                if len(body) > PARSE_IN_THREAD_BYTES:
                    parsed = await asyncio.to_thread(parse_infer_request, body, header_length)
                else:
                    parsed = parse_infer_request(body, header_length)
                # Looked up again after the awaits: a swap may have happened while the body came
                # in. From here to submit nothing awaits, so the request joins the engine it was
                # checked against, and a swap cannot slip in between.
                served = _ready(self._find(request))
                spec = served.spec
                label, version = spec.label, str(spec.version)
                assert served.engine is not None and served.batcher is not None
                check_request(parsed, served.inputs, served.output_names)
                arrays = served.engine.validate(parsed.inputs)
                del body  # the arrays keep what they use of it
                outputs = await served.batcher.submit(arrays)
                content, headers = encode_infer_response(parsed, spec.name, version, outputs)
                del parsed, arrays, outputs
            status = 200
            return Response(content, headers=headers)
        except ServingError as exc:
            status = exc.status
            return error_response(status, str(exc))
        except (ProtocolError, EngineInputError) as exc:
            status = 400
            return error_response(status, str(exc))
        except PipelineError as exc:
            log.warning("serving: %s failed: %s", label, exc)
            return error_response(status, str(exc))
        except Exception as exc:
            log.exception("serving: %s failed", label)
            return error_response(status, f"the model failed on this request: {exc}")
        finally:
            self.metrics.requests.labels(label, version, str(status)).inc()
            if spec is not None:
                elapsed = time.perf_counter() - started
                self.metrics.latency.labels(label).observe(elapsed)
                self.metrics.slow_streaks.observe(label, status, elapsed)
                self.stats.observe(spec, status, elapsed)

    # -- pieces ------------------------------------------------------------------------------------

    def _find(self, request: Request) -> ServedModel:
        """The caller's model named in the path (ready or not); 401 or 404 otherwise."""
        team = self._team(request)
        name = request.path_params["name"]
        served = self.runtime.lookup(team, name)
        if served is None:
            raise ServingError(404, f"model {name!r} is not served here")
        asked = request.path_params.get("version")
        serving = str(served.spec.version)
        if asked is not None and asked != serving:
            message = f"version {asked} of model {name!r} is not served (version {serving} is)"
            raise ServingError(404, message)
        return served

    def _team(self, request: Request) -> int:
        token = _bearer(request)
        if not token:
            raise ServingError(401, "send a team API token: Authorization: Bearer <token>")
        try:
            team = self.tokens.team_for(token)
        except TokensUnavailable as exc:
            raise ServingError(503, str(exc)) from None
        if team is None:
            raise ServingError(
                401,
                "this API token is not valid: unknown, revoked, or its user left the team or "
                "was deactivated; ask a team member for a new one",
            )
        return team

    def openai_team(self, request: Request) -> int:
        """The caller's team for the OpenAI-compatible routes (their error shape)."""
        try:
            return self._team(request)
        except ServingError as exc:
            kind = "authentication_error" if exc.status == 401 else "server_error"
            raise ApiError(exc.status, str(exc), kind=kind) from None

    def _large_body_size(self, request: Request) -> int:
        """What this body takes from the budget: 0 when small, the limit when of unknown size."""
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else self.options.max_body_bytes
        return min(size, self.options.max_body_bytes) if size > PARSE_IN_THREAD_BYTES else 0

    async def _body(self, request: Request) -> bytearray:
        """The body in one buffer (no list of chunks joined into a second copy)."""
        limit = self.options.max_body_bytes
        too_large = ServingError(413, f"the request body is over the {limit} byte limit")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_large
            body += chunk
        return body


def _bearer(request: Request) -> str:
    """The request's bearer token, "" when it sends none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _ready(served: ServedModel) -> ServedModel:
    if not served.ready:
        raise ServingError(503, f"model {served.spec.name!r} is not ready: {served.reason}")
    return served


def build_app(source: ModelSource, options: ServingOptions | None = None) -> Starlette:
    """The HTTP app for ``source``'s models; its poller starts and stops with the app."""
    options = options or ServingOptions()
    mmap_large_buffers()  # request-sized buffers go back to the system once freed
    metrics = ServingMetrics()
    stats = ServingStats()
    runtime = ModelRuntime(
        source, metrics, batching=options.batching, poll_seconds=options.poll_seconds, stats=stats
    )
    stats_seconds = options.stats_seconds or settings.R1_SERVING_STATS_SECONDS
    flusher = WindowFlusher(stats, source, stats_seconds, live=runtime.ready_specs)
    tokens = TokenCache(options.token_max_age_seconds)
    refresher = TokenRefresher(source, tokens, every=min(options.poll_seconds, 1.0))
    api = _Api(runtime, metrics, options, tokens)
    openai = OpenAIApi(runtime, metrics, stats, api.openai_team, options.max_body_bytes)
    generate = GenerateApi(runtime, metrics, stats, api.openai_team, options.max_body_bytes)
    models, versions = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    # Routes are matched in order: inference, the hot path, first.
    routes = [
        Route(models + "/infer", api.infer, methods=["POST"]),
        Route(versions + "/infer", api.infer, methods=["POST"]),
        Route(models + "/generate", generate.generate, methods=["POST"]),
        Route(versions + "/generate", generate.generate, methods=["POST"]),
        Route(models + "/generate_stream", generate.generate_stream, methods=["POST"]),
        Route(versions + "/generate_stream", generate.generate_stream, methods=["POST"]),
        Route(models, api.model_metadata),
        Route(models + "/ready", api.model_ready),
        Route(versions, api.model_metadata),
        Route(versions + "/ready", api.model_ready),
        Route("/v1/chat/completions", openai.chat, methods=["POST"]),
        Route("/v1/completions", openai.completions, methods=["POST"]),
        Route("/v1/models", openai.models),
        Route("/v2", api.server_metadata),
        Route("/v2/health/live", api.live),
        Route("/v2/health/ready", api.ready),
        Route("/metrics", api.metrics_page),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(refresher.start)  # waits (briefly) for the first read
        runtime.start(asyncio.get_running_loop())
        flusher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(refresher.stop)
            await runtime.stop()
            # After the drain, so the last window holds the answers the drain gave.
            await asyncio.to_thread(flusher.stop)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail)

    handlers = {HTTPException: http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.tokens = tokens
    app.state.stats_flusher = flusher
    return app
