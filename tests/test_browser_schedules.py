"""The schedules pages in headless Chromium: a refused cron, a schedule made, paused and resumed,
run now, and its runs table kept live by htmx."""

from __future__ import annotations

import re

import pytest

from r1platform.schedules import runs
from r1platform.schedules.models import Schedule, ScheduleRun
from r1platform.workers.services import beat
from tests.certification_data import WORKER
from tests.schedules_pages_data import (  # noqa: F401 - fixtures, registered by name
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    template_fixture,
    training_fixture,
)
from tests.test_browser import page, sign_in  # noqa: F401 - page is a fixture

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("enqueued")]

ROW = "[data-testid=run-row]"


@pytest.fixture(autouse=True)
def no_mlflow_mirror(monkeypatch):
    """The upload's MLflow mirror (a few seconds of tracking-store setup, run for real on commit
    under the live server) is not what these pages show: left out to keep the test short."""
    monkeypatch.setattr("r1platform.registry.services.mirror_to_mlflow", lambda *a, **k: "")


def test_a_schedule_is_refused_made_paused_resumed_and_run_from_the_browser(
    page,  # noqa: F811
    user,
    version,
    training,
    pool,
    template,
    enqueued,
):
    sign_in(page)
    page.click("[data-testid=nav-schedules]")
    page.wait_for_url("**/schedules/")
    page.click("[data-testid=schedule-new-link]")
    page.wait_for_url("**/schedules/new/")

    page.fill("input[name=name]", "browser nightly")
    page.select_option("select[name=model]", str(version.model_id))
    page.select_option("select[name=template]", str(template.pk))
    page.select_option("select[name=dataset_name]", training.name)
    page.select_option("select[name=pool]", str(pool.pk))
    page.fill("input[name=cron]", "61 * * * *")
    page.click("[data-testid=save-button]")

    # htmx swaps the refused form in place: the message names the field, nothing is saved.
    errors = page.wait_for_selector("[data-testid=form-errors]")
    assert "(minute)" in errors.inner_text() and "61" in errors.inner_text()
    assert page.input_value("input[name=cron]") == "61 * * * *", "what was typed stays"
    assert page.url.endswith("/schedules/new/")
    assert not Schedule.objects.exists()

    # The schedule's stages are checked against a live worker of the pool's hardware: keep the
    # (simulated) worker beating as a live one does, however long the browser took.
    beat(WORKER)
    page.fill("input[name=cron]", "*/5 * * * *")
    page.click("[data-testid=save-button]")
    page.wait_for_url(re.compile(r"/schedules/\d+/$"))
    schedule = Schedule.objects.get()
    assert page.url.endswith(schedule.get_absolute_url())
    assert schedule.cron == "*/5 * * * *" and schedule.model_id == version.model_id
    state = page.locator("[data-testid=schedule-state]")
    assert state.inner_text().strip().lower() == "enabled"

    page.click("[data-testid=toggle-button]")
    page.wait_for_selector("[data-testid=schedule-state]:text-is('paused')")
    assert state.inner_text().strip().lower() == "paused"
    assert not Schedule.objects.get().enabled
    page.click("[data-testid=toggle-button]")
    page.wait_for_selector("[data-testid=schedule-state]:text-is('enabled')")
    assert Schedule.objects.get().enabled

    beat(WORKER)
    page.click("[data-testid=run-button]")
    row = page.wait_for_selector(ROW)
    run = ScheduleRun.objects.get(schedule=schedule)
    assert row.get_attribute("data-run") == str(run.pk)
    badge = row.query_selector("[data-decision]")
    assert badge is not None and badge.get_attribute("data-decision") == run.decision
    assert badge.inner_text().strip(), "the decision badge says something"
    # Whatever the service decided (running with its job, or failed/skipped), the row says why.
    reason = row.query_selector("td:nth-child(3)").inner_text().strip()
    job_link = row.query_selector("a[href^='/jobs/']")
    assert (reason and reason != "—") or job_link is not None
    if run.job_id is not None:
        assert job_link is not None and job_link.get_attribute("href") == run.job.get_absolute_url()
        assert enqueued == [run.job_id]

    # The runs table polls: a run recorded meanwhile (a second "run now" through the service)
    # arrives in the table without the page reloading.
    page.evaluate("window.__noReload = true")
    second = runs.run_schedule(schedule.pk, trigger="manual")
    assert second is not None
    page.wait_for_selector(f"{ROW}[data-run='{second.pk}']", timeout=15_000)
    assert page.evaluate("window.__noReload") is True
    assert page.locator(ROW).count() == 2
    second_row = page.locator(f"{ROW}[data-run='{second.pk}']")
    assert second_row.get_attribute("data-decision") == second.decision
