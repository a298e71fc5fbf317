"""The browser boundary: what a web page on another site may make the gateway do.

A page a user visits can send requests to the gateway on their machine or network. Two
rules keep it out:

- **Host** (:class:`AllowedHosts`). A DNS-rebinding page (``evil.example`` first resolving
  to the attacker, then to ``127.0.0.1``) is, to the browser, same-origin with the gateway:
  it may read every answer. Its requests carry ``Host: evil.example``, so a request whose
  Host is not one the gateway serves is answered 400 before any route, HTTP and WebSocket
  handshake alike (Ollama fixed the same hole, CVE-2024-28224, the same way). Served are
  the loopback names, the address served on, the names in ``CHATGATE_ALLOWED_HOSTS``, and
  any IP address: rebinding needs a name, and a page can only send ``Host: 10.0.0.5`` to
  the address it was loaded from. With a wildcard or other non-loopback bind, also names
  no one can register in public DNS, which a page on the internet cannot rebind: this
  machine's host name, single-label names (a compose service, ``http://chatgate:8000``)
  and names under ``.local``, ``.internal`` and ``.home.arpa`` (a Kubernetes service's
  ``….svc.cluster.local``). Any port. ``*`` turns the check off.
- **JSON bodies** (:class:`JsonBodiesOnly`). A page may send another site a POST without
  asking first (no CORS preflight) only with a ``text/plain``, form or multipart body, or
  with no ``Content-Type`` at all (``fetch`` of a Blob or ArrayBuffer). Every POST, PUT and
  PATCH route of the gateway reads JSON, so a body not declared as JSON is answered 415,
  in the route's error shape, before anything reads it.

Browsers' WebSockets skip CORS altogether; :meth:`BrowserBoundary.allows_origin` is what
``api/ws.py`` asks about a handshake's ``Origin``. The same allowlist gives CORS its origins
(:meth:`BrowserBoundary.cors_options`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate.api.errors import error_response, shape_of
from chatgate.chat.events import ChatError

if TYPE_CHECKING:
    from chatgate.config import Settings

log = logging.getLogger("chatgate")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Bind addresses that listen on every interface.
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
#: Methods whose body a route reads; a body sent with them must be declared as JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Special-use domains (RFC 6762, RFC 8375, ICANN's .internal): not in public DNS.
PRIVATE_SUFFIXES = (".local", ".internal", ".home.arpa")
#: Distinct Host header values remembered with their verdict.
_VERDICTS_KEPT = 1024


@dataclass(frozen=True)
class BrowserBoundary:
    #: Host names and addresses served, exactly (lower case, IPv6 without brackets).
    names: frozenset[str]
    #: ``.example.com``: that domain's subdomains (the domain itself is in ``names``).
    suffixes: tuple[str, ...]
    #: ``CHATGATE_ALLOWED_HOSTS=*``: any Host is served.
    any_host: bool
    #: ``CHATGATE_CORS_ORIGINS``: full origins, or ``*``.
    origins: frozenset[str]
    #: Serve every name outside public DNS too (a non-loopback bind); as a Host only: a
    #: page from another machine's such name is another site.
    private_names: bool = False

    @classmethod
    def of(cls, bind: str, allowed: Sequence[str], origins: Sequence[str]) -> BrowserBoundary:
        names = set(LOOPBACK_NAMES)
        suffixes = [".localhost"]
        bind = bind.strip().lower().removeprefix("[").removesuffix("]")
        if bind not in WILDCARD_BINDS:
            names.add(bind)
        if not is_loopback(bind):
            names.update(machine_names())
        for entry in allowed:
            if entry == "*":
                continue
            domain = entry.removeprefix("*").removeprefix(".")
            names.add(domain)
            if entry.startswith((".", "*.")):
                suffixes.append("." + domain)
        return cls(
            frozenset(names), tuple(suffixes), "*" in allowed, frozenset(origins), not is_loopback(bind)
        )

    def allows_host(self, host: str) -> bool:
        """``host`` as :func:`host_of` gives it."""
        return (
            self.any_host
            or self._named(host)
            or _is_address(host)
            or (self.private_names and bool(host) and ("." not in host or host.endswith(PRIVATE_SUFFIXES)))
        )

    def allows_origin(self, origin: str, host_header: str) -> bool:
        """A browser's ``Origin``: the page's own (the request's Host, once that passed the
        Host check), a page of a served name or loopback address on any port, over http or
        https, or one of ``CHATGATE_CORS_ORIGINS``. Not every IP address: a page from
        another machine is another site."""
        if "*" in self.origins or origin in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            name = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False
        return parts.netloc.lower() == host_header.lower() or self._named(name.removesuffix("."))

    def cors_options(self) -> dict[str, Any]:
        """CORSMiddleware's arguments: the configured origins, and the served names' pages."""
        hosts = [re.escape(f"[{n}]" if ":" in n else n) for n in sorted(self.names)]
        hosts += [r"(?:[a-z0-9_-]+\.)+" + re.escape(s[1:]) for s in self.suffixes]
        return {
            "allow_origins": sorted(self.origins),
            "allow_origin_regex": rf"(?i)https?://(?:{'|'.join(hosts)})(?::[0-9]{{1,5}})?",
            "allow_methods": ["*"],
            "allow_headers": ["*"],
            "expose_headers": ["X-Conversation-Id"],
        }

    def describe(self) -> str:
        names = ", ".join(sorted(self.names, key=lambda n: (n not in LOOPBACK_NAMES, n)))
        subdomains = "".join(f", *{s}" for s in self.suffixes)
        private = ", single-label names, *.local, *.internal, *.home.arpa" if self.private_names else ""
        return "any" if self.any_host else f"{names}{subdomains}{private} and any IP address"

    def _named(self, name: str) -> bool:
        return name in self.names or name.endswith(self.suffixes)


def boundary_of(settings: Settings) -> BrowserBoundary:
    """The boundary ``settings`` describe; made once per distinct setting."""
    return _boundary(settings.host, tuple(settings.allowed_host_list), tuple(settings.cors_origin_list))


@functools.lru_cache(maxsize=16)
def _boundary(bind: str, allowed: tuple[str, ...], origins: tuple[str, ...]) -> BrowserBoundary:
    return BrowserBoundary.of(bind, allowed, origins)


def host_of(header: str) -> str:
    """The host of a Host header: lower case, without port, IPv6 brackets or trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def machine_names() -> set[str]:
    """This machine's host name, short and as given, and its mDNS name (``name.local``),
    from the kernel: no DNS lookup at start-up."""
    full = socket.gethostname().lower().removesuffix(".")
    if not full:
        return set()
    short = full.partition(".")[0]
    return {full, short, f"{short}.local"}


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """Answer 400, in the route's error shape, to an HTTP request or WebSocket handshake
    whose Host the gateway does not serve (see the module docstring). A request with no
    Host at all (HTTP/1.0) is served: browsers always send one."""

    def __init__(self, app: ASGIApp, boundary: BrowserBoundary) -> None:
        self.app = app
        self.boundary = boundary
        #: Host header value -> served: one dict lookup per request after the first.
        self._verdicts: dict[bytes, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.boundary.any_host:
            header = next((value for name, value in scope["headers"] if name == b"host"), None)
            if header is not None and not self._serves(header):
                await self._refuse(header, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _serves(self, header: bytes) -> bool:
        verdict = self._verdicts.get(header)
        if verdict is None:
            verdict = self.boundary.allows_host(host_of(header.decode("latin-1")))
            if len(self._verdicts) >= _VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[header] = verdict
        return verdict

    @staticmethod
    async def _refuse(header: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        host = host_of(header.decode("latin-1"))[:100]
        refused = ChatError(
            "bad_request",
            f"this gateway does not serve the host {host!r}; its operator can add it to "
            "CHATGATE_ALLOWED_HOSTS (a guard against DNS rebinding)",
        )
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; the answer is an HTTP response, not a 101
        await error_response(refused, shape_of(scope["path"]))(scope, receive, send)


def is_json(content_type: bytes | None) -> bool:
    """``application/json`` or ``application/*+json`` (RFC 6839), any parameters."""
    if content_type is None:
        return False
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class JsonBodiesOnly:
    """Answer 415, in the route's error shape, to a POST, PUT or PATCH whose body is not
    declared as JSON (see the module docstring). Requests without a body pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            content_type: bytes | None = None
            has_body = False
            for name, value in scope["headers"]:
                if name == b"content-type" and content_type is None:
                    content_type = value
                elif name == b"content-length":
                    has_body = value.strip() != b"0"
                elif name == b"transfer-encoding":
                    has_body = True
            if has_body and not is_json(content_type):
                given = f"not {content_type.decode('latin-1')[:100]!r}" if content_type else "none was given"
                refused = ChatError(
                    "bad_request",
                    f"the body must be JSON sent with Content-Type: application/json ({given}); "
                    "with curl: --json BODY, or -H 'Content-Type: application/json' -d BODY",
                )
                await error_response(refused, shape_of(scope["path"]), status=415)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def log_exposure(settings: Settings) -> None:
    """At start-up: the Host names served, and a warning when the gateway listens beyond
    this machine with no API keys."""
    boundary = boundary_of(settings)
    log.info(
        f"serving Host names: {boundary.describe()}; "
        "add one with CHATGATE_ALLOWED_HOSTS=name (a comma list; .example.com for its subdomains too)",
        extra={"allowed_hosts": sorted(boundary.names), "any_host": boundary.any_host},
    )
    bind = settings.host.strip().lower().removeprefix("[").removesuffix("]")
    if not is_loopback(bind) and not settings.api_key_set():
        log.warning(
            f"listening on {settings.host or '*'}, beyond this machine, with no API keys: anyone who "
            "can reach the port may use the model and read every conversation; set CHATGATE_API_KEYS",
            extra={"host": settings.host},
        )
