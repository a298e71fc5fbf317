"""The chat page's first promises in a real browser (Debian's Chromium driven by Playwright):
an answer streams and comes back after a reload, and Stop stops. The rest is in
``test_chat_page.py``."""

from __future__ import annotations

from playwright.async_api import Page, expect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway


async def test_page_streams_an_answer_and_remembers_it(gw: RunningGateway, fake: FakeLLM, page: Page) -> None:
    fake.configure(tokens=30, tps=100)
    await page.goto(gw.url + "/")
    await expect(page.locator("#status")).to_have_text("connected")
    await page.fill("#input", "Hello there")
    await page.press("#input", "Enter")
    assistant = page.locator(".msg.assistant").last
    await expect(assistant).to_have_text(fake_reply(30), timeout=10_000)
    await expect(page.locator("#send")).to_be_enabled()

    await page.reload()
    await expect(page.locator(".msg.user")).to_have_text(["Hello there"])
    await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(30)])

    await page.fill("#input", "And again")
    await page.press("#input", "Enter")
    await expect(page.locator(".msg.assistant").last).to_have_text(fake_reply(30), timeout=10_000)
    history = fake.requests()[-1]["body"]["messages"]
    assert [m["content"] for m in history[1:]] == ["Hello there", fake_reply(30), "And again"]


async def test_stop_button_cancels_and_marks_partial(gw: RunningGateway, fake: FakeLLM, page: Page) -> None:
    fake.configure(tokens=2000, tps=40)
    await page.goto(gw.url + "/")
    await expect(page.locator("#status")).to_have_text("connected")
    await page.fill("#input", "Talk for a long time")
    await page.click("#send")
    await expect(page.locator(".msg.assistant").last).not_to_have_text("")
    await page.click("#stop")
    await expect(page.locator(".msg.assistant.partial")).to_have_count(1)
