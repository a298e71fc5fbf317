"""The least a Python process can do per streamed token: a reference, not a gateway.

It speaks just enough of chatgate's ``/ws`` to serve the bench's stream clients: a
WebSocket handshake, then for each ``chat`` frame one POST to an Ollama ``/api/chat``
upstream, each NDJSON token relayed at once as a ``delta`` frame, then ``done``. No
framework, no HTTP client library, no log of events, no auth, storage or limits: raw
asyncio protocols on uvloop, httptools for the upstream's chunked body, frames built by
hand. What it costs per token on a machine is a floor for any Python gateway there;
bench/RESULTS.md sets chatgate's figures beside it.

    python bench/bare_relay.py --upstream http://127.0.0.1:PORT [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
DONE_FRAME = b'{"type":"done"}'


def text_frame(payload: bytes) -> bytes:
    """An unmasked server text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2) + payload
    return bytes((0x81, 127)) + size.to_bytes(8) + payload


class Upstream(asyncio.Protocol):
    """One streamed ``POST /api/chat``; each token becomes a delta frame on ``client``."""

    def __init__(self, client: Client, host: str, body: bytes) -> None:
        self.client = client
        self.request = (
            b"POST /api/chat HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        self.parser = httptools.HttpResponseParser(self)
        self.partial = b""
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.fail("the upstream's answer is not HTTP")

    def on_body(self, body: bytes) -> None:
        *lines, self.partial = (self.partial + body).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            data = orjson.loads(line)
            if data.get("done"):
                self.finished = True
                self.client.send(DONE_FRAME)
                assert self.transport is not None
                self.transport.close()
                return
            self.client.send(orjson.dumps({"type": "delta", "text": data["message"]["content"]}))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.client.fail("the upstream closed mid-answer")


class Client(asyncio.Protocol):
    """One browser-side WebSocket."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(text_frame(payload))

    def fail(self, message: str) -> None:
        self.send(orjson.dumps({"type": "error", "code": "upstream", "message": message}))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")), None)
            if key is None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.upgraded, self.buffer = True, rest
        self._read_frames()

    def _read_frames(self) -> None:
        """Client frames are masked (RFC 6455 section 5.3)."""
        while len(self.buffer) >= 6:
            opcode, size, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(self.buffer[2:4]), 4
            elif size == 127:
                size, start = int.from_bytes(self.buffer[2:10]), 10
            if len(self.buffer) < start + 4 + size:
                return
            mask = self.buffer[start:start + 4]
            masked = self.buffer[start + 4:start + 4 + size]
            self.buffer = self.buffer[start + 4 + size:]
            payload = (int.from_bytes(masked) ^ int.from_bytes((mask * (size // 4 + 1))[:size])).to_bytes(size)
            if opcode == 0x1:
                self._chat(payload)
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
                return

    def _chat(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        body = orjson.dumps({"model": frame.get("model") or "fake-model", "stream": True,
                             "messages": [{"role": "user", "content": frame.get("message", "")}]})
        host, port = self.upstream
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: Upstream(self, f"{host}:{port}", body), host, port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        if task.exception() is not None:
            self.fail(f"the upstream is not reachable: {task.exception()}")


async def serve(upstream: str, host: str, port: int) -> None:
    parts = urlsplit(upstream)
    target = (parts.hostname or "127.0.0.1", parts.port or 80)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(target), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"bare relay listening on http://{bound[0]}:{bound[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="an Ollama-style server, e.g. chatgate fake-llm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
