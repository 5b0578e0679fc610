"""What the schedules API and dashboard tests share: a real ONNX model, a training dataset that
fits it, a serving pool, and a template and a schedule made through the services."""

from __future__ import annotations

import pytest

from r1platform.datasets.models import Dataset
from r1platform.schedules import pipeline_templates, services
from r1platform.schedules.models import PipelineTemplate, Schedule
from tests.certification_data import make_dataset
from tests.promotion_data import (  # noqa: F401 - fixtures, registered by name
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
)

# Runs on the 16-feature ONNX classifier; the evaluate stage's dataset_id is left out, so each
# run fills it with the schedule's training dataset.
STAGES = [
    {"name": "quantize", "settings": {"mode": "int8_dynamic"}},
    {"name": "evaluate", "settings": {}},
]


@pytest.fixture(name="training")
def training_fixture(team, user, tmp_path) -> Dataset:
    return make_dataset(team, user, tmp_path, "train16", 16, target=True)


@pytest.fixture(name="template")
def template_fixture(team, user) -> PipelineTemplate:
    return pipeline_templates.create_template(team=team, user=user, name="nightly", stages=STAGES)


@pytest.fixture(name="schedule")
def schedule_fixture(team, user, version, training, pool, template) -> Schedule:
    return services.create_schedule(
        team=team,
        user=user,
        name="mlp nightly",
        model=version.model,
        template=template,
        dataset_name=training.name,
        pool=pool,
        cron="0 3 * * *",
    )
