"""A generation as an HTTP response, for every HTTP API.

Three ways to consume a turn, each racing the client's disconnect (which cancels the
generation; the chat service keeps the partial answer):

- :func:`first_outcome` waits for the first delta or the end, so that a failure before
  any text is still an HTTP error status, not a 200 with an error inside;
- :class:`GenerationResponse` then streams the rest through the runner WebSockets use
  (:mod:`chatgate.api.delivery`), encoded by the API's codec: plain text, SSE, OpenAI
  chunks or Ollama lines. A client that stops reading is given up after the runner's
  send timeout and its generation cancelled, rather than buffered for;
- :func:`run_to_end` waits for the whole answer, for non-streaming requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatgate.api.delivery import Follower, Outbox
from chatgate.chat.events import DoneEvent, ErrorEvent, Event
from chatgate.chat.generation import Generation

#: Encodes one native event for an HTTP API; ``b""`` sends nothing for it.
Codec = Callable[[Event], bytes]


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def first_outcome(receive: Receive, generation: Generation) -> tuple[int, Event]:
    """The first delta, ``done`` or ``error``, and the log index just after it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, generation))
    try:
        index = 0
        async for event in generation.events():
            index += 1
            if event["type"] != "start":
                return index, event
    finally:
        watcher.cancel()
    raise RuntimeError("generation ended without a terminal event")  # pragma: no cover


async def run_to_end(receive: Receive, generation: Generation) -> DoneEvent | ErrorEvent:
    """The generation's ``done`` or ``error``, once the whole answer is there."""
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, generation))
    try:
        await generation.wait_finished()
    finally:
        watcher.cancel()
    end = generation.log[-1]
    assert end["type"] == "done" or end["type"] == "error"
    return end


class GenerationResponse(Response):
    """Streams ``generation``'s log from ``index`` on, after the ``leading`` events,
    each encoded by ``codec``; ends with the generation's ``done`` or ``error``."""

    def __init__(
        self,
        generation: Generation,
        codec: Codec,
        media_type: str,
        *,
        leading: list[Event],
        index: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # No body is set, so no Content-Length: the answer goes out chunked.
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.generation = generation
        self.codec = codec
        self.leading = leading
        self.index = index

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        def deliver(event: Event, generation: Generation | None = None) -> None:
            last = event["type"] in ("done", "error")
            body = self.codec(event)
            if body or last:
                # The end of the body goes with the last event, not a loop turn later: a
                # client waits for it before it sends its next request.
                outbox.write({"type": "http.response.body", "body": body, "more_body": not last})
            if last:
                follower.finish()

        def stuck() -> None:
            self.generation.cancel()  # not reading: its partial answer is kept
            follower.finish()

        outbox = Outbox(send, on_drained=lambda: follower.resume(), on_stuck=stuck)
        follower = Follower(outbox, deliver)
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.generation))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for event in self.leading:
                deliver(event)
            if self.leading[-1]["type"] not in ("done", "error"):
                follower.follow(self.generation, index=self.index)
                await follower.run()
        except OSError:
            self.generation.cancel()
        finally:
            watcher.cancel()
            follower.stop()
            outbox.close()
