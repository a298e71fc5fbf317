"""Command line: ``chatgate serve | chat | hash-key | fake-llm``."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from chatgate.app import server_options
    from chatgate.chat.agents import AgentFileError, load_agents
    from chatgate.cluster import is_redis
    from chatgate.config import ConfigError, load_settings
    from chatgate.serve import bind, run, store_problem, workers_problem
    from chatgate.telemetry.logs import setup_logging
    from chatgate.telemetry.otel import export_for

    # Flags win: they become the primary variables, which is also how worker processes see them.
    for flag, variable in (("host", "CHATGATE_HOST"), ("port", "CHATGATE_PORT"), ("workers", "CHATGATE_WORKERS")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[variable] = str(value)
    from chatgate.providers import configuration_problem

    # Every start-up failure is one line on stderr and exit code 2, before uvicorn runs.
    try:
        settings = load_settings()
        load_agents(settings.agents_dir)
        problem = configuration_problem(settings) or store_problem(settings) or workers_problem(settings)
        if problem:
            raise ConfigError(problem)
        export_for("traces"), export_for("metrics")  # an OTEL_* value chatgate cannot act on
    except (ConfigError, AgentFileError) as exc:
        print(f"chatgate: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from chatgate.api.auth import workers_need_a_secret

    if settings.workers > 1 and workers_need_a_secret(settings):
        # Each worker must accept the tickets and identity cookies the others signed.
        os.environ["CHATGATE_SECRET"] = secrets.token_urlsafe(32)
    if settings.workers > 1 and not is_redis(settings.store_url):
        logging.getLogger("chatgate").warning(
            f"{settings.workers} workers share conversations through the store, but an answer can be "
            "resumed or cancelled only from a connection that reaches the worker running it; "
            "with CHATGATE_STORE=redis://… any worker can",
            extra={"workers": settings.workers, "store": settings.store_url.split(":", 1)[0]},
        )
    config = uvicorn.Config(
        "chatgate.app:app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        **server_options(settings),
        log_level=None,  # setup_logging sets uvicorn's loggers' levels
        timeout_graceful_shutdown=5,
        backlog=4096,  # thousands of sockets may arrive at once; the kernel caps it at somaxconn
    )
    # Bound here so that a port in use is one line; "chatgate ready" follows once it listens.
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        where = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"chatgate: cannot listen on {where}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    from chatgate.api.browsers import log_exposure

    log_exposure(settings)  # the Host names served; a warning when exposed without keys
    return run(config, sock)


def _fake_llm(args: argparse.Namespace) -> int:
    from chatgate.testing.fake_llm import FakeSettings, run_fake_llm

    run_fake_llm(args.host, args.port, FakeSettings(tokens=args.tokens, tps=args.tps, ttft_ms=args.ttft_ms))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    """Print the ``sha256:`` line a keys file may hold instead of the key, read from stdin
    (not the command line, which shell history and ``ps`` keep)."""
    import getpass

    from chatgate.api.auth import hashed_key

    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not key.strip():
        print("chatgate hash-key: no key given on stdin", file=sys.stderr)
        return 2
    print(hashed_key(key.strip()))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from chatgate.terminal import Options, run_chat

    return run_chat(
        Options(
            url=args.url,
            key=args.key,
            agent=args.agent,
            model=args.model,
            conversation_id=args.conversation,
            message=" ".join(args.message) if args.message else None,
            stdin_as_one=args.stdin_as_one,
        )
    )


CHAT_EPILOG = """\
On a terminal, answers are rendered as Markdown; piped, they are the plain text followed by a
newline. With stdin piped, each line is a turn of one conversation (--stdin-as-one: all of it
is one message). Interactive commands: /new /agent /model /clear /history /quit /help;
Ctrl-C stops an answer, Ctrl-D quits.

The gateway: --url, else CHATGATE_URL, else CHATGATE_HOST/CHATGATE_PORT as `serve` reads them.

exit codes:
  0    done
  2    usage or configuration error (also: unknown agent or model, message too large)
  3    gateway unreachable (the line names the URL and where it came from)
  4    unauthorized: set --key or CHATGATE_API_KEY
  5    rate limited (the line says when to retry)
  6    the answer failed (upstream error)
  130  interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    from chatgate import __version__

    parser = argparse.ArgumentParser(prog="chatgate", description="Self-hosted streaming chat gateway")
    parser.add_argument("--version", action="version", version=f"chatgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway with the web UI")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=_serve)

    chat = commands.add_parser(
        "chat",
        help="chat from the terminal (interactive without MESSAGE)",
        description="Chat with a running gateway over its WebSocket protocol.",
        epilog=CHAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--url", help="the gateway, e.g. http://127.0.0.1:8000 (env CHATGATE_URL)")
    chat.add_argument("--agent", help="agent to answer as (default: the gateway's general agent)")
    chat.add_argument("--model", help="model to ask (default: the agent's)")
    chat.add_argument("--conversation", help="continue this conversation id")
    chat.add_argument(
        "--key", "--api-key", dest="key", default=os.environ.get("CHATGATE_API_KEY") or None,
        help="API key when the gateway has keys (env CHATGATE_API_KEY)",
    )
    chat.add_argument("--stdin-as-one", action="store_true", help="send all of piped stdin as one message")
    chat.add_argument("message", nargs="*", help="one message to answer, then exit")
    chat.set_defaults(run=_chat)

    hash_key = commands.add_parser(
        "hash-key", help="print the sha256: line for a CHATGATE_API_KEYS file, given the key on stdin"
    )
    hash_key.set_defaults(run=_hash_key)

    fake = commands.add_parser("fake-llm", help="deterministic Ollama/OpenAI/Gemini-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=11434)
    fake.add_argument("--tokens", type=int, default=40)
    fake.add_argument("--tps", type=float, default=0.0, help="tokens per second (0 = no delay)")
    fake.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    fake.set_defaults(run=_fake_llm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
