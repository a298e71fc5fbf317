"""Raw-socket clients for tests of what a misbehaving client can do to a server: send a
request head or body as large or as slowly as it likes, frame a WebSocket message by
hand, or stop reading. Every wait is bounded; nothing sleeps but a dribbling client
between two bytes, and it waits for the server's answer while it does."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from urllib.parse import urlsplit

#: ``tcp_info.tcpi_state`` of a connection that neither end has closed (Linux).
ESTABLISHED = 1


def connect(url: str, *, receive_buffer: int | None = None) -> socket.socket:
    """A TCP connection to ``url``'s host and port. ``receive_buffer``: a small kernel
    receive buffer, set before connecting, so that a client that does not read fills it
    (and the server's buffers behind it) quickly."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    return sock


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of the connection: :data:`ESTABLISHED` until the peer closes
    (a FIN makes it CLOSE_WAIT, a reset CLOSE), read without reading any data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def request_head(method: str, path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, *, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or resets it); raises
    TimeoutError if it is still open after ``within_s``."""
    deadline = time.monotonic() + within_s
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"connection still open after {within_s} s; received {bytes(received[:200])!r}")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(received)
        except TimeoutError:
            continue
        if not data:
            return bytes(received)
        received += data


def send_until_refused(sock: socket.socket, total: int, *, chunk: int = 1 << 20, within_s: float = 30) -> int:
    """Send up to ``total`` bytes of ``a``; how many went out before the server stopped
    taking them (it closed or reset the connection, or took nothing for ``within_s``)."""
    block = b"a" * chunk
    sent = 0
    sock.settimeout(within_s)
    try:
        while sent < total:
            sent += sock.send(block[: min(chunk, total - sent)])
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    return sent


def dribble(sock: socket.socket, data: bytes, *, gap_s: float, within_s: float) -> tuple[bytes, float]:
    """Send ``data`` one byte at a time, ``gap_s`` apart, until the server answers or
    closes; the answer and how long after the first byte it came. Raises TimeoutError if
    the server has said nothing after ``within_s`` (or after the last byte)."""
    start = time.monotonic()
    for i in range(len(data)):
        try:
            sock.send(data[i : i + 1])
        except (ConnectionResetError, BrokenPipeError):
            return b"", time.monotonic() - start
        sock.settimeout(gap_s)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            if time.monotonic() - start > within_s:
                break
            continue
        except ConnectionResetError:
            answer = b""
        return answer, time.monotonic() - start
    raise TimeoutError(f"the server said nothing for {time.monotonic() - start:.1f} s of dribbling")


def websocket_handshake(sock: socket.socket, host: str, path: str) -> bytes:
    """Upgrade the connection to a WebSocket; the server's response head."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        request_head(
            "GET", path, host,
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"},
        )
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return head


def frame_header(length: int, *, opcode: int = 0x1) -> bytes:
    """A client's (masked, all-zero mask) final frame header for ``length`` payload bytes:
    the payload may then be sent as it is."""
    first = bytes([0x80 | opcode])
    if length < 126:
        return first + bytes([0x80 | length]) + b"\0\0\0\0"
    if length < 1 << 16:
        return first + bytes([0x80 | 126]) + struct.pack(">H", length) + b"\0\0\0\0"
    return first + bytes([0x80 | 127]) + struct.pack(">Q", length) + b"\0\0\0\0"


def text_frame(text: str) -> bytes:
    payload = text.encode()
    return frame_header(len(payload)) + payload
