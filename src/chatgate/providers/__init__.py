"""Provider adapters register themselves; :func:`build_provider` picks one.

Each adapter module declares its own settings (a :class:`ProviderSettings` with its
variables and validators) and registers a factory for them with
:func:`~chatgate.providers.base.register_provider`. This package imports every adapter, so
a broken one fails at import; it loads every adapter's settings for
:func:`chatgate.config.load_settings` (installing :func:`load_upstream_settings` there when
imported) and builds the provider :func:`choose_provider` picks.

Adding a provider ``NAME`` takes one new module, ``chatgate/providers/NAME.py``: its
:class:`ProviderSettings` subclass (fields named ``NAME_…``, read from their variables),
its adapter (the :class:`~chatgate.providers.base.Provider` protocol), and a factory
decorated with ``@register_provider("NAME", settings=…)``; then its name in the import of
the adapters below, its tests, and its variables in the README. ``CHATGATE_PROVIDER=NAME``
and its variables then work, and :func:`chatgate.config.load_settings` accepts its fields
as overrides. Nothing outside the new module names it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from pydantic import ValidationError

from chatgate.config import ConfigError, Settings, config_error, load_upstreams_with, variable_for
from chatgate.providers import gemini, local, ollama, openai  # noqa: F401  (they register themselves)
from chatgate.providers._http import close_session, new_session
from chatgate.providers.base import (
    AUTO,
    Provider,
    ProviderDefaults,
    ProviderError,
    ProviderSettings,
    registered_providers,
)

log = logging.getLogger("chatgate.providers")


def provider_names() -> list[str]:
    """What ``CHATGATE_PROVIDER`` may name: ``auto`` or a registered provider."""
    return sorted([AUTO, *registered_providers()])


@load_upstreams_with
def load_upstream_settings(settings: Settings, overrides: Mapping[str, Any]) -> list[ProviderSettings]:
    """Every registered provider's settings, read from the sources ``settings`` was read
    from, each override going to the settings with a field of its name. All of them are
    loaded whichever provider is chosen: a wrong value is wrong either way, and ``auto``
    reads Ollama's. What only the chosen provider needs is its ``problem()``."""
    kinds = [registration.settings for registration in registered_providers().values()]
    unknown = sorted(set(overrides).difference(*(kind.model_fields for kind in kinds)))
    if unknown:
        raise TypeError(f"no settings have the fields {', '.join(unknown)}")
    if settings.provider not in provider_names():
        raise ConfigError(
            f"{variable_for('provider')}: unknown provider {settings.provider!r};"
            f" known: {', '.join(provider_names())}"
        )
    loaded: list[ProviderSettings] = []
    for kind in kinds:
        try:
            loaded.append(kind(**{k: v for k, v in overrides.items() if k in kind.model_fields}))
        except ValidationError as exc:
            raise config_error(exc, kind) from None
    return loaded


def configuration_problem(settings: Settings) -> str | None:
    """One line naming the variable when the provider named outright cannot be built; else
    None. The provider ``auto`` picks is checked once picked, by :func:`build_provider`."""
    if settings.provider == AUTO:
        return None
    registration = registered_providers()[settings.provider]
    upstream: ProviderSettings = settings.upstream(registration.settings)
    return upstream.problem()


async def ollama_answers(settings: Settings, session: aiohttp.ClientSession) -> bool:
    probe = ollama.OllamaProvider(settings.upstream(ollama.OllamaSettings).ollama_host, session)
    try:
        await asyncio.wait_for(probe.check(), timeout=settings.connect_timeout_s)
    except (ProviderError, TimeoutError):
        return False
    return True


def choose_provider(settings: Settings, ollama_answered: bool) -> tuple[str, str]:
    """The provider to build and why, in words for the start-up log.

    A provider named outright is used. ``auto`` with an Ollama address configured means
    Ollama, whether or not it answers: when it is down, clients get its error and
    ``/health`` says degraded, never a silent switch to another model. ``auto`` with no
    address configured uses Ollama when ``ollama_answered`` (the one probe of the default
    address at start-up), else the embedded model.
    """
    if settings.provider != AUTO:
        return settings.provider, f"{variable_for('provider')}={settings.provider}"
    address = settings.upstream(ollama.OllamaSettings)
    if address.configured:
        return "ollama", f"{address.address_variable} is set"
    if ollama_answered:
        return "ollama", f"Ollama answered at {address.ollama_host}"
    return "local", (
        f"no upstream configured and none answered at {address.ollama_host}: using the embedded model"
    )


def needs_probe(settings: Settings) -> bool:
    """Whether :func:`choose_provider` depends on asking Ollama."""
    return settings.provider == AUTO and not settings.upstream(ollama.OllamaSettings).configured


async def build_provider(settings: Settings) -> tuple[Provider, aiohttp.ClientSession]:
    """The configured provider (see :func:`choose_provider`) and the one pooled session it
    streams over. Logs which provider was chosen and why; a chosen provider that cannot be
    built with its settings raises ConfigError."""
    session = new_session(
        connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.request_timeout_s
    )
    try:
        answers = needs_probe(settings) and await ollama_answers(settings, session)
        name, reason = choose_provider(settings, answers)
        log.info("provider chosen", extra={"provider": name, "reason": reason})
        provider = build_named_provider(name, settings, session)
    except BaseException:
        await close_session(session)
        raise
    return provider, session


def build_named_provider(name: str, settings: Settings, session: aiohttp.ClientSession) -> Provider:
    """Provider ``name`` as ``settings`` configure it; ConfigError when they cannot."""
    registration = registered_providers()[name]
    defaults = ProviderDefaults(model=settings.model, options=settings.generation_options)
    return registration.build(settings.upstream(registration.settings), defaults, session)
