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


def ollama_address_variable(settings: Settings) -> str | None:
    """The variable naming a configured Ollama address, or None when none is configured.
    Configured means set at all (pydantic puts fields given by the environment, ``.env`` or
    an override in ``model_fields_set``), even to the default address. The name is the one
    in the environment, else ``OLLAMA_HOST``."""
    from chatgate.config import variable_for  # here: chatgate.config imports this package

    return variable_for("ollama_host") if "ollama_host" in settings.model_fields_set else None


def choose_provider(settings: Settings, ollama_answered: bool) -> tuple[str, str]:
    """The provider to build and why, in words for the start-up log.

    A provider named outright is used. ``auto`` with an Ollama address configured means
    Ollama, whether or not it answers: when it is down, clients get its error and
    ``/health`` says degraded, never a silent switch to another model. ``auto`` with no
    address configured uses Ollama when ``ollama_answered`` (the one probe of the default
    address at start-up), else the embedded model.
    """
    from chatgate.config import variable_for

    if settings.provider != "auto":
        return settings.provider, f"{variable_for('provider')}={settings.provider}"
    variable = ollama_address_variable(settings)
    if variable is not None:
        return "ollama", f"{variable} is set"
    if ollama_answered:
        return "ollama", f"Ollama answered at {settings.ollama_host}"
    return "local", (
        f"no upstream configured and none answered at {settings.ollama_host}: using the embedded model"
    )


def needs_probe(settings: Settings) -> bool:
    """Whether :func:`choose_provider` depends on asking Ollama."""
    return settings.provider == "auto" and ollama_address_variable(settings) is None


async def build_provider(settings: Settings) -> tuple[Provider, aiohttp.ClientSession]:
    """The configured provider (see :func:`choose_provider`) and the one pooled session it
    streams over. Logs which provider was chosen and why."""
    _load_optional()
    session = new_session(
        connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.request_timeout_s
    )
    try:
        answers = needs_probe(settings) and await ollama_answers(settings, session)
        name, reason = choose_provider(settings, answers)
        log.info("provider chosen", extra={"provider": name, "reason": reason})
        provider = provider_factory(name)(settings, session)
    except BaseException:
        await session.close()
        raise
    return provider, session
