"""SIGTERM to one of two instances on one Redis while ten answers run there: the answers
whose sockets stay go on to their end (the drain), those whose clients reconnect to the
other instance are resumed there, and every turn is stored exactly once, complete."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import redis
from websockets.asyncio.client import ClientConnection, connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import Frame, recv, send, until
from chatgate.testing.servers import FakeLLM, RedisServer, serve_process

DB = 14
TOKENS = 120
TPS = 40.0  # 3 s an answer: all of them are mid-answer at the signal


async def test_sigterm_with_ten_answers_loses_none_and_stores_none_twice(
    fake: FakeLLM, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = f"{redis_server.url}/{DB}"
    redis.Redis.from_url(store).flushdb()
    fake.configure(tokens=TOKENS, tps=TPS)
    env = {"OLLAMA_HOST": fake.url, "CHATGATE_STORE": store, "CHATGATE_DRAIN_S": "30",
           "CHATGATE_DATA_DIR": str(tmp_path)}
    with serve_process(env) as a, serve_process(env) as b:
        sockets = [await connect(a.ws_url + "/ws") for _ in range(10)]
        starts: list[Frame] = []
        for n, ws in enumerate(sockets):
            await send(ws, {"type": "chat", "message": f"question {n}", "conversation_id": f"conv-{n}"})
            starts.append(await recv(ws))
        firsts = [await recv(ws) for ws in sockets]
        assert all(f["type"] == "delta" for f in firsts)

        a.process.send_signal(signal.SIGTERM)

        async def stay(ws: ClientConnection, first: Frame) -> tuple[str, int | None]:
            done, rest = await until(ws, "done", within_s=30)
            assert done["finish_reason"] == "stop"
            text = first["text"] + "".join(f["text"] for f in rest)
            await ws.wait_closed()
            return text, ws.close_code

        async def move(ws: ClientConnection, start: Frame, first: Frame) -> tuple[str, int | None]:
            await ws.close()  # the client's network blips; it reconnects, to the other instance
            async with connect(b.ws_url + "/ws") as again:
                await send(again, {"type": "resume", "id": start["id"], "after": first["seq"]})
                done, rest = await until(again, "done", within_s=30)
            assert done["finish_reason"] == "stop"
            seqs = [first["seq"], *(f["seq"] for f in rest)]
            assert seqs == list(range(1, len(seqs) + 1))
            return first["text"] + "".join(f["text"] for f in rest), None

        results = await asyncio.gather(
            *(stay(ws, first) for ws, first in zip(sockets[:5], firsts[:5], strict=True)),
            *(move(ws, start, first) for ws, start, first in zip(sockets[5:], starts[5:], firsts[5:], strict=True)),
        )
        assert [text for text, _ in results] == [fake_reply(TOKENS)] * 10
        assert [code for _, code in results[:5]] == [1012] * 5  # closed once drained: reconnect elsewhere
        assert a.process.wait(timeout=30) == 0

        for n in range(10):
            stored: Any = httpx.get(f"{b.url}/conversations/conv-{n}").json()
            assert [(m["role"], m["partial"]) for m in stored["messages"]] == [("user", False), ("assistant", False)]
            assert stored["messages"][1]["content"] == fake_reply(TOKENS)
