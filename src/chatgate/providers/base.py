"""The provider contract: one async generator per turn, and one error tree.

Every adapter turns a :class:`ProviderRequest` into a stream of :class:`Chunk` and
translates its upstream's failures into this tree at its own edge, so nothing above
the adapters knows which upstream it is talking to::

    ProviderError                 any failure of the model backend (HTTP 502 to clients)
    ├── ProviderUnavailable       cannot reach it: refused, DNS, connect timeout   retryable
    ├── ProviderTimeout           reached, but no byte within the read timeout     retryable
    ├── ProviderHTTPError         answered with an error status (``status``)        retryable if 5xx
    │   └── ModelNotFound         the model does not exist there (404)
    ├── ProviderStreamError       broke after the stream started (dropped
    │                             connection, in-stream ``{"error": ...}``)         retryable
    └── Unsupported               the upstream cannot do what the request asks
        │                         (tools on the embedded model)                     HTTP 400
        └── EmbeddingsUnsupported it cannot embed at all

An :class:`Unsupported` request is refused as it is: no retry, no fallback model.

``retryable`` says whether the *same* request may succeed if sent again; whether it is
sent again is the chat service's decision (only before the first token).

An adapter module declares its :class:`ProviderSettings` and registers its factory with
:func:`register_provider`; :mod:`chatgate.providers` loads the settings and builds the
chosen provider from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    Any,
    ClassVar,
    Generic,
    NamedTuple,
    Protocol,
    TypeAlias,
    TypeVar,
    runtime_checkable,
)

import aiohttp

from chatgate.config import ConfigError, EnvironmentSettings, Settings
from chatgate.vocabulary import (
    FinishReason,
    GenerationOptions,
    Message,
    OutputFormat,
    ToolCallDelta,
    Tools,
    Usage,
)


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One turn for an upstream: ``tools`` the model may call and the ``output`` format
    it must answer in, each mapped by the adapter to its wire format (None: not asked)."""

    messages: list[Message]
    model: str
    options: GenerationOptions = field(default_factory=GenerationOptions)
    tools: Tools | None = None
    output: OutputFormat | None = None


class Chunk(NamedTuple):
    """A piece of the answer. The last chunk of a stream has ``finish_reason`` set
    (its ``text`` may be empty) and ``usage`` when the upstream reported it;
    ``tool_calls`` holds pieces of tool calls as they stream. A tuple rather than a frozen
    dataclass: one is made per token, and a frozen dataclass's ``__init__`` costs about
    twice a tuple's."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


#: Given each chunk of an answer as it arrives, synchronously; returns ``True`` to end the
#: answer there (an answer cap), which closes its upstream request.
ChunkSink: TypeAlias = Callable[[Chunk], bool]


@runtime_checkable
class PushedChunks(Protocol):
    """What a stream of chunks may offer besides iteration: hand the rest of the answer to
    a sink as it arrives, in the socket's callback, with no task switch per token (the HTTP
    adapters' streams, :class:`chatgate.providers._http.LineStream`)."""

    async def pump(self, sink: ChunkSink) -> None:
        """Give every further chunk to ``sink``; return once the last one (the one with
        ``finish_reason``) was given or ``sink`` returned ``True``; raise what ended the
        answer otherwise. Cancelling the wait stops the deliveries."""
        ...


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One vector per input text, in order; ``prompt_tokens`` when the upstream counted them."""

    vectors: list[list[float]]
    prompt_tokens: int | None = None


class ProviderError(Exception):
    default_retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, provider: str = "", model: str = "", retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.model = model
        self.retryable = self.default_retryable if retryable is None else retryable


class ProviderUnavailable(ProviderError):
    default_retryable = True


class ProviderTimeout(ProviderError):
    default_retryable = True


class ProviderHTTPError(ProviderError):
    def __init__(self, message: str, *, status: int, provider: str = "", model: str = "") -> None:
        retryable = status >= 500 or status == 429
        super().__init__(message, provider=provider, model=model, retryable=retryable)
        self.status = status


class ModelNotFound(ProviderHTTPError):
    def __init__(self, message: str, *, provider: str = "", model: str = "") -> None:
        super().__init__(message, status=404, provider=provider, model=model)


class ProviderStreamError(ProviderError):
    default_retryable = True


class Unsupported(ProviderError):
    """The upstream cannot do what the request asks (a feature it lacks): the request is
    refused as the client's (400), never retried or sent to a fallback model."""


class EmbeddingsUnsupported(Unsupported):
    """The upstream (or the model it was started with) does not compute embeddings."""


@runtime_checkable
class Provider(Protocol):
    """An LLM backend. ``name`` is the registry name; ``default_model`` is used when
    neither the request nor the agent names one."""

    name: ClassVar[str]
    default_model: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        """Yield the answer's chunks; the last one carries ``finish_reason``.

        Closing the iterator early (``aclose()``, or cancelling the task iterating it)
        must release the upstream request at once. The iterator may also be
        :class:`PushedChunks`, which the chat service prefers once the first chunk is in.
        """
        ...

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        """One embedding per text of ``inputs``, by ``model`` (empty: the default one),
        ``dimensions`` long when given (models trained for it shorten their vectors)."""
        ...

    async def models(self) -> list[str]:
        """Models the upstream offers (may be just the default one)."""
        ...

    async def check(self) -> str:
        """Raise :class:`ProviderError` when the upstream cannot serve; else a short status."""
        ...

    async def aclose(self) -> None: ...


class ProviderSettings(EnvironmentSettings):
    """What one adapter reads from the environment, declared in its own module and read
    from the same sources as :class:`chatgate.config.Settings`. A value that is wrong
    whichever provider is chosen fails its field validator when the settings load; what
    only the chosen provider needs is :meth:`problem`."""

    def problem(self) -> str | None:
        """Why this provider, once chosen, cannot be built: one line naming the variable
        to set (or what to install); None when it can."""
        return None


@dataclass(frozen=True, slots=True)
class ProviderDefaults:
    """What every adapter is given besides its own settings: the gateway's default model
    (None: the adapter's own) and generation options."""

    model: str | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)


AdapterSettings = TypeVar("AdapterSettings", bound=ProviderSettings)
ProviderFactory: TypeAlias = Callable[
    [AdapterSettings, ProviderDefaults, aiohttp.ClientSession], Provider
]


@dataclass(frozen=True)
class Registration(Generic[AdapterSettings]):
    """A provider as registered: its name, its settings class and the factory that builds
    it from an instance of them."""

    name: str
    settings: type[AdapterSettings]
    factory: ProviderFactory[AdapterSettings]

    def build(
        self, upstream: AdapterSettings, defaults: ProviderDefaults, session: aiohttp.ClientSession
    ) -> Provider:
        """The provider, or ConfigError with the line of :meth:`ProviderSettings.problem`."""
        problem = upstream.problem()
        if problem is not None:
            raise ConfigError(problem)
        return self.factory(upstream, defaults, session)


_REGISTRY: dict[str, Registration[Any]] = {}
#: Not a provider: ``CHATGATE_PROVIDER=auto`` lets :func:`chatgate.providers.choose_provider` pick.
AUTO = "auto"


def register_provider(
    name: str, *, settings: type[AdapterSettings]
) -> Callable[[ProviderFactory[AdapterSettings]], ProviderFactory[AdapterSettings]]:
    """Make the decorated factory provider ``name``, configured by ``settings``.

    Field names are unique across :class:`chatgate.config.Settings` and every provider's
    settings, because :func:`chatgate.config.load_settings` routes an override by its name
    alone; a clash fails here, when the adapter is imported."""

    def decorate(factory: ProviderFactory[AdapterSettings]) -> ProviderFactory[AdapterSettings]:
        owners = dict.fromkeys(Settings.model_fields, Settings.__name__)
        for registered in _REGISTRY.values():
            owners.update(dict.fromkeys(registered.settings.model_fields, registered.settings.__name__))
        clashes = [f"{taken} (also in {owners[taken]})" for taken in settings.model_fields if taken in owners]
        if name == AUTO or name in _REGISTRY or clashes:
            raise ValueError(
                f"cannot register provider {name!r}: "
                + ("; ".join(clashes) if clashes else "the name is taken")
            )
        _REGISTRY[name] = Registration(name, settings, factory)
        return factory

    return decorate


def registered_providers() -> Mapping[str, Registration[Any]]:
    """Every registered provider by name (the adapters register when imported)."""
    return MappingProxyType(_REGISTRY)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model as the upstream describes it: ``raw`` is its entry, whole, in the format
    ``kind`` names (``ollama``: an ``/api/tags`` entry, ``openai``: a model object,
    ``gemini``: a model resource, ``gguf``: the embedded model's file); the other fields are
    what the adapter could read from it, None where the upstream does not say."""

    name: str
    raw: Mapping[str, Any]
    kind: str = ""
    owned_by: str | None = None
    created: int | None = None  # Unix seconds
    size: int | None = None  # bytes
    modified_at: str | None = None  # ISO 8601


@runtime_checkable
class ModelCatalog(Protocol):
    """An adapter that can describe its upstream's models, not only name them."""

    async def model_catalog(self) -> list[ModelInfo]:
        """Every model the upstream lists, with its details as the upstream gives them."""
        ...

    async def model_card(self, name: str) -> Mapping[str, Any] | None:
        """The upstream's full description of ``name`` (Ollama's ``/api/show`` body); None
        when the upstream has no such description. Raises :class:`ModelNotFound`."""
        ...

    async def loaded_models(self) -> list[ModelInfo]:
        """The models the upstream holds in memory now (Ollama's ``/api/ps``); empty when
        it does not say."""
        ...
