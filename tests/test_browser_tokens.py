"""The API tokens page in headless Chromium: make one, use it, revoke it."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.test_browser import page, sign_in  # noqa: F401 - page is a fixture

pytestmark = [pytest.mark.browser]


def test_a_member_makes_uses_and_revokes_a_token(page, user, transactional_db):  # noqa: F811
    page.set_viewport_size({"width": 1024, "height": 800})
    sign_in(page)
    page.click("[data-testid=nav-tokens]")
    page.wait_for_url("**/teams/tokens/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1024
    page.fill("input[name=name]", "laptop")
    page.click("[data-testid=create-token]")
    raw = page.inner_text("[data-testid=new-token-value]").strip()
    assert raw.startswith("r1_")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/v1/models").status_code == 200

    page.goto("/teams/tokens/")
    assert raw not in page.content()
    page.click("[data-testid=revoke-token]")
    page.wait_for_selector("[data-testid=token-row][data-state=revoked]")
    assert api.get("/api/v1/models").status_code == 401
