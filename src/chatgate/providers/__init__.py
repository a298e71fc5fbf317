"""Provider adapters register themselves by name; :func:`build_provider` picks one."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from chatgate.providers import ollama, openai  # noqa: F401  (registration)
from chatgate.providers._http import new_session
from chatgate.providers.base import Provider, ProviderError, provider_factory

if TYPE_CHECKING:
    from chatgate.config import Settings

log = logging.getLogger("chatgate.providers")


def _load_optional() -> None:
    for module in ("chatgate.providers.local", "chatgate.providers.gemini"):
        try:
            __import__(module)
        except ImportError:  # pragma: no cover - module not written or extra missing
            continue


def configuration_problem(settings: Settings) -> str | None:
    """One line naming the variable when the chosen provider cannot be built; else None."""
    _load_optional()
    if settings.provider == "openai" and not settings.openai_base_url:
        return "CHATGATE_OPENAI_BASE_URL: required when CHATGATE_PROVIDER=openai"
    if settings.provider == "gemini" and not (
        settings.gemini_api_key and settings.gemini_api_key.get_secret_value()
    ):
        return "GEMINI_API_KEY: required when CHATGATE_PROVIDER=gemini"
    if settings.provider != "auto":
        try:
            provider_factory(settings.provider)
        except ValueError as exc:
            return f"CHATGATE_PROVIDER: {exc}"
    return None


async def ollama_answers(settings: Settings, session: aiohttp.ClientSession) -> bool:
    probe = ollama.OllamaProvider(settings.ollama_host, session)
    try:
        await asyncio.wait_for(probe.check(), timeout=settings.connect_timeout_s)
    except (ProviderError, TimeoutError):
        return False
    return True


async def build_provider(settings: Settings) -> tuple[Provider, aiohttp.ClientSession]:
    """The configured provider and the one pooled session it streams over.

    ``auto`` asks Ollama once at start-up and falls back to the embedded model.
    """
    _load_optional()
    session = new_session(
        connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.request_timeout_s
    )
    name = settings.provider
    if name == "auto":
        name = "ollama" if await ollama_answers(settings, session) else "local"
        log.info("provider auto-selected", extra={"provider": name})
    try:
        provider = provider_factory(name)(settings, session)
    except BaseException:
        await session.close()
        raise
    return provider, session
