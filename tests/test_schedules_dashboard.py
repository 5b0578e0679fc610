"""The schedules pages: list, new and edit forms, detail with its live runs table, pause and
resume, run now, delete, and the pipeline templates' pages."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django_celery_beat.models import PeriodicTask

from r1platform.core.storage import spool_local_file
from r1platform.registry.services import upload_model
from r1platform.schedules import pipeline_templates, services
from r1platform.schedules.models import Decision, PipelineTemplate, Schedule, ScheduleRun
from tests.certification_data import make_dataset
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

HTMX = {"HTTP_HX_REQUEST": "true"}


def form_data(version, template, pool, **more) -> dict:
    return {
        "name": "nightly",
        "model": version.model_id,
        "template": template.pk,
        "dataset_name": "train16",
        "eval_split": "test",
        "pool": pool.pk,
        "cron": "0 3 * * *",
        "interval_seconds": "",
        "margin": "0.01",
        "enabled": "on",
        **more,
    }


# -- list and detail -------------------------------------------------------------------------------


def test_the_list_shows_each_schedule_with_its_chain_timing_and_state(member_client, schedule):
    page = member_client.get(reverse("schedules:schedule_list")).content.decode()

    assert 'data-testid="nav-schedules"' in page
    assert f'data-schedule="{schedule.pk}" data-enabled="true"' in page
    assert "<code>quantize</code> → <code>evaluate</code>" in page
    assert "0 3 * * *" in page and "cpu-a" in page and "never run" in page
    assert schedule.model.get_absolute_url() in page


def test_the_list_shows_the_last_runs_decision(member_client, schedule):
    ScheduleRun.objects.create(
        schedule=schedule, team=schedule.team, decision=Decision.KEPT, reason="champion won"
    )

    page = member_client.get(reverse("schedules:schedule_list")).content.decode()

    assert 'data-decision="kept"' in page and "never run" not in page


def test_the_detail_page_shows_the_settings_and_a_polling_runs_table(member_client, schedule):
    page = member_client.get(schedule.get_absolute_url()).content.decode()

    assert 'data-testid="schedule-settings"' in page and "train16" in page
    assert 'id="runs"' in page and 'hx-trigger="every 5s"' in page
    assert 'data-testid="next-run"' in page and "No run yet" in page


def test_the_htmx_partial_answers_the_runs_table_alone(member_client, schedule):
    run = ScheduleRun.objects.create(
        schedule=schedule, team=schedule.team, decision=Decision.SKIPPED, reason="no new data"
    )

    response = member_client.get(schedule.get_absolute_url(), **HTMX)

    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section class="card" id="runs"') and "<html" not in html
    assert f'data-run="{run.pk}" data-decision="skipped"' in html and "no new data" in html


def test_the_partial_stops_polling_once_paused_with_nothing_running(member_client, schedule):
    member_client.post(reverse("schedules:schedule_toggle", args=[schedule.pk]))

    response = member_client.get(schedule.get_absolute_url(), **HTMX)

    assert response.status_code == 286
    assert "hx-trigger" not in response.content.decode()


def test_another_teams_schedule_is_404(client, outsider, schedule):
    client.force_login(outsider)

    assert client.get(schedule.get_absolute_url()).status_code == 404
    assert client.post(reverse("schedules:schedule_delete", args=[schedule.pk])).status_code == 404
    assert Schedule.objects.filter(pk=schedule.pk).exists()


# -- new and edit ----------------------------------------------------------------------------------


def test_the_new_form_offers_the_teams_models_templates_and_datasets(
    member_client, version, template, training, pool
):
    page = member_client.get(reverse("schedules:schedule_new")).content.decode()

    assert 'data-testid="schedule-form"' in page
    assert "mlp" in page and "nightly: quantize → evaluate" in page
    assert '<option value="train16"' in page and "cpu-a" in page


def test_the_new_form_creates_the_schedule(member_client, version, template, training, pool):
    response = member_client.post(
        reverse("schedules:schedule_new"), form_data(version, template, pool)
    )

    schedule = Schedule.objects.get()
    assert response.status_code == 302 and response["Location"] == schedule.get_absolute_url()
    assert schedule.name == "nightly" and schedule.margin == 0.01 and schedule.enabled
    assert schedule.periodic_task is not None and schedule.periodic_task.enabled


def test_a_bad_cron_re_renders_the_form_with_the_message_and_saves_nothing(
    member_client, version, template, training, pool
):
    data = form_data(version, template, pool, cron="0 25 * * *")

    response = member_client.post(reverse("schedules:schedule_new"), data, **HTMX)

    page = response.content.decode()
    assert response.status_code == 400
    assert 'data-testid="form-errors"' in page and "(hour)" in page and "does not parse" in page
    assert page.lstrip().startswith("<form"), "htmx gets the form alone"
    assert 'value="0 25 * * *"' in page, "what was typed stays"
    assert not Schedule.objects.exists()


def test_both_timings_are_refused_in_the_form(member_client, version, template, training, pool):
    data = form_data(version, template, pool, interval_seconds="60")

    response = member_client.post(reverse("schedules:schedule_new"), data)

    assert response.status_code == 400 and "not both" in response.content.decode()
    assert not Schedule.objects.exists()


def test_the_edit_form_changes_the_schedule(member_client, schedule, version, template, pool):
    url = reverse("schedules:schedule_edit", args=[schedule.pk])
    assert 'value="mlp nightly"' in member_client.get(url).content.decode()

    data = form_data(version, template, pool, name="mlp hourly", cron="", interval_seconds="3600")
    response = member_client.post(url, data, **HTMX)

    assert response.status_code == 200 and response["HX-Redirect"] == schedule.get_absolute_url()
    schedule.refresh_from_db()
    assert schedule.name == "mlp hourly" and schedule.interval_seconds == 3600 and not schedule.cron
    assert PeriodicTask.objects.get(r1_schedule=schedule).interval.every == 3600


# -- actions ---------------------------------------------------------------------------------------


def test_pause_and_resume_toggle_the_periodic_task(member_client, schedule):
    url = reverse("schedules:schedule_toggle", args=[schedule.pk])

    member_client.post(url)
    schedule.refresh_from_db()
    assert not schedule.enabled and not PeriodicTask.objects.get(r1_schedule=schedule).enabled
    page = member_client.get(schedule.get_absolute_url()).content.decode()
    assert "paused" in page and "Resume" in page

    response = member_client.post(url, {"next": "list"})
    schedule.refresh_from_db()
    assert response["Location"] == reverse("schedules:schedule_list")
    assert schedule.enabled and PeriodicTask.objects.get(r1_schedule=schedule).enabled


def test_run_now_creates_a_run_shown_on_the_detail_page(
    member_client, schedule, training, enqueued, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = member_client.post(reverse("schedules:schedule_run", args=[schedule.pk]))

    run = ScheduleRun.objects.get(schedule=schedule)
    assert response.status_code == 302 and run.trigger == "manual" and run.job is not None
    assert enqueued == [run.job.pk]
    page = member_client.get(schedule.get_absolute_url(), follow=True).content.decode()
    assert f'data-run="{run.pk}" data-decision="running"' in page
    assert run.job.get_absolute_url() in page and "train16 v1" in page


def test_delete_removes_the_schedule_and_its_periodic_task(member_client, schedule):
    task_id = schedule.periodic_task_id

    response = member_client.post(reverse("schedules:schedule_delete", args=[schedule.pk]))

    assert response["Location"] == reverse("schedules:schedule_list")
    assert not Schedule.objects.exists() and not PeriodicTask.objects.filter(pk=task_id).exists()
    page = member_client.get(reverse("schedules:schedule_list")).content.decode()
    assert "mlp nightly" in page, "the message names the deleted schedule"


# -- templates -------------------------------------------------------------------------------------


def test_the_template_list_shows_each_template_and_its_use(member_client, schedule):
    page = member_client.get(reverse("schedules:template_list")).content.decode()

    assert f'data-template="{schedule.template_id}"' in page
    assert "<code>quantize</code> → <code>evaluate</code>" in page


def test_a_new_template_is_made_from_json_stages(member_client, team):
    url = reverse("schedules:template_new")
    assert "finetune" in member_client.get(url).content.decode(), "prefilled with an example"

    data = {"name": "weekly", "description": "", "stages": json.dumps(STAGES)}
    response = member_client.post(url, data)

    assert response["Location"] == reverse("schedules:template_list")
    assert PipelineTemplate.objects.get().stages == STAGES


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{", "Not valid JSON"),
        ('{"name": "x"}', "JSON list"),
        ('[{"name": "distill"}]', "distill"),
    ],
)
def test_a_bad_template_re_renders_with_the_message(member_client, team, stages, message):
    data = {"name": "weekly", "description": "", "stages": stages}

    response = member_client.post(reverse("schedules:template_new"), data)

    assert response.status_code == 400 and message in response.content.decode()
    assert not PipelineTemplate.objects.exists()


def test_the_template_edit_form_changes_the_stages(member_client, template):
    url = reverse("schedules:template_edit", args=[template.pk])
    stages = [{"name": "quantize", "settings": {"mode": "int8_dynamic"}}]

    response = member_client.post(url, {"name": "nightly", "stages": json.dumps(stages)})

    assert response.status_code == 302
    template.refresh_from_db()
    assert template.stages == stages


def test_a_template_in_use_is_not_deleted_and_the_page_says_why(member_client, schedule):
    url = reverse("schedules:template_delete", args=[schedule.template_id])

    response = member_client.post(url, follow=True)

    assert PipelineTemplate.objects.filter(pk=schedule.template_id).exists()
    assert "Refused" in response.content.decode()


def test_an_unused_template_is_deleted(member_client, template):
    member_client.post(reverse("schedules:template_delete", args=[template.pk]))

    assert not PipelineTemplate.objects.exists()


# -- the model page's schedules section ----------------------------------------------------------


def test_the_model_page_lists_its_schedules_with_the_last_decision(member_client, schedule):
    ScheduleRun.objects.create(
        schedule=schedule, team=schedule.team, decision=Decision.KEPT, reason="champion won"
    )

    page = member_client.get(schedule.model.get_absolute_url()).content.decode()

    section = page[page.index('data-testid="model-schedules"') :]
    assert f'data-schedule="{schedule.pk}" data-enabled="true"' in section
    assert schedule.get_absolute_url() in section and "mlp nightly" in section
    assert "0 3 * * *" in section and "cpu-a" in section
    assert 'data-decision="kept"' in section and "never run" not in section
    new_link = f"{reverse('schedules:schedule_new')}?model={schedule.model_id}"
    assert new_link in section
    assert 'data-testid="model-schedules-empty"' not in page


def test_the_model_pages_schedules_cost_one_query_however_many(member_client, schedule):
    url = schedule.model.get_absolute_url()
    with CaptureQueriesContext(connection) as one:
        member_client.get(url)
    for n in (2, 3):
        services.create_schedule(
            team=schedule.team,
            user=None,
            name=f"mlp nightly {n}",
            model=schedule.model,
            template=schedule.template,
            dataset_name=schedule.dataset_name,
            pool=schedule.pool,
            interval_seconds=3600 * n,
        )
        ScheduleRun.objects.create(
            schedule=Schedule.objects.get(name=f"mlp nightly {n}"),
            team=schedule.team,
            decision=Decision.SKIPPED,
        )
    with CaptureQueriesContext(connection) as three:
        page = member_client.get(url).content.decode()

    assert page.count('data-testid="model-schedule-row"') == 3
    assert len(three) == len(one)


def test_the_model_page_never_shows_another_teams_schedules(
    member_client, schedule, other_team, outsider, pool, mlp_onnx, tmp_path
):
    theirs = upload_model(
        team=other_team,
        user=outsider,
        name="their-mlp",
        task="classification",
        uploaded=spool_local_file(mlp_onnx),
    )
    (tmp_path / "b").mkdir()
    make_dataset(other_team, outsider, tmp_path / "b", "train16", 16, target=True)
    theirs_template = pipeline_templates.create_template(
        team=other_team, user=outsider, name="theirs", stages=STAGES
    )
    services.create_schedule(
        team=other_team,
        user=outsider,
        name="their nightly",
        model=theirs.model,
        template=theirs_template,
        dataset_name="train16",
        pool=pool,
        cron="0 4 * * *",
    )
    # A row on team A's model that bypassed the services (which refuse it): never shown either.
    stray = Schedule.objects.create(
        team=other_team,
        name="stray",
        model=schedule.model,
        template=theirs_template,
        dataset_name="train16",
        pool=pool,
        cron="0 5 * * *",
    )

    page = member_client.get(schedule.model.get_absolute_url()).content.decode()

    assert page.count('data-testid="model-schedule-row"') == 1
    assert "mlp nightly" in page
    assert "their nightly" not in page and f'data-schedule="{stray.pk}"' not in page


def test_a_model_without_schedules_shows_the_empty_state_and_a_new_link(
    member_client, version, template, training, pool
):
    page = member_client.get(version.model.get_absolute_url()).content.decode()

    assert 'data-testid="model-schedules-empty"' in page
    assert 'data-testid="model-schedule-row"' not in page
    assert f"{reverse('schedules:schedule_new')}?model={version.model_id}" in page


def test_the_new_form_pre_selects_the_model_given_in_the_query(
    member_client, version, template, training, pool
):
    url = reverse("schedules:schedule_new")

    page = member_client.get(f"{url}?model={version.model_id}").content.decode()
    plain = member_client.get(url).content.decode()
    junk = member_client.get(f"{url}?model=nope")

    selected = f'<option value="{version.model_id}" selected>'
    assert selected in page and selected not in plain
    assert junk.status_code == 200
