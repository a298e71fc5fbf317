"""``printf 'one\\ntwo\\nthree\\n' | chatgate chat --url URL``: each piped line is a turn
of one conversation, sent as soon as the answer before it has ended, and answered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM

TOKENS = 5
ANSWER = fake_reply(TOKENS)


def test_piped_lines_are_turns_of_one_conversation(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHATGATE_")}
    with start_gateway(store=f"sqlite:///{tmp_path}/chat.db") as gw:
        result = subprocess.run(
            [sys.executable, "-m", "chatgate", "chat", "--url", gw.url],
            input="one\ntwo\nthree\n",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.count(ANSWER) == 3, output
    assert "error" not in output.lower(), output

    turns = [r["body"]["messages"] for r in fake.requests()]
    assert [m[-1]["content"] for m in turns] == ["one", "two", "three"]
    assert [m for m in turns[-1] if m["role"] != "system"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "three"},
    ]
