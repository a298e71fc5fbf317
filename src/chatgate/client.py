"""The terminal client behind ``chatgate chat``: streams replies over ``POST /chat`` (SSE)."""

from __future__ import annotations

import sys

import httpx
import orjson
from rich.console import Console


def _stream_turn(
    client: httpx.Client, console: Console, message: str, agent: str, conversation_id: str | None
) -> tuple[str | None, bool]:
    body = {"message": message, "agent": agent, "stream": True, "conversation_id": conversation_id}
    with client.stream("POST", "/chat", json=body, headers={"Accept": "text/event-stream"}) as response:
        if response.status_code != 200:
            response.read()
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            console.print(f"[red]error {response.status_code}:[/red] {detail}")
            return conversation_id, False
        conversation_id = response.headers.get("x-conversation-id", conversation_id)
        ok = True
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = orjson.loads(line[6:])
            if event["type"] == "delta":
                console.out(event["text"], end="", highlight=False)
            elif event["type"] == "error":
                console.print(f"\n[red]error:[/red] {event['message']}")
                ok = False
        console.out("")
    return conversation_id, ok


def run_chat(
    *, url: str, agent: str, conversation_id: str | None, message: str | None, api_key: str | None
) -> int:
    console = Console(highlight=False)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(10.0, read=300.0)
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        try:
            if message is not None:
                _, ok = _stream_turn(client, console, message, agent, conversation_id)
                return 0 if ok else 1
            console.print(f"[dim]chatgate at {url}, agent {agent}. Empty line or Ctrl-D to quit.[/dim]")
            while True:
                try:
                    line = console.input("[bold]you>[/bold] ").strip()
                except EOFError:
                    return 0
                if not line:
                    return 0
                conversation_id, _ = _stream_turn(client, console, line, agent, conversation_id)
        except httpx.HTTPError as exc:
            print(f"chatgate chat: cannot reach {url}: {exc}", file=sys.stderr)
            return 1
