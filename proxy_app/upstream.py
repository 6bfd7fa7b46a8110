"""The forwarding client: HTTP/1.1 with keep-alive to vLLM, on asyncio protocols + httptools.

httpx costs about a millisecond per request on this kind of machine (measured: a bare
FastAPI + httpx forward manages ~420 req/s on 2 cores), which alone would eat the gateway's
latency budget. vLLM speaks plain HTTP/1.1 on loopback, so a small client does: one
connection per in-flight request, idle connections reused (LIFO), responses parsed by
httptools (the parser uvicorn uses), bodies handed over chunk by chunk with back-pressure.
Every wait has a deadline, so no request can hang on a silent vLLM.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections import deque

import httptools

from .config import Timeouts
from .errors import GatewayError

# A streamed response is read from vLLM no faster than the client takes it: past this many
# buffered bytes the socket stops being read until the client has caught up.
_HIGH_WATER = 1 << 20
# vLLM (uvicorn) closes idle keep-alive connections after 5 s; reuse one only well before.
_IDLE_EXPIRY = 4.0


class UpstreamError(GatewayError):
    """vLLM could not be reached or did not answer properly; callers catch a subclass."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UpstreamUnavailable(UpstreamError):
    """No connection to vLLM could be made: nothing of the request was sent, so another
    backend may take it."""


class UpstreamTimeout(UpstreamError):
    """vLLM did not answer within a deadline."""


class UpstreamBroken(UpstreamError):
    """vLLM's answer was not valid HTTP, or the connection closed before its end."""


class _Connection(asyncio.Protocol):
    """One TCP connection to vLLM, carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.error: UpstreamError | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.streaming = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamBroken(f"invalid HTTP response from vLLM: {e}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamBroken("vLLM closed the connection before the end"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.streaming and self.buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # waiting

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        if self.error is None:
            self.error = err
        self._wake()

    async def wait(self, deadline: float, what: str) -> None:
        """Wait for the next parser event, or raise UpstreamError(timeout) at ``deadline``."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiter = fut
        handle = loop.call_at(deadline, _expire, fut, what)
        try:
            await fut
        finally:
            handle.cancel()
            self.waiter = None
        if self.error is not None:
            raise self.error

    def send(self, data: bytes, streaming: bool) -> None:
        self._reset()
        self.streaming = streaming
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes | None:
        """Everything buffered so far, in one piece, resuming the socket if it was paused.

        Taking all of it matters: a consumer that took one piece at a time would find the
        buffer never empty while vLLM streams fast, and would never yield to the event loop
        (nor notice its own client leaving).
        """
        chunks = self.chunks
        if not chunks:
            return None
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    def dropped(self) -> bool:
        """Whether vLLM closed this idle connection, though the event loop has not seen it
        yet: an idle connection with something to read (its FIN) is one vLLM closed."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return True
        # poll, not select: select refuses descriptors past 1023, which a busy gateway has.
        poller = select.poll()
        try:
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future[None], what: str) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout(f"vLLM did not answer in time ({what})"))


class UpstreamResponse:
    """A response from vLLM; its body is read in full or chunk by chunk, then released."""

    __slots__ = ("_conn", "_deadline", "_pool", "_read_timeout", "done", "headers", "status")

    def __init__(
        self, pool: UpstreamPool, conn: _Connection, deadline: float, read_timeout: float
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._deadline = deadline
        self._read_timeout = read_timeout
        self.status = conn.status
        self.headers = conn.headers
        self.done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives; None at its end."""
        conn = self._conn
        loop_time = asyncio.get_running_loop().time
        while True:
            chunk = conn.take()
            if chunk is not None:
                return chunk
            if conn.complete:
                self.release()
                return None
            deadline = min(loop_time() + self._read_timeout, self._deadline)
            try:
                await conn.wait(deadline, "reading the response")
            except (UpstreamError, asyncio.CancelledError):
                # Cancelled too (the client left): vLLM must see the connection close.
                self.abort()
                raise

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool when the body was read in full, else close it."""
        if self.done:
            return
        self.done = True
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed:
            self._pool._put(conn)
        else:
            conn.close()

    def abort(self) -> None:
        """Drop the connection: vLLM sees the client go and stops generating."""
        if self.done:
            return
        self.done = True
        self._conn.abort()


class UpstreamPool:
    """Keep-alive connections to one vLLM server."""

    def __init__(
        self,
        host: str,
        port: int,
        timeouts: Timeouts,
        api_key: str | None = None,
        max_idle: int = 256,
    ) -> None:
        self.host = host
        self.port = port
        self.timeouts = timeouts
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        fixed = f"Host: {host_header}\r\nUser-Agent: llmhost-proxy\r\n"
        if api_key:
            fixed += f"Authorization: Bearer {api_key}\r\n"
        self._fixed_headers = fixed.encode()

    def _put(self, conn: _Connection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            # A loop that fell behind (a starved process) learns of vLLM's close late: the
            # kernel knows at once. Without asking it, a POST sent on a connection vLLM had
            # closed failed with 502 (measured: a gateway restart on a loaded host).
            if not conn.closed and now - conn.idle_since < _IDLE_EXPIRY and not conn.dropped():
                return conn
            conn.close()
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = max(0.0, deadline - loop.time())
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except TimeoutError:
            # Nothing was sent: unavailable (another backend may take it), not a timeout.
            raise UpstreamUnavailable(
                f"vLLM did not accept a connection within {timeout:.1f}s"
            ) from None
        except OSError as e:
            raise UpstreamUnavailable(f"vLLM is not reachable ({e.strerror or e})") from None
        return conn

    def _request_bytes(
        self,
        method: str,
        path: str,
        body: bytes | None,
        request_id: str | None,
        priority: int | None = None,
    ) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._fixed_headers
        if request_id:
            head += b"X-Request-ID: " + request_id.encode() + b"\r\n"
        if priority is not None:
            head += b"X-Vllm-Priority: %d\r\n" % priority
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            return head + body
        return head + b"\r\n"

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        request_id: str | None = None,
        streaming: bool = False,
        first_byte_timeout: float | None = None,
        total_timeout: float | None = None,
        priority: int | None = None,
    ) -> UpstreamResponse:
        """Send one request and wait for the response headers; ``priority``: vLLM's
        scheduling priority (X-Vllm-Priority)."""
        t = self.timeouts
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + (total_timeout or t.total)
        header_deadline = min(start + (first_byte_timeout or t.first_byte), deadline)
        data = self._request_bytes(method, path, body, request_id, priority)
        for attempt in (0, 1):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(min(start + t.connect, deadline))
            conn.send(data, streaming)
            try:
                while not conn.headers_done:
                    await conn.wait(header_deadline, "waiting for the response headers")
            except UpstreamError as e:
                conn.abort()
                # vLLM may close an idle connection just as it is reused. Whether it read the
                # request first cannot be known, so only a GET (no generation) is sent again:
                # a POST that reached vLLM must never run twice.
                broken = isinstance(e, UpstreamBroken)
                if attempt == 0 and reused and not conn.received_any and broken and method == "GET":
                    continue
                raise
            except asyncio.CancelledError:
                conn.abort()  # the request is abandoned: vLLM must not go on with it
                raise
            return UpstreamResponse(self, conn, deadline, t.read)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            self._idle.pop().close()
