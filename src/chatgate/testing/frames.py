"""A WebSocket client's side of the native protocol, for tests: JSON frames in and out,
each receive bounded in time."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

Frame = dict[str, Any]


async def recv(ws: ClientConnection, within_s: float = 10) -> Frame:
    frame: Frame = orjson.loads(await asyncio.wait_for(ws.recv(), within_s))
    return frame


async def send(ws: ClientConnection, frame: Frame) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def until(ws: ClientConnection, *types: str, within_s: float = 10) -> tuple[Frame, list[Frame]]:
    """Receive until a frame of one of ``types``; return it and every frame before it."""
    seen: list[Frame] = []
    while True:
        frame = await recv(ws, within_s)
        if frame["type"] in types:
            return frame, seen
        seen.append(frame)
