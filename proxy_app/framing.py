"""The gateway's HTTP connections: framing it refuses before any route runs, in OpenAI's
error shape, and a shutdown that never closes a connection a request may be on its way over.

uvicorn's httptools protocol sets no limit on the size or number of request headers (a
16 MB header and 10,000 headers were accepted) and answers malformed requests with a
plain-text 400. This protocol, handed to uvicorn in place of its own, caps both and answers
every refusal as JSON, then closes the connection. nginx in front has lower limits of its
own (large_client_header_buffers); these hold when the gateway is reached directly.

On shutdown (a restart: SIGTERM), uvicorn closes idle keep-alive connections at once. nginx
may have just written a request on one of them: the request is lost, and nginx cannot send
a POST again (its body was sent), so the client gets a 502. Here the gateway leaves idle
connections to the client: a request that still arrives on one is served, with
`Connection: close`; nginx closes the others itself after its upstream keepalive_timeout,
which is shorter than ``SHUTDOWN_IDLE_SECONDS``, after which the gateway closes what is left
(clients other than nginx). Requests in flight run to their end, as before.

A client that leaves is reported at once: each request's scope carries a ``ClientLost``
(``scope["extensions"][CLIENT_LOST]``) that ``connection_lost`` fires, so the request waiting
on vLLM is cancelled in the same event-loop turn as the close, with no task or timer per
request (reading ``receive`` in a task for every request cost ~40% of the req/s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import ApiError, GatewayError, bad_request, headers_too_large

# The request line and all headers together; nginx's default allows 4 x 8 KiB.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100

_LINGER_SECONDS = 2.0
# How long a connection must have been idle before a shutting-down gateway closes it: more
# than nginx's upstream keepalive_timeout (roles/nginx: nginx_upstream_keepalive_timeout).
SHUTDOWN_IDLE_SECONDS = 5.0
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}
_log = logging.getLogger("uvicorn.error")

# The scope extension that carries a request's ClientLost.
CLIENT_LOST = "llmhost.client_lost"


class ClientLost:
    """Says, the moment it happens, that a request's client closed its connection.

    Whoever waits on the request's behalf sets ``callback``; it runs once, from the
    protocol's ``connection_lost``, or at once when set after the client had already gone.
    """

    __slots__ = ("_callback", "gone")

    def __init__(self) -> None:
        self._callback: Callable[[], None] | None = None
        self.gone = False

    def call(self, callback: Callable[[], None] | None) -> None:
        """Run ``callback`` when the client goes (None: no longer)."""
        self._callback = callback
        if callback is not None and self.gone:
            self.fire()

    def fire(self) -> None:
        self.gone = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class _Refused(GatewayError):
    """Raised from a parser callback; httptools hands it to uvicorn as a parser error."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head and JSON refusals."""

    _head_bytes = 0
    _header_count = 0
    _in_head = True
    _refusal: ApiError | None = None
    _discarding = False
    _shutting_down = False
    _idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()

    def shutdown(self) -> None:
        """Called by uvicorn when the gateway stops: see the module's docstring."""
        self._shutting_down = True
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self.transport.is_closing():
            return
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.loop.time() - self._idle_since >= SHUTDOWN_IDLE_SECONDS:
            self.transport.close()
            return
        self.loop.call_later(0.25, self._close_when_idle)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Still reading a request's head after this piece: all of it was head.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(headers_too_large(f"more than {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # left before the response's end
            cycle.scope["extensions"][CLIENT_LOST].fire()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {CLIENT_LOST: ClientLost()}
        self._in_head = True
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._refusal = headers_too_large(f"more than {MAX_HEADERS} headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse (or that a callback refused)."""
        refusal = self._refusal or bad_request(
            "The request is not valid HTTP/1.1.", code="invalid_http_request"
        )
        self._refuse(refusal)

    def _refuse(self, err: ApiError) -> None:
        self._refusal = None
        _log.warning("refused request: %s", err.message)
        body = err.body()
        head = [b"HTTP/1.1 %d %s\r\n" % (err.status, _REASONS.get(err.status, b"Error"))]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        transport: asyncio.Transport = self.transport
        transport.write(b"".join(head) + body)
        # A lingering close, as nginx does: closing with the client's bytes unread would
        # reset the connection and the client would never read the answer. So the write
        # side closes now, what still arrives is dropped, and the socket closes soon after.
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)
