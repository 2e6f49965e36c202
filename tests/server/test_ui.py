"""The /ui chat page in headless Chromium (Debian's `chromium`, driven by Playwright), the files it is
made of, and the ready line that points at it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import httpx
import pytest

from mistralrs_py.server.app import UI_DIR

from .conftest import running_server

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="the /ui browser tests need Debian's chromium package (apt-get install chromium); not found",
)
QUESTION = "What is the capital of France?"


# ---- the files ---------------------------------------------------------------------------------------
def test_ui_files_are_self_contained():
    files = {p.name: p.read_text() for p in UI_DIR.iterdir()}
    assert {"index.html", "app.js", "style.css"} <= set(files)
    for name, text in files.items():
        # no CDN, no web fonts, no absolute URLs: the page works offline and behind a path prefix
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
        assert "@import" not in text and "fonts.googleapis" not in text, name
    assert 'src="app.js"' in files["index.html"] and 'href="style.css"' in files["index.html"]


def test_ui_is_served_and_root_leads_to_it(tiny_server):
    url, _ = tiny_server
    r = httpx.get(f"{url}/")
    assert r.status_code in (302, 307) and r.headers["location"] == "ui/"
    page = httpx.get(f"{url}/ui", follow_redirects=True)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<textarea id="input"' in page.text
    js = httpx.get(f"{url}/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]


# ---- the page in a browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("the /ui browser tests need Debian's chromium package (apt-get install chromium); not found")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # NOTE: --no-sandbox because CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tiny_server):
    url, _ = tiny_server
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(f"{url}/ui")
    pg.wait_for_function("document.getElementById('model').textContent !== '…'")
    yield pg
    ctx.close()


# NOTE: every text node ever put into an assistant bubble, read from the mutation records (not the
# batched callbacks), so each streamed state is seen even when several arrive in one task.
RECORD_STATES = """() => {
  window.__states = [];
  new MutationObserver((records) => {
    for (const r of records)
      for (const n of r.addedNodes)
        if (n.nodeType === 3 && n.parentElement && n.parentElement.matches('.msg.assistant .content'))
          window.__states.push(n.data);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true});
}"""


def set_controls(pg, temperature: str, max_tokens: str) -> None:
    pg.eval_on_selector(
        "#temperature", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", temperature
    )
    pg.fill("#max-tokens", max_tokens)


@needs_chromium
def test_typed_question_gets_a_streamed_answer(page, tiny_server):
    url, _ = tiny_server
    set_controls(page, "0", "24")
    page.evaluate(RECORD_STATES)
    page.click("#input")
    page.keyboard.type(QUESTION)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.keyboard.press("Enter")
    body = sent.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["messages"] == [{"role": "user", "content": QUESTION}]

    page.wait_for_selector(".msg.assistant[data-state=done]")
    shown = page.text_content(".msg.assistant .content")
    assert page.text_content(".msg.user .content") == QUESTION
    assert page.input_value("#input") == "" and page.is_hidden("#stop") and page.is_enabled("#send")
    assert "tokens" in page.text_content(".msg.assistant .note")

    # the same request without streaming gives the same text: the page reassembled the stream exactly
    ref = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert shown == ref["choices"][0]["message"]["content"] and shown
    # and it grew in several steps, each a prefix of the next
    states = [s for s in page.evaluate("window.__states") if s]
    assert len(set(states)) >= 2, states
    assert all(b.startswith(a) for a, b in zip(states, states[1:])) and states[-1] == shown

    # the conversation goes on: the next request carries the history
    page.fill("#input", "And of Italy?")
    with page.expect_request("**/v1/chat/completions") as sent2:
        page.click("#send")
    assert sent2.value.post_data_json["messages"] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": shown},
        {"role": "user", "content": "And of Italy?"},
    ]
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state=done]")


@needs_chromium
def test_stop_button_aborts_the_request(page, tiny_server):
    url, _ = tiny_server
    # NOTE: a slow link (about 1 SSE chunk per 0.3 s) so the answer is still arriving when Stop is
    # clicked; the server itself is far faster than a person.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 20, "downloadThroughput": 800, "uploadThroughput": -1},
    )
    set_controls(page, "0", "60")
    failed = []
    page.on("requestfailed", lambda r: failed.append((r.url, r.failure)))
    page.fill("#input", QUESTION)
    page.click("#send")
    page.wait_for_function("(document.querySelector('.msg.assistant .content') || {}).textContent")
    assert page.is_visible("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    partial = page.text_content(".msg.assistant .content")
    assert page.text_content(".msg.assistant .note") == "stopped"
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert any(u.endswith("/v1/chat/completions") and "ABORTED" in (f or "") for u, f in failed), failed
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    full = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 60,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert len(partial) < len(full.json()["choices"][0]["message"]["content"])
    assert full.json()["choices"][0]["message"]["content"].startswith(partial)


@needs_chromium
def test_server_errors_are_shown_not_swallowed(page):
    set_controls(page, "0", "100000")  # more than the 128-token context
    page.fill("#input", QUESTION)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=error]")
    assert "maximum context length" in page.text_content(".msg.assistant .note")
    assert page.is_enabled("#send")


# ---- the ready line -----------------------------------------------------------------------------------
def test_ready_line_names_the_ui_and_its_curl_works(tiny_llama):
    args = ["--max-model-len", "64", "--max-seqs", "1"]
    with running_server(args, ["mistral", "-m", str(tiny_llama)], env={"COLUMNS": "400"}) as srv:
        lines = [line.strip() for line in srv.output().splitlines()]
        ready = next(line for line in lines if line.startswith("ready "))
        assert ready.endswith(f"| http://127.0.0.1:{srv.port}/ui"), ready
        assert str(tiny_llama) in ready and "ctx 64 x 1 seqs" in ready and " | loaded in " in ready
        curl = shlex.split(next(line for line in lines if line.startswith("try:"))[4:])
        assert curl[:2] == ["curl", f"http://127.0.0.1:{srv.port}/v1/chat/completions"]
        assert curl[2:5] == ["-H", "Content-Type: application/json", "-d"]
        if shutil.which("curl"):
            out = subprocess.run([*curl, "-s", "--max-time", "60"], capture_output=True, text=True).stdout
        else:  # the same request without the curl binary
            out = httpx.post(curl[1], headers={"Content-Type": "application/json"}, content=curl[5], timeout=60).text
        answer = json.loads(out)
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1


def test_public_url_never_shows_a_wildcard_address():
    from mistralrs_py.server.launch import public_url

    assert public_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert public_url("::", 8080) == "http://[::1]:8080"
    assert public_url("fe80::1", 1) == "http://[fe80::1]:1"
    assert public_url("example.lan", 1) == "http://example.lan:1"
