"""Redis stopped and started again under two gateways (real redis-server, AOF on, as in
production): ``redis_failure_mode: local`` serves each gateway's share of the limits and
loses no usage; ``closed`` (the default) answers 503 (test_redis.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from proxy_harness import (
    USER_KEY,
    Gateway,
    GatewayFactory,
    Proc,
    Upstream,
    free_port,
    keys_with,
    metric_value,
    start,
    wait_for,
)

FAKE_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class OwnRedis:
    """A redis-server this test stops and starts again on the same port and data."""

    def __init__(self, exe: str, d: Path) -> None:
        self.exe, self.dir, self.port = exe, d, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", str(self.dir)]  # fmt: skip
        self.proc = start(args, self.dir / "redis.log")
        client = redis.Redis(port=self.port)
        wait_for(client.ping, 20, "redis-server")
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def total_tokens(self) -> int:
        client = redis.Redis(port=self.port)
        try:
            keys = client.keys("llmhost:usage:*:total")
            return sum(int(client.hget(k, "tokens") or 0) for k in keys)
        finally:
            client.close()


@pytest.fixture
def own_redis(redis_exe: str, tmp_path: Path) -> Iterator[OwnRedis]:
    d = tmp_path / "redis"
    d.mkdir()
    r = OwnRedis(redis_exe, d)
    r.start()
    try:
        yield r
    finally:
        r.stop()


def _post(gw: Gateway, body: dict = FAKE_CHAT) -> httpx.Response:
    with gw.client(USER_KEY) as c:
        return c.post("/v1/chat/completions", json=body)


def _charged(*gws: Gateway) -> int:
    """Tokens the gateways charged, by their request log lines."""
    total = 0
    for gw in gws:
        for rec in gw.logs():
            if rec.get("event") == "request" and isinstance(rec.get("prompt_tokens"), int):
                total += rec["prompt_tokens"] + rec["completion_tokens"]
    return total


def test_local_mode_enforces_a_share_and_loses_no_usage(
    gateway_factory: GatewayFactory, fake: Upstream, own_redis: OwnRedis
) -> None:
    keys = keys_with(concurrent=2, quota=1_000_000, queue_timeout=0)  # refused, not waiting
    local = {"redis_url": own_redis.url, "redis_failure_mode": "local", "gateway_count": 2}
    a = gateway_factory(fake, keys=keys, name="a", **local)
    b = gateway_factory(fake, keys=keys, name="b", **local)
    for gw in (a, b):
        assert _post(gw).status_code == 200
        assert metric_value(gw.metrics(), "gateway_limits_local") == 0

    own_redis.stop()
    assert _post(a).status_code == 200
    assert metric_value(a.metrics(), "gateway_limits_local") == 1
    assert any(rec.get("event") == "limits_local" for rec in a.logs())
    with a.client() as c:
        assert c.get("/ready").status_code == 200  # it serves, with limits
    # concurrent: 2 shared by 2 gateways: 1 each while they cannot see each other.
    with a.client(USER_KEY) as c:
        slow = {"model": "fake-slow", "prompt": "x", "stream": True}
        with c.stream("POST", "/v1/completions", json=slow) as held:
            assert held.status_code == 200
            # Kept: a line generator dropped unfinished closes its connection (httpx), and
            # the gateway frees the slot of a client that left at once.
            lines = held.iter_lines()
            next(lines)
            r = _post(a)
            assert r.status_code == 429
            assert a.request_log(r.headers["x-request-id"])["limit"] == "concurrency_key"
            assert _post(b).status_code == 200
    for _ in range(3):
        assert _post(b).status_code == 200

    own_redis.start()
    # The spooled usage reaches Redis: everything both gateways charged, none lost.
    wait_for(lambda: own_redis.total_tokens() == _charged(a, b), 20, "the spool's replay")
    for gw in (a, b):
        wait_for(
            lambda gw=gw: metric_value(gw.metrics(), "gateway_limits_local") == 0,
            20,
            "shared limits again",
        )
    assert any(rec.get("event") == "limits_shared" for rec in a.logs())
    assert _post(a).status_code == 200
    wait_for(lambda: own_redis.total_tokens() == _charged(a, b), 10, "usage in Redis")


def test_local_mode_quota_is_a_share_of_what_was_left(
    gateway_factory: GatewayFactory, fake: Upstream, own_redis: OwnRedis
) -> None:
    # 12 tokens per answer; quota 100: 88 left when Redis goes, 44 for each of 2 gateways.
    local = {"redis_url": own_redis.url, "redis_failure_mode": "local", "gateway_count": 2}
    a = gateway_factory(fake, keys=keys_with(quota=100), name="a", **local)
    body = {**FAKE_CHAT, "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}
    assert _post(a, body).status_code == 200
    own_redis.stop()
    served = 0
    while (r := _post(a, body)).status_code == 200:
        served += 1
    assert r.json()["error"]["code"] == "insufficient_quota"
    assert served >= 1 and 12 * served <= 44


def test_closed_mode_is_503_and_counts_on_no_share(
    gateway_factory: GatewayFactory, fake: Upstream, own_redis: OwnRedis
) -> None:
    gw = gateway_factory(fake, keys=keys_with(concurrent=2), redis_url=own_redis.url)
    assert _post(gw).status_code == 200
    own_redis.stop()
    r = _post(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "limit_store_unavailable"
    assert metric_value(gw.metrics(), "gateway_limits_local") == 0


def test_local_mode_refuses_a_quota_it_never_read(
    gateway_factory: GatewayFactory, fake: Upstream, own_redis: OwnRedis
) -> None:
    local = {"redis_url": own_redis.url, "redis_failure_mode": "local", "gateway_count": 2}
    gw = gateway_factory(fake, keys=keys_with(quota=100), **local)
    own_redis.stop()
    r = _post(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "limit_store_unavailable"
    # Nor does a gateway start without its Redis, local mode or not.
    with pytest.raises(RuntimeError, match="exited"):
        gateway_factory(fake, name="late", **local)


def test_a_redis_restart_costs_no_request(own_redis: OwnRedis, fake: Upstream, gateway_factory):
    """Redis restarted between two requests: every pooled connection of the gateway is
    dead, and the next requests still succeed (a dead connection is noticed before use, or
    the command is sent again on a new one). Without that the first ones got 503."""
    gw = gateway_factory(fake, keys=keys_with(concurrent=8, qps=100), redis_url=own_redis.url)
    for _ in range(4):
        assert _post(gw).status_code == 200
    own_redis.stop()
    own_redis.start()
    codes = [_post(gw).status_code for _ in range(8)]
    assert codes == [200] * 8, codes


def test_an_event_loop_stall_as_a_redis_connection_opens_fails_no_command(redis_url: str):
    """A gateway starting on a loaded host: its event loop stalls for over a second (the
    health check's interval) after each command the client writes. With redis-py's CLIENT
    SETINFO pair sent as each connection opens, the health check's PING then read the first
    SETINFO's answer (an error from Redis before 7.2), and the request failed with 503
    (measured: a gateway restart under load in the cluster scenario). The gateway's client
    (``redis_client``) sends no command ahead of another's answer: every command answers."""
    import asyncio
    import time

    from redis.asyncio.connection import Connection

    from proxy_app.app import redis_client

    send = Connection.send_command

    async def stalled_send(self: Connection, *args: object, **kwargs: object) -> None:
        await send(self, *args, **kwargs)
        time.sleep(1.2)  # the whole loop, as a process starved of CPU is

    async def commands() -> list[object]:
        client = redis_client(redis_url)
        try:
            return [await client.set("llmhost:test", "1"), await client.get("llmhost:test")]
        finally:
            await client.aclose()

    Connection.send_command = stalled_send  # type: ignore[method-assign]
    try:
        assert asyncio.run(commands()) == [True, b"1"]
    finally:
        Connection.send_command = send  # type: ignore[method-assign]
