"""Agents: the built-in ``general`` (alias ``default``) and agent files, over POST /chat
against the fake upstream; a broken agent file stops ``chatgate serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway

PIRATE_TOML = """\
description = "Talks like a pirate"
system_prompt = '''
You are a pirate. Answer every question in pirate speak.
'''
model = "fake-backup"

[options]
temperature = 0.2
max_tokens = 5
top_p = 0.5
stop = ["Arr!"]
seed = 7
"""

CODER_JSON = {
    "name": "code-helper",
    "description": "Writes small programs",
    "system_prompt": "You write Python. Reply with code only.",
    "options": {"num_ctx": 1024, "num_predict": 9},
}


@pytest.fixture
def agents_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "pirate.toml").write_text(PIRATE_TOML, encoding="utf-8")
    (folder / "coder.json").write_text(json.dumps(CODER_JSON), encoding="utf-8")
    (folder / "README.md").write_text("not an agent", encoding="utf-8")
    return folder


def chat(gw: RunningGateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat", json=body, timeout=10)


@pytest.mark.parametrize("agent", [None, "general", "default"])
def test_builtin_general_agent_and_its_default_alias(gw: RunningGateway, fake: FakeLLM, agent: str | None) -> None:
    body: dict[str, Any] = {"message": "hi"}
    if agent is not None:
        body["agent"] = agent
    response = chat(gw, **body)
    assert response.status_code == 200
    assert response.json()["model"] == "fake-model"
    sent = fake.requests()[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": GENERAL_PROMPT}
    assert sent["model"] == "fake-model"
    conversation = httpx.get(f"{gw.url}/conversations/{response.json()['conversation_id']}").json()
    assert conversation["agent"] == "general"


def test_toml_agent_sends_its_prompt_model_and_options(
    start_gateway: Any, fake: FakeLLM, agents_dir: Path
) -> None:
    with start_gateway(agents_dir=agents_dir, num_ctx=4096, temperature=0.9) as gw:
        response = chat(gw, message="Where is the treasure?", agent="pirate")
        assert response.status_code == 200
        body = response.json()
        conversation = httpx.get(f"{gw.url}/conversations/{body['conversation_id']}").json()
    assert body["model"] == "fake-backup"
    assert body["reply"] == fake_reply(5)
    assert conversation["agent"] == "pirate"
    sent = fake.requests()[-1]["body"]
    assert sent["model"] == "fake-backup"
    assert sent["messages"] == [
        {"role": "system", "content": "You are a pirate. Answer every question in pirate speak."},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    # The agent's options win; the gateway's fill in what the agent leaves unset.
    assert sent["options"] == {
        "temperature": 0.2,
        "num_predict": 5,
        "top_p": 0.5,
        "stop": ["Arr!"],
        "seed": 7,
        "num_ctx": 4096,
    }


def test_json_agent_with_its_own_name(start_gateway: Any, fake: FakeLLM, agents_dir: Path) -> None:
    with start_gateway(agents_dir=agents_dir) as gw:
        assert chat(gw, message="fizzbuzz", agent="coder").status_code == 404
        response = chat(gw, message="fizzbuzz", agent="code-helper")
    assert response.status_code == 200
    assert response.json()["model"] == "fake-model", "an agent without a model uses the default"
    assert response.json()["reply"] == fake_reply(9)
    sent = fake.requests()[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": CODER_JSON["system_prompt"]}
    assert sent["options"] == {"num_ctx": 1024, "num_predict": 9}


def test_agents_lists_files_with_descriptions(start_gateway: Any, agents_dir: Path) -> None:
    with start_gateway(agents_dir=agents_dir) as gw:
        body = httpx.get(f"{gw.url}/agents").json()
    assert body["agents"] == ["general", "code-helper", "pirate"]
    details = {d["name"]: d for d in body["details"]}
    assert [d["name"] for d in body["details"]] == body["agents"]
    assert details["pirate"] == {"name": "pirate", "description": "Talks like a pirate", "model": "fake-backup"}
    assert details["code-helper"] == {"name": "code-helper", "description": "Writes small programs", "model": None}


def test_agent_file_can_override_general(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    (tmp_path / "general.toml").write_text('system_prompt = "You are terse."\n', encoding="utf-8")
    with start_gateway(agents_dir=tmp_path) as gw:
        assert chat(gw, message="hi", agent="default").status_code == 200
        assert httpx.get(f"{gw.url}/agents").json()["agents"] == ["general"]
    assert fake.requests()[-1]["body"]["messages"][0] == {"role": "system", "content": "You are terse."}


def serve(agents_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m chatgate serve`` with these agents; should it start after all, the
    timeout ends it and the test fails."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHATGATE_")},
        "CHATGATE_AGENTS_DIR": str(agents_dir),
        "CHATGATE_STORE": "memory",
        "CHATGATE_PORT": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "chatgate", "serve"],
        env=env,
        cwd=agents_dir.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.toml", 'system_prompt = "unterminated\n'),
        ("broken.json", '{"system_prompt": "x",'),
        ("broken.toml", 'description = "no prompt"\n'),
        ("broken.json", '{"system_prompt": "x", "options": {"temperature": "hot"}}'),
    ],
    ids=["bad-toml", "bad-json", "no-prompt", "bad-option"],
)
def test_broken_agent_file_stops_serve_in_one_line(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / "fine.toml").write_text('system_prompt = "ok"\n', encoding="utf-8")
    (tmp_path / name).write_text(content, encoding="utf-8")
    result = serve(tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]


def test_missing_agents_folder_stops_serve(tmp_path: Path) -> None:
    result = serve(tmp_path / "nowhere")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "CHATGATE_AGENTS_DIR" in result.stderr
