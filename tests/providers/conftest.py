"""What the HTTP adapters' tests share: a pooled session, and reading a whole stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from chatgate.providers._http import new_session


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    client = new_session(connect_timeout_s=2, read_timeout_s=10)
    yield client
    await client.close()
