"""An upstream written in a few lines, for tests of the chat core: subclass
:class:`StubProvider` and write ``stream`` (an async generator of ``Chunk``); the rest
of the provider contract is answered here (one model, always healthy, nothing to close)."""

from __future__ import annotations

from typing import ClassVar

from chatgate.providers.base import Embeddings, EmbeddingsUnsupported


class StubProvider:
    name: ClassVar[str] = "stub"
    default_model = "stub-model"

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        raise EmbeddingsUnsupported("the stub provider does not do embeddings", provider=self.name)

    async def models(self) -> list[str]:
        return [self.default_model]

    async def check(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        pass
