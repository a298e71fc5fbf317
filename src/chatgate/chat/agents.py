"""Agents: a name, a system prompt, and optionally a model and generation options.

The built-in ``general`` agent (alias ``default``) always exists. Files in the agents
folder add or override agents: ``NAME.toml`` or ``NAME.json`` with keys ``name``
(defaults to the file name), ``description``, ``system_prompt``, ``model``,
``allow_client_system`` and an ``options`` table (temperature, max_tokens, num_ctx, top_p,
stop, seed).

An agent's system prompt is the operator's. A client's own ``system`` message next to it
(the compatible APIs and CS_Agent carry them) could countermand it, so an agent from a
file refuses them unless it sets ``allow_client_system = true``. The built-in ``general``
agent allows them: its prompt is a generic one with nothing to protect, and the clients
of the OpenAI and Ollama APIs (their SDKs, LangChain, Open WebUI) send system messages
as a matter of course.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatgate.chat.events import ChatError
from chatgate.options import OptionError, parse_options
from chatgate.vocabulary import GenerationOptions, Message

GENERAL_PROMPT = (
    "You are a helpful, honest assistant. Answer clearly and concisely; "
    "say so when you do not know something."
)
ALIASES = {"default": "general"}


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    system_prompt: str
    description: str = ""
    model: str | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    #: Clients may send ``system`` messages of their own in this agent's turns.
    allow_client_system: bool = False

    def detail(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model}


GENERAL = Agent("general", GENERAL_PROMPT, "General helpful assistant", allow_client_system=True)


def refused_system_message(agent: Agent, messages: Sequence[Message]) -> int | None:
    """The index of the first ``system`` message among a client's ``messages`` that
    ``agent`` refuses; None when it refuses none."""
    if agent.allow_client_system:
        return None
    return next((i for i, message in enumerate(messages) if message["role"] == "system"), None)


def client_system_refusal(agent: Agent) -> str:
    """Why a client's system message was refused, and how the operator allows it."""
    return (
        f"agent {agent.name!r} does not accept system messages from clients: its own system "
        "prompt applies (send instructions as a user message; to allow client system messages, "
        "set allow_client_system = true in the agent's file)"
    )


def check_client_system(agent: Agent, messages: Sequence[Message]) -> None:
    """Refuse a client's ``messages`` holding a ``system`` message ``agent`` does not allow."""
    if refused_system_message(agent, messages) is not None:
        raise ChatError("bad_request", client_system_refusal(agent))


class AgentRegistry:
    def __init__(self, agents: list[Agent] | None = None) -> None:
        self._agents: dict[str, Agent] = {GENERAL.name: GENERAL}
        for agent in agents or ():
            self._agents[agent.name] = agent

    def get(self, name: str | None) -> Agent:
        key = ALIASES.get(name or "general", name or "general")
        try:
            return self._agents[key]
        except KeyError:
            known = ", ".join(self.names())
            raise ChatError("not_found", f"unknown agent {name!r}; known agents: {known}") from None

    def names(self) -> list[str]:
        return ["general", *sorted(n for n in self._agents if n != "general")]

    def details(self) -> list[dict[str, Any]]:
        return [self._agents[n].detail() for n in self.names()]


class AgentFileError(ValueError):
    pass


def load_agent_file(path: Path) -> Agent:
    try:
        raw = path.read_bytes()
        data: dict[str, Any] = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (OSError, ValueError) as exc:
        raise AgentFileError(f"agent file {path.name}: {exc}") from exc
    prompt = data.get("system_prompt") or data.get("system") or data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AgentFileError(f"agent file {path.name}: system_prompt is missing")
    try:
        options = parse_options(data.get("options"))
    except OptionError as exc:
        raise AgentFileError(f"agent file {path.name}: {exc}") from exc
    allow_client_system = data.get("allow_client_system", False)
    if not isinstance(allow_client_system, bool):
        raise AgentFileError(f"agent file {path.name}: allow_client_system must be true or false")
    return Agent(
        name=str(data.get("name") or path.stem),
        system_prompt=prompt.strip(),
        description=str(data.get("description", "")),
        model=data.get("model") or None,
        options=options,
        allow_client_system=allow_client_system,
    )


def load_agents(folder: Path | None) -> AgentRegistry:
    if folder is None:
        return AgentRegistry()
    if not folder.is_dir():
        raise AgentFileError(f"CHATGATE_AGENTS_DIR: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".toml", ".json"))
    return AgentRegistry([load_agent_file(p) for p in files])
