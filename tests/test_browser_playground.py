"""The playground in headless Chromium: a prompt typed, the answer streamed in token by token
from a real serving app, the numbers shown; a pool that cannot be reached is said so."""

from __future__ import annotations

import pytest

from r1platform.deployments.models import ServingPool
from tests.test_browser import page, sign_in  # noqa: F401 - page is a fixture
from tests.test_playground import (  # noqa: F401 - fixtures
    PROMPT,
    chatty,
    direct,
    other_team,
    serving,
    team,
)

pytestmark = [pytest.mark.browser]

# Counts the output's changes (mutation records, one per streamed event the page applied), so the
# test sees the answer built from many events, not set at once. Counting observer callbacks
# instead failed on a busy CI machine: every event arrived in one network read, was applied in
# one task, and the observer was called once with all the records.
WATCH_OUTPUT = """() => {
  window.__updates = 0;
  const output = document.querySelector("[data-testid=playground-output]");
  new MutationObserver((records) => { window.__updates += records.length; })
    .observe(output, {childList: true, characterData: true, subtree: true});
}"""


def test_a_member_watches_the_answer_stream_in(page, user, chatty, serving):  # noqa: F811
    body = {"model": "chatty", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
    expected = direct(serving, "completions", body).json()["choices"][0]["text"]
    sign_in(page)
    page.goto(chatty.get_absolute_url())
    page.fill("textarea[name=prompt]", PROMPT)
    page.fill("input[name=max_tokens]", "64")
    page.fill("input[name=temperature]", "0")
    page.evaluate(WATCH_OUTPUT)

    page.click("[data-testid=playground-send]")

    stats = page.wait_for_selector("[data-testid=playground-stats]:not([hidden])")
    assert page.text_content("[data-testid=playground-output]") == expected
    assert page.evaluate("window.__updates") > 2, "the answer did not arrive token by token"
    text = stats.inner_text()
    assert "TTFT" in text and "tokens/s" in text and "answered by v1 on play" in text
    assert page.is_hidden("[data-testid=playground-error]")
    assert page.is_hidden("[data-testid=playground-stop]")  # shown only while streaming

    ServingPool.objects.filter(name="play").update(url="http://127.0.0.1:9")
    page.click("[data-testid=playground-send]")

    error = page.wait_for_selector("[data-testid=playground-error]:not([hidden])")
    assert "unreachable" in error.inner_text()
