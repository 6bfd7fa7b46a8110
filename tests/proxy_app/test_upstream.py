"""The forwarding client's keep-alive pool against a real TCP server that closes idle
connections, as vLLM (uvicorn) does after 5 s: a connection the server closed is never
reused for a request, even when the gateway's event loop has not yet seen the close, and
one it did not close is reused, however many descriptors the gateway has open."""

from __future__ import annotations

import asyncio
import resource
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop

from proxy_app.config import Timeouts
from proxy_app.upstream import UpstreamPool

IDLE_CLOSE_SECONDS = 0.3
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _IdleClosing(socketserver.BaseRequestHandler):
    """Answers each request with keep-alive; closes a connection idle for 0.3 s."""

    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        conn: socket.socket = self.request
        conn.settimeout(IDLE_CLOSE_SECONDS)
        data = b""
        while True:
            try:
                piece = conn.recv(65536)
            except TimeoutError:
                return  # idle: close, as uvicorn's keep-alive timeout does
            if not piece:
                return
            data += piece
            while b"\r\n\r\n" in data:
                head, rest = data.split(b"\r\n\r\n", 1)
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                if len(rest) < length:
                    break
                self.server.requests.append(head.split(b"\r\n")[0] + rest[:length])  # type: ignore[attr-defined]
                data = rest[length:]
                conn.sendall(RESPONSE)


@pytest.fixture
def idle_closing_server() -> Iterator[socketserver.ThreadingTCPServer]:
    """In threads of its own: it closes connections while the test's event loop stalls."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _IdleClosing)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    server.connections = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_connection_closed_while_the_loop_stalled_is_not_reused(
    idle_closing_server: socketserver.ThreadingTCPServer,
    new_loop: Callable[[], asyncio.AbstractEventLoop],
):
    """One POST, then the event loop stalls past the server's idle close (a gateway starved
    of CPU), then a second POST: it goes on a new connection and is answered. Reusing the
    closed one (the loop had not yet seen the server's FIN) failed it with 'vLLM closed the
    connection before the end', a 502; a POST is never sent twice."""
    port = idle_closing_server.server_address[1]

    async def main() -> None:
        timeouts = Timeouts(connect=2, first_byte=5, read=5, total=10)
        pool = UpstreamPool("127.0.0.1", port, timeouts)
        try:
            first = await pool.request("POST", "/v1/completions", b'{"n": 1}')
            assert (first.status, await first.read()) == (200, b"{}")
            # The whole loop stops, as in a starved process; meanwhile the server closes.
            time.sleep(IDLE_CLOSE_SECONDS * 3)
            second = await pool.request("POST", "/v1/completions", b'{"n": 2}')
            assert (second.status, await second.read()) == (200, b"{}")
        finally:
            pool.close()

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert idle_closing_server.requests == [  # type: ignore[attr-defined]
        b'POST /v1/completions HTTP/1.1{"n": 1}',
        b'POST /v1/completions HTTP/1.1{"n": 2}',
    ]


def test_a_connection_is_reused_when_the_gateway_has_descriptors_past_1023(
    idle_closing_server: socketserver.ThreadingTCPServer,
):
    """A busy gateway has more than 1,024 descriptors open (clients, vLLM, Redis): the check
    that vLLM has not closed an idle connection works there too (select() refuses such
    descriptors, and every connection would then be thrown away): two POSTs, one connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the open-files limit ({hard}) is under 2,048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    port = idle_closing_server.server_address[1]
    filler = [socket.socket() for _ in range(1100)]

    async def main() -> None:
        pool = UpstreamPool("127.0.0.1", port, Timeouts(connect=2, first_byte=5, read=5, total=10))
        try:
            for n in (1, 2):
                r = await pool.request("POST", "/v1/completions", b'{"n": %d}' % n)
                assert (r.status, await r.read()) == (200, b"{}")
        finally:
            pool.close()

    try:
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    finally:
        for s in filler:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(idle_closing_server.requests) == 2  # type: ignore[attr-defined]
    assert idle_closing_server.connections == 1  # type: ignore[attr-defined]
