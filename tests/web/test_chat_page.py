"""The chat page in a real Chromium: streaming Markdown, stop, resume after a reload or a
dropped socket, sanitizing, conversations, agents and models, errors, the queue."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect
from scripted_upstream import ScriptedUpstream, start_scripted_upstream

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway

Shot = Callable[[Page, str], Awaitable[Path]]

#: Wraps the page's WebSocket so a test can close it as a network would.
TRACK_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
})();
"""

#: Records the last answer's text length at each change, and its first heading element.
WATCH_ANSWER = """
() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const answer = [...document.querySelectorAll('.msg.assistant')].at(-1);
    if (!answer) return;
    const length = answer.textContent.length;
    if (window.__lengths.at(-1) !== length) window.__lengths.push(length);
    // Once the list shows, the heading's block has been closed for a while.
    if (answer.querySelector('li')) window.__heading = window.__heading || answer.querySelector('h2');
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}
"""

MARKDOWN = [
    "## Plan", "\n\nSteps to ", "follow:\n\n", "- first ", "item\n", "- second item\n",
    "\n```python\n", "def add(a, b):\n", "    return a + b\n", "```\n\n", "Done ", "now.",
]
CODE = "def add(a, b):\n    return a + b\n"


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := check()):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
    return value


async def open_chat(page: Page, gw: RunningGateway, path: str = "/") -> None:
    await page.goto(gw.url + path)
    await expect(page.locator("#status")).to_have_text("connected")


async def ask(page: Page, text: str) -> None:
    await page.fill("#input", text)
    await page.press("#input", "Enter")


async def answered(page: Page, count: int = 1) -> None:
    """Wait for the ``count``-th answer's end (its timings shown)."""
    await expect(page.locator(".assistant-entry .meta").nth(count - 1)).to_contain_text("tokens/s", timeout=15_000)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    upstream, runner = await start_scripted_upstream()
    try:
        yield upstream
    finally:
        await runner.cleanup()


@pytest.fixture
def scripted_gw(scripted: ScriptedUpstream, start_gateway: Any) -> Iterator[RunningGateway]:
    with start_gateway(ollama_host=scripted.url, model="scripted-model") as running:
        yield running


# Streaming Markdown --------------------------------------------------------------------


async def test_answer_streams_progressively_as_markdown_with_copyable_code(
    scripted: ScriptedUpstream, scripted_gw: RunningGateway, open_page: Any, screenshot: Shot
) -> None:
    scripted.answer(MARKDOWN, interval_s=0.08)
    page = await open_page(permissions=["clipboard-read", "clipboard-write"])
    await open_chat(page, scripted_gw)
    await page.evaluate(WATCH_ANSWER)
    await ask(page, "Show me some Markdown")
    answer = page.locator(".msg.assistant").last
    await expect(answer.locator("ul li")).to_have_count(1)
    await screenshot(page, "streaming")
    await answered(page)
    await screenshot(page, "done")

    final = len(await answer.text_content() or "")
    lengths: list[int] = await page.evaluate("window.__lengths")
    assert lengths == sorted(lengths), lengths
    assert len([n for n in lengths if 0 < n < final]) >= 3, lengths
    # The heading rendered first is the one still shown: closed blocks are kept, not redrawn.
    assert await page.evaluate("window.__heading && window.__heading.isConnected"), await answer.inner_html()

    await expect(answer.locator("h2")).to_have_text("Plan")
    await expect(answer.locator("ul > li")).to_have_text(["first item", "second item"])
    code = answer.locator("pre code.hljs")
    await expect(code).to_have_text(CODE)
    await expect(code.locator(".hljs-keyword").first).to_have_text("def")
    await expect(answer.locator("p").last).to_have_text("Done now.")
    # Screen readers hear the answer once it is whole, not each token as it comes.
    await expect(page.locator("#announcer")).to_contain_text("Done now.")
    assert await page.locator("#log").get_attribute("aria-live") is None

    copy = answer.locator("button.copy")
    await copy.click()
    await expect(copy).to_have_attribute("aria-label", "Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == CODE


async def test_model_text_runs_nothing_loads_nothing_and_navigates_nowhere(
    scripted: ScriptedUpstream, scripted_gw: RunningGateway, page: Page
) -> None:
    pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
    scripted.answer([
        "Look: <img src=x onerror=\"alert('img')\"> and <script>alert('script')</script>\n\n",
        "[click me](javascript:alert('link')) [relative](/conversations) ",
        "<a href=\"https://example.com/\" onclick=\"alert('onclick')\">raw</a> [fine](https://example.com/)\n\n",
        "<iframe src=\"http://127.0.0.1:9/frame\"></iframe>\n\n",
        "![remote](http://127.0.0.1:9/remote.png) ![inline](" + pixel + ")\n\n",
        "<form action=\"http://127.0.0.1:9/\"><input name=q><button>go</button></form>\n\n",
        "<object data=\"http://127.0.0.1:9/o\"></object><embed src=\"http://127.0.0.1:9/e\">",
        "<svg onload=\"alert('svg')\"><circle r=1 /></svg>\n\n",
        "<p style=\"background:url(http://127.0.0.1:9/bg.png)\" class=\"msg error\">styled</p>\n\n",
        "<details open ontoggle=\"alert('toggle')\"><summary>s</summary>x</details>",
    ])
    dialogs: list[str] = []
    messages: list[str] = []
    requested: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.on("console", lambda message: messages.append(message.text))
    page.on("request", lambda request: requested.append(request.url))
    await open_chat(page, scripted_gw)
    await ask(page, "Say something nasty")
    await answered(page)

    answer = page.locator(".msg.assistant").last
    found = await answer.evaluate("""answer => ({
        forbidden: [...answer.querySelectorAll('script, iframe, object, embed, form, input, svg, style, details')]
            .map(e => e.tagName),
        handlers: [...answer.querySelectorAll('*')].flatMap(e => [...e.attributes])
            .filter(a => a.name.startsWith('on') || a.name === 'style').map(a => a.name),
        images: [...answer.querySelectorAll('img')].map(i => i.getAttribute('src').slice(0, 22)),
        links: [...answer.querySelectorAll('a')].map(a => [a.textContent, a.getAttribute('href'), a.target, a.rel]),
        classes: [...answer.querySelectorAll('[class]')].map(e => e.className),
    })""")
    assert found["forbidden"] == [] and found["handlers"] == []
    assert found["images"] == ["data:image/png;base64,"]
    assert found["links"] == [
        ["click me", None, "_blank", "noopener noreferrer"],
        ["relative", None, "_blank", "noopener noreferrer"],
        ["fine", "https://example.com/", "_blank", "noopener noreferrer"],
    ]
    assert not any("error" in c for c in found["classes"])
    await expect(answer).to_contain_text("<script>alert('script')</script>")  # shown, as text
    assert dialogs == [] and messages == []
    assert requested and all(url.startswith(scripted_gw.url + "/") or url.startswith("data:") for url in requested), requested
    await expect(answer).to_contain_text("styled")


# Stop, reload, dropped connections -----------------------------------------------------


async def test_stop_and_escape_end_the_upstream_request_and_keep_the_partial_answer(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    fake.configure(tokens=2000, tps=40)
    await open_chat(page, gw)
    await ask(page, "Talk for a long time")
    answer = page.locator(".msg.assistant").last
    await expect(answer).to_contain_text("fake model")
    await page.click("#stop")
    await expect(answer).to_have_class("msg assistant partial")
    await expect(page.locator(".assistant-entry .meta").last).to_contain_text("stopped")
    await screenshot(page, "stopped")
    record = await eventually(lambda: fake.requests()[-1]["disconnected_at"] and fake.requests()[-1])
    assert record["completed"] is False
    kept = await answer.text_content()
    assert kept and len(kept) < len(fake_reply(2000))

    await ask(page, "And again")
    await expect(page.locator(".msg.assistant").last).to_contain_text("fake model")
    await page.keyboard.press("Escape")
    await expect(page.locator(".msg.assistant.partial")).to_have_count(2)
    await eventually(lambda: len(fake.requests()) == 2 and fake.requests()[-1]["disconnected_at"])

    await page.reload()
    await expect(page.locator(".msg.assistant.partial")).to_have_count(2)
    await expect(page.locator(".msg.assistant").first).to_have_text(kept)


async def test_a_reload_mid_answer_resumes_it_without_repeating_text(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    fake.configure(tokens=150, tps=50)
    await open_chat(page, gw)
    await ask(page, "A long answer please")
    await expect(page.locator(".msg.assistant")).to_contain_text("tokens")
    await page.reload()
    await expect(page.locator("#status")).to_have_text("connected")
    await screenshot(page, "after-reload")
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(150)], timeout=15_000)
    await expect(page.locator(".msg.user")).to_have_text(["A long answer please"])
    assert len(fake.requests()) == 1
    assert await page.evaluate("sessionStorage.getItem('chatgate.running')") == "[]"

    await page.reload()  # and the stored answer is the same
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(150)])


async def test_a_dropped_socket_mid_answer_reconnects_and_resumes(
    gw: RunningGateway, fake: FakeLLM, page: Page
) -> None:
    fake.configure(tokens=150, tps=50)
    await page.add_init_script(TRACK_SOCKETS)
    await open_chat(page, gw)
    await ask(page, "Keep going")
    await expect(page.locator(".msg.assistant")).to_contain_text("tokens")
    await page.evaluate("window.__sockets.at(-1).close()")
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(150)], timeout=15_000)
    assert await page.evaluate("window.__sockets.length") == 2
    assert len(fake.requests()) == 1


async def test_offline_mid_answer_resumes_and_sends_what_was_written_meanwhile(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    fake.configure(tokens=120, tps=40)
    await open_chat(page, gw)
    await ask(page, "First question")
    await expect(page.locator(".msg.assistant")).to_contain_text("tokens")
    await page.context.set_offline(True)
    await expect(page.locator("#status")).to_have_text("offline")
    await expect(page.locator("#send")).to_have_text("Offline — will send")
    await ask(page, "Written while offline")
    await expect(page.locator(".user-entry.queued .msg.user")).to_have_text("Written while offline")
    await screenshot(page, "offline")
    await page.context.set_offline(False)
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(120)] * 2, timeout=20_000)
    await expect(page.locator(".msg.user")).to_have_text(["First question", "Written while offline"])
    await expect(page.locator(".user-entry.queued")).to_have_count(0)
    assert len(fake.requests()) == 2
    assert [m["content"] for m in fake.requests()[1]["body"]["messages"][1:]] == [
        "First question", fake_reply(120), "Written while offline",
    ]


@pytest.mark.allow_page_errors(r"\b401\b")
async def test_with_keys_the_key_is_asked_once_and_a_reload_resumes_with_a_new_ticket(
    start_gateway: Any, fake: FakeLLM, page: Page
) -> None:
    key = "page-key-abcdefghij"
    fake.configure(tokens=120, tps=50)
    with start_gateway(api_keys=key) as gw:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.goto(gw.url + "/")
        await expect(page.locator("#status")).to_have_text("API key needed")
        await page.fill("#key", "not-the-key")
        await page.press("#key", "Enter")
        await expect(page.locator("#status")).to_have_text("wrong API key")
        await page.fill("#key", key)
        await page.press("#key", "Enter")
        await expect(page.locator("#status")).to_have_text("connected")
        await ask(page, "Behind a key")
        await expect(page.locator(".msg.assistant")).to_contain_text("tokens")
        await page.reload()
        await expect(page.locator("#status")).to_have_text("connected")
        await expect(page.locator("#keyform")).to_be_hidden()
        await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(120)], timeout=15_000)
        assert len(fake.requests()) == 1
        assert len(sockets) == 2 and all("ticket=" in url and key not in url for url in sockets)


# Conversations, agents, models ---------------------------------------------------------


async def test_the_sidebar_opens_renames_and_deletes_conversations(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    await open_chat(page, gw)
    await ask(page, "About apples")
    await answered(page)
    first_url = page.url
    assert "#c=" in first_url
    await page.click("#new")
    await expect(page.locator(".msg")).to_have_count(0)
    await ask(page, "About pears")
    await answered(page)
    links = page.locator("#conversations a")
    await expect(links).to_have_text(["About pears", "About apples"])
    await expect(links.first).to_have_attribute("aria-current", "page")

    await links.nth(1).click()
    await expect(page.locator(".msg.user")).to_have_text(["About apples"])
    assert page.url == first_url
    await screenshot(page, "switched")

    other = await page.context.new_page()  # the URL names the conversation: another tab opens it
    await other.goto(first_url)
    await expect(other.locator(".msg.user")).to_have_text(["About apples"])
    await other.close()

    await page.locator("#conversations li").nth(1).hover()
    await page.locator("#conversations li").nth(1).locator("button.rename").click()
    await page.fill(".rename-field", "Fruit notes")
    await page.press(".rename-field", "Enter")
    await expect(links).to_have_text(["About pears", "Fruit notes"])
    await page.reload()
    await expect(links).to_have_text(["About pears", "Fruit notes"])

    row = page.locator("#conversations li").nth(1)
    delete = row.locator("button.delete")
    await expect(delete).to_be_hidden()  # with a mouse, a row shows its buttons when pointed at
    await row.hover()
    await delete.click()
    await expect(delete).to_have_text("Delete?")
    await delete.click()
    await expect(links).to_have_text(["About pears"])
    await expect(page.locator(".msg")).to_have_count(0)  # it was open: a new chat instead
    assert "#c=" not in page.url
    assert [c["title"] for c in (await page.evaluate("fetch('conversations').then(r => r.json())"))["conversations"]] == ["About pears"]


async def test_the_agent_picked_sets_the_next_turns_system_prompt(
    start_gateway: Any, fake: FakeLLM, page: Page, tmp_path: Path
) -> None:
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "pirate.toml").write_text('description = "Talks like a pirate"\nsystem_prompt = "Answer as a pirate."\n')
    with start_gateway(agents_dir=agents) as gw:
        await open_chat(page, gw)
        await expect(page.locator("#agent option")).to_have_text(["general", "pirate"])
        await page.select_option("#agent", "pirate")
        await ask(page, "Ahoy?")
        await answered(page)
        assert fake.requests()[-1]["body"]["messages"][0] == {"role": "system", "content": "Answer as a pirate."}
        await page.select_option("#agent", "general")
        await ask(page, "Plainly now")
        await answered(page, 2)
        assert "pirate" not in fake.requests()[-1]["body"]["messages"][0]["content"]


async def test_the_model_picked_is_asked_for_and_shown_with_its_timings(
    gw: RunningGateway, fake: FakeLLM, page: Page
) -> None:
    fake.configure(tokens=20, tps=200)
    await open_chat(page, gw)
    await expect(page.locator("#model option")).to_contain_text(["fake-model", "fake-backup"])
    await page.select_option("#model", "fake-backup")
    await ask(page, "Which model?")
    await answered(page)
    assert fake.requests()[-1]["body"]["model"] == "fake-backup"
    await expect(page.locator(".assistant-entry .meta")).to_have_text(
        re.compile(r"^fake-backup · first token \d+ ms · [\d.]+ tokens/s$")
    )
    await page.reload()
    await expect(page.locator("#model")).to_have_value("fake-backup")


# Errors, queue, regenerate, edit -------------------------------------------------------


async def test_an_upstream_error_is_shown_inline_and_retry_answers(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    fake.configure(tokens=30, tps=100)
    fake.fault("error_line", after=3)
    await open_chat(page, gw)
    await ask(page, "Try this")
    error = page.locator(".error-entry")
    await expect(error).to_be_visible(timeout=10_000)
    await expect(page.locator(".msg.assistant.partial")).to_have_count(1)
    await screenshot(page, "error")
    await error.locator("button.retry").click()
    await expect(error).to_have_count(0)
    await expect(page.locator(".msg.assistant").last).to_have_text(fake_reply(30), timeout=10_000)
    assert [r["body"]["messages"][-1]["content"] for r in fake.requests()] == ["Try this", "Try this"]


async def test_a_message_sent_during_an_answer_is_queued_then_sent(
    gw: RunningGateway, fake: FakeLLM, page: Page, screenshot: Shot
) -> None:
    fake.configure(tokens=80, tps=40)
    await open_chat(page, gw)
    await ask(page, "First")
    await expect(page.locator(".msg.assistant")).to_contain_text("fake")
    await ask(page, "Second")
    queued = page.locator(".user-entry.queued")
    await expect(queued).to_have_count(1)
    await expect(queued.locator(".badge")).to_contain_text("Queued")
    await screenshot(page, "queued")
    assert len(fake.requests()) == 1
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(80)] * 2, timeout=15_000)
    await expect(queued).to_have_count(0)
    await expect(page.locator(".msg.user")).to_have_text(["First", "Second"])
    assert fake.requests()[1]["body"]["messages"][-1]["content"] == "Second"


async def test_regenerate_and_edit_resend_the_last_message(
    gw: RunningGateway, fake: FakeLLM, page: Page
) -> None:
    fake.configure(tokens=10)
    await open_chat(page, gw)
    await ask(page, "Tell me once")
    await answered(page)
    await page.click("text=Regenerate")
    await answered(page, 2)
    await expect(page.locator(".msg.user")).to_have_text(["Tell me once", "Tell me once"])
    history = fake.requests()[-1]["body"]["messages"][1:]
    assert [m["content"] for m in history] == ["Tell me once", fake_reply(10), "Tell me once"]

    await page.locator(".user-entry").last.locator("text=Edit").click()
    await expect(page.locator("#input")).to_have_value("Tell me once")
    await expect(page.locator("#input")).to_be_focused()
    await page.keyboard.type("Tell me twice")
    await page.keyboard.press("Enter")
    await answered(page, 3)
    assert fake.requests()[-1]["body"]["messages"][-1]["content"] == "Tell me twice"


# Keyboard, small screens, themes, accessibility ----------------------------------------


async def test_enter_sends_and_shift_enter_breaks_the_line(gw: RunningGateway, fake: FakeLLM, page: Page) -> None:
    await open_chat(page, gw)
    await page.keyboard.press("Tab")  # the first stop: a link past the header to the message box
    await expect(page.locator(".skip")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#input")).to_be_focused()
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    await expect(page.locator("#input")).to_have_value("line one\nline two")
    await page.keyboard.press("Enter")
    await expect(page.locator(".msg.user")).to_have_text(["line one\nline two"])
    await answered(page)


async def test_the_page_fits_a_phone(gw: RunningGateway, fake: FakeLLM, open_page: Any, screenshot: Shot) -> None:
    page = await open_page(viewport={"width": 390, "height": 844})
    await open_chat(page, gw)
    await ask(page, "A reply on a phone " + "with-a-very-long-unbroken-word" * 5)
    await answered(page)
    toggle = page.locator("#sidebar-toggle")
    await expect(page.locator("#sidebar")).to_be_hidden()
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-expanded", "true")
    new_chat = page.locator("#new")
    await expect(new_chat).to_be_visible()
    box = await new_chat.bounding_box()
    line = await new_chat.evaluate("b => parseFloat(getComputedStyle(b).lineHeight)")
    assert box and box["height"] < 2 * line
    await screenshot(page, "phone-sidebar")
    await toggle.click()
    await expect(page.locator("#sidebar")).to_be_hidden()
    await toggle.click()
    await page.locator("#conversations a").first.focus()
    await page.keyboard.press("Escape")  # closes the panel, and gives the focus back
    await expect(page.locator("#sidebar")).to_be_hidden()
    await expect(toggle).to_be_focused()
    await screenshot(page, "phone")
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert await page.evaluate("document.getElementById('log').scrollWidth <= document.getElementById('log').clientWidth")


async def test_the_theme_follows_the_system_and_the_toggle_is_remembered(
    gw: RunningGateway, open_page: Any
) -> None:
    page = await open_page(color_scheme="dark")
    await open_chat(page, gw)
    background = "getComputedStyle(document.body).backgroundColor"
    dark = await page.evaluate(background)
    await expect(page.locator("#theme")).to_have_attribute("aria-pressed", "true")
    await page.click("#theme")
    await expect(page.locator("html")).to_have_attribute("data-theme", "light")
    light = await page.evaluate(background)
    assert light != dark
    await page.reload()
    await expect(page.locator("html")).to_have_attribute("data-theme", "light")
    assert await page.evaluate(background) == light
    assert await page.evaluate("document.getElementById('code-light').media") == "all"


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_no_serious_accessibility_violations(
    scheme: str, scripted: ScriptedUpstream, scripted_gw: RunningGateway, open_page: Any,
    axe_violations: Any, screenshot: Shot,
) -> None:
    scripted.answer(MARKDOWN)
    page = await open_page(bypass_csp=True, color_scheme=scheme)
    await open_chat(page, scripted_gw)
    await ask(page, "Something with code")
    await answered(page)
    await screenshot(page, scheme)
    assert summary(await axe_violations(page)) == []
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.click("#sidebar-toggle")
    assert summary(await axe_violations(page)) == []


def summary(violations: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    return [(v["id"], [node["target"] for node in v["nodes"]]) for v in violations]


async def test_the_page_loads_quietly_with_its_favicon(gw: RunningGateway, page: Page) -> None:
    responses: list[tuple[str, int]] = []
    page.on("response", lambda response: responses.append((response.url, response.status)))
    await open_chat(page, gw)
    icon = await page.evaluate("document.querySelector('link[rel=icon]').href")
    assert (await page.request.get(icon)).status == 200
    assert all(status < 400 for _, status in responses)
    assert {url.rsplit("/", 1)[1] for url, _ in responses} >= {"app.js", "style.css", "marked.umd.js", "purify.min.js"}
