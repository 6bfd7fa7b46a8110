"""The forwarding client on aiohttp: the interface of ``upstream.py``, on a kept library.

A candidate to replace ``upstream.py``'s own HTTP/1.1 client, measured against it side by side
by ``bench/ab.py --client`` (figures in bench/RESULTS.md). Same public interface, same
exception classes, same deadlines (connect, first byte, read between chunks, total), same
keep-alive reuse; the differences that remain:

- a request is never sent twice. ``upstream.py`` resends once when a reused connection dies
  before any byte of the answer; here a request whose bytes may have reached vLLM fails
  instead (``UpstreamBroken``), and aiohttp's own resend of idempotent methods on a reused
  connection is switched off;
- idle connections expire after 4 s (aiohttp's ``keepalive_timeout``); ``max_idle`` has no
  aiohttp counterpart and is accepted only for the interface.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from proxy_app.config import Timeouts
from proxy_app.upstream import UpstreamBroken, UpstreamTimeout, UpstreamUnavailable

# aiohttp pauses reading a socket past 2 x read_bufsize buffered bytes: 1 MiB, as upstream.py.
_READ_BUFSIZE = 1 << 19
# vLLM (uvicorn) closes idle keep-alive connections after 5 s; reuse one only well before.
_IDLE_EXPIRY = 4.0


def _broken(e: aiohttp.ClientError) -> UpstreamBroken:
    if isinstance(e, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamBroken("vLLM closed the connection before the end")
    return UpstreamBroken(f"invalid HTTP response from vLLM: {e}")


class UpstreamResponse:
    """A response from vLLM; its body is read in full or chunk by chunk, then released."""

    __slots__ = ("_deadline", "_read_timeout", "_resp", "done", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, deadline: float, read_timeout: float) -> None:
        self._resp = resp
        self._deadline = deadline
        self._read_timeout = read_timeout
        self.status = resp.status
        self.headers = [(k.lower(), v) for k, v in resp.raw_headers]
        self.done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives; None at its end."""
        content = self._resp.content
        try:
            # What is buffered already, all of it (see upstream.py's take() for why).
            chunk = content.read_nowait()
            if not chunk:
                if content.at_eof():
                    self.release()
                    return None
                loop_time = asyncio.get_running_loop().time()
                async with asyncio.timeout_at(min(loop_time + self._read_timeout, self._deadline)):
                    chunk = await content.readany()
                if not chunk:  # the end, seen while waiting
                    self.release()
                    return None
            return chunk
        except TimeoutError:
            self.abort()
            raise UpstreamTimeout("vLLM did not answer in time (reading the response)") from None
        except aiohttp.ClientError as e:
            self.abort()
            raise _broken(e) from None
        except asyncio.CancelledError:
            # The client left: vLLM must see the connection close.
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
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()

    def abort(self) -> None:
        """Drop the connection: vLLM sees the client go and stops generating."""
        if self.done:
            return
        self.done = True
        self._resp.close()


class UpstreamPool:
    """Keep-alive connections to one vLLM server, through one aiohttp session."""

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
        netloc = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self._base = f"http://{netloc}"
        self._urls: dict[str, URL] = {}
        headers = {"User-Agent": "llmhost-proxy"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        # Made on the first request: aiohttp wants a running event loop.
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Future[None] | None = None

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_IDLE_EXPIRY)
        session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            skip_auto_headers=("Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            read_bufsize=_READ_BUFSIZE,
            # Only the connect phase is left to aiohttp; the other deadlines are kept here
            # (aiohttp's sock_read would bound the wait for the headers as well).
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_read=None, sock_connect=self.timeouts.connect
            ),
        )
        # aiohttp resends an idempotent request (GET) once when a reused connection fails,
        # even if vLLM may have had it; nothing here is ever sent twice. No public switch.
        session._retry_connection = False
        return session

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = URL(self._base + path)
            if len(self._urls) < 64:
                self._urls[path] = url
        return url

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
    ) -> UpstreamResponse:
        """Send one request and wait for the response headers.

        ``streaming`` is accepted for the interface: aiohttp applies back-pressure to every
        body alike.
        """
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        t = self.timeouts
        start = asyncio.get_running_loop().time()
        deadline = start + (total_timeout or t.total)
        header_deadline = min(start + (first_byte_timeout or t.first_byte), deadline)
        headers = {}
        if request_id:
            headers["X-Request-ID"] = request_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            # On a timeout or a cancellation aiohttp closes the connection it was using, so
            # vLLM sees the request abandoned.
            async with asyncio.timeout_at(header_deadline):
                resp = await session.request(
                    method, self._url(path), data=body, headers=headers, allow_redirects=False
                )
        except aiohttp.ConnectionTimeoutError:  # a TimeoutError too: caught first
            raise UpstreamTimeout(
                f"vLLM did not accept a connection within {t.connect:.1f}s"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamUnavailable(
                f"vLLM is not reachable ({e.os_error.strerror or e.os_error})"
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(
                "vLLM did not answer in time (waiting for the response headers)"
            ) from None
        except aiohttp.ClientError as e:
            raise _broken(e) from None
        return UpstreamResponse(resp, deadline, t.read)

    def close(self) -> None:
        """Close the connections."""
        session, self._session = self._session, None
        if session is None or session.connector is None:
            return
        # The sockets close now; what is left is waiting for their close to complete.
        waiter = session.connector.close()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._closing = asyncio.ensure_future(waiter)
