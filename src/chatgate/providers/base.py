"""The provider contract: one async generator per turn, and one error tree.

Every adapter turns a :class:`ProviderRequest` into a stream of :class:`Chunk` and
translates its upstream's failures into this tree at its own edge, so nothing above
the adapters knows which upstream it is talking to::

    ProviderError                 any failure of the model backend (HTTP 502 to clients)
    ├── ProviderUnavailable       cannot reach it: refused, DNS, connect timeout   retryable
    ├── ProviderTimeout           reached, but no byte within the read timeout     retryable
    ├── ProviderHTTPError         answered with an error status (``status``)        retryable if 5xx
    │   └── ModelNotFound         the model does not exist there (404)
    └── ProviderStreamError       broke after the stream started (dropped
                                  connection, in-stream ``{"error": ...}``)         retryable

``retryable`` says whether the *same* request may succeed if sent again; whether it is
sent again is the chat service's decision (only before the first token).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple, Protocol, TypedDict, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """Sampling options, named once here; each adapter maps them to its wire names. A
    client's options are read and range-checked by :func:`chatgate.options.parse_options`."""

    temperature: float | None = None
    max_tokens: int | None = None
    num_ctx: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def merged(self, override: GenerationOptions | None) -> GenerationOptions:
        """Options of ``override`` win where they are set."""
        if override is None:
            return self
        values = {
            name: getattr(override, name)
            if getattr(override, name) not in (None, ())
            else getattr(self, name)
            for name in self.__dataclass_fields__
        }
        return GenerationOptions(**values)


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    messages: list[Message]
    model: str
    options: GenerationOptions = field(default_factory=GenerationOptions)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Chunk(NamedTuple):
    """A piece of the answer. The last chunk of a stream has ``finish_reason`` set
    (its ``text`` may be empty) and ``usage`` when the upstream reported it. A tuple
    rather than a frozen dataclass: one is made per token, and a frozen dataclass's
    ``__init__`` costs about twice a tuple's."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


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


@runtime_checkable
class Provider(Protocol):
    """An LLM backend. ``name`` is the registry name; ``default_model`` is used when
    neither the request nor the agent names one."""

    name: ClassVar[str]
    default_model: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        """Yield the answer's chunks; the last one carries ``finish_reason``.

        Closing the iterator early (``aclose()``, or cancelling the task iterating it)
        must release the upstream request at once.
        """
        ...

    async def models(self) -> list[str]:
        """Models the upstream offers (may be just the default one)."""
        ...

    async def check(self) -> str:
        """Raise :class:`ProviderError` when the upstream cannot serve; else a short status."""
        ...

    async def aclose(self) -> None: ...


ProviderFactory = Callable[..., Provider]
_REGISTRY: dict[str, ProviderFactory] = {}


def register_provider(name: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def decorate(factory: ProviderFactory) -> ProviderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def provider_factory(name: str) -> ProviderFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
