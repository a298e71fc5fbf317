"""Tickets: how a browser's WebSocket proves who it is without putting a key in its URL.

A browser cannot set headers on a WebSocket handshake, and a key in the URL ends up in
proxy logs and browser history for as long as the key lives. So the page asks
``POST /auth/ticket`` (the key in a header) for a ticket and connects with ``?ticket=``.
A ticket names the key's owner, lives ``TICKET_TTL_S`` seconds and is taken once: a copy
that a log kept is worth nothing.

A ticket is ``OWNER.EXPIRES.ID.MAC``: the MAC is an HMAC-SHA256 of the rest, so any
process with the same secret checks it without asking anyone (:meth:`chatgate.api.auth.Access.of`
says which secret). The owner is sealed (XORed with an HMAC of the ticket's random id): it
is a digest of the key, and a ticket a log kept must not let anyone try guesses at a weak
key offline. That a ticket was used is remembered until it expires: in Redis
(``SET NX`` of its id) when the store is Redis, so a ticket works once across every
instance, else in this process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from chatgate.chat.events import ChatError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

#: How long a ticket may wait for its handshake: the page asks for one just before it connects.
TICKET_TTL_S = 30
_REDIS_KEY = "chatgate:ticket:"


class TicketBook:
    """Issues tickets and takes each one once. ``clock`` is wall time (tickets cross processes)."""

    def __init__(self, secret: bytes, *, ttl_s: int = TICKET_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self.clock = clock
        #: Ids taken in this process (without Redis), with their expiry, oldest first.
        self._taken: dict[str, int] = {}

    def issue(self, owner: str) -> str:
        expires = math.ceil(self.clock()) + self.ttl_s
        ticket_id = secrets.token_urlsafe(12)
        payload = f"{_encode(self._seal(owner.encode(), ticket_id))}.{expires}.{ticket_id}"
        return f"{payload}.{_encode(self._mac(payload))}"

    async def redeem(self, ticket: str, redis: aioredis.Redis | None) -> str:
        """The owner ``ticket`` names, if it is genuine, unexpired and not used before;
        else :class:`ChatError` ``unauthorized``."""
        parts = ticket.split(".")
        if (
            len(parts) != 4
            or not (parts[1].isascii() and parts[1].isdigit())
            or not hmac.compare_digest(parts[3].encode(), _encode(self._mac(".".join(parts[:3]))).encode())
        ):
            raise ChatError("unauthorized", "the ticket is not valid")
        expires, ticket_id = int(parts[1]), parts[2]
        try:  # only a holder of the secret gets here with a malformed owner
            owner = self._seal(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)), ticket_id).decode()
        except ValueError:
            raise ChatError("unauthorized", "the ticket is not valid") from None
        if expires < self.clock():
            raise ChatError("unauthorized", "the ticket has expired; ask POST /auth/ticket for another")
        first = await self._take_shared(ticket_id, expires, redis) if redis is not None else self._take(ticket_id, expires)
        if not first:
            raise ChatError("unauthorized", "the ticket was already used; ask POST /auth/ticket for another")
        return owner

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, b"mac\0" + payload.encode(), hashlib.sha256).digest()

    def _seal(self, data: bytes, ticket_id: str) -> bytes:
        """``data`` XOR a pad made for this ticket alone: sealing twice gives ``data`` back."""
        pad = hmac.new(self._secret, b"owner\0" + ticket_id.encode(), hashlib.sha256).digest()
        if len(data) > len(pad):
            raise ValueError("an owner id is at most 32 bytes")
        return bytes(a ^ b for a, b in zip(data, pad, strict=False))

    def _take(self, ticket_id: str, expires: int) -> bool:
        now = self.clock()
        while self._taken and next(iter(self._taken.values())) < now:
            del self._taken[next(iter(self._taken))]
        if ticket_id in self._taken:
            return False
        self._taken[ticket_id] = expires
        return True

    async def _take_shared(self, ticket_id: str, expires: int, redis: aioredis.Redis) -> bool:
        keep_s = max(1, math.ceil(expires - self.clock()) + 1)
        try:
            return bool(await redis.set(_REDIS_KEY + ticket_id, b"1", nx=True, ex=keep_s))
        except (RedisError, OSError) as exc:
            # Taken here alone, a ticket could be used once on every instance: refuse instead.
            raise ChatError(
                "internal", "tickets cannot be checked right now; try again", retryable=True
            ) from exc


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
