"""What the HTTP adapters share: the pooled session and the aiohttp-to-ProviderError edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson

from chatgate.providers.base import (
    ProviderError,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
)

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def new_session(*, connect_timeout_s: float, read_timeout_s: float) -> aiohttp.ClientSession:
    """One pooled session per upstream. ``read_timeout_s`` bounds the gap between two
    reads, not the whole answer, so a long generation is never cut off while it streams."""
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
    )
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        auto_decompress=True,
        trust_env=False,
    )


@asynccontextmanager
async def upstream_errors(provider: str, model: str, url: str) -> AsyncIterator[None]:
    """Translate aiohttp's failures into the provider error tree (see providers/base.py)."""
    try:
        yield
    except ProviderError:
        raise
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc)
        raise ProviderUnavailable(
            f"{provider} is not reachable at {url}: {reason}", provider=provider, model=model
        ) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise ProviderTimeout(
            f"{provider} did not answer in time ({url})", provider=provider, model=model
        ) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise ProviderStreamError(
            f"{provider} closed the connection mid-answer: {exc}", provider=provider, model=model
        ) from exc
    except aiohttp.ClientError as exc:
        raise ProviderError(f"{provider} request failed: {exc}", provider=provider, model=model) from exc


def error_text(body: bytes) -> str:
    """The human part of an upstream error body, in Ollama's or OpenAI's shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500] or "no detail"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]
