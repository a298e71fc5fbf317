"""Datadog LLM Observability: a real ``chatgate serve`` with ddtrace sends its spans to an
intake on loopback (ddtrace's ``DD_LLMOBS_OVERRIDE_ORIGIN`` stands in for the site's), and
the test reads what arrived. Nothing leaves the machine: remote configuration and
instrumentation telemetry are off, and any Agent address is a closed loopback port."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from chatgate.telemetry.datadog import INSTALL, _message, _tool_call
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, free_port, serve_process, wait_until
from chatgate.vocabulary import ToolCall

ML_APP = "chatgate-test"
API_KEY = "test-api-key"


@dataclass
class Intake:
    """An LLM Observability intake on loopback: every span posted to it, with its headers."""

    url: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def span_tagged(self, tag: str) -> dict[str, Any] | None:
        return next((span for span in self.received() if tag in span["tags"]), None)


@pytest.fixture
def intake() -> Iterator[Intake]:
    found = Intake()

    async def spans(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        payload = json.loads(body)
        with found.lock:
            found.api_keys.append(request.headers.get("DD-API-KEY", ""))
            for event in payload if isinstance(payload, list) else [payload]:
                found.spans.extend(event["spans"])
        return web.json_response({}, status=202)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/api/v2/llmobs", spans)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=loop.run_forever, name="llmobs-intake", daemon=True)
    thread.start()
    try:
        yield found
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def datadog_env(fake: FakeLLM, intake: Intake, **extra: str) -> dict[str, str]:
    return {
        "OLLAMA_HOST": fake.url,
        "DD_LLMOBS_ENABLED": "1",
        "DD_LLMOBS_ML_APP": ML_APP,
        "DD_API_KEY": API_KEY,
        "DD_SITE": "localhost",
        "DD_LLMOBS_OVERRIDE_ORIGIN": intake.url,
        "DD_TRACE_AGENT_URL": f"http://127.0.0.1:{free_port()}",
        "DD_REMOTE_CONFIGURATION_ENABLED": "false",
        "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
        "DD_CRASHTRACKING_ENABLED": "false",
        **extra,
    }


def chat(url: str, text: str, conversation_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": text}]},
        headers={"X-Conversation-Id": conversation_id},
        timeout=30,
    )


def test_each_generation_is_an_llm_span_with_its_prompt_answer_tokens_and_error(
    fake: FakeLLM, intake: Intake
) -> None:
    with serve_process(datadog_env(fake, intake)) as served:
        ok = chat(served.url, "say something", "dd-ok")
        assert ok.status_code == 200, ok.text
        fake.fault("http_500", times=3)  # every attempt fails before its first token
        failed = chat(served.url, "this one breaks", "dd-fail")
        assert failed.status_code >= 500, failed.text

        def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
            answered, broken = intake.span_tagged("outcome:stop"), intake.span_tagged("outcome:error")
            return (answered, broken) if answered and broken else None

        answered, broken = wait_until(both, timeout=20, what="both spans at the intake")

    assert set(intake.api_keys) == {API_KEY}
    for span in (answered, broken):
        assert span["meta"]["span"]["kind"] == "llm"
        assert span["name"] == "ollama.generate"
        assert span["meta"]["model_name"] == "llama3.2"
        assert span["meta"]["model_provider"] == "ollama"
        assert f"ml_app:{ML_APP}" in span["tags"]
        assert span["parent_id"] == "undefined"  # each generation is its own trace

    assert answered["status"] == "ok"
    assert answered["meta"]["input"]["messages"][-1] == {"role": "user", "content": "say something"}
    assert answered["meta"]["output"]["messages"] == [{"role": "assistant", "content": fake_reply(40)}]
    metrics = answered["metrics"]
    assert metrics["output_tokens"] == 40
    assert metrics["input_tokens"] > 0
    assert metrics["total_tokens"] == metrics["input_tokens"] + 40
    assert 0 < metrics["time_to_first_token"] < 20
    assert "error" not in answered["meta"]

    assert broken["status"] == "error"
    assert broken["meta"]["input"]["messages"][-1] == {"role": "user", "content": "this one breaks"}
    error = broken["meta"]["error"]
    assert error["type"].endswith("ProviderHTTPError")
    assert "500" in error["message"]
    assert "error:1" in broken["tags"] and "error_code:provider_error" in broken["tags"]
    assert broken["metrics"]["output_tokens"] == 0
    assert "time_to_first_token" not in broken["metrics"]
    assert broken["meta"]["metadata"]["retries"] == 2


def test_spans_still_queued_are_sent_when_the_gateway_stops(fake: FakeLLM, intake: Intake) -> None:
    # ddtrace's writer then waits far longer than the test: only the flush at close sends.
    env = datadog_env(fake, intake, _DD_LLMOBS_WRITER_INTERVAL="600")
    with serve_process(env) as served:
        assert chat(served.url, "remember me", "dd-close").status_code == 200
        assert intake.received() == []
        served.process.terminate()
        served.process.wait(timeout=20)
    assert served.process.returncode == 0
    [span] = intake.received()
    assert span["meta"]["output"]["messages"][0]["content"] == fake_reply(40)


def test_nothing_but_llm_observability_is_switched_on(intake: Intake) -> None:
    """No integration is patched (aiohttp, FastAPI, openai stay as they are) and APM
    tracing is off, so the spans go to the LLM Observability intake on their own."""
    script = (
        "import json, aiohttp, fastapi, openai\n"
        "from chatgate.telemetry.datadog import LLMObsObserver, start_datadog, stop_datadog\n"
        "observer = LLMObsObserver('ollama', start_datadog())\n"
        "from ddtrace import _monkey\n"
        "from ddtrace.internal.settings.standalone import standalone_config\n"
        "print(json.dumps({'patched': sorted(_monkey._get_patched_modules()),\n"
        "                  'apm': standalone_config.apm_tracing_enabled,\n"
        "                  'request_wrapped': hasattr(aiohttp.ClientSession._request, '__wrapped__')}))\n"
        "stop_datadog(observer)\n"
    )
    env = {
        **os.environ, "DD_LLMOBS_ENABLED": "true", "DD_API_KEY": API_KEY, "DD_SITE": "localhost",
        "DD_LLMOBS_OVERRIDE_ORIGIN": intake.url, "DD_TRACE_AGENT_URL": f"http://127.0.0.1:{free_port()}",
        "DD_REMOTE_CONFIGURATION_ENABLED": "false", "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
        "DD_CRASHTRACKING_ENABLED": "false",
    }
    env.pop("DD_APM_TRACING_ENABLED", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"patched": [], "apm": False, "request_wrapped": False}


def test_start_up_without_ddtrace_fails_in_one_line_naming_the_extra(tmp_path: Path, fake: FakeLLM) -> None:
    hidden = tmp_path / "ddtrace"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('ddtrace is not installed here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OLLAMA_"))}
    env.update(PYTHONPATH=str(tmp_path), DD_LLMOBS_ENABLED="1", OLLAMA_HOST=fake.url)
    done = subprocess.run(
        [sys.executable, "-m", "chatgate", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("chatgate:")]
    assert len(lines) == 1 and lines[0].endswith(INSTALL), done.stderr


def test_prompt_messages_and_tool_calls_take_the_shape_llmobs_accepts() -> None:
    call: ToolCall = {"id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'}
    assert _message({"role": "assistant", "content": "", "tool_calls": [call]}) == {
        "role": "assistant", "content": "",
        "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}, "type": "function",
                        "tool_id": "call_1"}],
    }
    assert _message({"role": "tool", "content": "sunny", "tool_call_id": "call_1"}) == {
        "role": "tool", "content": "sunny",
        "tool_results": [{"result": "sunny", "type": "function_call_output", "tool_id": "call_1"}],
    }
    cut_short = _tool_call({"id": "", "name": "weather", "arguments": '{"city": "Os'})
    assert cut_short == {"name": "weather", "arguments": {"arguments": '{"city": "Os'}, "type": "function"}
