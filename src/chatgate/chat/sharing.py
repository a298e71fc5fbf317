"""Generations that other instances can follow: what the chat service asks of the place
several instances share (:mod:`chatgate.cluster.bus` with a Redis store; nothing at all
with a process-local store, where a generation lives and dies with its process).

The service stays the one owner of its generations. It hands each one it starts to
:meth:`SharedGenerations.publish`, which mirrors the log where other instances can read
it; asked for a generation it does not run, it asks :meth:`SharedGenerations.find` for a
*replica*: a :class:`Generation` whose log is filled from the running instance's, so the
delivery code follows it as it follows a local one. Cancelling, orphaning and adopting a
replica are messages to the instance that runs the original, which the shared place
hands back to that instance's service (:class:`GenerationControl`).
"""

from __future__ import annotations

from typing import Protocol

from chatgate.chat.generation import Generation


class GenerationControl(Protocol):
    """What another instance may ask of this one's generations."""

    def cancel_local(self, namespace: str, generation_id: str) -> None: ...

    def orphan_local(self, namespace: str, generation_id: str, grace_s: float) -> None: ...

    def adopt_local(self, namespace: str, generation_id: str) -> None: ...


class SharedGenerations(Protocol):
    async def start(self, control: GenerationControl) -> None:
        """Begin taking requests from other instances for ``control``'s generations."""
        ...

    async def close(self) -> None: ...

    def publish(self, generation: Generation) -> None:
        """Mirror ``generation``'s log, from its ``start`` event to its end, for others."""
        ...

    async def find(
        self, namespaces: list[str], generation_id: str, *, offered: bool = False
    ) -> Generation | None:
        """A replica of the generation ``generation_id`` another instance runs (or ran
        lately) in the first of ``namespaces`` that has one, or with ``offered`` one that
        :meth:`offer` put up, or ``None``."""
        ...

    def offer(self, generation: Generation, grace_s: float) -> None:
        """An anonymous client's generation, by the id it chose, lost its socket: for
        ``grace_s`` any instance finds it by that id alone, as this one does."""
        ...

    def withdraw(self, generation: Generation) -> None:
        """A socket follows the offered generation again."""
        ...

    def orphan(self, replica: Generation, grace_s: float) -> None:
        """Nobody here follows ``replica`` any more: its instance keeps it for ``grace_s``."""
        ...

    def adopt(self, replica: Generation) -> None:
        """A client follows ``replica`` again: its instance must not stop it."""
        ...
