"""The embedded llama.cpp model answering through the gateway, end to end."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

pytestmark = pytest.mark.slow


def port_answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


async def test_embedded_model_answers_over_websocket(start_gateway: Any) -> None:
    with start_gateway(provider="local", model=None, num_ctx=2048) as gw:
        assert gw.gateway.provider.name == "local"
        async with connect(gw.ws_url + "/ws") as ws:
            await ws.send(orjson.dumps({
                "type": "chat",
                "id": "q1",
                "message": "Name three primary colours and say one sentence about each.",
                "options": {"temperature": 0, "max_tokens": 96},
            }).decode())
            frames: list[dict[str, Any]] = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 120)))
    assert frames[0]["type"] == "start"
    assert frames[0]["model"].startswith("SmolLM2")
    deltas = [f for f in frames if f["type"] == "delta"]
    assert frames[-1]["type"] == "done", frames[-1]
    # Tokens that arrive while a delta waits for the socket join it: count tokens, not deltas.
    assert deltas and all(d["text"] for d in deltas)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    answer = "".join(d["text"] for d in deltas)
    assert len(answer.split()) >= 8
    assert frames[-1]["usage"]["completion_tokens"] >= max(10, len(deltas))
    assert frames[-1]["usage"]["prompt_tokens"] > 0
    assert frames[-1]["timings"]["ttft_ms"] is not None


async def test_auto_uses_the_embedded_model_when_no_upstream_is_configured_or_answers(
    start_gateway: Any
) -> None:
    assert not port_answers("127.0.0.1", 11434), "something listens on Ollama's default port"
    with start_gateway(provider="auto", ollama_host=None, model=None, connect_timeout_s=1) as gw:
        assert gw.gateway.provider.name == "local"


async def test_auto_never_swaps_a_configured_ollama_for_the_embedded_model(
    start_gateway: Any, closed_port_url: str
) -> None:
    with start_gateway(provider="auto", ollama_host=closed_port_url, model=None, connect_timeout_s=1) as gw:
        assert gw.gateway.provider.name == "ollama"


async def test_auto_picks_ollama_when_it_answers(start_gateway: Any) -> None:
    with start_gateway(provider="auto") as gw:
        assert gw.gateway.provider.name == "ollama"


async def test_embedded_model_refuses_tools_and_answers_json(start_gateway: Any) -> None:
    import openai

    with start_gateway(provider="local", model=None, num_ctx=2048) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)
        tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "time?"}], tools=[tool]  # type: ignore[list-item]
            )
        assert "does not support tool calling" in str(raised.value)
        schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
        completion = await client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Name a colour."}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
            max_tokens=40,
            temperature=0,
        )
        answer = orjson.loads(completion.choices[0].message.content or "")
        assert isinstance(answer, dict) and isinstance(answer["colour"], str)
