"""A real Chromium (Debian's, driven by Playwright) against the real server: ask, watch the reply
stream in, stop a long reply, reopen a saved conversation. Screenshots go to tests/artifacts/."""
import os
import re
import time
from pathlib import Path

import pytest
from tests.browser import launch_chromium

playwright = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
DOCS_SHOT = REPO / "docs" / "screenshot-chat.png"
QUESTION = "What is the capital of France?"
STORY = "Write a very long story about a dragon who learns to fly."
TOKENS_RE = re.compile(r"(\d+) tokens · [\d.]+ tok/s")


@pytest.fixture(scope="module")
def page(chat_server):
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.requested_urls = []
        page.on("request", lambda request: page.requested_urls.append(request.url))
        page.set_default_timeout(60_000)
        page.goto(chat_server.url)
        page.locator("#chat-input textarea").wait_for()
        yield page
        browser.close()


def wait_stats(page, word: str) -> str:
    page.wait_for_function(
        "w => { const e = document.querySelector('#chat-stats'); return e && e.innerText.includes(w); }",
        arg=word, timeout=120_000)
    return page.locator("#chat-stats").inner_text()


def last_reply(page) -> str:
    """Text of the newest reply, without the stats line the page shows under it."""
    return page.evaluate("""() => {
        const all = document.querySelectorAll('#chatbot [data-testid=bot]');
        if (!all.length) return '';
        const copy = all[all.length - 1].cloneNode(true);
        copy.querySelectorAll('.gen-stats').forEach(e => e.remove());
        return copy.innerText.trim();
    }""")


def clear(page):
    page.locator("#chat-clear").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot]')")
    page.wait_for_function("() => document.querySelector('#chat-stats').innerText.trim() === ''")


@pytest.mark.browser
def test_ask_and_see_the_reply(page, artifacts_dir):
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()
    stats = wait_stats(page, "done")
    assert "Paris" in last_reply(page)
    assert int(TOKENS_RE.search(stats).group(1)) >= 3
    assert page.locator("#chat-input textarea").input_value() == ""        # input cleared on send
    page.screenshot(path=str(artifacts_dir / "browser-chat-paris.png"))
    if os.environ.get("GPTQ_WEBUI_SCREENSHOT") == "1":                  # refresh the README picture
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_SHOT), clip={"x": 0, "y": 0, "width": 1280, "height": 860})


@pytest.mark.browser
def test_stop_a_long_streamed_reply(page, artifacts_dir):
    clear(page)
    max_tokens = page.locator("#param-max-new-tokens input[type=number]")
    max_tokens.fill("400")
    max_tokens.press("Enter")
    page.locator("#chat-input textarea").fill(STORY)
    page.locator("#chat-send").click()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = last_reply(page)
        if text and (not seen or len(text) != seen[-1]):
            seen.append(len(text))
        if len(text) > 60 and len(seen) >= 3:
            break
        time.sleep(0.05)
    assert len(seen) >= 3, f"the reply did not stream in: lengths seen {seen}"
    page.locator("#chat-stop").click()
    stats = wait_stats(page, "stopped")
    generated = int(TOKENS_RE.search(stats).group(1))
    assert generated < 200, stats                                        # well short of 400
    frozen = last_reply(page)
    time.sleep(1.0)
    assert last_reply(page) == frozen                                    # nothing arrives after Stop
    page.screenshot(path=str(artifacts_dir / "browser-chat-stopped.png"))


@pytest.mark.browser
def test_reopen_a_saved_conversation(page, artifacts_dir):
    clear(page)
    page.locator("#history-list input").click()
    page.get_by_role("option", name=re.compile(re.escape(QUESTION))).first.click()
    page.locator("#history-open").click()
    page.wait_for_function("() => document.querySelector('#chatbot [data-testid=bot]')")
    assert "Paris" in last_reply(page)
    assert QUESTION in page.locator("#chatbot [data-testid=user]").first.inner_text()
    page.screenshot(path=str(artifacts_dir / "browser-chat-reopened.png"))


@pytest.mark.browser
def test_models_tab_bad_input_shows_a_message_and_chat_still_works(page, artifacts_dir):
    page.get_by_role("tab", name="Models").click()
    name = page.locator("#models-name input")
    name.wait_for()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in page.locator("#models-table").inner_text()
    # the model loaded at start is already picked for Unload
    assert page.locator("#models-loaded-picker input").input_value() == "SmolLM2-135M-Instruct@transformers"
    name.fill("../../etc/passwd")
    name.press("Enter")
    page.locator("#models-load").click()
    page.wait_for_function("() => document.querySelector('#models-status').innerText.includes('outside the models folder')")
    assert "Could not load ../../etc/passwd" in page.locator("#models-status").inner_text()
    assert "SmolLM2-135M-Instruct@transformers" in page.locator("#loaded-table").inner_text()
    page.screenshot(path=str(artifacts_dir / "browser-models-bad-input.png"))
    page.get_by_role("tab", name="Chat").click()
    clear(page)
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()
    wait_stats(page, "done")
    assert "Paris" in last_reply(page)


@pytest.mark.browser
def test_enter_sends_and_shift_enter_adds_a_line(page):
    """What the input's placeholder promises: Enter sends (as in every chat app), Shift+Enter starts a
    new line and sends nothing. A two-line Gradio textbox does the reverse."""
    clear(page)
    box = page.locator("#chat-input textarea")
    assert "Enter sends" in box.get_attribute("placeholder")
    box.fill(QUESTION)
    box.press("Enter")
    wait_stats(page, "done")
    assert "Paris" in last_reply(page)
    assert box.input_value() == ""
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    time.sleep(1.0)
    assert box.input_value() == "first line\nsecond line"
    assert page.locator("#chatbot [data-testid=user]").count() == 1          # nothing more was sent
    box.fill("")


@pytest.mark.browser
def test_enter_in_the_preset_name_saves_the_preset(page, chat_server):
    name = page.locator("#preset-name textarea")
    name.fill("Enter Saved")
    name.press("Enter")
    page.wait_for_function("() => document.querySelector('#preset-status').innerText.includes('Saved preset')")
    assert "Enter Saved" in chat_server.ctx.presets.names()
    assert page.locator("#preset-picker input").input_value() == "Enter Saved"


@pytest.mark.browser
def test_the_page_fetches_nothing_from_outside(page, chat_server):
    """No fonts, analytics or scripts from the internet: the UI works offline and leaks nothing."""
    assert page.requested_urls
    outside = [u for u in page.requested_urls
               if not u.startswith((chat_server.url.rstrip("/"), "data:", "blob:"))]
    assert outside == []
