"""Who is calling: an API key from ``Authorization: Bearer``, ``X-API-Key`` or (for
browsers' WebSockets, which cannot set headers) the ``api_key`` query parameter.

The owner recorded on conversations is a digest of the key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection

from chatgate.chat.events import ChatError


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Authenticator:
    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, conn: HTTPConnection) -> str | None:
        """The caller's owner id, ``None`` when auth is off; raises 401 otherwise."""
        if not self._keys:
            return None
        key = _presented_key(conn)
        if key is not None and any(hmac.compare_digest(key, k) for k in self._keys):
            return owner_of(key)
        raise ChatError("unauthorized", "a valid API key is required", status=401)


def _presented_key(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return conn.headers.get("x-api-key") or conn.query_params.get("api_key")
