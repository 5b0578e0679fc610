"""The dashboard in headless Chromium: upload -> launch -> live progress -> finished job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from r1platform.jobs.models import Job, JobStatus

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [pytest.mark.browser, pytest.mark.worker]


@pytest.fixture
def page(live_server):
    if not CHROMIUM.exists():
        if os.environ.get("R1_REQUIRE_BROWSER") == "1":
            pytest.fail("R1_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls the test makes
    # between page actions are still plain synchronous calls.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(base_url=live_server.url)
        page.set_default_timeout(30_000)
        yield page
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def sign_in(page, username: str = "alice", password: str = "pw-alice-123") -> None:
    """Through the login form, as a person does; lands on the dashboard."""
    page.goto("/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url("**/")


def test_it_takes_a_model_from_upload_to_a_finished_job(
    page, worker, user, digits_torchscript, tmp_path
):
    sign_in(page)

    page.goto("/models/upload/")
    page.fill("input[name=name]", "browser-digits")
    page.select_option("select[name=task]", "classification")
    page.set_input_files("input[name=file]", str(digits_torchscript))
    page.fill("input[name=input_shape]", "batch,64")
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/models/*/")
    assert "browser-digits" in page.inner_text("h1")

    page.click("text=Launch pipeline")
    page.wait_for_url("**/jobs/new/**")
    page.click("[data-testid=launch-button]")
    page.wait_for_url("**/jobs/*/")

    # A marker on window survives only if the page is never reloaded: progress must arrive live.
    page.evaluate("window.__noReload = true")
    status = page.locator("[data-testid=job-status]")
    seen = {status.get_attribute("data-status")}
    for _ in range(600):
        seen.add(status.get_attribute("data-status"))
        if seen & {"succeeded", "failed", "cancelled"}:
            break
        page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid=job-status][data-status=succeeded]", timeout=240_000)
    assert page.evaluate("window.__noReload") is True
    assert "running" in seen or "queued" in seen

    job = Job.objects.get()
    assert job.status == JobStatus.SUCCEEDED
    assert page.locator("[data-testid=produced-row]").count() == 3
    assert page.locator("[data-testid=benchmark-row]").count() >= 3
    link = page.get_attribute("[data-testid=mlflow-run-link]", "href")
    assert link and job.mlflow_run_id in link
    page.screenshot(path=str(tmp_path / "job-finished.png"), full_page=True)
    if os.environ.get("R1_SCREENSHOT_DIR"):
        page.screenshot(
            path=os.path.join(os.environ["R1_SCREENSHOT_DIR"], "job.png"), full_page=True
        )
