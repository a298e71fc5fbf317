"""How ``chatgate serve`` runs uvicorn: checks that fail in one line before anything
starts, the listening socket bound up front, and "chatgate ready on URL" said once the
socket accepts connections, by the first worker that is ready.

A start-up that fails after that point (the application's lifespan raised) is also one
line on stderr; the CLI then exits with 2, as for a configuration error.

On SIGTERM (or Ctrl+C) the server drains before uvicorn's own shutdown: it stops
listening, lets the running answers finish for up to ``CHATGATE_DRAIN_S`` while their
sockets and responses are still open (:func:`chatgate.gateway.drain_gateway`), cuts what
is left, and only then lets uvicorn close the WebSockets with 1012 and end the
application. uvicorn alone closes the WebSockets first, which ends every answer's way to
its client. A second signal ends the drain at once; a drained process exits with 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import uvicorn
from uvicorn.server import HANDLED_SIGNALS
from uvicorn.supervisors import multiprocess

from chatgate.config import WILDCARD_HOSTS

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from types import FrameType

    from chatgate.config import Settings
    from chatgate.gateway import Gateway

log = logging.getLogger("chatgate")
#: uvicorn reports start-up failures, with the application's traceback, on this logger.
_UVICORN_LOGGER = "uvicorn.error"
#: Bits of the value the workers of one supervisor share: what has been said already.
READY, FAILED = 1, 2
#: uvicorn starts its workers in this context; what they share must come from it too.
_spawn = multiprocessing.get_context("spawn")
#: Where the workers of one supervisor keep their metrics (prometheus_client's variable).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often a supervisor waiting for its draining workers looks for a further signal.
_JOIN_POLL_S = 0.1


# --- checks before start-up -------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _shown(url: str) -> str:
    """``url`` without its password, if it has one."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def store_problem(settings: Settings) -> str | None:
    """One line naming the variable when the store cannot be opened; else None. Opens the
    store once and closes it again, so a wrong path fails here rather than in a worker."""
    from chatgate.store import StoreLimits, open_store
    from chatgate.store.base import _REGISTRY

    url = settings.store_url
    variable = "CHATGATE_STORE" if settings.store else "CHATGATE_DATA_DIR"
    scheme = urlsplit(url).scheme or url
    if scheme not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        return f"CHATGATE_STORE: unknown store scheme {scheme!r}; known: {known}"
    try:
        store = open_store(url, StoreLimits())
    except ValueError as exc:
        return f"{variable}: {_one_line(exc)}"

    async def open_and_close() -> None:
        await asyncio.wait_for(store.open(), timeout=settings.connect_timeout_s)
        await store.close()

    try:
        asyncio.run(open_and_close())
    except Exception as exc:
        return f"{variable}: cannot open the store {_shown(url)}: {_one_line(exc)}"
    return None


def workers_problem(settings: Settings) -> str | None:
    """Several workers with the memory store would each keep conversations of their own,
    so a conversation's next turn could land where its history is not."""
    if settings.workers > 1 and (urlsplit(settings.store_url).scheme or settings.store_url) == "memory":
        return (
            f"CHATGATE_WORKERS: {settings.workers} workers cannot share the memory store; "
            "use CHATGATE_STORE=sqlite:///path.db or redis://host:port/db"
        )
    return None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound but not yet listening: the server listens once the
    application has started. Like ``uvicorn.Config.bind_socket``, which exits instead of
    raising; this raises OSError."""
    sock = socket.socket(family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    """Where clients connect: a wildcard address (``0.0.0.0``, ``::``) names this machine."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{WILDCARD_HOSTS.get(shown, shown)}:{port}"


# --- the server ------------------------------------------------------------------------


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_back(name: str) -> Iterator[list[logging.LogRecord]]:
    """Keep what ``name`` logs in a list instead of letting it through."""
    logger = logging.getLogger(name)
    recorder = _Recorder()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [recorder], False
    try:
        yield recorder.records
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _failure_of(records: list[logging.LogRecord]) -> str:
    """The reason in uvicorn's start-up error records: the exception, without its traceback."""
    errors = [r for r in records if r.levelno >= logging.ERROR]
    for record in errors:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            return f"{type(exc).__name__}: {_one_line(exc)}"
        text = record.getMessage()
        if text.startswith("Traceback"):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[-1]
    if errors:
        return " ".join(errors[0].getMessage().split())
    return "the application did not start"


def gateway_of(app: Any) -> Gateway | None:
    """The :class:`chatgate.app.Gateway` of a started app, through uvicorn's wrappers
    (which keep the app they wrap as ``.app``)."""
    for _ in range(16):
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:
            return gateway  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class GatewayServer(uvicorn.Server):
    """uvicorn's server, saying "chatgate ready on URL" once its sockets listen, one line
    on stderr instead of a traceback when the application's start-up fails, and draining
    before it shuts down.

    ``said`` is shared by the workers of one supervisor, so that each is said once.
    ``supervised``: a worker of :class:`Supervisor`, which passes SIGTERM on to it. A
    service manager may signal every process of the group as well (systemd does, and a
    terminal's Ctrl+C reaches them all), so a worker takes a second SIGTERM for the same
    request to stop and only a SIGINT (which the supervisor sends on a second signal) ends
    its drain early."""

    def __init__(
        self, config: uvicorn.Config, said: Synchronized[int] | None = None, *, supervised: bool = False
    ) -> None:
        super().__init__(config)
        self.said = said
        self.supervised = supervised
        self.failure: str | None = None
        #: Ctrl+C was among the signals: raised again once the server has stopped.
        self.interrupted = False
        #: A second signal came during the drain: end it now.
        self.drain_cut = False

    def _first(self, what: int) -> bool:
        if self.said is None:
            return True
        with self.said.get_lock():
            first = not self.said.value & what
            self.said.value |= what
        return first

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        with _held_back(_UVICORN_LOGGER) as records:
            try:
                await super().startup(sockets=sockets)
            except SystemExit:  # what uvicorn does when the lifespan start-up failed
                self._failed(records)
                raise
        if not self.started:  # uvicorn versions that return instead
            if self.lifespan.should_exit:
                self._failed(records)
            return
        for record in records:
            logging.getLogger(_UVICORN_LOGGER).handle(record)
        if not self.should_exit and self._first(READY):
            self._say_ready(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and (sig == signal.SIGINT or not self.supervised):
            self.drain_cut = True
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except what happens after the shutdown: uvicorn raises the signals
        it caught again, so a SIGTERM killed the process even once it had stopped cleanly.
        Here only Ctrl+C is raised again (the CLI's exit code 130), and not in a worker."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
        if self.interrupted and not self.supervised:
            signal.raise_signal(signal.SIGINT)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from chatgate.gateway import drain_gateway

        gateway = gateway_of(self.config.loaded_app)
        if gateway is not None:  # even when forced: the cut answers are stored
            for server in self.servers:  # stop listening now; uvicorn does it again, harmlessly
                server.close()
            for sock in sockets or []:
                sock.close()
            try:
                await drain_gateway(
                    gateway, gateway.settings.drain_s, cut_short=lambda: self.drain_cut or self.force_exit
                )
            except Exception:  # the connections must be closed and the application ended all the same
                log.exception("draining failed")
        await super().shutdown(sockets=sockets)

    def _failed(self, records: list[logging.LogRecord]) -> None:
        self.failure = _failure_of(records)
        if self._first(FAILED):
            print(f"chatgate: start-up failed: {self.failure}", file=sys.stderr, flush=True)

    def _say_ready(self, sockets: list[socket.socket] | None) -> None:
        if sockets:
            port = sockets[0].getsockname()[1]
        else:
            port = self.servers[0].sockets[0].getsockname()[1]
        url = url_of(self.config.host, port)
        gateway = gateway_of(self.config.loaded_app)
        provider, model, store = (
            (gateway.provider.name, gateway.provider.default_model, gateway.store.name)
            if gateway is not None
            else ("unknown", "unknown", "unknown")
        )
        log.info(
            f"chatgate ready on {url} (provider {provider}, model {model}, store {store})",
            extra={"url": url, "provider": provider, "model": model, "store": store},
        )


# --- several workers -----------------------------------------------------------------


class _WorkerProcess(multiprocess.Process):
    """uvicorn's worker process, running a :class:`GatewayServer`."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], *, said: Synchronized[int]) -> None:
        self.said = said  # before the base class makes the child process, which carries it
        super().__init__(config, sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(self.config, self.said, supervised=True)
        return self._server


class _QuietAfterFailure(logging.Filter):
    """Once a worker has said why start-up failed, the supervisor's own error about that
    worker would be a second line."""

    def __init__(self, said: Synchronized[int]) -> None:
        super().__init__()
        self.said = said

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not self.said.value & FAILED


class Supervisor(multiprocess.Multiprocess):
    """uvicorn's supervisor of several workers (what ``uvicorn.run`` does for
    ``workers > 1``), with workers that run :class:`GatewayServer`."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.said: Synchronized[int] = _spawn.Value("b", 0)

    @property
    def start_failed(self) -> bool:
        return bool(self.said.value & FAILED)

    def terminate_all(self) -> None:
        """Close this process's copy of the listening socket first: once the draining
        workers have closed theirs, a new connection is refused instead of waiting in a
        queue that nobody reads."""
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def join_all(self) -> None:
        """Wait for the workers to drain and exit; a further signal to this process ends
        their drains at once."""
        for worker in self.processes:
            while worker.process.is_alive():
                worker.process.join(_JOIN_POLL_S)
                if self.signal_queue:
                    self.signal_queue.clear()
                    for other in self.processes:
                        if other.process.is_alive() and other.pid is not None:
                            os.kill(other.pid, signal.SIGINT)

    def keep_subprocess_alive(self) -> None:
        alive = self._pids()
        super().keep_subprocess_alive()
        self._bury(alive - self._pids())

    def restart_all(self) -> None:
        alive = self._pids()
        super().restart_all()
        self._bury(alive - self._pids())

    def _pids(self) -> set[int]:
        return {worker.pid for worker in self.processes if worker.pid is not None}

    def _bury(self, pids: set[int]) -> None:
        """Replaced workers' live gauges leave the sums (their counts stay)."""
        directory = os.environ.get(METRICS_DIR_ENV)
        if pids and directory:
            from prometheus_client import multiprocess as prometheus_multiprocess

            for pid in pids:
                prometheus_multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]

    def run(self) -> None:
        # The supervisor makes (and remakes) its workers by this module-level name.
        plain = multiprocess.Process
        quiet = _QuietAfterFailure(self.said)
        logger = logging.getLogger(_UVICORN_LOGGER)
        multiprocess.Process = functools.partial(_WorkerProcess, said=self.said)  # type: ignore[misc,assignment]
        logger.addFilter(quiet)
        try:
            super().run()
        finally:
            multiprocess.Process = plain  # type: ignore[misc]
            logger.removeFilter(quiet)


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """A fresh directory where the workers keep their Prometheus values, named to them in
    ``PROMETHEUS_MULTIPROC_DIR`` before they start (prometheus_client reads it on import),
    and removed when they have all stopped (:mod:`chatgate.telemetry.metrics`)."""
    directory = tempfile.mkdtemp(prefix="chatgate-metrics-")
    before = os.environ.get(METRICS_DIR_ENV)
    os.environ[METRICS_DIR_ENV] = directory
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = before
        shutil.rmtree(directory, ignore_errors=True)


def run(config: uvicorn.Config, sock: socket.socket) -> int:
    """Serve on the bound ``sock`` until stopped; the exit code (2: start-up failed)."""
    try:
        if config.workers > 1:
            with _metrics_directory():
                supervisor = Supervisor(config, [sock])
                supervisor.run()
            return 2 if supervisor.start_failed else 0
        server = GatewayServer(config)
        try:
            server.run(sockets=[sock])
        except SystemExit:
            if server.started:
                raise
        return 0 if server.started else 2
    finally:
        sock.close()
