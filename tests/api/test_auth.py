"""API keys: who may chat, whose conversations are whose, and keys never stored."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatgate.api.auth import owner_of
from chatgate.chat.service import conversation_key
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import RunningGateway

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}


@pytest.fixture
def authed(start_gateway: Any) -> Iterator[RunningGateway]:
    with start_gateway(api_keys="k1,k2") as running:
        yield running


def chat(gw: RunningGateway, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer nope"}, {"Authorization": "Basic azE6"}, {"X-API-Key": "k3"}],
    ids=["none", "wrong-bearer", "basic", "wrong-x-api-key"],
)
def test_chat_without_a_valid_key_is_401(authed: RunningGateway, headers: dict[str, str] | None) -> None:
    response = chat(authed, headers, message="hi")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    for path in ("/conversations", "/conversations/any"):
        assert httpx.get(authed.url + path, headers=headers).status_code == 401


@pytest.mark.parametrize(
    "headers",
    [K1, {"Authorization": "bearer k2"}, {"X-API-Key": "k1"}],
    ids=["bearer", "lowercase-scheme", "x-api-key"],
)
def test_chat_with_a_key_is_200(authed: RunningGateway, headers: dict[str, str]) -> None:
    response = chat(authed, headers, message="hi")
    assert response.status_code == 200
    assert response.json()["reply"] == fake_reply(40)


def test_health_needs_no_key(authed: RunningGateway) -> None:
    assert httpx.get(f"{authed.url}/health/live").status_code == 200


def test_conversations_are_private_to_their_key(authed: RunningGateway) -> None:
    conversation_id = chat(authed, K1, message="mine only").json()["conversation_id"]

    assert httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K1).status_code == 200
    assert [c["id"] for c in httpx.get(f"{authed.url}/conversations", headers=K1).json()["conversations"]] == [
        conversation_id
    ]

    assert httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K2).status_code == 404
    assert httpx.get(f"{authed.url}/conversations", headers=K2).json() == {"conversations": []}
    assert httpx.delete(f"{authed.url}/conversations/{conversation_id}", headers=K2).status_code == 404

    # The same id under another key is another conversation: k2 writes only into its own.
    same_id = chat(authed, K2, message="let me in", conversation_id=conversation_id)
    assert same_id.status_code == 200
    messages = httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K1).json()["messages"]
    assert [m["content"] for m in messages] == ["mine only", fake_reply(40)]
    theirs = httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K2).json()["messages"]
    assert [m["content"] for m in theirs] == ["let me in", fake_reply(40)]

    follow_up = chat(authed, K1, message="still mine", conversation_id=conversation_id)
    assert follow_up.status_code == 200


async def test_websocket_without_key_gets_unauthorized_and_close(authed: RunningGateway) -> None:
    async with connect(authed.ws_url + "/ws") as ws:
        error = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error" and error["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_websocket_with_key_in_query_works(authed: RunningGateway) -> None:
    async with connect(authed.ws_url + "/ws?api_key=k1") as ws:
        await ws.send(orjson.dumps({"type": "chat", "message": "hello over ws"}).decode())
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"
    conversation_id = frames[0]["conversation_id"]
    # The socket's conversation belongs to k1, whichever way k1 presents itself.
    assert httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K1).status_code == 200
    assert httpx.get(f"{authed.url}/conversations/{conversation_id}", headers=K2).status_code == 404


async def test_memory_store_records_a_digest_not_the_key(start_gateway: Any) -> None:
    key = "k1-very-secret-key-value"
    with start_gateway(api_keys=f"{key},k2") as gw:
        conversation_id = chat(gw, {"Authorization": f"Bearer {key}"}, message="hello").json()["conversation_id"]
        [info] = [i for i in await gw.gateway.store.list(owner_of(key)) if i.id.endswith(conversation_id)]
        conversation = await gw.gateway.store.get(info.id)
    owner = conversation.info.owner
    assert owner is not None and re.fullmatch(r"[0-9a-f]{16,}", owner)
    assert key not in owner
    assert all(key not in m.content for m in conversation.messages)


def test_sqlite_store_never_contains_the_key(start_gateway: Any, tmp_path: Path) -> None:
    key = "k1-very-secret-key-value"
    path = tmp_path / "keys.db"
    with start_gateway(api_keys=f"{key},k2", store=f"sqlite:///{path}") as gw:
        headers = {"Authorization": f"Bearer {key}"}
        conversation_id = chat(gw, headers, message="hello").json()["conversation_id"]
        assert httpx.get(f"{gw.url}/conversations/{conversation_id}", headers=headers).status_code == 200
    with sqlite3.connect(path) as db:
        [(owner,)] = db.execute(
            "SELECT owner FROM conversations WHERE id = ?", (conversation_key(owner_of(key), conversation_id),)
        ).fetchall()
        rows = db.execute("SELECT * FROM conversations").fetchall() + db.execute("SELECT * FROM messages").fetchall()
    assert owner and key not in owner
    assert not any(key in str(value) for row in rows for value in row)
    for file in tmp_path.glob("keys.db*"):
        assert key.encode() not in file.read_bytes(), file.name
