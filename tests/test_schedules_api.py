"""/api/v1/schedules and /api/v1/templates: create, read, change, pause, delete, run now, and the
refusals (a cron expression that does not parse, an unknown stage, both timings) as 400s."""

from __future__ import annotations

import pytest
from django_celery_beat.models import PeriodicTask

from r1platform.accounts.models import ApiToken
from r1platform.schedules.models import Decision, PipelineTemplate, Schedule, ScheduleRun
from tests.schedules_pages_data import (  # noqa: F401 - fixtures, registered by name
    STAGES,
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    schedule_fixture,
    template_fixture,
    training_fixture,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")


def post(client, url: str, body: dict):
    return client.post(url, body, content_type="application/json")


def patch(client, url: str, body: dict):
    return client.patch(url, body, content_type="application/json")


def body(version, **more) -> dict:
    return {
        "model_id": version.model_id,
        "template": STAGES,
        "dataset": "train16",
        "pool": "cpu-a",
        "cron": "0 3 * * *",
        **more,
    }


@pytest.fixture
def outsider_api(client, outsider_token):
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {outsider_token}"
    return client


# -- create ----------------------------------------------------------------------------------------


def test_it_creates_a_schedule_and_its_template_from_stages(api, version, training, pool):
    response = post(api, "/api/v1/schedules", body(version, margin=0.01, name="nightly mlp"))

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["name"] == "nightly mlp" and data["model_name"] == "mlp"
    assert data["cron"] == "0 3 * * *" and data["interval_seconds"] is None
    assert data["dataset"] == "train16" and data["pool"] == "cpu-a" and data["margin"] == 0.01
    assert data["enabled"] is True and data["eval_split"] == "test"
    assert data["template"]["name"] == "nightly mlp"
    assert data["template"]["stage_names"] == ["quantize", "evaluate"]
    assert data["last_run"] is None and data["next_run_at"] is not None
    schedule = Schedule.objects.get(pk=data["id"])
    assert schedule.periodic_task is not None and schedule.periodic_task.enabled


def test_it_names_a_schedule_after_its_model_and_keeps_names_unique(api, version, training, pool):
    first = post(api, "/api/v1/schedules", body(version))
    second = post(api, "/api/v1/schedules", body(version, interval_seconds=600, cron=""))

    assert first.status_code == 201 and second.status_code == 201, second.content
    assert first.json()["name"] == "mlp retraining"
    assert second.json()["name"] == "mlp retraining 2"
    assert second.json()["template"]["name"] == "mlp retraining 2"
    assert second.json()["timing"] == "every 600 s"


def test_it_uses_an_existing_template_by_id(api, version, training, pool, template):
    payload = body(version, template_id=template.pk)
    del payload["template"]

    response = post(api, "/api/v1/schedules", payload)

    assert response.status_code == 201, response.content
    assert response.json()["template"]["id"] == template.pk
    assert PipelineTemplate.objects.count() == 1


def test_a_cron_expression_that_does_not_parse_is_400_and_saves_nothing(
    api, version, training, pool
):
    response = post(api, "/api/v1/schedules", body(version, cron="0 25 * * *"))

    assert response.status_code == 400
    assert "(hour) '25' does not parse" in response.json()["detail"]
    assert not Schedule.objects.exists() and not PipelineTemplate.objects.exists()
    assert not PeriodicTask.objects.filter(name__contains="mlp").exists()


def test_a_template_naming_an_unknown_stage_is_400_and_saves_nothing(api, version, training, pool):
    stages = [{"name": "distill", "settings": {}}]

    response = post(api, "/api/v1/schedules", body(version, template=stages))

    assert response.status_code == 400
    assert "distill" in response.json()["detail"]
    assert not Schedule.objects.exists() and not PipelineTemplate.objects.exists()


def test_both_cron_and_interval_is_400(api, version, training, pool):
    response = post(api, "/api/v1/schedules", body(version, interval_seconds=60))

    assert response.status_code == 400
    assert "not both" in response.json()["detail"]
    assert not Schedule.objects.exists()


def test_neither_template_nor_template_id_is_400(api, version, training, pool):
    payload = body(version)
    del payload["template"]

    response = post(api, "/api/v1/schedules", payload)

    assert response.status_code == 400
    assert "template" in response.json()["detail"]


def test_an_unknown_pool_is_400_naming_the_pools(api, version, training, pool):
    response = post(api, "/api/v1/schedules", body(version, pool="nowhere"))

    assert response.status_code == 400
    assert "nowhere" in response.json()["detail"] and "cpu-a" in response.json()["detail"]
    assert not PipelineTemplate.objects.exists()


def test_another_teams_model_is_404(outsider_api, version, training, pool):
    response = post(outsider_api, "/api/v1/schedules", body(version))

    assert response.status_code == 404
    assert not Schedule.objects.exists()


def test_it_needs_a_token(client, version):
    assert client.get("/api/v1/schedules").status_code == 401
    assert post(client, "/api/v1/schedules", body(version)).status_code == 401


# -- read ------------------------------------------------------------------------------------------


def test_it_lists_and_reads_only_the_teams_schedules(api, schedule, outsider, other_team):
    listed = api.get("/api/v1/schedules")
    one = api.get(f"/api/v1/schedules/{schedule.pk}")

    assert [s["id"] for s in listed.json()] == [schedule.pk]
    assert one.status_code == 200 and one.json()["template"]["stages"] == STAGES
    other = ApiToken.issue(outsider, other_team)[1]
    api.defaults["HTTP_AUTHORIZATION"] = f"Bearer {other}"
    assert api.get("/api/v1/schedules").json() == []
    for call in (api.get, api.delete):
        assert call(f"/api/v1/schedules/{schedule.pk}").status_code == 404
    assert patch(api, f"/api/v1/schedules/{schedule.pk}", {"enabled": False}).status_code == 404
    assert api.get(f"/api/v1/schedules/{schedule.pk}/runs").status_code == 404
    assert post(api, f"/api/v1/schedules/{schedule.pk}/run", {}).status_code == 404
    assert Schedule.objects.get(pk=schedule.pk).enabled and not ScheduleRun.objects.exists()


def test_the_schedules_show_in_the_openapi_document(api):
    paths = api.get("/api/v1/openapi.json").json()["paths"]

    assert paths["/api/v1/schedules/{schedule_id}/runs"]["get"]["tags"] == ["schedules"]
    assert "patch" in paths["/api/v1/templates/{template_id}"]


# -- change and delete -----------------------------------------------------------------------------


def test_patch_enabled_false_pauses_the_periodic_task_and_true_resumes_it(api, schedule):
    url = f"/api/v1/schedules/{schedule.pk}"

    paused = patch(api, url, {"enabled": False})

    assert paused.status_code == 200, paused.content
    assert paused.json()["enabled"] is False and paused.json()["next_run_at"] is None
    assert PeriodicTask.objects.get(r1_schedule=schedule).enabled is False
    resumed = patch(api, url, {"enabled": True})
    assert resumed.json()["enabled"] is True and resumed.json()["next_run_at"] is not None
    assert PeriodicTask.objects.get(r1_schedule=schedule).enabled is True


def test_patch_an_interval_replaces_the_cron_expression(api, schedule):
    response = patch(api, f"/api/v1/schedules/{schedule.pk}", {"interval_seconds": 900})

    assert response.status_code == 200, response.content
    assert response.json()["cron"] == "" and response.json()["interval_seconds"] == 900
    task = PeriodicTask.objects.get(r1_schedule=schedule)
    assert task.interval is not None and task.crontab is None


def test_patch_with_a_bad_cron_is_400_and_changes_nothing(api, schedule):
    response = patch(api, f"/api/v1/schedules/{schedule.pk}", {"cron": "every day", "margin": 1})

    assert response.status_code == 400
    assert "cron 'every day' has 2 field(s)" in response.json()["detail"]
    schedule.refresh_from_db()
    assert schedule.cron == "0 3 * * *" and schedule.margin == 0.0


def test_patch_stages_rewrites_the_schedules_own_template(api, schedule):
    stages = [{"name": "quantize", "settings": {"mode": "int8_dynamic"}}]

    response = patch(api, f"/api/v1/schedules/{schedule.pk}", {"template": stages})

    assert response.status_code == 200, response.content
    assert response.json()["template"]["id"] == schedule.template_id
    assert response.json()["template"]["stage_names"] == ["quantize"]


def test_delete_removes_the_schedule_and_its_periodic_task(api, schedule):
    task_id = schedule.periodic_task_id

    response = api.delete(f"/api/v1/schedules/{schedule.pk}")

    assert response.status_code == 204
    assert not Schedule.objects.filter(pk=schedule.pk).exists()
    assert not PeriodicTask.objects.filter(pk=task_id).exists()
    assert api.get(f"/api/v1/schedules/{schedule.pk}").status_code == 404


# -- runs ------------------------------------------------------------------------------------------


def test_run_now_launches_a_job_and_the_runs_list_shows_it(
    api, schedule, training, enqueued, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = post(api, f"/api/v1/schedules/{schedule.pk}/run", {})

    assert response.status_code == 201, response.content
    run = response.json()
    assert run["trigger"] == "manual" and run["decision"] == Decision.RUNNING
    assert run["job_id"] is not None and run["job_id"] in enqueued
    assert run["dataset_id"] == training.pk and run["dataset_name"] == "train16"
    listed = api.get(f"/api/v1/schedules/{schedule.pk}/runs").json()
    assert [r["id"] for r in listed] == [run["id"]]
    assert listed[0]["job_status"] == "queued" and listed[0]["dataset_version"] == 1
    shown = api.get(f"/api/v1/schedules/{schedule.pk}").json()
    assert shown["last_run"]["decision"] == Decision.RUNNING


def test_run_now_while_the_last_run_still_goes_records_a_skip(api, schedule):
    post(api, f"/api/v1/schedules/{schedule.pk}/run", {})

    again = post(api, f"/api/v1/schedules/{schedule.pk}/run", {})

    assert again.status_code == 200, again.content
    assert again.json()["decision"] == Decision.SKIPPED and again.json()["reason"]
    assert again.json()["job_id"] is None
    assert len(api.get(f"/api/v1/schedules/{schedule.pk}/runs").json()) == 2


# -- templates -------------------------------------------------------------------------------------


def test_templates_are_created_read_changed_and_deleted(api, team):
    made = post(api, "/api/v1/templates", {"name": "weekly", "stages": STAGES})

    assert made.status_code == 201, made.content
    tid = made.json()["id"]
    assert made.json()["stage_names"] == ["quantize", "evaluate"]
    assert [t["id"] for t in api.get("/api/v1/templates").json()] == [tid]
    changed = patch(api, f"/api/v1/templates/{tid}", {"description": "Sundays"})
    assert changed.status_code == 200 and changed.json()["description"] == "Sundays"
    assert api.get(f"/api/v1/templates/{tid}").json()["stages"] == STAGES
    assert api.delete(f"/api/v1/templates/{tid}").status_code == 204
    assert not PipelineTemplate.objects.filter(pk=tid).exists()


def test_a_template_with_an_unknown_stage_is_400(api, team, template):
    made = post(api, "/api/v1/templates", {"name": "x", "stages": [{"name": "distill"}]})
    changed = patch(api, f"/api/v1/templates/{template.pk}", {"stages": [{"name": "distill"}]})

    assert made.status_code == 400 and "distill" in made.json()["detail"]
    assert changed.status_code == 400 and "distill" in changed.json()["detail"]
    template.refresh_from_db()
    assert template.stages == STAGES and PipelineTemplate.objects.count() == 1


def test_a_template_in_use_cannot_be_deleted(api, schedule):
    response = api.delete(f"/api/v1/templates/{schedule.template_id}")

    assert response.status_code == 409 and response.json()["detail"]
    assert PipelineTemplate.objects.filter(pk=schedule.template_id).exists()


def test_another_teams_template_is_404(outsider_api, template):
    url = f"/api/v1/templates/{template.pk}"

    assert outsider_api.get(url).status_code == 404
    assert patch(outsider_api, url, {"name": "mine"}).status_code == 404
    assert outsider_api.delete(url).status_code == 404
    assert PipelineTemplate.objects.get(pk=template.pk).name == "nightly"
