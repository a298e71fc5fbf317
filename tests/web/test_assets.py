"""The page's files: ``/assets/…`` and ``/favicon.ico``, their types, caching and security
headers, what they refuse, and the vendored libraries against their manifest."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page

from chatgate.api import http as http_routes
from chatgate.testing.servers import RunningGateway

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "src" / "chatgate" / "web"
VENDOR = WEB / "vendor"
TEST_VENDOR = Path(__file__).resolve().parent / "vendor"


def manifest(folder: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads((folder / "MANIFEST.json").read_text())["files"]
    return entries


SHIPPED = [e["file"] for e in manifest(VENDOR) if not e["file"].startswith("licenses/")]
EXPECTED_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".map": "application/json"}


def raw_get(gw: RunningGateway, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET of ``path`` exactly as written: httpx would resolve ``..`` before sending it."""
    address = urlsplit(gw.url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def directives(policy: str) -> dict[str, str]:
    parsed = (d.strip().split(None, 1) for d in policy.split(";") if d.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in parsed}


def assert_security_headers(headers: httpx.Headers | dict[str, str]) -> None:
    assert directives(headers["content-security-policy"]) == {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "font-src": "'self'",
        "object-src": "'none'",
        "base-uri": "'none'",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
    }
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("file", SHIPPED)
def test_vendored_files_are_served_with_their_type_and_cached(gw: RunningGateway, file: str) -> None:
    response = httpx.get(f"{gw.url}/assets/vendor/{file}")
    assert response.status_code == 200
    assert response.content == (VENDOR / file).read_bytes()
    suffix = Path(file).suffix
    assert response.headers["content-type"].split(";")[0] == EXPECTED_TYPES[suffix]
    cache = response.headers["cache-control"]
    assert "max-age=" in cache and int(cache.split("max-age=")[1].split(",")[0]) >= 86_400
    assert_security_headers(response.headers)


def test_the_pages_own_files_are_revalidated(gw: RunningGateway) -> None:
    for path in ("/", "/assets/favicon.svg", "/favicon.ico"):
        response = httpx.get(gw.url + path)
        assert response.status_code == 200, path
        assert response.headers["cache-control"] == "no-cache", path


def test_favicon_is_the_svg(gw: RunningGateway) -> None:
    response = httpx.get(gw.url + "/favicon.ico")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    assert response.content == (WEB / "favicon.svg").read_bytes()


def test_page_has_the_policy_and_security_headers(gw: RunningGateway) -> None:
    response = httpx.get(gw.url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert_security_headers(response.headers)


@pytest.mark.parametrize(
    "path",
    [
        "/assets/../../../README.md",
        "/assets/vendor/../../../../README.md",
        "/assets/%2e%2e/%2e%2e/%2e%2e/README.md",
        "/assets/..%2f..%2f..%2fREADME.md",
        "/assets/..\\..\\..\\README.md",
        "/assets//etc/hostname",
        "/assets/%2fetc%2fhostname",
        "/assets/./favicon.svg",
        "/assets/vendor/",
        "/assets/vendor/licenses",
        "/assets/index.html",
        "/assets/no-such-file.js",
    ],
)
def test_outside_the_web_directory_and_unknown_files_are_404(gw: RunningGateway, path: str) -> None:
    status, headers, body = raw_get(gw, path)
    assert status == 404, path
    assert json.loads(body) == {"detail": "no such asset", "code": "not_found"}
    assert headers["x-content-type-options"] == "nosniff"


@pytest.fixture
def web_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A web directory of its own, beside a secret, for what the real tree cannot show."""
    web = tmp_path / "web"
    (web / "vendor").mkdir(parents=True)
    (web / "app.js").write_text("ok")
    (tmp_path / "secret.js").write_text("secret")
    (web / "vendor" / "escape.js").symlink_to(tmp_path / "secret.js")
    (web / "inside.js").symlink_to(web / "app.js")
    monkeypatch.setattr(http_routes, "WEB_DIR", web)
    yield web


def test_symbolic_links_out_of_the_web_directory_are_refused(web_dir: Path) -> None:
    assert http_routes._web_file("app.js") == web_dir / "app.js"
    assert http_routes._web_file("inside.js") == web_dir / "app.js"
    assert http_routes._web_file("vendor/escape.js") is None
    assert http_routes._web_file("../secret.js") is None
    assert http_routes._web_file(str(web_dir.parent / "secret.js")) is None


def test_the_page_and_its_files_need_no_key(start_gateway: Any) -> None:
    with start_gateway(api_keys="k1") as gw:
        assert httpx.get(gw.url + "/conversations").status_code == 401
        for path in ("/", "/favicon.ico", "/assets/favicon.svg", f"/assets/vendor/{SHIPPED[0]}"):
            assert httpx.get(gw.url + path).status_code == 200, path
        assert httpx.get(gw.url + "/assets/nothing.js").status_code == 404


async def test_vendored_libraries_run_under_the_policy(gw: RunningGateway, page: Page) -> None:
    """The page's libraries load from /assets/ and work where inline script is refused."""
    await page.goto(gw.url + "/assets/vendor/licenses/marked.LICENSE.md")
    for file in ("marked.umd.js", "purify.min.js", "highlight.min.js"):
        await page.add_script_tag(url=f"/assets/vendor/{file}")
    html = await page.evaluate(
        """() => DOMPurify.sanitize(marked.parse(
            '**hi** <a href="javascript:alert(1)">link</a> <script>alert(2)</script>'))"""
    )
    assert "<strong>hi</strong>" in html and "javascript:" not in html and "<script" not in html
    highlighted = await page.evaluate("() => hljs.highlight('def f(): pass', {language: 'python'}).value")
    assert 'class="hljs-keyword"' in highlighted


@pytest.mark.allow_page_errors("Content Security Policy", "Refused to")
async def test_policy_refuses_inline_script(gw: RunningGateway, page: Page, page_problems: Any) -> None:
    await page.goto(gw.url + "/assets/vendor/licenses/marked.LICENSE.md")
    with pytest.raises(Exception, match=r"(?i)content security policy|refused"):
        await page.add_script_tag(content="window.ran = true")
    assert await page.evaluate("() => window.ran") is None
    assert any("Content Security Policy" in line for line in page_problems.seen)


@pytest.mark.allow_page_errors("Content Security Policy", "Refused to connect")
async def test_policy_lets_the_websocket_reach_its_own_host_only(
    gw: RunningGateway, page: Page, page_problems: Any
) -> None:
    """connect-src 'self' covers ws: to the page's own host; another origin is refused."""
    await page.goto(gw.url + "/assets/vendor/licenses/marked.LICENSE.md")
    opened = await page.evaluate(
        """url => new Promise(resolve => {
            const ws = new WebSocket(url);
            ws.onopen = () => { ws.close(); resolve('open'); };
            ws.onerror = () => resolve('error');
        })""",
        gw.ws_url + "/ws",
    )
    assert opened == "open"
    other = gw.ws_url.replace("127.0.0.1", "localhost") + "/ws"
    refused = await page.evaluate(
        """url => new Promise(resolve => {
            document.addEventListener('securitypolicyviolation', e => resolve(e.violatedDirective));
            try {
                const ws = new WebSocket(url);
                ws.onopen = () => { ws.close(); resolve('open'); };
                ws.onclose = () => resolve('closed');
            } catch (e) { resolve('thrown: ' + e.name); }
        })""",
        other,
    )
    assert refused != "open"
    assert any("connect-src" in line for line in page_problems.seen), page_problems.seen


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("folder", [VENDOR, TEST_VENDOR], ids=["shipped", "tests"])
def test_vendored_files_match_their_manifest(folder: Path) -> None:
    """What scripts/vendor-web.sh wrote is what is committed, and nothing else is there."""
    entries = manifest(folder)
    for entry in entries:
        assert sha256(folder / entry["file"]) == entry["sha256"], entry["file"]
    listed = {e["file"] for e in entries} | {"MANIFEST.json", "LICENSES.md"}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert present <= listed, present - listed


def test_pins_are_the_vendored_versions() -> None:
    package = json.loads((REPO / "web" / "package.json").read_text())
    pins = {**package["dependencies"], **package["devDependencies"]}
    vendored = {e["package"]: e["version"] for e in manifest(VENDOR) + manifest(TEST_VENDOR)}
    assert pins == vendored
    lock = json.loads((REPO / "web" / "package-lock.json").read_text())["packages"]
    assert {name: lock[f"node_modules/{name}"]["version"] for name in pins} == pins


def test_every_vendored_package_has_its_licence() -> None:
    listing = (VENDOR / "LICENSES.md").read_text()
    for entry in manifest(VENDOR):
        assert f"| {entry['package']} | {entry['version']} |" in listing
    licensed = {e["package"] for e in manifest(VENDOR) if e["file"].startswith("licenses/")}
    assert licensed == {e["package"] for e in manifest(VENDOR)}
    assert any(e["file"].endswith(".txt") for e in manifest(TEST_VENDOR))
