"""The JSON API (``/api/v1/``), its OpenAPI document at ``/api/v1/openapi.json``.

Every endpoint needs a team token (``Authorization: Bearer <token>``) and sees only that team's
objects; another team's id answers 404, as if it did not exist. Each domain's endpoints and
schemas live in their own router module; this one mounts them.
"""

from __future__ import annotations

from ninja import NinjaAPI
from ninja.operation import Operation

from r1platform.api import (
    certification,
    datasets,
    errors,
    jobs,
    notifications,
    promotion,
    registry,
    schedules,
    workers,
)
from r1platform.api.auth import TeamToken

# Mounted in this order so the OpenAPI document lists the paths as it always has.
ROUTERS = (registry, datasets, jobs, certification, promotion, workers, schedules, notifications)

# Operation ids are what generated clients name their methods after. These routers' endpoints
# were once all in ``r1platform.api.api``; their ids keep that module's prefix.
_FIRST_MODULE_PREFIX = {
    module.__name__: "r1platform_api_api"
    for module in (registry, datasets, jobs, certification, promotion, workers)
}


class PlatformAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation: Operation) -> str:
        module = operation.view_func.__module__
        prefix = _FIRST_MODULE_PREFIX.get(module, module.replace(".", "_"))
        return f"{prefix}_{operation.view_func.__name__}"


api = PlatformAPI(
    title="r1platform API",
    version="1",
    description=(
        "Upload models, launch pipelines, read versions, jobs and benchmarks; certify versions "
        "on hardware profiles and read their certificates; promote certified versions to "
        "serving pools, roll them back, approve promotions and read the audit log.\n\n"
        "**Authorize**: every call takes a team token as `Authorization: Bearer <token>`. Make "
        "one on the dashboard's [API tokens](/teams/tokens/) page (or `manage.py issue_token "
        "<user> <team>`), then press *Authorize* above and paste it."
    ),
    auth=TeamToken(),
    urls_namespace="api",
)
for module in ROUTERS:
    api.add_router("", module.router)
# Any other exception a view raises is a JSON 500 too (ninja's default leaves it to Django's HTML
# page); the more specific handlers (404, HttpError, validation) still win.
api.add_exception_handler(Exception, errors.unexpected)
