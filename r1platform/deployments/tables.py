"""What the dashboard's deployments section shows: every pool and stage of a model, with the
version served there and whether its certificate still holds, and the requests waiting."""

from __future__ import annotations

from dataclasses import dataclass

from r1platform.certification.services import Validity, validity
from r1platform.deployments.forms import PromoteForm
from r1platform.deployments.models import (
    Deployment,
    PromotionRequest,
    RequestStatus,
    ServingPool,
    Stage,
)
from r1platform.registry.models import RegisteredModel

# Production first: it is what the page is read for.
STAGES = (Stage.PRODUCTION, Stage.STAGING)


@dataclass(frozen=True)
class Slot:
    pool: ServingPool
    stage: str
    deployment: Deployment | None
    validity: Validity | None


def slots(model: RegisteredModel) -> list[Slot]:
    """One row per pool and stage, served or not."""
    served = {
        (d.pool_id, d.stage): d
        for d in Deployment.objects.filter(model=model).select_related(
            "version",
            "previous_version",
            "certification__profile",
            "certification__version",
            "updated_by",
        )  # fmt: skip
    }
    rows = []
    for pool in ServingPool.objects.select_related("profile"):
        for stage in STAGES:
            d = served.get((pool.pk, stage.value))
            checked = validity(d.certification) if d and d.certification else None
            rows.append(Slot(pool, stage.value, d, checked))
    return rows


def pending_requests(model: RegisteredModel) -> list[PromotionRequest]:
    return list(
        model.promotion_requests.filter(status=RequestStatus.PENDING)
        .select_related("pool", "version", "requested_by")
        .order_by("created_at", "pk")
    )


def section_context(model: RegisteredModel, form: PromoteForm | None = None) -> dict:
    """Everything the deployments section shows; ``form`` with its errors after a bad post."""
    return {
        "model": model,
        "slots": slots(model),
        "pending": pending_requests(model),
        "form": form or PromoteForm(model=model),
    }
