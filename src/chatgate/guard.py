"""Limits on connections, held in uvicorn's protocols before a request reaches the application.

uvicorn's httptools protocol reads a request head of any size (a 50 MB header was read whole
and answered), closes an idle connection only after a response (never one that sent
nothing), waits for a head or a body for as long as the client dribbles it, and, when a
client stops reading, keeps the response it buffered, and the socket, for good: closing a
transport waits until its buffer is written. :class:`GuardedHttpProtocol` adds, per
connection:

- the request head (request line and headers) at most ``header_bytes`` and ``headers``
  header lines, else 431; counted as the bytes arrive, so no more than that and one read
  is ever held for it;
- the head within ``header_timeout_s`` of the first read that left it incomplete, else
  408 (slowloris);
- the body within ``body_timeout_s`` of the head, else 408;
- a connection that sends nothing is closed after uvicorn's keep-alive timeout, as one
  that is idle between requests is;
- at most ``per_address`` connections from one address, else 503; the proxies uvicorn
  trusts (``FORWARDED_ALLOW_IPS``, by default 127.0.0.1) are exempt, since all their
  clients share their address;
- a kernel send buffer of ``send_buffer_bytes``, and a write deadline: a client that takes
  nothing for ``send_timeout_s`` (:data:`chatgate.api.delivery.SEND_TIMEOUT_S`, the one
  send timeout of HTTP streams and WebSockets) while its buffer is full is aborted, which
  ends its response (the generation is cancelled and its partial answer kept).

:class:`GuardedWebSocketProtocol` is uvicorn's websockets sans-I/O protocol with the same
write deadline, counted in the same per-address cap; frames are held to uvicorn's
``ws_max_size``, which :func:`guarded_server` sets to the largest frame any dialect takes.
It also offers the application a synchronous text-frame writer (the ASGI scope extension
:data:`chatgate.api.delivery.TEXT_FRAMES`): a token's frame is one transport write, not an
ASGI ``send`` coroutine; and it keeps less per idle socket than uvicorn's (a list and a
future instead of an asyncio queue and event, no handshake headers after the handshake).

The checks cost a counter per read while a head is being read, a callback per header line,
a timer per head or body that does not arrive in one read, and nothing per streamed token.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from chatgate.api.delivery import SEND_TIMEOUT_S, TEXT_FRAMES
from chatgate.api.limits import SizeLimits

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from chatgate.config import Settings

log = logging.getLogger("chatgate.server")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: SO_LINGER on, for 0 s: closing resets the connection.
_NO_LINGER = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_bytes: int
    headers: int
    header_timeout_s: float
    body_timeout_s: float
    #: 0: no cap.
    per_address: int
    #: 0: the kernel's own (autotuned, up to ``net.ipv4.tcp_wmem``).
    send_buffer_bytes: int
    send_timeout_s: float = SEND_TIMEOUT_S

    @classmethod
    def of(cls, settings: Settings) -> ServerLimits:
        return cls(
            header_bytes=settings.max_header_bytes,
            headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            per_address=settings.max_connections_per_address,
            send_buffer_bytes=settings.send_buffer_bytes,
        )


@dataclass(slots=True)
class Guard:
    """One server's limits and its count of open connections per address."""

    limits: ServerLimits
    counts: dict[str, int] = field(default_factory=dict)
    #: Addresses refused since they reached the cap: logged once until they drop below it.
    refusing: set[str] = field(default_factory=set)
    #: The trusted proxies (uvicorn's ``forwarded_allow_ips``), read at the first connection.
    proxies: tuple[Network, ...] | None = None
    any_proxy: bool = False

    def admit(self, host: str | None, config: Config) -> bool:
        """Count a connection from ``host``; False, uncounted, when it is over the cap."""
        cap = self.limits.per_address
        if not cap or host is None or self._exempt(host, config):
            return True
        count = self.counts.get(host, 0)
        if count >= cap:
            if host not in self.refusing:
                self.refusing.add(host)
                log.warning(
                    "too many connections from one address; refusing more",
                    extra={"client": host, "connections": count, "cap": cap},
                )
            return False
        self.counts[host] = count + 1
        return True

    def release(self, host: str | None) -> None:
        """A connection :meth:`admit` counted has closed (uncounted ones are not in ``counts``)."""
        if host is None:
            return
        count = self.counts.get(host)
        if count is None:
            return
        if count <= 1:
            del self.counts[host]
        else:
            self.counts[host] = count - 1
        self.refusing.discard(host)

    def _exempt(self, host: str, config: Config) -> bool:
        if self.proxies is None:
            self.any_proxy, self.proxies = _trusted(config.forwarded_allow_ips)
        if self.any_proxy:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.proxies)


def _trusted(allowed: list[str] | str) -> tuple[bool, tuple[Network, ...]]:
    """uvicorn's ``forwarded_allow_ips`` as networks; True first when it is ``*``. Entries
    that are no address (a Unix socket's name) never match a TCP peer and are left out."""
    items = [item.strip() for item in (allowed.split(",") if isinstance(allowed, str) else allowed)]
    networks: list[Network] = []
    for item in items:
        if item == "*":
            return True, ()
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue
    return False, tuple(networks)


class HeadTooLarge(Exception):
    pass


def _response(status: int, text: str) -> bytes:
    body = text.encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`Guard`'s limits (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: Guard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.limits = guard.limits
        #: Counted in ``guard``: released when the connection closes.
        self._counted: str | None = None
        self._refused = False
        #: Between a request's end (or the connection's start) and the next one's headers.
        self._reading_head = True
        #: Between a request's headers and its end.
        self._reading_body = False
        #: Bytes received since the head began, and the head's url, names and values.
        self._head_bytes = 0
        #: The parser has begun a request whose head is not complete.
        self._head_begun = False
        self._head_size = 0
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if not self.guard.admit(host, self.config):
            self._refused = True
            transport.write(_response(503, "too many connections from this address"))
            transport.close()
            return
        if self.limits.per_address:
            self._counted = host
        _set_send_buffer(transport, self.limits.send_buffer_bytes)
        # uvicorn arms this only after a response: a connection that never sends a byte
        # would otherwise stay open for good.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.guard.release(self._counted)
        self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_head:
            self._head_bytes += len(data)
        # uvicorn's, with the head's refusal told apart from a malformed request
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._refuse(431, str(exc.__context__))
            else:
                self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # A head or body that came whole in this read needs no deadline: most of them.
        if self._reading_head:
            if self._head_bytes > self.limits.header_bytes:
                self._refuse(431, f"request head larger than {self.limits.header_bytes} bytes")
            elif self._head_timer is None and (self._head_bytes or self._head_begun):
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._reading_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def _invalid(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = self._head_begun = True

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.limits.header_bytes:
            raise HeadTooLarge(f"request head larger than {self.limits.header_bytes} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        self._head_count += 1
        if self._head_size > self.limits.header_bytes:
            raise HeadTooLarge(f"request head larger than {self.limits.header_bytes} bytes")
        if self._head_count > self.limits.headers:
            raise HeadTooLarge(f"more than {self.limits.headers} header lines")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = self._head_begun = False
        self._reading_body = not self.parser.should_upgrade()
        self._head_bytes = self._head_size = self._head_count = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading_body = False
        self._reading_head = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        # From here on the WebSocket protocol has the transport, and the count.
        self._cancel_timers()
        self._reading_head = self._reading_body = False
        super().handle_websocket_upgrade()

    # --- deadlines ---

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined head behind a running response: uvicorn's keep-alive timer follows it
        self._refuse(408, f"request head not received within {self.limits.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self._reading_body and not self.transport.is_closing():
            self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.send_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.info(
            "client took nothing for the send timeout; connection aborted",
            extra={"client": self.client[0] if self.client else None, "send_timeout_s": self.limits.send_timeout_s},
        )
        _reset(self.transport)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` (unless a response has begun) and close; the request being
        read, if any, sees the client gone."""
        log.warning(reason, extra={"client": self.client[0] if self.client else None, "status": status})
        cycle = self.cycle
        started = cycle is not None and not cycle.response_complete and cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not started:
            self.transport.write(_response(status, reason))
        self._reading_head = self._reading_body = False
        self._cancel_timers()
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._write_timer = None


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets sans-I/O protocol with the write deadline, releasing the count
    its HTTP connection took in the per-address cap."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: Guard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._write_timer: asyncio.TimerHandle | None = None
        # What uvicorn uses of an asyncio.Queue and an asyncio.Event, without their four
        # deques: 3 KiB of every idle socket (bench/RESULTS.md).
        self.queue = _Inbox(self.loop)  # type: ignore[assignment]
        self.writable = _Flag(self.loop)  # type: ignore[assignment]
        self.writable.set()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][TEXT_FRAMES] = self.write_text

    def start_keepalive(self) -> None:
        """Called once the handshake's response is written: the request and response
        objects are not needed after it. The websockets parser keeps the request for the
        socket's life, so its headers (a few KiB) are emptied; the scope has its own copy."""
        super().start_keepalive()
        self.request.headers.clear()
        self.request = self.response = None  # type: ignore[assignment]

    def write_text(self, payload: bytes) -> bool:
        """Write ``payload`` (UTF-8) as one text frame now, if the socket takes frames
        without waiting; ``False`` sends nothing, and the frame goes through ASGI ``send``.

        The frame is built here rather than by the websockets protocol object: a frame header
        and one transport write, where ``send`` costs a coroutine, an event wait and a frame
        object per token. Never compressed: chatgate does not negotiate permessage-deflate
        (``ws_per_message_deflate`` in :mod:`chatgate.app`)."""
        if (
            self.close_sent
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()  # the peer is gone; ASGI send says so
        ):
            return False
        size = len(payload)
        if size < 126:
            self.transport.write(bytes((0x81, size)) + payload)
        elif size < 65536:
            self.transport.write(b"\x81\x7e" + size.to_bytes(2, "big") + payload)
        else:
            self.transport.write(b"\x81\x7f" + size.to_bytes(8, "big") + payload)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(TEXT_FRAMES, None)  # the scope outlives the socket in the app
        super().connection_lost(exc)
        self.guard.release(self.client[0] if self.client else None)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.guard.limits.send_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.info(
            "client took nothing for the send timeout; WebSocket aborted",
            extra={"client": self.client[0] if self.client else None,
                   "send_timeout_s": self.guard.limits.send_timeout_s},
        )
        _reset(self.transport)


class _Inbox:
    """A WebSocket's received messages for its one reader, the application's ``receive``:
    ``put_nowait``, ``get`` and ``empty``, as uvicorn uses them of an :class:`asyncio.Queue`."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: list[Any] = []
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class _Flag:
    """Whether a socket takes writes: ``set``, ``clear``, ``is_set`` and ``wait``, as uvicorn
    uses them of an :class:`asyncio.Event`."""

    __slots__ = ("_loop", "_set", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = self._loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


def _set_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    sock = transport.get_extra_info("socket")
    if size and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:  # the socket may be gone already
            pass


def _reset(transport: asyncio.Transport) -> None:
    """Close at once, buffers and all. A plain close (even ``abort()``) leaves the kernel
    holding what it buffered, and the connection, for as long as the client does not read:
    with no lingering the kernel resets the connection instead."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        except OSError:
            pass
    transport.abort()


def guarded_server(settings: Settings) -> dict[str, Any]:
    """uvicorn options holding ``settings``' connection limits: the guarded protocols (as
    factories, which uvicorn takes for classes, and which a worker process receives
    pickled), the keep-alive timeout, and WebSocket frames no larger than the largest one
    a dialect accepts, so that nothing larger is ever buffered."""
    guard = Guard(ServerLimits.of(settings))
    return {
        "http": functools.partial(GuardedHttpProtocol, guard=guard),
        "ws": functools.partial(GuardedWebSocketProtocol, guard=guard),
        "ws_max_size": SizeLimits.of(settings).history_bytes,
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }
