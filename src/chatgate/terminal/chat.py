"""``chatgate chat``: an interactive prompt on a terminal, one answer for a message given
as an argument, one turn per line (or one for the whole input) when stdin is piped."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from websockets.exceptions import WebSocketException

from chatgate.terminal.output import LiveOutput, Output, PlainOutput
from chatgate.terminal.session import Answer, ClientError, Exit, Session, Target

HELP = """\
/new            start a new conversation
/agent [NAME]   answer as agent NAME (without NAME: list the agents)
/model [NAME]   ask model NAME (without NAME: the agent's own)
/clear          forget this conversation's history
/history        show this conversation
/quit           leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer streams stops it."""


@dataclass
class Options:
    url: str | None
    key: str | None
    agent: str | None
    model: str | None
    conversation_id: str | None
    message: str | None
    stdin_as_one: bool


class Interrupts:
    """Ctrl-C while an answer streams stops that answer instead of the program; a second
    one gives up waiting for the gateway to confirm."""

    def __init__(self) -> None:
        self.pressed = False

    @contextmanager
    def catching(self) -> Iterator[None]:
        self.pressed = False

        def press(signum: int, frame: FrameType | None) -> None:
            if self.pressed:
                raise KeyboardInterrupt
            self.pressed = True

        previous = signal.signal(signal.SIGINT, press)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Chat:
    """One conversation at a time over one session, written to one output."""

    def __init__(self, session: Session, output: Output, options: Options) -> None:
        self.session = session
        self.output = output
        self.agent = options.agent
        self.model = options.model
        self.conversation_id = options.conversation_id
        self.interrupts = Interrupts()

    def turn(self, message: str) -> Answer:
        """Ask ``message`` and show the answer; a stopped one ends ``cancelled``."""
        self.output.begin()
        finish = "error"
        try:
            with self.interrupts.catching():
                answer = self.session.ask(
                    message,
                    conversation_id=self.conversation_id,
                    agent=self.agent,
                    model=self.model,
                    on_start=self._started,
                    on_text=self.output.text,
                    interrupted=lambda: self.interrupts.pressed,
                )
            finish = answer.finish_reason
        finally:
            self.output.end(finish)
        return answer

    def _started(self, event: dict[str, Any]) -> None:
        self.conversation_id = event["conversation_id"]


def find_gateway(url: str | None) -> Target:
    """``--url``, else ``CHATGATE_URL``, else the address ``chatgate serve`` listens on by
    the same settings (``CHATGATE_HOST``/``CHATGATE_PORT`` and their aliases, ``.env``)."""
    if url:
        return Target(_normal(url), "from --url")
    if os.environ.get("CHATGATE_URL"):
        return Target(_normal(os.environ["CHATGATE_URL"]), "from CHATGATE_URL")
    import chatgate.providers  # noqa: F401  (load_settings reads the providers' settings too)
    from chatgate.config import WILDCARD_HOSTS, ConfigError, load_settings, variable_for

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise ClientError(Exit.USAGE, f"configuration error: {exc}") from None
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    given = [variable_for(field) for field in ("host", "port") if field in settings.model_fields_set]
    source = f"from {' and '.join(given)}" if given else "the default address; set --url or CHATGATE_URL"
    return Target(f"http://{WILDCARD_HOSTS.get(host, host)}:{settings.port}", source)


def _normal(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("http", "https") or not rest:
        raise ClientError(Exit.USAGE, f"not a gateway URL: {url} (expected http://HOST:PORT)")
    return f"{scheme}://{rest.removesuffix('/ws')}"


def run_chat(options: Options) -> int:
    """Run the command; every failure is one line on stderr and its exit code."""
    try:
        target = find_gateway(options.url)
        interactive = options.message is None and sys.stdin.isatty()
        if options.message is not None:
            messages: list[str] = [options.message]
        elif interactive:
            messages = []
        elif options.stdin_as_one:
            messages = [sys.stdin.read().strip()]
        else:
            messages = []  # read line by line as the answers come
        if any(not message.strip() for message in messages):
            raise ClientError(Exit.USAGE, "the message is empty")
        session = Session(target, options.key)
        try:
            session.connect()
            if interactive:
                return Prompt(session, options).run()
            chat = Chat(session, LiveOutput(Console()) if sys.stdout.isatty() else PlainOutput(), options)
            for message in messages or _lines(sys.stdin):
                if chat.turn(message).finish_reason == "cancelled":
                    return Exit.INTERRUPTED
            return Exit.OK
        finally:
            session.close()
    except ClientError as exc:
        print(f"chatgate chat: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except (OSError, WebSocketException) as exc:  # a failure the session did not foresee
        print(f"chatgate chat: the connection failed: {exc}", file=sys.stderr)
        return Exit.UNREACHABLE


def _lines(stream: Any) -> Iterator[str]:
    """Each non-blank line, read only once the answer before it has ended."""
    for line in iter(stream.readline, ""):
        if line.strip():
            yield line.rstrip("\r\n")


class Prompt:
    """The interactive prompt: turns, and the slash commands of :data:`HELP`."""

    def __init__(self, session: Session, options: Options) -> None:
        self.console = Console(highlight=False)
        self.session = session
        self.chat = Chat(session, LiveOutput(self.console) if self.console.is_terminal else PlainOutput(), options)

    def run(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        self.console.print(
            f"[dim]chatgate at {self.session.target.url}, agent {self.chat.agent or 'general'}. "
            "/help for commands; Ctrl-C stops an answer; Ctrl-D quits.[/dim]"
        )
        while True:
            try:
                line = self.console.input("[bold green]you>[/bold green] ").strip()
            except EOFError:
                self.console.print()
                return Exit.OK
            except KeyboardInterrupt:
                self.console.print()
                return Exit.INTERRUPTED
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return Exit.OK
                else:
                    self.chat.turn(line)
            except ClientError as exc:
                if exc.exit_code in (Exit.UNREACHABLE, Exit.UNAUTHORIZED):
                    raise
                self.console.print(f"[red]{exc.message}[/red]", highlight=False)

    def command(self, line: str) -> bool:
        """Carry out a slash command; ``False`` to leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        chat = self.chat
        match name:
            case "/quit" | "/exit":
                return False
            case "/help":
                self.console.print(HELP, markup=False)
            case "/new":
                chat.conversation_id = None
                self.console.print("[dim]new conversation[/dim]")
            case "/agent":
                agents = self.session.agents()
                if not argument or argument not in agents:
                    if argument:
                        self.console.print(f"[red]no agent {argument}[/red]", highlight=False)
                    self.console.print(f"agents: {', '.join(agents)} (now {chat.agent or 'general'})", markup=False)
                else:
                    chat.agent = argument
                    self.console.print(f"[dim]agent {argument}[/dim]", highlight=False)
            case "/model":
                chat.model = argument or None
                self.console.print(f"[dim]model {argument or 'of the agent'}[/dim]", highlight=False)
            case "/clear":
                if chat.conversation_id is not None:
                    self.session.clear_history(chat.conversation_id)
                self.console.print("[dim]history cleared[/dim]")
            case "/history":
                self._history()
            case _:
                self.console.print(f"unknown command {name}; /help lists them", markup=False)
        return True

    def _history(self) -> None:
        if self.chat.conversation_id is None:
            self.console.print("[dim]nothing yet[/dim]")
            return
        messages = self.session.history(self.chat.conversation_id)
        if not messages:
            self.console.print("[dim]nothing yet[/dim]")
        for message in messages:
            role = message.get("role", "")
            self.console.print(f"[bold]{role}[/bold]" + (" [dim](partial)[/dim]" if message.get("partial") else ""))
            content = message.get("content") or ""
            self.console.print(Markdown(content) if role == "assistant" else content, markup=False)
