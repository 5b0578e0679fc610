"""Flash messages in headless Chromium: they clear when the state they describe is over."""

from __future__ import annotations

import pytest

from r1platform.jobs.models import Job, JobStatus
from tests.test_browser import page, sign_in  # noqa: F401 - page is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("enqueued")]


def test_the_launch_message_clears_when_the_job_ends(page, user, transactional_db, version):  # noqa: F811
    sign_in(page)
    page.goto(f"/jobs/new/?version={version.pk}")
    page.click("[data-testid=launch-button]")
    page.wait_for_url("**/jobs/*/")
    messages = page.locator("#messages li")
    assert messages.count() == 1 and "Launched job" in messages.inner_text()

    page.wait_for_timeout(2500)  # polls while queued leave the message alone
    assert messages.count() == 1

    Job.objects.update(status=JobStatus.SUCCEEDED, progress=1.0)
    page.wait_for_selector("[data-testid=job-status][data-status=succeeded]")
    page.wait_for_function("document.querySelectorAll('#messages li').length === 0")
    assert page.locator("[data-testid=messages-cleared]").count() == 1
