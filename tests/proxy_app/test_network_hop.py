"""The gateway across real network hops: Nagle's algorithm is off on every socket it uses, and
a stream whose chunks leave the upstream 2 ms apart reaches a client on another network
2 ms apart, not in bursts.

Why (issue 22): on one host every hop is loopback, which hides a TCP socket that holds small
writes back until the peer acknowledges the last one (Nagle's algorithm, ~40 ms when the
peer delays its ACK). The cluster layout puts real hops between the client, the gateway,
vLLM and Redis. Measured on the cluster scenario's hosts: every connected socket of the
gateway (to clients, to vLLM, to Redis), of vLLM and of Redis had TCP_NODELAY set.

The hop here is a veth pair into a network namespace of this machine (real TCP between two
network stacks, not loopback): the stand-in upstream (fake_upstream.py, model `fake-tick`)
and the client run in the namespace, the gateway outside it. Creating it needs root (CI and
`make test` run as root); `make test-gateway` leaves these tests out (marker ``netns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxy_harness import (
    ADMIN_KEY,
    HERE,
    GatewayFactory,
    Proc,
    Upstream,
    free_port,
    http,
    start,
    wait_for,
    wait_http_ok,
)

pytestmark = pytest.mark.netns


@dataclass
class Netns:
    """A network namespace joined to this one by a veth pair."""

    name: str
    inside: str  # the namespace's address
    outside: str  # this side's address

    def run(self, args: list[str], log: Path) -> Proc:
        return start(["ip", "netns", "exec", self.name, *args], log)


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail(
            "the network-hop tests need root and iproute2 (`ip`) to create a network "
            "namespace and a veth pair; `make test-gateway` leaves them out",
            pytrace=False,
        )
    n = os.getpid() % 50000
    name, veth = f"llmhost-hop-{n}", f"lhhop{n}"
    inside, outside = f"10.213.{n % 250}.2", f"10.213.{n % 250}.1"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", name)
        ip("link", "add", veth + "a", "type", "veth", "peer", "name", veth + "b")
        ip("link", "set", veth + "b", "netns", name)
        ip("addr", "add", outside + "/30", "dev", veth + "a")
        ip("link", "set", veth + "a", "up")
        ip("netns", "exec", name, "ip", "addr", "add", inside + "/30", "dev", veth + "b")
        ip("netns", "exec", name, "ip", "link", "set", veth + "b", "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield Netns(name, inside, outside)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", veth + "a")  # takes its peer with it
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "del", name)


@pytest.fixture(scope="module")
def far_upstream(netns: Netns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """fake_upstream.py in the namespace: the gateway reaches it over the veth pair."""
    port = free_port()
    log = tmp_path_factory.mktemp("far") / "fake.log"
    proc = netns.run([sys.executable, str(HERE / "fake_upstream.py"), str(port), netns.inside], log)
    try:
        wait_http_ok(proc, f"http://{netns.inside}:{port}/health", 30, "the far upstream")
        yield Upstream(port, proc)
    finally:
        proc.stop()


# Run in the namespace: stream completions from URL and print, for each stream, the time
# of every chunk's arrival (chunks that came in one read share it).
CLIENT = textwrap.dedent(
    """
    import http.client, json, sys, time, urllib.parse
    url, key, streams = sys.argv[1], sys.argv[2], int(sys.argv[3])
    u = urllib.parse.urlsplit(url)
    out = []
    for i in range(streams):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        body = json.dumps({"model": "fake-tick", "prompt": "tick %d" % i, "stream": True})
        c.request("POST", "/v1/completions", body,
                  {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        arrivals, buf = [], b""
        while b"[DONE]" not in buf:
            data = r.fp.read1(65536)
            if not data:
                break
            now = time.monotonic()
            arrivals += [now] * data.count(b"data: {")
            buf = buf[-16:] + data
        c.close()
        out.append(arrivals)
    print(json.dumps(out))
    """
)


def test_a_stream_crosses_the_hops_chunk_by_chunk_not_in_bursts(
    netns: Netns, far_upstream: Upstream, gateway_factory: GatewayFactory, tmp_path: Path
):
    """Upstream -> gateway and gateway -> client both cross the veth pair. The upstream
    writes 100 chunks 2 ms apart, three streams; the client must see them about 2 ms apart
    (median gap at least 1 ms), not in bursts (fewer than half in the same read as the chunk
    before; a busy machine bunches a few, never most).

    What this does not show: that Nagle's algorithm would bunch them. With TCP_NODELAY
    cleared on the gateway's client socket (a trial patch, 2026-12-07), the chunks still
    came 2.2 ms apart, none bunched: the client acknowledged each at once, so Nagle never
    had to wait. The socket test below is the one that fails without TCP_NODELAY."""
    gw = gateway_factory(far_upstream, vllm_host=netns.inside, fastapi_host=netns.outside)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    out = subprocess.run(
        ["ip", "netns", "exec", netns.name, sys.executable, str(script), gw.url, ADMIN_KEY, "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    streams = json.loads(out.stdout)
    gaps = [(b - a) * 1000 for arrivals in streams for a, b in itertools.pairwise(arrivals)]
    assert [len(a) for a in streams] == [100, 100, 100]
    together = sum(1 for g in gaps if g == 0) / len(gaps)
    median = statistics.median(gaps)
    print(
        f"chunk gaps through the gateway: median {median:.2f} ms, max {max(gaps):.1f} ms, "
        f"{together:.0%} in the same read as the chunk before"
    )
    assert together < 0.5, (together, sorted(gaps)[-10:])
    assert median >= 1.0, (median, gaps[:20])


_PIDFD_OPEN, _PIDFD_GETFD = 434, 438  # the same number on every Linux architecture


def _tcp_nodelay(pid: int) -> dict[tuple[str, int], int]:
    """TCP_NODELAY of each connected TCP socket of process ``pid``, by peer address (the
    socket is borrowed with pidfd_getfd, Linux 5.6+; reading it changes nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    found = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            copy = libc.syscall(_PIDFD_GETFD, pidfd, int(fd), 0)
            if copy < 0:
                continue
            s = socket.socket(fileno=copy)
            try:
                if s.type == socket.SOCK_STREAM and s.family == socket.AF_INET:
                    with contextlib.suppress(OSError):  # a listening socket has no peer
                        peer = s.getpeername()
                        found[peer] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return found


def test_every_connected_socket_of_the_gateway_has_nagle_off(
    netns: Netns, far_upstream: Upstream, gateway_factory: GatewayFactory, redis_url: str
):
    """While a stream runs: the gateway's sockets to the client, to the upstream and to Redis
    (the cluster's three kinds of hop) all have TCP_NODELAY set."""
    gw = gateway_factory(
        far_upstream, vllm_host=netns.inside, fastapi_host=netns.outside, redis_url=redis_url
    )
    assert gw.proc is not None
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    body = {"model": "fake-slow", "prompt": "x", "stream": True}
    with (
        http(gw.url, ADMIN_KEY) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        chunks = r.iter_raw()  # kept: a dropped iterator closes the response
        next(chunks)  # the stream runs: every hop is open

        seen: list[dict] = []

        def sockets() -> dict[str, list[int]]:
            kinds: dict[str, list[int]] = {"client": [], "upstream": [], "redis": []}
            seen[:] = [_tcp_nodelay(gw.proc.popen.pid)]
            for (host, port), nodelay in seen[0].items():
                if (host, port) == (netns.inside, far_upstream.port):
                    kinds["upstream"].append(nodelay)
                elif port == redis_port:
                    kinds["redis"].append(nodelay)
                elif host == netns.outside:
                    kinds["client"].append(nodelay)
            return kinds if all(kinds.values()) else {}

        try:
            kinds = wait_for(sockets, 10, "the gateway's client, upstream and Redis sockets")
        except TimeoutError as e:
            raise AssertionError(f"{e}; its connected sockets: {seen}") from None
    assert kinds == {k: [1] * len(v) for k, v in kinds.items()}, kinds
