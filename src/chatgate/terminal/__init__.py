"""The terminal client behind ``chatgate chat``: the native WebSocket protocol
(:mod:`.session`), Markdown on a terminal or plain text on a pipe (:mod:`.output`), and
the prompt, one-shot and piped modes (:mod:`.chat`)."""

from chatgate.terminal.chat import Options, run_chat
from chatgate.terminal.session import Exit

__all__ = ["Exit", "Options", "run_chat"]
