"""Who is calling, decided once per request by one middleware in front of every route.

**Keys on** (``CHATGATE_API_KEYS``): a caller presents a key in ``Authorization: Bearer``
or ``X-API-Key``. A browser's WebSocket, which cannot set headers, presents a ticket
(``?ticket=``, from ``POST /auth/ticket``: :mod:`chatgate.api.tickets`). ``?api_key=`` is
still taken on WebSocket handshakes, for clients written before tickets, and logged once as
such; on HTTP routes it counts for nothing. The owner recorded on conversations is a digest
of the key, never the key. Without a valid key only the public paths answer, and
``/health/ready`` then says no more than its status (:func:`authenticated`).

**Keys off**: programs are anonymous (owner ``None``) as they always were, and each browser
has an identity of its own in a signed cookie (owner ``anon-…``), so visitors do not see
each other's conversations. Only the page's browser is given one: on ``GET /``, on
requests its browser marks as the page's own (``Sec-Fetch-Site: same-origin``, Fetch
Metadata that every current browser sends and programs do not), and on WebSocket
handshakes from the page's own ``Origin`` (browsers send no Fetch Metadata there). A
program that keeps cookies would otherwise turn into someone else after its first
request, and a page of another origin, whose browser keeps no cookie for it, into someone
else at every request.

``api_key`` and ``ticket`` are taken out of the query string before anything else sees it,
so no log line (uvicorn's WebSocket lines print the URL) can carry them. Handlers read the
owner with :func:`caller`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.api.errors import error_response, shape_of
from chatgate.api.tickets import TicketBook
from chatgate.chat.events import ChatError
from chatgate.chat.service import ANONYMOUS_IDENTITY
from chatgate.config import Settings

log = logging.getLogger("chatgate.auth")

#: Paths that answer without a key when keys are on: the web page, where a user enters a
#: key, and its icon; the orchestrators' probes, which then give no details; Ollama's
#: version probe, a constant. ``CHATGATE_PUBLIC_PATHS`` opens more.
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/health/live", "/health/ready", "/api/version"})
#: Prefixes of public paths: the page's scripts, styles and images, which load before it has a key.
PUBLIC_PREFIXES = ("/assets/",)
#: The cookie that holds an anonymous browser's identity, and its owners' prefix.
IDENTITY_COOKIE = "chatgate_id"
ANONYMOUS_PREFIX = ANONYMOUS_IDENTITY
_IDENTITY_MAX_AGE_S = 400 * 86_400  # the longest browsers keep a cookie
#: Query parameters that carry credentials.
_IN_URL = ("api_key", "ticket")


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def hashed_key(key: str) -> str:
    """What a keys file may hold instead of ``key`` (``chatgate hash-key`` prints it)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def caller(connection: HTTPConnection) -> str | None:
    """The owner the middleware identified for this request; ``None`` when anonymous."""
    owner: str | None = connection.scope.get("state", {}).get("owner")
    return owner


def refusal(connection: HTTPConnection) -> ChatError | None:
    """Why a WebSocket handshake was not authenticated; its dialect says so to the client."""
    refused: ChatError | None = connection.scope.get("state", {}).get("refused")
    return refused


def authenticated(connection: HTTPConnection) -> bool:
    """Whether the caller may see what keys guard: keys are off, or it presented a valid one."""
    return bool(connection.scope.get("state", {}).get("authenticated"))


class KeySet:
    """The accepted keys, each held as its SHA-256 digest: ``sha256:HEX`` entries (a keys
    file that does not give the keys away) and plain keys are checked alike, every one of
    them, in constant time."""

    def __init__(self, entries: Iterable[str]) -> None:
        entries = list(entries)
        self._digests = tuple(
            bytes.fromhex(e[7:]) if e.startswith("sha256:") else hashlib.sha256(e.encode()).digest()
            for e in entries
        )
        #: The keys themselves, when every entry is one.
        self.plain: tuple[str, ...] | None = (
            tuple(sorted(entries)) if entries and not any(e.startswith("sha256:") for e in entries) else None
        )

    def __bool__(self) -> bool:
        return bool(self._digests)

    def owner(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).digest()
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return digest.hex()[:24] if matched else None


class Identities:
    """Anonymous browsers' identities: a random id and its HMAC, in a cookie."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def owner(self, cookie: str) -> str | None:
        identity, _, mac = cookie.partition(".")
        if identity and hmac.compare_digest(mac.encode(), self._mac(identity).encode()):
            return ANONYMOUS_PREFIX + identity
        return None

    def mint(self, *, secure: bool) -> tuple[str, bytes]:
        """A new identity: its owner and the ``Set-Cookie`` value that gives it to the browser."""
        identity = secrets.token_hex(12)
        cookie = (
            f"{IDENTITY_COOKIE}={identity}.{self._mac(identity)}; Path=/; Max-Age={_IDENTITY_MAX_AGE_S}; "
            f"HttpOnly; SameSite=Lax{'; Secure' if secure else ''}"
        )
        return ANONYMOUS_PREFIX + identity, cookie.encode()

    def _mac(self, identity: str) -> str:
        digest = hmac.new(self._secret, identity.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Access:
    """What the middleware checks callers against, built once from the settings."""

    keys: KeySet
    public_paths: frozenset[str]
    tickets: TicketBook
    identities: Identities

    @classmethod
    def of(cls, settings: Settings) -> Access:
        """Tickets are signed with ``CHATGATE_SECRET`` when set, else with a secret derived
        from the keys, which every instance configured with the same keys shares; a keys
        file of hashes gives none away, so then each process has a random one. Identity
        cookies are signed with ``CHATGATE_SECRET``, else a random secret of this start."""
        keys = KeySet(settings.api_key_set())
        configured = settings.secret.get_secret_value().encode()
        if configured:
            ticket_secret = _derive(configured, "ticket")
        elif keys.plain is not None:
            ticket_secret = _derive("\n".join(keys.plain).encode(), "ticket")
        else:
            ticket_secret = secrets.token_bytes(32)
        identity_secret = _derive(configured, "identity") if configured else secrets.token_bytes(32)
        return cls(keys, PUBLIC_PATHS | settings.public_path_set, TicketBook(ticket_secret), Identities(identity_secret))


def workers_need_a_secret(settings: Settings) -> bool:
    """Whether the processes of one ``serve --workers N`` must be handed a secret in common
    to accept each other's tickets and cookies: none is configured and none comes from the keys."""
    return not settings.secret.get_secret_value() and KeySet(settings.api_key_set()).plain is None


def ticket_for(request: HTTPConnection) -> dict[str, Any]:
    """``POST /auth/ticket``: a ticket for the key the request presented."""
    access: Access = request.app.state.access
    if not access.keys:
        raise ChatError("not_found", "API keys are off: a WebSocket needs no ticket")
    owner = caller(request)
    if owner is None:
        raise ChatError("unauthorized", "a valid API key is required")
    return {"ticket": access.tickets.issue(owner), "expires_in": access.tickets.ttl_s}


class Authentication:
    """Identify every HTTP request and WebSocket handshake; answer 401 (in the route's
    API shape) to an HTTP request without a valid key, except on public paths. A refused
    WebSocket is let through, marked: it is told in its own dialect and closed."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self._told_of_key_in_url = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        in_url = _take_credentials(scope)
        if not self.access.keys:
            state["authenticated"] = True
            send = self._recognise(scope, state, send)
        else:
            try:
                state["owner"] = await self._identify(scope, in_url)
                state["authenticated"] = True
            except ChatError as exc:
                state["owner"] = None
                if scope["type"] == "websocket":
                    state["refused"] = exc
                elif not self._public(scope["path"]):
                    await error_response(exc, shape_of(scope["path"]))(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _public(self, path: str) -> bool:
        return path in self.access.public_paths or path.startswith(PUBLIC_PREFIXES)

    async def _identify(self, scope: Scope, in_url: dict[str, str]) -> str:
        key = _header_key(Headers(scope=scope))
        if key is not None:
            return self._owner(key)
        if scope["type"] == "websocket":
            if "ticket" in in_url:
                return await self.access.tickets.redeem(in_url["ticket"], _redis_of(scope))
            if "api_key" in in_url:
                self._tell_of_key_in_url()
                return self._owner(in_url["api_key"])
        elif "api_key" in in_url:
            raise ChatError(
                "unauthorized",
                "a valid API key is required in the Authorization or X-API-Key header "
                "(?api_key= is taken on WebSocket handshakes only)",
            )
        raise ChatError("unauthorized", "a valid API key is required")

    def _owner(self, key: str) -> str:
        owner = self.access.keys.owner(key)
        if owner is None:
            raise ChatError("unauthorized", "a valid API key is required")
        return owner

    def _tell_of_key_in_url(self) -> None:
        if not self._told_of_key_in_url:
            self._told_of_key_in_url = True
            log.warning(
                "a WebSocket presented its API key in the URL (?api_key=), a compatibility path: "
                "URLs end up in proxy logs and browser history; browsers should connect with "
                "?ticket= from POST /auth/ticket (said once per process)"
            )

    def _recognise(self, scope: Scope, state: dict[str, Any], send: Send) -> Send:
        """Keys are off: a browser's identity, from its cookie or a new one."""
        cookie, own_page = _cookie_and_own_page(scope)
        identity = cookie_parser(cookie).get(IDENTITY_COOKIE) if cookie else None
        state["owner"] = self.access.identities.owner(identity) if identity else None
        page = scope["type"] == "http" and scope["path"] == "/" and scope["method"] == "GET"
        if state["owner"] is not None or not (own_page or page):
            return send
        state["owner"], set_cookie = self.access.identities.mint(secure=scope.get("scheme") in ("https", "wss"))
        return _adding_header(send, (b"set-cookie", set_cookie))


def _header_key(headers: Headers) -> str | None:
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return headers.get("x-api-key") or None


def _take_credentials(scope: Scope) -> dict[str, str]:
    """The credentials in the query string, which loses them: nothing after this
    middleware sees them, not even the server's log lines, which print the URL."""
    query: bytes = scope.get("query_string", b"")
    if b"api_key" not in query and b"ticket" not in query:
        return {}
    found: dict[str, str] = {}
    kept: list[bytes] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        decoded = unquote_plus(name.decode("latin-1"))
        if decoded in _IN_URL:
            found.setdefault(decoded, unquote_plus(value.decode("latin-1")))
        else:
            kept.append(part)
    scope["query_string"] = b"&".join(kept)
    return found


def _cookie_and_own_page(scope: Scope) -> tuple[str, bool]:
    """The request's cookies, and whether a browser sent it for a page of this origin (or
    for the user: ``Sec-Fetch-Site: none``, an address typed or bookmarked)."""
    cookies: list[str] = []
    site = origin = host = b""
    for name, value in scope["headers"]:
        if name == b"cookie":
            cookies.append(value.decode("latin-1"))
        elif name == b"sec-fetch-site":
            site = value
        elif name == b"origin":
            origin = value
        elif name == b"host":
            host = value
    if scope["type"] == "websocket":
        own = bool(host) and origin.partition(b"://")[2] == host
    else:
        own = site in (b"same-origin", b"none")
    return "; ".join(cookies), own


def _adding_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return sending


def _redis_of(scope: Scope) -> Any:
    gateway = getattr(scope["app"].state, "gateway", None)
    return gateway.redis if gateway is not None else None


def _derive(secret: bytes, purpose: str) -> bytes:
    return hmac.new(secret, f"chatgate {purpose}".encode(), hashlib.sha256).digest()
