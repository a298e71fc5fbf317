"""How an answer reaches the screen: rendered Markdown on a terminal, the exact text
anywhere else (a pipe, a file), so scripts read what the model wrote and nothing more."""

from __future__ import annotations

import sys
import time
from typing import Protocol

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

#: A terminal redraws the answer at most this often, not once per token: re-rendering the
#: whole Markdown per token costs more the longer the answer grows.
REFRESH_S = 0.25


class Output(Protocol):
    def begin(self) -> None: ...
    def text(self, piece: str) -> None: ...
    def end(self, finish_reason: str) -> None: ...
    def note(self, line: str) -> None:
        """Something for the user that is not the answer (never on a pipe's stdout)."""


class PlainOutput:
    """The answer's text as it arrives, then a newline; notes go to stderr."""

    def __init__(self) -> None:
        self._wrote = False

    def begin(self) -> None:
        self._wrote = False

    def text(self, piece: str) -> None:
        self._wrote = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self, finish_reason: str) -> None:
        if self._wrote or finish_reason != "error":
            sys.stdout.write("\n")
            sys.stdout.flush()
        if finish_reason == "cancelled":
            self.note("(stopped)")

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)


class LiveOutput:
    """The answer as Markdown, redrawn in place while it streams."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live: Live | None = None
        self._text = ""
        self._drawn_at = 0.0

    def begin(self) -> None:
        self._text = ""
        self._live = Live(console=self.console, auto_refresh=False, vertical_overflow="visible")
        self._live.start()

    def text(self, piece: str) -> None:
        self._text += piece
        now = time.monotonic()
        if now - self._drawn_at >= REFRESH_S:
            self._draw()
            self._drawn_at = now

    def end(self, finish_reason: str) -> None:
        if self._live is not None:
            self._draw()
            self._live.stop()
            self._live = None
        if finish_reason == "cancelled":
            self.console.print("[dim](stopped)[/dim]")
        elif finish_reason == "length":
            self.console.print("[dim](cut short: the length limit)[/dim]")

    def note(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, style="dim")

    def _draw(self) -> None:
        assert self._live is not None
        self._live.update(Markdown(self._text), refresh=True)
