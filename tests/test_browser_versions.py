"""Version pages in headless Chromium: long names wrap at 1024 px; the file downloads."""

from __future__ import annotations

import hashlib

import pytest

from r1platform.registry.models import RegisteredModel
from tests.test_browser import page, sign_in  # noqa: F401 - page is a fixture

pytestmark = [pytest.mark.browser]

# What sticks out past 1024 px, for the failure message.
WIDE = """[...document.querySelectorAll('body *')]
  .filter(e => e.getBoundingClientRect().right > 1024).slice(0, 5)
  .map(e => `${e.tagName}.${e.className} ${e.getBoundingClientRect().right}`)"""
LONG = "a-very-long-model-name-" + "x" * 77  # 100 characters, no space to break at


@pytest.fixture
def long_named(transactional_db, version):
    RegisteredModel.objects.filter(pk=version.model_id).update(name=LONG)
    version.refresh_from_db()
    return version


def test_a_long_name_wraps_and_the_file_downloads(page, user, long_named, tmp_path):  # noqa: F811
    page.set_viewport_size({"width": 1024, "height": 800})
    sign_in(page)
    for url in (long_named.get_absolute_url(), long_named.model.get_absolute_url(), "/"):
        page.goto(url)
        assert LONG in page.inner_text("body")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 1024, f"{url} is {width} px wide at 1024 px: {page.evaluate(WIDE)}"

    page.goto(long_named.get_absolute_url())
    with page.expect_download() as caught:
        page.click("[data-testid=version-download]")
    saved = tmp_path / "downloaded"
    caught.value.save_as(saved)
    assert caught.value.suggested_filename == f"{LONG}-v1.onnx"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == long_named.sha256


def test_two_versions_are_compared_from_the_model_page(page, user, long_named):  # noqa: F811
    from tests.test_dashboard import make_version

    make_version(long_named.model, metrics={"accuracy": 0.5})
    page.set_viewport_size({"width": 1024, "height": 800})
    sign_in(page)
    page.goto(long_named.model.get_absolute_url())
    checks = page.locator("[data-testid=compare-check]")
    assert checks.count() == 2
    checks.nth(0).check()
    checks.nth(1).check()
    page.click("[data-testid=compare-button]")
    page.wait_for_url("**/compare/?v=*")
    assert page.locator("[data-testid=compare-versions] th").count() == 3
    assert page.locator("[data-testid=metric-line][data-metric=accuracy]").count() == 1
    assert page.evaluate("document.documentElement.scrollWidth") <= 1024, page.evaluate(WIDE)
