"""One terminal's connection to the gateway: the native WebSocket protocol on ``/ws``,
with HTTP beside it for what the socket does not carry (tickets, history, agents).

A dropped socket is reconnected with backoff and the running answer resumed after the
last delta seen, so no text arrives twice. Every failure is a :class:`ClientError`
carrying the exit code it ends the command with.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect


class Exit(enum.IntEnum):
    """``chatgate chat``'s exit codes (its ``--help`` and the README list them)."""

    OK = 0
    USAGE = 2
    UNREACHABLE = 3
    UNAUTHORIZED = 4
    RATE_LIMITED = 5
    ANSWER_FAILED = 6
    INTERRUPTED = 130


class ClientError(Exception):
    """What went wrong, in one line, and the exit code it means."""

    def __init__(self, exit_code: Exit, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


#: The gateway's error codes by the exit code each ends the command with.
_EXIT_OF_CODE: dict[str, Exit] = {
    "unauthorized": Exit.UNAUTHORIZED,
    "forbidden": Exit.UNAUTHORIZED,
    "rate_limited": Exit.RATE_LIMITED,
    "bad_request": Exit.USAGE,
    "too_large": Exit.USAGE,
    "not_found": Exit.USAGE,
}
#: Seconds between reconnection attempts; after the last one the gateway counts as gone.
#: Together they stay well inside the gateway's default resume grace period (30 s).
RECONNECT_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0)
#: How long a stopped answer may take to say it has ended.
CANCEL_WAIT_S = 5.0
#: How long the gateway may take to answer a command that is not an answer (ping, clear).
REPLY_WAIT_S = 10.0
_POLL_S = 0.1
#: The close code of a socket the gateway refused (no valid key or ticket, an origin).
POLICY_VIOLATION = 1008


def error_from(code: str, message: str, retry_after: float | None = None) -> ClientError:
    """A gateway error (a frame's or an HTTP body's) as the line and exit code the user sees."""
    exit_code = _EXIT_OF_CODE.get(code, Exit.ANSWER_FAILED)
    if exit_code is Exit.UNAUTHORIZED:
        return ClientError(exit_code, f"unauthorized: {message}; set --key or CHATGATE_API_KEY")
    if exit_code is Exit.RATE_LIMITED:
        wait = f" (retry after {retry_after:g} s)" if retry_after is not None else ""
        return ClientError(exit_code, f"rate limited: {message}{wait}")
    return ClientError(exit_code, f"{code}: {message}")


@dataclass
class Answer:
    conversation_id: str | None
    model: str | None
    finish_reason: str


@dataclass(frozen=True)
class Target:
    """Where the gateway is and how that was decided (said when it cannot be reached)."""

    url: str
    source: str

    @property
    def ws_url(self) -> str:
        scheme, rest = self.url.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws"

    def unreachable(self, why: str) -> ClientError:
        return ClientError(Exit.UNREACHABLE, f"cannot reach the gateway at {self.url} ({self.source}): {why}")


class Session:
    """The socket and the HTTP client, both authenticated with the same key."""

    def __init__(self, target: Target, key: str | None) -> None:
        self.target = target
        self.key = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=target.url, headers=headers, timeout=httpx.Timeout(10.0))
        self._socket: ClientConnection | None = None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self.http.close()

    # --- the socket ---------------------------------------------------------------------

    def connect(self) -> None:
        """Open the socket and check it is let in (a refused one is told, then closed)."""
        url = self.target.ws_url
        ticket = self._ticket()
        if ticket is not None:
            url += "?ticket=" + quote(ticket)
        try:
            self._socket = connect(url, open_timeout=10, close_timeout=2)
        except InvalidStatus as exc:
            raise self._refused(exc.response.status_code, bytes(exc.response.body or b"")) from None
        except InvalidURI as exc:
            raise ClientError(Exit.USAGE, f"not a gateway URL: {self.target.url} ({exc})") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise self.target.unreachable(_reason(exc)) from None
        with suppress(ConnectionClosed):  # refused: the reason is the frame already sent
            self._send({"type": "ping"})
        self._wait_for(lambda frame: frame.get("type") == "pong")

    def _ticket(self) -> str | None:
        """With a key, a single-use ticket for the socket; ``None`` when keys are off."""
        if not self.key:
            return None
        with self._http("POST", "/auth/ticket") as response:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise self._refused(response.status_code, response.content, response.headers.get("retry-after"))
            ticket: str = response.json()["ticket"]
            return ticket

    def _reconnect(self, interrupted: Callable[[], bool]) -> bool:
        """Connect again with backoff; ``False`` if the user stopped waiting."""
        last: ClientError | None = None
        for delay in RECONNECT_DELAYS_S:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if interrupted():
                    return False
                time.sleep(_POLL_S)  # the pause between attempts, interruptible by Ctrl-C
            try:
                self.connect()
                return True
            except ClientError as exc:
                if exc.exit_code is not Exit.UNREACHABLE:
                    raise
                last = exc
        assert last is not None
        raise ClientError(Exit.UNREACHABLE, f"lost the connection and could not reconnect: {last.message}")

    def _send(self, frame: dict[str, Any]) -> None:
        assert self._socket is not None
        self._socket.send(orjson.dumps(frame).decode())

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The next frame, or ``None`` after ``timeout``; ConnectionClosed when it dropped."""
        assert self._socket is not None
        try:
            raw = self._socket.recv(timeout=timeout)
        except TimeoutError:
            return None
        frame: dict[str, Any] = orjson.loads(raw)
        if frame.get("type") == "error" and "id" not in frame:
            raise error_from(frame.get("code", "internal"), frame.get("message", ""))
        return frame

    def _wait_for(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + REPLY_WAIT_S
        while time.monotonic() < deadline:
            try:
                frame = self._receive(_POLL_S)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == POLICY_VIOLATION:
                    raise error_from("unauthorized", exc.rcvd.reason) from None
                raise self.target.unreachable(f"the connection closed ({exc.rcvd or 'no close frame'})") from None
            if frame is not None and wanted(frame):
                return frame
        raise self.target.unreachable(f"no reply within {REPLY_WAIT_S:g} s")

    def ask(
        self,
        message: str,
        *,
        conversation_id: str | None,
        agent: str | None,
        model: str | None,
        on_start: Callable[[dict[str, Any]], None],
        on_text: Callable[[str], None],
        interrupted: Callable[[], bool],
    ) -> Answer:
        """Send one turn and stream its answer; once ``interrupted()`` turns true the
        answer is cancelled on the gateway and what came so far is kept."""
        request_id = uuid.uuid4().hex
        frame: dict[str, Any] = {"type": "chat", "id": request_id, "message": message}
        for name, value in (("conversation_id", conversation_id), ("agent", agent), ("model", model)):
            if value is not None:
                frame[name] = value
        answer = Answer(conversation_id, model, "stop")
        started = False
        last_seq = 0
        cancel_deadline: float | None = None
        pending: dict[str, Any] | None = frame
        while True:
            if interrupted() and cancel_deadline is None:
                if pending is frame:  # the gateway never saw the turn
                    answer.finish_reason = "cancelled"
                    return answer
                cancel_deadline = time.monotonic() + CANCEL_WAIT_S
                pending = {"type": "cancel", "id": request_id}
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                answer.finish_reason = "cancelled"
                return answer
            try:
                if pending is not None:
                    self._send(pending)
                    pending = None
                event = self._receive(_POLL_S)
            except ConnectionClosed:
                if cancel_deadline is not None or not self._reconnect(interrupted):
                    answer.finish_reason = "cancelled"
                    return answer
                pending = {"type": "resume", "id": request_id, "after": last_seq} if started else frame
                continue
            if event is None or event.get("id") != request_id:
                continue
            kind = event.get("type")
            if kind == "start":
                started = True
                answer.conversation_id = event["conversation_id"]
                answer.model = event.get("model")
                on_start(event)
            elif kind == "delta" and event["seq"] > last_seq:
                last_seq = event["seq"]
                on_text(event["text"])
            elif kind == "done":
                answer.finish_reason = event["finish_reason"]
                return answer
            elif kind == "error":
                if cancel_deadline is not None and event.get("code") == "not_found":
                    answer.finish_reason = "cancelled"  # it ended before the cancel arrived
                    return answer
                raise error_from(event.get("code", "internal"), event.get("message", ""), event.get("retry_after"))

    def clear_history(self, conversation_id: str) -> None:
        frame = {"type": "clear_history", "conversation_id": conversation_id}
        try:
            self._send(frame)
        except ConnectionClosed:  # dropped while the prompt waited
            self._reconnect(lambda: False)
            self._send(frame)
        frame = self._wait_for(lambda f: f.get("type") in ("history_cleared", "error"))
        if frame["type"] == "error":
            raise error_from(frame.get("code", "internal"), frame.get("message", ""))

    # --- HTTP ---------------------------------------------------------------------------

    def history(self, conversation_id: str) -> list[dict[str, Any]]:
        with self._http("GET", f"/conversations/{quote(conversation_id, safe='')}") as response:
            self._check(response)
            messages: list[dict[str, Any]] = response.json()["messages"]
            return messages

    def agents(self) -> list[str]:
        with self._http("GET", "/agents") as response:
            self._check(response)
            names: list[str] = response.json()["agents"]
            return names

    @contextmanager
    def _http(self, method: str, path: str) -> Iterator[httpx.Response]:
        try:
            response = self.http.request(method, path)
        except httpx.HTTPError as exc:
            raise self.target.unreachable(_reason(exc)) from None
        yield response

    def _check(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise self._refused(response.status_code, response.content, response.headers.get("retry-after"))

    def _refused(self, status: int, body: bytes, retry_after: str | None = None) -> ClientError:
        """An HTTP refusal (of a request or of the socket's handshake) as a ClientError."""
        try:
            parsed = orjson.loads(body)
            detail, code = str(parsed.get("detail")), str(parsed.get("code"))
        except (orjson.JSONDecodeError, AttributeError):
            detail, code = f"HTTP {status}", ""
        if status == 401:
            return error_from("unauthorized", detail)
        if status == 429:
            return error_from("rate_limited", detail, float(retry_after) if retry_after else None)
        if code in _EXIT_OF_CODE or status == 502:
            return error_from(code or "provider_error", detail)
        return self.target.unreachable(f"HTTP {status} from {self.target.url}: is it a chatgate gateway?")


def _reason(exc: BaseException) -> str:
    """An exception as a few words: the OS's reason when there is one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        if isinstance(exc, OSError) and exc.strerror:
            break
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
