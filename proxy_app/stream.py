"""Relaying a streamed completion, and the one watcher for clients that leave.

Both forwarding paths, streamed and not, wait on vLLM under one ``ClientWatch``: when the
client closes its connection, the waiting task is cancelled, the connection to vLLM is
dropped (that is how vLLM learns to stop generating) and the caller charges what was used.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from prometheus_client import Histogram

from .apis import Api, anthropic_error_body
from .asgi import Receive, Send
from .errors import ApiError
from .framing import ClientLost
from .outcome import Outcome, Tokens
from .sse import SseScanner
from .upstream import UpstreamResponse

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx must not buffer the stream either.
    (b"x-accel-buffering", b"no"),
]


class ClientWatch:
    """Cancels the current task when its client disconnects; ``gone`` then says so.

    The gateway's own HTTP protocol reports the client leaving at once (``ClientLost``, from
    its ``connection_lost``), at no cost per request. Served by another ASGI server, the
    watch reads ``receive`` in a task instead. Close the watch before the response's last
    message: once a response is complete, the server reports the connection as gone.
    """

    __slots__ = ("_lost", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive, lost: ClientLost | None) -> None:
        self._task = asyncio.current_task()
        self._lost = lost
        self._watcher: asyncio.Future[None] | None = None
        self.gone = False
        if lost is not None:
            lost.call(self._left)
        else:
            self._watcher = asyncio.ensure_future(self._watch(receive))

    def _left(self) -> None:
        self.gone = True
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._left()

    def close(self) -> None:
        """Stop watching."""
        if self._lost is not None:
            self._lost.call(None)
        if self._watcher is not None:
            self._watcher.cancel()


class StreamRelay:
    """Passes vLLM's server-sent events to the client as they come, and counts the tokens.

    The final ``data: [DONE]`` is held back until the caller has stored the usage (``end``),
    so a client never sees the end of a stream whose tokens were not counted.
    """

    __slots__ = ("_api", "_outcome", "_scanner", "_send", "started")

    def __init__(self, send: Send, outcome: Outcome, keep_usage: bool, api: Api) -> None:
        self._send = send
        self._outcome = outcome
        self._api = api
        self._scanner = SseScanner(keep_usage=keep_usage, shape=api.usage)
        self.started = False

    @staticmethod
    def accepts(resp: UpstreamResponse) -> bool:
        """Whether vLLM answered with a stream (an error comes back as a whole JSON body)."""
        return resp.status == 200 and (resp.header(b"content-type") or b"").startswith(
            b"text/event-stream"
        )

    async def pump(self, resp: UpstreamResponse, t0: float, ttft: Histogram) -> None:
        """Send the response's headers, then every event until vLLM's stream ends.

        Raises UpstreamError when vLLM fails mid-stream; the caller ends the stream.
        """
        outcome = self._outcome
        outcome.responding(200)
        self.started = True
        headers = [*SSE_HEADERS, (b"x-request-id", outcome.request_id.encode())]
        send = self._send
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = True
        while (chunk := await resp.next_chunk()) is not None:
            if first:
                first = False
                seconds = time.perf_counter() - t0
                outcome.first_token(seconds)
                ttft.observe(seconds)
            out = self._scanner.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})

    def tokens(self, prompt_estimate: int) -> Tokens:
        """vLLM's usage when it came, else an estimate: each vLLM chunk is one token."""
        return self._scanner.tokens(prompt_estimate)

    async def end(self) -> None:
        """Send what is left: an unterminated event, then ``data: [DONE]``."""
        rest = self._scanner.rest()
        await self._send({"type": "http.response.body", "body": rest, "more_body": False})

    async def end_with_error(self, err: ApiError) -> None:
        """End a broken stream with one event carrying the error in the API's shape."""
        self._outcome.failed(err.metric_type)
        if self._api.anthropic:
            event = b"event: error\ndata: " + anthropic_error_body(err.status, err.message)
        elif self._api.usage == "responses":
            error = {"type": "error", "code": err.code, "message": err.message, "param": None}
            event = b"event: error\ndata: " + orjson.dumps(error)
        else:
            event = b"data: " + err.body()
        event += b"\n\n"
        await self._send({"type": "http.response.body", "body": event, "more_body": False})
