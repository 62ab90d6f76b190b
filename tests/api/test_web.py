"""The chat page (GET /ui) in a headless Chromium against the running application.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped where either is missing
(playwright's own browser download is not used). One Ray + Serve start for the module, two pools.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In CI (`make test` installs both) a missing browser is a failure, not a skip.
if os.environ.get("CI"):
    import playwright.sync_api as sync_api

    assert CHROMIUM is not None, "CI needs /usr/bin/chromium (make test installs it)"
else:
    sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")]
POOLS = ["chatglm2-6b", "chatglm2-6b-int8", "chatglm2-6b-int4"]  # the demo service's
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser(base_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    page = browser.new_page()
    page.goto(f"{base_url}/ui")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield page
    page.close()


def greedy_answer(base_url: str, query: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": query}], "temperature": 0,
            "max_tokens": max_tokens}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def ask(page, text: str) -> str:
    """Type, send, wait for the answer to finish; returns the status line."""
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function("/^(done|stopped|error)/.test(document.querySelector('#status').textContent)")
    return page.text_content("#status")


def greedy(page, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))


def test_models_fill_the_pool_select(page):
    values = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert values[:3] == POOLS
    # then the demo adapters, by name and per pool, labelled with their pool
    assert "demo-ptuning" in values and "chatglm2-6b-int4:demo-lora" in values
    labels = page.eval_on_selector_all("#model option", "options => options.map(o => o.textContent)")
    assert labels[values.index("demo-lora")] == "demo-lora (adapter of chatglm2-6b)"


def test_answer_streams_in_and_matches_the_api(page, base_url):
    greedy(page, 160)  # long enough that the answer cannot arrive in a single network read
    # Record every rendering of the assistant bubble to see the text arrive in pieces.
    page.evaluate("""() => {
        window.renderings = [];
        new MutationObserver(() => {
            const bubble = document.querySelector('.msg.assistant:last-child');
            if (bubble && bubble.textContent) window.renderings.push(bubble.textContent);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")
    assert ask(page, "你好").startswith("done (chatglm2-6b)")
    answer = page.text_content(".msg.assistant")
    assert answer == greedy_answer(base_url, "你好", POOLS[0], 160).replace("\n", "")
    renderings = page.evaluate("window.renderings")
    assert len(set(renderings)) >= 2 and renderings[-1] == answer
    assert page.text_content(".msg.user") == "你好"


def test_switch_pool_retry_and_clear(page, base_url):
    greedy(page, 8)
    page.select_option("#model", POOLS[1])
    assert ask(page, "你好").startswith(f"done ({POOLS[1]})")
    first = page.text_content(".msg.assistant")
    page.click("#retry")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert page.text_content(".msg.assistant") == first  # greedy: the same answer again
    page.click("#clear")
    assert page.locator("#messages > *").count() == 0


@pytest.mark.parametrize(("mode", "system"), [
    ("background", "You are a pirate."),
    ("translate", "Translate the following into French:"),
])
def test_modes_send_their_instruction_as_system_message(page, mode, system):
    sent = []

    def record(route):
        sent.append(json.loads(route.request.post_data))
        route.continue_()

    page.route("**/v1/chat/completions", record)
    greedy(page, 4)
    page.select_option("#mode", mode)
    if mode == "background":
        page.fill("#instruction", system)
    else:
        page.fill("#language", "French")
    ask(page, "hello")
    ask(page, "again")
    first, second = sent
    assert first["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
    assert first["stream"] is True and first["temperature"] == 0 and first["max_tokens"] == 4
    if mode == "translate":  # each translation stands alone
        assert second["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "again"}]
    else:  # the background setting stays first; the conversation follows it
        assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]


def test_model_output_cannot_inject_markup(page):
    payload = 'hi <img src=x onerror="window.pwned=1"> **bold** `x<b>` \n```\n<script>window.pwned=2</script>\n```'
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": POOLS[0],
               "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
              for piece in (payload[:10], payload[10:])]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    ask(page, "show me html")
    bubble = page.locator(".msg.assistant")
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert '<img src=x onerror="window.pwned=1">' in bubble.text_content()
    assert bubble.locator("strong").text_content() == "bold"
    assert bubble.locator("code").first.text_content() == "x<b>"  # inline code, before the fence
    assert bubble.locator("pre code").text_content().strip() == "<script>window.pwned=2</script>"
