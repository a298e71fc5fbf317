"""With auth off, each browser is someone of its own (chatgate.api.auth): a signed cookie
set by the page gives it an identity, so visitors do not list, read or delete each other's
conversations, while programs that send no cookie (the seeds' clients, curl, the SDKs)
are the one anonymous caller they always were. Real gateways on loopback; two cookie jars
play two browsers; Debian's Chromium plays two real ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
from playwright.async_api import Browser, expect
from websockets.sync.client import connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, serve_process

RECV_S = 10.0
#: Headers every current browser sends on a fetch, and programs do not.
FETCH_METADATA = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "empty"}


@contextmanager
def browser_jar(gw: RunningGateway) -> Iterator[httpx.Client]:
    """A client that keeps cookies and, like a browser, loads the page first."""
    with httpx.Client(base_url=gw.url, timeout=RECV_S) as client:
        page = client.get("/")
        assert page.status_code == 200
        yield client


def chat(client: httpx.Client | None, gw: RunningGateway, message: str, **body: Any) -> str:
    payload = {"message": message, **body}
    response = client.post("/chat", json=payload) if client else httpx.post(f"{gw.url}/chat", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["reply"] == fake_reply(40)
    conversation_id: str = response.json()["conversation_id"]
    return conversation_id


def listed(client: httpx.Client | None, gw: RunningGateway) -> set[str]:
    response = client.get("/conversations") if client else httpx.get(f"{gw.url}/conversations")
    assert response.status_code == 200, response.text
    return {c["id"] for c in response.json()["conversations"]}


def test_two_browsers_do_not_see_each_others_conversations(gw: RunningGateway) -> None:
    with browser_jar(gw) as alice, browser_jar(gw) as bob:
        assert alice.cookies["chatgate_id"] != bob.cookies["chatgate_id"]
        hers = chat(alice, gw, "alice's secret")
        his = chat(bob, gw, "bob's secret")
        assert listed(alice, gw) == {hers} and listed(bob, gw) == {his}

        assert alice.get(f"/conversations/{his}").status_code == 404
        assert alice.delete(f"/conversations/{his}").status_code == 404
        assert bob.get(f"/conversations/{his}").json()["messages"][0]["content"] == "bob's secret"

        # A program without cookies is the anonymous caller of before: its own, and no one else's.
        theirs = chat(None, gw, "a script's words")
        assert chat(None, gw, "and more", conversation_id=theirs) == theirs
        assert listed(None, gw) == {theirs}
        messages = httpx.get(f"{gw.url}/conversations/{theirs}").json()["messages"]
        assert [m["content"] for m in messages] == ["a script's words", fake_reply(40), "and more", fake_reply(40)]
        assert httpx.get(f"{gw.url}/conversations/{hers}").status_code == 404
        assert theirs not in listed(alice, gw) | listed(bob, gw)


def test_a_browser_that_drops_its_cookie_does_not_get_a_new_rate_limit(start_gateway: Any) -> None:
    """A new identity is one dropped cookie away, so limits count a browser's turns by its
    address, as they did before identities: three browsers from one address share 3/minute."""
    with start_gateway(rate_limit="3/minute") as gw:
        statuses = []
        for n in range(4):
            with browser_jar(gw) as fresh:  # a new cookie jar: a new identity each time
                statuses.append(fresh.post("/chat", json={"message": f"turn {n}"}).status_code)
    assert statuses == [200, 200, 200, 429]


def test_the_identity_cookie_is_signed_http_only_and_same_site(gw: RunningGateway) -> None:
    page = httpx.get(gw.url + "/")
    set_cookie = page.headers["set-cookie"]
    assert set_cookie.startswith("chatgate_id=")
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
    assert {"path", "httponly", "samesite", "max-age"} <= attributes and "secure" not in attributes
    assert "samesite=lax" in set_cookie.lower()
    # Behind a TLS proxy (X-Forwarded-Proto from a trusted address) the cookie is Secure.
    behind_tls = httpx.get(gw.url + "/", headers={"X-Forwarded-Proto": "https"})
    assert "secure" in behind_tls.headers["set-cookie"].lower()

    # Alice's identity with another cookie's signature is no one: a program presenting it
    # is the anonymous caller, a browser is given an identity of its own.
    with browser_jar(gw) as alice:
        chat(alice, gw, "mine")
        alices = alice.cookies["chatgate_id"]
    forged = {"Cookie": f"chatgate_id={alices.partition('.')[0]}.{page.cookies['chatgate_id'].partition('.')[2]}"}
    response = httpx.get(f"{gw.url}/conversations", headers=forged)
    assert response.json() == {"conversations": []} and "set-cookie" not in response.headers
    renewed = httpx.get(f"{gw.url}/conversations", headers={**forged, **FETCH_METADATA})
    assert renewed.json() == {"conversations": []}
    assert renewed.cookies["chatgate_id"] not in (alices, page.cookies["chatgate_id"])


def test_programs_that_keep_cookies_are_one_caller_as_before(gw: RunningGateway) -> None:
    """The OpenAI and Ollama SDKs keep cookies: they are never handed one, so their first
    request and their next are the same anonymous caller."""
    with httpx.Client(base_url=gw.url, timeout=RECV_S) as sdk:
        first = sdk.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        }, headers={"X-Conversation-Id": "sdk-1"})
        assert first.status_code == 200 and "set-cookie" not in first.headers
        conversation_id = chat(sdk, gw, "again", conversation_id="sdk-1")
        assert not sdk.cookies
    assert conversation_id == "sdk-1" and listed(None, gw) == {"sdk-1"}
    assert len(httpx.get(f"{gw.url}/conversations/sdk-1").json()["messages"]) == 4


def test_a_page_of_another_origin_is_anonymous_as_before(gw: RunningGateway) -> None:
    """Its browser keeps no cookie for it (a cross-origin fetch without credentials): given
    a new identity at each request, it would lose its conversation after the first turn."""
    cross = {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
    first = httpx.post(f"{gw.url}/chat", json={"message": "one"}, headers=cross, timeout=RECV_S)
    assert first.status_code == 200 and "set-cookie" not in first.headers
    conversation_id = first.json()["conversation_id"]
    second = httpx.post(
        f"{gw.url}/chat", json={"message": "two", "conversation_id": conversation_id}, headers=cross, timeout=RECV_S
    )
    assert second.status_code == 200
    messages = httpx.get(f"{gw.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["content"] for m in messages] == ["one", fake_reply(40), "two", fake_reply(40)]


def test_a_browser_websocket_is_given_an_identity_and_keeps_it(gw: RunningGateway) -> None:
    def turn(headers: dict[str, str], message: str) -> tuple[str, str | None]:
        with connect(gw.ws_url + "/ws", additional_headers=headers, open_timeout=RECV_S) as ws:
            ws.send(orjson.dumps({"type": "chat", "message": message}).decode())
            frames = [orjson.loads(ws.recv(timeout=RECV_S))]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(orjson.loads(ws.recv(timeout=RECV_S)))
            assert ws.response is not None
            return frames[0]["conversation_id"], ws.response.headers.get("set-cookie")

    # Browsers send no Fetch Metadata on a handshake, but their page's Origin.
    own_origin = {"Origin": gw.url}
    first, set_cookie = turn(own_origin, "from a browser socket")
    assert set_cookie is not None
    cookie = {"Cookie": set_cookie.split(";")[0]}
    second, again = turn({**own_origin, **cookie}, "the same browser, reconnected")
    assert again is None
    with httpx.Client(base_url=gw.url, headers=cookie, timeout=RECV_S) as same:
        assert listed(same, gw) == {first, second}
    assert listed(None, gw) == set()
    # A program's socket, and a page's of another origin, stay anonymous and are given nothing.
    anonymous, nothing = turn({}, "from a script")
    assert nothing is None and listed(None, gw) == {anonymous}
    elsewhere, nothing = turn({"Origin": "http://localhost:5173"}, "from a dev server's page")
    assert nothing is None and listed(None, gw) == {anonymous, elsewhere}


def test_with_chatgate_secret_identities_survive_a_restart(start_gateway: Any, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/identities.db"
    secret = "a-secret-of-at-least-16-chars"
    with start_gateway(store=store, secret=secret) as gw, browser_jar(gw) as alice:
        hers = chat(alice, gw, "remember me")
        cookie = {"Cookie": f"chatgate_id={alice.cookies['chatgate_id']}"}
    with start_gateway(store=store, secret=secret) as gw:
        assert httpx.get(f"{gw.url}/conversations", headers=cookie).json()["conversations"][0]["id"] == hers
    with start_gateway(store=store) as gw:  # a random secret: yesterday's cookie is no one's
        assert httpx.get(f"{gw.url}/conversations", headers=cookie).json() == {"conversations": []}


def test_the_workers_of_one_start_share_identities(fake: FakeLLM, tmp_path: Path) -> None:
    """``serve --workers 3`` without CHATGATE_SECRET: a cookie one worker signed is known
    to the others (without a secret in common about 4 in 5 requests were given a new one)."""
    env = {"CHATGATE_PROVIDER": "ollama", "OLLAMA_HOST": fake.url, "CHATGATE_STORE": f"sqlite:///{tmp_path}/w.db"}
    with serve_process(env, "--workers", "3") as served:
        cookie = httpx.get(served.url + "/", timeout=RECV_S).cookies["chatgate_id"]
        headers = {"Cookie": f"chatgate_id={cookie}", **FETCH_METADATA}
        answers = [httpx.get(served.url + "/conversations", headers=headers, timeout=RECV_S) for _ in range(30)]
    assert all(a.status_code == 200 and "set-cookie" not in a.headers for a in answers)


# Two real browsers --------------------------------------------------------------------




async def test_two_real_browsers_keep_their_conversations_apart(gw: RunningGateway, browser: Browser) -> None:
    alice = await (await browser.new_context()).new_page()
    bob = await (await browser.new_context()).new_page()
    for page in (alice, bob):
        await page.goto(gw.url + "/")
        await expect(page.locator("#status")).to_have_text("connected")
    await alice.fill("#input", "Alice over the socket")
    await alice.press("#input", "Enter")
    await expect(alice.locator(".msg.assistant").last).to_have_text(fake_reply(40), timeout=10_000)

    listing = "fetch('conversations').then(r => r.json()).then(b => b.conversations.map(c => c.id))"
    hers = await alice.evaluate(listing)
    assert len(hers) == 1
    assert await bob.evaluate(listing) == []
    status = await bob.evaluate(f"fetch('conversations/{hers[0]}').then(r => r.status)")
    assert status == 404
    assert listed(None, gw) == set()

    # A browser that lost its cookie is given a new identity by its page's own socket.
    await bob.context.clear_cookies()
    opened = "new Promise(done => { const ws = new WebSocket(location.href.replace('http', 'ws') + 'ws');"
    opened += " ws.onopen = () => { ws.close(); done(true); }; })"
    assert await bob.evaluate(opened)
    assert [c["name"] for c in await bob.context.cookies()] == ["chatgate_id"]
