"""Issue 16: a pipeline template may name only its own team's datasets.

A template's stage settings may name a dataset id (a fixed evaluation set, say). Another team's
id used to be stored as it was, through the service, the API and the dashboard form alike; it is
refused when the template is saved, with the same answer as an id that does not exist.
"""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from r1platform.schedules import pipeline_templates
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.models import PipelineTemplate
from tests.certification_data import make_dataset
from tests.schedules_pages_data import STAGES

pytestmark = pytest.mark.usefixtures("enqueued")


def evaluate_on(dataset_id: int) -> list[dict]:
    return [{"name": "evaluate", "settings": {"dataset_id": dataset_id}}]


@pytest.fixture
def theirs(other_team, outsider, tmp_path):
    return make_dataset(other_team, outsider, tmp_path, "their-holdout", 16, target=True)


@pytest.fixture
def ours(team, user, tmp_path):
    return make_dataset(team, user, tmp_path, "holdout", 16, target=True)


def test_a_template_naming_another_teams_dataset_is_refused(team, user, theirs, ours):
    with pytest.raises(ScheduleRefused) as refused:
        pipeline_templates.create_template(
            team=team, user=user, name="steal", stages=evaluate_on(theirs.pk)
        )

    message = str(refused.value)
    assert f"stage 1 (evaluate): dataset_id {theirs.pk} is not one of Team A's datasets" in message
    assert "their-holdout" not in message, "nothing about the other team's dataset is told"
    assert not PipelineTemplate.objects.exists()
    own = pipeline_templates.create_template(
        team=team, user=user, name="mine", stages=evaluate_on(ours.pk)
    )
    assert own.stages == evaluate_on(ours.pk)


def test_an_id_that_does_not_exist_gets_the_same_answer(team, user, theirs):
    missing = theirs.pk + 1000

    with pytest.raises(ScheduleRefused, match=f"dataset_id {missing} is not one of Team A's"):
        pipeline_templates.create_template(
            team=team, user=user, name="x", stages=evaluate_on(missing)
        )


def test_changing_a_template_to_another_teams_dataset_is_refused(team, user, theirs):
    template = pipeline_templates.create_template(team=team, user=user, name="t", stages=STAGES)
    missing = theirs.pk + 1000
    stages = [
        {
            "name": "quantize",
            "settings": {"mode": "int8_static", "calibration_dataset_id": missing},
        },
        *evaluate_on(theirs.pk),
    ]

    with pytest.raises(ScheduleRefused) as refused:
        pipeline_templates.update_template(template, stages=stages)

    assert f"stage 1 (quantize): calibration_dataset_id {missing} is not one" in str(refused.value)
    assert f"stage 2 (evaluate): dataset_id {theirs.pk} is not one" in str(refused.value)
    template.refresh_from_db()
    assert template.stages == STAGES


def test_each_refusal_names_the_stage_by_its_place_in_the_template(team, user, theirs):
    stages = [{"name": "distill"}, *evaluate_on(theirs.pk)]

    with pytest.raises(ScheduleRefused) as refused:
        pipeline_templates.create_template(team=team, user=user, name="x", stages=stages)

    assert "stage 1: unknown stage 'distill'" in str(refused.value)
    assert f"stage 2 (evaluate): dataset_id {theirs.pk} is not one" in str(refused.value)


def test_the_api_refuses_it_with_a_400(api, team, theirs):
    created = api.post(
        "/api/v1/templates",
        {"name": "steal", "stages": evaluate_on(theirs.pk)},
        content_type="application/json",
    )

    assert created.status_code == 400
    assert f"dataset_id {theirs.pk} is not one of Team A's datasets" in created.json()["detail"]
    assert not PipelineTemplate.objects.exists()

    made = api.post(
        "/api/v1/templates", {"name": "ok", "stages": STAGES}, content_type="application/json"
    )
    assert made.status_code == 201
    patched = api.patch(
        f"/api/v1/templates/{made.json()['id']}",
        {"stages": evaluate_on(theirs.pk)},
        content_type="application/json",
    )
    assert patched.status_code == 400 and "is not one of Team A's" in patched.json()["detail"]
    assert PipelineTemplate.objects.get().stages == STAGES


def test_the_dashboard_form_refuses_it_with_the_message(member_client, team, theirs):
    data = {"name": "steal", "description": "", "stages": json.dumps(evaluate_on(theirs.pk))}

    response = member_client.post(reverse("schedules:template_new"), data)

    assert response.status_code == 400
    assert "is not one of Team A&#x27;s datasets" in response.content.decode()
    assert not PipelineTemplate.objects.exists()
