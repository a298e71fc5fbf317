"""What the model routes of both APIs say about models: the upstream's own description,
asked of the adapter (:class:`~chatgate.providers.base.ModelCatalog`) and kept for
:data:`CATALOG_TTL_S`, then chatgate's agents, each pointing at the model it answers with.

Nothing is invented: what the upstream does not say is left out or null.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fastapi import Request

from chatgate.api import compat
from chatgate.chat.events import ChatError, provider_error_code
from chatgate.providers.base import ModelCatalog, ModelInfo, ProviderError

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

#: How long the upstream's list is reused: model routes are polled (Open WebUI asks on
#: every page load), the list changes when someone pulls a model.
CATALOG_TTL_S: Final = 10.0
#: Entries in Ollama's own format, passed on whole.
OLLAMA_KIND: Final = "ollama"
#: Entries in OpenAI's own format, passed on whole.
OPENAI_KIND: Final = "openai"
#: The cache's clock (a seam for tests).
clock: Callable[[], float] = time.monotonic


@dataclass
class _Cached:
    at: float
    models: list[ModelInfo]


async def upstream_models(request: Request) -> list[ModelInfo]:
    """The upstream's models, at most :data:`CATALOG_TTL_S` old; none when it cannot say."""
    gateway = compat.gateway_of(request)
    cached: _Cached | None = getattr(request.app.state, "model_catalog", None)
    now = clock()
    if cached is not None and now - cached.at < CATALOG_TTL_S:
        return cached.models
    try:
        if isinstance(gateway.provider, ModelCatalog):
            models = await gateway.provider.model_catalog()
        else:
            models = [ModelInfo(name, {}) for name in await gateway.provider.models()]
    except (ProviderError, OSError, TimeoutError):
        return []  # not cached: the next request asks again
    request.app.state.model_catalog = _Cached(now, models)
    return models


def agent_bases(gateway: Gateway) -> dict[str, str]:
    """``agent:NAME`` → the upstream model the agent answers with."""
    return {
        compat.AGENT_PREFIX + name: gateway.agents.get(name).model or gateway.provider.default_model
        for name in gateway.agents.names()
    }


def find(models: list[ModelInfo], name: str) -> ModelInfo | None:
    """``name`` among ``models``, Ollama's implicit ``:latest`` either way."""
    wanted = {name, name.removesuffix(":latest"), f"{name}:latest"}
    return next((model for model in models if model.name in wanted), None)


def upstream_failure(exc: ProviderError) -> ChatError:
    return ChatError(provider_error_code(exc), exc.message, retryable=exc.retryable)


# Ollama ------------------------------------------------------------------------------


def ollama_entry(model: ModelInfo) -> dict[str, Any]:
    """An ``/api/tags`` (or ``/api/ps``) entry: Ollama's own, whole; else what the upstream
    says, with null for the size, date and digest it does not give."""
    if model.kind == OLLAMA_KIND:
        return dict(model.raw)
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": model.modified_at,
        "size": model.size,
        "digest": None,
        "details": None,
    }


def ollama_agent_entry(name: str, base: str, base_entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """An agent as a model of its own: its base model's entry, renamed, with the base as
    its ``parent_model``."""
    entry: dict[str, Any] = dict(base_entry or {"modified_at": None, "size": None, "digest": None})
    details = entry.get("details")
    entry.update(name=name, model=name, details={**(details or {}), "parent_model": base})
    return entry


async def ollama_tags(request: Request) -> list[dict[str, Any]]:
    gateway = compat.gateway_of(request)
    models = await upstream_models(request)
    entries = [ollama_entry(model) for model in models]
    for name, base in agent_bases(gateway).items():
        found = find(models, base)
        entries.append(ollama_agent_entry(name, base, None if found is None else ollama_entry(found)))
    return entries


async def ollama_show(request: Request, name: str) -> dict[str, Any]:
    """The upstream's ``/api/show`` body when it has one; else what its list says."""
    gateway = compat.gateway_of(request)
    agents = agent_bases(gateway)
    if compat.agent_of(name) is not None and name not in agents:
        raise ChatError("not_found", f"model '{name}' not found")
    base = agents.get(name, name)
    if isinstance(gateway.provider, ModelCatalog):
        try:
            card = await gateway.provider.model_card(base)
        except ProviderError as exc:
            raise upstream_failure(exc) from exc
        if card is not None:
            return dict(card)
    found = find(await upstream_models(request), base)
    if found is None:
        raise ChatError("not_found", f"model '{name}' not found")
    return {
        "modelfile": None,
        "parameters": None,
        "template": None,
        "details": {"parent_model": base} if base != name else None,
        "model_info": dict(found.raw),
        "capabilities": ["completion"],
        "modified_at": found.modified_at,
    }


async def ollama_running(request: Request) -> list[dict[str, Any]]:
    """What the upstream holds in memory, as it says; nothing for an upstream that does not say."""
    provider = compat.gateway_of(request).provider
    if not isinstance(provider, ModelCatalog):
        return []
    try:
        loaded = await provider.loaded_models()
    except ProviderError as exc:
        raise upstream_failure(exc) from exc
    return [ollama_entry(model) for model in loaded]


# OpenAI ------------------------------------------------------------------------------


def openai_card(model: ModelInfo) -> dict[str, Any]:
    """A ``model`` object: OpenAI-compatible upstreams' own, whole; else built from what the
    upstream says (``created`` null when it gives no date)."""
    if model.kind == OPENAI_KIND:
        return dict(model.raw)
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": model.owned_by}


async def openai_models(request: Request) -> list[dict[str, Any]]:
    gateway = compat.gateway_of(request)
    models = await upstream_models(request)
    cards = [openai_card(model) for model in models]
    for name, base in agent_bases(gateway).items():
        found = find(models, base)
        created = None if found is None else openai_card(found).get("created")
        cards.append({"id": name, "object": "model", "created": created, "owned_by": "chatgate"})
    return cards
