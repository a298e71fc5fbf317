"""The generated docs match the code, no setting goes undocumented, and the frames a real
gateway exchanges on /ws are what docs/protocol.schema.json says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import AliasChoices, Field
from websockets.asyncio.client import ClientConnection, connect

from chatgate import docs
from chatgate.config import Settings
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RunningGateway

DOCS = Path(__file__).resolve().parents[2] / "docs"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def committed(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def regenerate_hint(name: str) -> str:
    return f"docs/{name} is stale: run `python -m chatgate.docs`"


def test_configuration_reference_is_generated_from_the_settings() -> None:
    assert committed(docs.CONFIGURATION_FILE) == docs.configuration_markdown(), regenerate_hint(
        docs.CONFIGURATION_FILE
    )


def test_protocol_schema_is_generated_from_the_message_types() -> None:
    assert committed(docs.SCHEMA_FILE) == docs.protocol_schema_text(), regenerate_hint(docs.SCHEMA_FILE)


def test_the_generator_command_writes_both_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "chatgate.docs", str(tmp_path)], check=True, capture_output=True)
    for name, text in docs.generated_files().items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text


def test_every_setting_of_the_gateway_and_each_provider_is_documented() -> None:
    reference = committed(docs.CONFIGURATION_FILE)
    classes = dict(docs.settings_classes())
    assert {"Gateway", "Provider `ollama`", "Provider `openai`", "Provider `gemini`", "Provider `local`"} <= set(classes)
    assert docs.undocumented(reference) == []
    for _, model in classes.items():
        for name, info in model.model_fields.items():
            for variable in docs.variables(info, name):
                assert f"`{variable}`" in reference, f"{model.__name__}.{name}: {variable} not in the reference"
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "DD_LLMOBS_ENABLED", "DD_API_KEY"):
        assert f"| `{variable}` |" in reference


def test_a_new_setting_missing_from_the_reference_is_reported() -> None:
    class WithNewSetting(Settings):
        sparkle_level: int = Field(
            3, validation_alias=AliasChoices("CHATGATE_SPARKLE_LEVEL"), description="How much it sparkles."
        )

    class WithoutDescription(Settings):
        glitter: int = Field(1, validation_alias=AliasChoices("CHATGATE_GLITTER"))

    reference = committed(docs.CONFIGURATION_FILE)
    assert docs.undocumented(reference, [("Gateway", WithNewSetting)]) == ["WithNewSetting.sparkle_level"]
    regenerated = docs.configuration_markdown([("Gateway", WithNewSetting)])
    assert "| `CHATGATE_SPARKLE_LEVEL` | integer | `3` | How much it sparkles. |" in regenerated
    assert docs.undocumented(regenerated, [("Gateway", WithNewSetting)]) == []
    # A field without a description is undocumented even once its row is generated.
    without = [("Gateway", WithoutDescription)]
    assert docs.undocumented(docs.configuration_markdown(without), without) == ["WithoutDescription.glitter"]


SCHEMA: dict[str, Any] = json.loads(committed(docs.SCHEMA_FILE))


def validator(definition: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"}
    )


CLIENT = validator("ClientFrame")
SERVER = validator("ServerFrame")


def test_the_schema_is_valid_draft_2020_12_and_can_refuse_frames() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert not SERVER.is_valid({"type": "delta", "id": "a", "text": "x"})  # no seq
    assert not SERVER.is_valid({"type": "delta", "id": "a", "seq": 1, "text": "x", "extra": 1})
    assert not SERVER.is_valid({"type": "done", "id": "a", "finish_reason": "maybe",
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                                "timings": {"ttft_ms": 1.0, "total_ms": 2.0}})
    assert not CLIENT.is_valid({"type": "cancel"})
    assert not CLIENT.is_valid({"type": "resume", "id": "a", "after": -1})
    assert not CLIENT.is_valid({"type": "chat", "message": "hi", "conversation_id": "x" * 129})
    assert not CLIENT.is_valid({"type": "shout"})


class Recorder:
    """A native client that checks every frame it sends and receives against the schema."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.kinds: dict[str, set[str]] = {"sent": set(), "received": set()}

    async def send(self, frame: dict[str, Any]) -> None:
        CLIENT.validate(frame)
        self.kinds["sent"].add(frame["type"])
        await send(self.ws, frame)

    def check(self, frame: dict[str, Any]) -> dict[str, Any]:
        SERVER.validate(frame)
        self.kinds["received"].add(frame["type"])
        return frame

    async def recv(self) -> dict[str, Any]:
        return self.check(await recv(self.ws))

    async def until(self, *types: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        last, before = await until(self.ws, *types)
        return self.check(last), [self.check(frame) for frame in before]


async def test_real_frames_validate_against_the_schema(gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(gw.ws_url + "/ws") as ws:
        client = Recorder(ws)
        await client.send({"type": "ping"})
        assert (await client.recv())["type"] == "pong"

        # A tool call, then its result answered with options.
        await client.send({"type": "chat", "id": "t1", "message": "Weather in Oslo?", "tools": [WEATHER_TOOL],
                           "tool_choice": "auto", "parallel_tool_calls": False})
        start = await client.recv()
        assert start["type"] == "start"
        done, pieces = await client.until("done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "tool_calls", done
        assert pieces and {p["type"] for p in pieces} == {"tool_call"}
        call = done["tool_calls"][0]
        await client.send({
            "type": "chat", "id": "t2", "conversation_id": start["conversation_id"],
            "tool_results": [{"tool_call_id": call["id"], "name": call["name"], "content": "18 degrees"}],
            "tools": [WEATHER_TOOL], "options": {"temperature": 0.2, "max_tokens": 64, "stop": ["\n\n"]},
        })
        done, before = await client.until("done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "stop", done
        assert {f["type"] for f in before} == {"start", "delta"}

        # Cancel a long answer.
        fake.configure(tokens=500, tps=100)
        await client.send({"type": "chat", "id": "c1", "message": "Tell me a long story", "agent": "general"})
        await client.recv()
        await client.recv()
        await client.send({"type": "cancel", "id": "c1"})
        done, _ = await client.until("done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "cancelled", done

        # Refusals are error events: a reply nobody started.
        await client.send({"type": "resume", "id": "nobody", "after": 0})
        error = await client.recv()
        assert error["type"] == "error" and error["code"] == "not_found", error

        await client.send({"type": "clear_history", "conversation_id": start["conversation_id"]})
        assert (await client.recv())["type"] == "history_cleared"

        # Resume from another socket, after the first dropped mid-answer.
        fake.configure(tokens=40, tps=80)
        await client.send({"type": "chat", "id": "r1", "message": "Once more"})
        await client.recv()
        first = await client.recv()
        assert first["type"] == "delta"
    async with connect(gw.ws_url + "/ws") as ws:
        resumed = Recorder(ws)
        await resumed.send({"type": "resume", "id": "r1", "after": first["seq"]})
        done, rest = await resumed.until("done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "stop", done
        assert {f["type"] for f in rest} <= {"delta"}

    assert client.kinds["sent"] | resumed.kinds["sent"] == {"chat", "cancel", "resume", "clear_history", "ping"}
    assert client.kinds["received"] | resumed.kinds["received"] == {
        "pong", "start", "tool_call", "delta", "done", "error", "history_cleared"
    }


@pytest.mark.parametrize("name", ["migration.md", "compatibility.md"])
def test_hand_written_docs_link_only_to_files_in_the_repository(name: str) -> None:
    text = committed(name)
    root = DOCS.parent
    for target in _relative_links(text):
        path = (DOCS / target.split("#")[0]).resolve()
        assert path.exists() and root in path.parents, f"{name} links to {target}"


def _relative_links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
