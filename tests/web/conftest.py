"""Shared fixtures and helpers for the page's tests in a real Chromium.

``page``
    A fresh page (in a context of its own) that records every console error, uncaught
    exception and failed request (a network failure, or an answer of 400 or more). Any of
    them fails the test at teardown: a page that works must also work quietly. A test
    that provokes some on purpose says so, either for the whole test with
    ``@pytest.mark.allow_page_errors`` or for some of them with
    ``@pytest.mark.allow_page_errors(r"regex", ...)``, or at run time with
    ``page_problems.allow(r"regex")``. Requests the page itself aborts (``net::ERR_ABORTED``,
    e.g. a fetch cut short by a reload) are not problems.
``a11y_page``
    The same, in a context that bypasses the Content-Security-Policy, so that
    :func:`axe_violations` can inject axe-core (an inline script the policy refuses).
    Use it for accessibility scans only: everything else runs under the real policy.
``open_page``
    The factory behind both, for a test that needs several pages (two tabs).
``screenshot``
    ``await screenshot(page, "name")`` saves ``name.png`` under the screenshots directory,
    in a folder named after the test, and returns its path. The directory is
    ``$CHATGATE_SCREENSHOTS`` when set, else ``.pytest-screenshots/`` at the repository's
    root (ignored by git); it is kept after the run and its path is printed in the summary.

``axe_violations``
    ``await axe_violations(a11y_page)``: runs axe-core (``tests/web/vendor/axe.min.js``,
    vendored by ``scripts/vendor-web.sh``) and returns the serious and critical violations
    (the fixture hands over the helper of that name, since test modules cannot import from
    a conftest).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, Response
from playwright.async_api import Error as PlaywrightError

REPO = Path(__file__).resolve().parents[2]
AXE_JS = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
SCREENSHOTS_ENV = "CHATGATE_SCREENSHOTS"
#: The impacts axe reports that fail a page.
BLOCKING_IMPACTS = ("serious", "critical")

_saved_screenshots: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_page_errors(*patterns): the page fixture tolerates console errors and failed "
        "requests matching these regexes (all of them when none is given)",
    )


@dataclass
class PageProblems:
    """What went wrong in a test's pages, as one line each, and what the test allows."""

    seen: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)
    allow_all: bool = False

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        if self.allow_all:
            return []
        return [line for line in self.seen if not any(p.search(line) for p in self.allowed)]

    def watch(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.seen.append(f"uncaught exception: {error}"))
        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.seen.append(f"console error: {message.text} ({message.location.get('url', '')})")

    def _on_request_failed(self, request: Request) -> None:
        failure = request.failure or ""
        if "ERR_ABORTED" not in failure:
            self.seen.append(f"request failed: {request.method} {request.url}: {failure}")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.seen.append(f"request failed: {response.request.method} {response.url}: {response.status}")


@pytest.fixture
def page_problems(request: pytest.FixtureRequest) -> PageProblems:
    problems = PageProblems()
    marker = request.node.get_closest_marker("allow_page_errors")
    if marker is not None:
        if marker.args:
            for pattern in marker.args:
                problems.allow(pattern)
        else:
            problems.allow_all = True
    return problems


PageFactory = Callable[..., Awaitable[Page]]


@pytest.fixture
async def open_page(browser: Browser, page_problems: PageProblems) -> AsyncIterator[PageFactory]:
    """``await open_page(**context_options)``: a new page, watched; every problem of every
    page it opened fails the test at teardown."""
    contexts: list[Any] = []

    async def open_one(**context_options: Any) -> Page:
        context = await browser.new_context(**context_options)
        contexts.append(context)
        page = await context.new_page()
        page_problems.watch(page)
        return page

    yield open_one
    for context in contexts:
        await context.close()
    unexpected = page_problems.unexpected()
    if unexpected:
        pytest.fail("the page reported problems:\n  " + "\n  ".join(unexpected), pytrace=False)


@pytest.fixture
async def page(open_page: PageFactory) -> Page:
    return await open_page()


@pytest.fixture
async def a11y_page(open_page: PageFactory) -> Page:
    return await open_page(bypass_csp=True)


def screenshots_dir() -> Path:
    configured = os.environ.get(SCREENSHOTS_ENV)
    return Path(configured) if configured else REPO / ".pytest-screenshots"


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Page, str], Awaitable[Path]]:
    folder = screenshots_dir() / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)

    async def take(page: Page, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        _saved_screenshots.append(path)
        return path

    return take


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _saved_screenshots:
        terminalreporter.write_line(
            f"{len(_saved_screenshots)} screenshot(s) saved under {screenshots_dir()}"
        )


async def axe_violations(page: Page) -> list[dict[str, Any]]:
    """The page's serious and critical accessibility violations, as axe-core reports them
    (``id``, ``impact``, ``help``, ``nodes`` with their ``target`` selectors). The page
    must come from ``a11y_page`` (or a context with ``bypass_csp=True``): the policy
    refuses the injected script otherwise."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        try:
            await page.add_script_tag(content=AXE_JS.read_text(encoding="utf-8"))
        except PlaywrightError as exc:
            raise RuntimeError(f"axe-core did not load: scan an a11y_page (bypass_csp=True): {exc}") from exc
    violations: list[dict[str, Any]] = await page.evaluate(
        "async () => (await window.axe.run(document, {resultTypes: ['violations']})).violations"
    )
    return [v for v in violations if v.get("impact") in BLOCKING_IMPACTS]


@pytest.fixture(name="axe_violations")
def axe_violations_fixture() -> Callable[[Page], Awaitable[list[dict[str, Any]]]]:
    """:func:`axe_violations` for test modules, which cannot import from a conftest."""
    return axe_violations
