"""Several gateways, one Redis: limits and quotas hold across them (real redis-server).

Against the real vLLM, with token counts as vLLM gives them; shared concurrency holds a
slot with the fake's slow stream (a real stream's length depends on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from proxy_harness import (
    ADMIN_KEY,
    TINY_CHAT,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    chat_cost,
    free_port,
    keys_with,
    metric_value,
    start,
    total_tokens,
    wait_for,
)

CHAT = TINY_CHAT
FAKE_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def _pair(
    factory: GatewayFactory, upstream: Upstream, redis_url: str, **limits: object
) -> tuple[Gateway, Gateway]:
    keys = keys_with(**limits)
    a = factory(upstream, keys=keys, name="a", redis_url=redis_url)
    b = factory(upstream, keys=keys, name="b", redis_url=redis_url)
    return a, b


def _post(gw: Gateway, body: dict | None = None) -> httpx.Response:
    with gw.client(USER_KEY) as c:
        return c.post("/v1/chat/completions", json=body or CHAT)


@contextmanager
def _held_stream(gw: Gateway) -> Iterator[None]:
    c = gw.client(USER_KEY)
    body = {"model": "fake-slow", "prompt": "x", "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        # Keep the line iterator alive: dropping it would close the response.
        lines = r.iter_lines()
        next(lines)  # the stream has started: the slot is taken
        yield
    c.close()


def test_concurrency_is_shared(
    gateway_factory: GatewayFactory, fake: Upstream, redis_url: str
) -> None:
    """The key's one slot, held through A: B's request waits its queue timeout (2 s) for it,
    then is refused by the key's limit; another, waiting when A's stream ends, is served:
    A's release wakes nobody at B, which looks again at Redis every 100 ms."""
    a, b = _pair(gateway_factory, fake, redis_url, concurrent=1, queue_timeout=2)
    with ThreadPoolExecutor(1) as pool:
        with _held_stream(a):
            r = _post(b, FAKE_CHAT)
            assert r.status_code == 429
            log = b.request_log(r.headers["x-request-id"])
            assert log["limit"] == "concurrency_key" and log["duration_ms"] >= 2000
            waiting = pool.submit(_post, b, FAKE_CHAT)
            wait_for(lambda: metric_value(b.metrics(), "gateway_queue_length") == 1, 10, "B's wait")
        r = waiting.result(10)
    assert r.status_code == 200, r.text
    assert b.request_log(r.headers["x-request-id"])["queue_ms"] > 0


def test_quota_and_usage_are_shared(
    gateway_factory: GatewayFactory, vllm: Upstream, redis_url: str
) -> None:
    # A's one answer spends the whole quota: B, another process, refuses the next request.
    a, b = _pair(gateway_factory, vllm, redis_url, quota=chat_cost(vllm))
    spent = total_tokens(_post(a))
    r = _post(b)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    for gw in (a, b):
        assert gw.usage(ADMIN_KEY)["user1"]["total_usage"]["total_tokens"] == spent


def test_tokens_per_minute_are_shared(
    gateway_factory: GatewayFactory, vllm: Upstream, redis_url: str
) -> None:
    a, b = _pair(gateway_factory, vllm, redis_url, tokens_per_minute=10)
    assert total_tokens(_post(a)) > 10
    r = _post(b)
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == "10"


def test_qps_is_shared(gateway_factory: GatewayFactory, vllm: Upstream, redis_url: str) -> None:
    a, b = _pair(gateway_factory, vllm, redis_url, qps=1)
    # One request per second between both: right after A's, B's is refused. (Tried a few
    # times in case a second boundary falls between the two.)
    for _ in range(5):
        wait_for(lambda: _post(a).status_code == 200, 5, "A to be admitted")
        r = _post(b)
        if r.status_code == 429:
            break
    assert r.status_code == 429
    assert r.headers["x-ratelimit-limit-requests"] == "1"


def test_usage_is_in_redis(gateway_factory: GatewayFactory, vllm: Upstream, redis_url: str) -> None:
    a, _ = _pair(gateway_factory, vllm, redis_url)
    spent = total_tokens(_post(a))
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k.decode() for k in client.keys("llmhost:usage:*:total")]
        assert len(keys) == 1
        assert client.hget(keys[0], "tokens") == str(spent).encode()
    finally:
        client.close()


def test_a_request_is_two_scripts_in_redis_and_gives_back_all_it_held(
    gateway_factory: GatewayFactory, fake: Upstream, redis_url: str
) -> None:
    # Admission, then settlement, which also gives back the request's concurrency slots: no
    # third round trip after the answer. Every kind of hold is taken (slot, tokens per
    # minute and quota reservations), streamed or not, and none is left behind.
    a, _ = _pair(
        gateway_factory, fake, redis_url, concurrent=1, tokens_per_minute=10**6, quota=10**6
    )
    client = redis.Redis.from_url(redis_url)
    try:
        assert _post(a, FAKE_CHAT).status_code == 200  # scripts loaded, connections open
        client.config_resetstat()
        with a.client(USER_KEY) as c:
            for stream in (False, True, False, True):
                r = c.post("/v1/chat/completions", json={**FAKE_CHAT, "stream": stream})
                assert r.status_code == 200, r.text
        stats = client.info("commandstats")
        scripts = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))
        assert scripts == 2 * 4, stats
        for k in client.keys("llmhost:conc:*") + client.keys("llmhost:res:*"):
            assert client.zcard(k) == 0, k
        sums = client.keys("llmhost:ressum:*")
        assert sums, "no reservation was taken: the check proves nothing"
        assert all(int(client.get(k) or 0) == 0 for k in sums)
    finally:
        client.close()


def test_redis_gone_is_503_not_unlimited(
    gateway_factory: GatewayFactory, vllm: Upstream, redis_exe: str, tmp_path: Path
) -> None:
    port = free_port()
    own = start(
        [redis_exe, "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        tmp_path / "redis.log",
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        wait_for(client.ping, 20, "redis-server")
        client.close()
        gw = gateway_factory(vllm, redis_url=f"redis://127.0.0.1:{port}/0", keys=keys_with(qps=100))
        assert _post(gw).status_code == 200
    finally:
        own.stop()
    r = _post(gw)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "limit_store_unavailable"
    with gw.client() as c:
        assert c.get("/ready").status_code == 503


def test_gateway_does_not_start_without_its_redis(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        gateway_factory(fake, redis_url=f"redis://127.0.0.1:{free_port()}/0")
