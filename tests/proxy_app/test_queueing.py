"""Fair sharing of a busy model: the key's priority sent to vLLM, and the gateway's queue.

The queue's order is checked on proxy_app.queueing.FairQueue itself (an event loop, no
processes: the order is the point, not the timing); its wiring through a real gateway with
the fake upstream (which records the order, the priority header and body it received, and
how many requests it served at once); and the order an interactive request gets through a
real gateway in front of real vLLM.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge
from proxy_harness import (
    ADMIN_KEY,
    TINY_CHAT,
    USER_KEY,
    GatewayFactory,
    Upstream,
    http,
    keys_with,
    metric_value,
    openai_error,
    wait_for,
)

from proxy_app.config import KeyDefaults
from proxy_app.errors import ApiError
from proxy_app.keys import KeysFileError, parse_keys
from proxy_app.queueing import FairQueue

# The queue, alone


def _queue(capacity: int, reserve: int = 0) -> FairQueue:
    r = CollectorRegistry()
    length = Gauge("q", "q", ["priority"], registry=r)
    return FairQueue("m", capacity, reserve, length)


async def _order(q: FairQueue, waiters: list[tuple[str, int, int]], holders: int) -> list[str]:
    """Queue ``waiters`` (key, priority, weight) behind ``holders`` places already taken,
    then free the places one at a time: the keys in the order they got one."""
    got: list[str] = []

    async def one(key: str, priority: int, weight: int) -> None:
        await q.acquire(key, priority, weight, 10)
        got.append(key)

    tasks = []
    for w in waiters:
        tasks.append(asyncio.create_task(one(*w)))
        await asyncio.sleep(0)  # each queued in this order
    for _ in range(len(waiters) + holders):
        await asyncio.sleep(0)
        if q.in_flight:
            q.release(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return got


def test_keys_take_turns_whatever_their_arrival_order() -> None:
    async def run() -> list[str]:
        q = _queue(1)
        await q.acquire("holder", 0, 1, 1)
        return await _order(q, [("a", 0, 1)] * 5 + [("b", 0, 1)] * 3, holders=1)

    assert asyncio.run(run()) == ["a", "b", "a", "b", "a", "b", "a", "a"]


def test_a_keys_weight_is_its_turns_in_a_row() -> None:
    async def run() -> list[str]:
        q = _queue(1)
        await q.acquire("holder", 0, 1, 1)
        return await _order(q, [("a", 0, 2)] * 5 + [("b", 0, 1)] * 3, holders=1)

    assert asyncio.run(run()) == ["a", "a", "b", "a", "a", "b", "a", "b"]


def test_interactive_requests_go_first_and_batch_never_takes_the_reserve() -> None:
    async def run() -> tuple[list[str], int]:
        q = _queue(3, reserve=1)
        # Batch may hold 2 of the 3 places: the third stays free for interactive requests.
        await q.acquire("batch", 10, 1, 1)
        await q.acquire("batch", 10, 1, 1)
        late = asyncio.create_task(q.acquire("batch", 10, 1, 10))
        await asyncio.sleep(0)
        assert not late.done() and q.waiting == 1
        assert await q.acquire("chat", 0, 1, 1) == 0.0  # at once: the reserved place
        # Every place taken: an interactive request waits, and is served before the batch
        # request that waited longer.
        chat = asyncio.create_task(q.acquire("chat", 0, 1, 10))
        await asyncio.sleep(0)
        q.release(10)  # a batch answer ends
        await asyncio.sleep(0)
        order = ["chat" if chat.done() else "", "batch" if late.done() else ""]
        q.release(0)
        await asyncio.sleep(0)
        await late
        return order, q.in_flight

    order, in_flight = asyncio.run(run())
    assert order == ["chat", ""]
    assert in_flight == 3


def test_a_waiter_that_gives_up_holds_nothing() -> None:
    async def run() -> None:
        q = _queue(1)
        await q.acquire("a", 0, 1, 1)
        with pytest.raises(ApiError) as e:
            await q.acquire("b", 0, 1, 0.05)
        assert e.value.status == 429 and e.value.code == "queue_timeout"
        assert e.value.reason == "queue_timeout"
        assert dict(e.value.headers)[b"retry-after"] == b"1"
        gone = asyncio.create_task(q.acquire("c", 0, 1, 10))
        await asyncio.sleep(0)
        gone.cancel()  # its client left
        await asyncio.sleep(0)
        assert q.waiting == 0
        q.release(0)
        assert q.in_flight == 0  # nobody took the place: nobody was left waiting
        assert await q.acquire("d", 0, 1, 1) == 0.0

    asyncio.run(run())


def test_a_place_handed_to_a_waiter_that_just_left_comes_back() -> None:
    async def run() -> None:
        q = _queue(1)
        await q.acquire("a", 0, 1, 1)
        late = asyncio.create_task(q.acquire("b", 0, 1, 10))
        await asyncio.sleep(0)
        q.release(0)  # handed to b...
        late.cancel()  # ...whose client leaves before it runs again
        with pytest.raises(asyncio.CancelledError):
            await late
        assert q.in_flight == 0 and q.waiting == 0

    asyncio.run(run())


# The keys file


def test_a_keys_priority_is_a_class_or_an_integer_and_its_weight_positive() -> None:
    def key(**fields: Any) -> bytes:
        return json.dumps({"keys": [{"key": "sk-abcdefgh12", "user": "u", **fields}]}).encode()

    keys = parse_keys(key(priority="batch", weight=3, queue_timeout=5), KeyDefaults())
    (k,) = keys.values()
    assert (k.priority, k.weight, k.queue_timeout) == (10, 3, 5)
    (k,) = parse_keys(key(), KeyDefaults()).values()
    assert (k.priority, k.weight, k.queue_timeout) == (0, 1, None)
    (k,) = parse_keys(key(priority=-3), KeyDefaults()).values()
    assert k.priority == -3
    for bad, what in [({"priority": "urgent"}, "priority"), ({"weight": 0}, "weight")]:
        with pytest.raises(KeysFileError, match=what):
            parse_keys(key(**bad), KeyDefaults())


# Through a gateway


def _stats(upstream: Upstream) -> dict[str, Any]:
    with http(upstream.url) as c:
        return c.get("/_stats").json()


def _arrivals(upstream: Upstream, since: int) -> list[list[Any]]:
    return _stats(upstream)["arrivals"][since:]


PRIORITY_KEYS = [
    {"key": ADMIN_KEY, "user": "admin", "admin": True},
    {"key": USER_KEY, "user": "user1", "priority": "batch"},
]


def test_the_keys_priority_reaches_vllm_whatever_the_client_sends(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=PRIORITY_KEYS)
    since = len(_stats(fake)["arrivals"])
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with http(gw.url, USER_KEY) as c:
        # A batch key asking for the front of vLLM's queue gets its own class all the same.
        r = c.post("/v1/chat/completions", json={**chat, "priority": -100, "fake_tag": "c"})
        assert r.status_code == 200, r.text
        r = c.post(
            "/v1/embeddings",
            json={"model": "fake", "input": "x", "priority": -100, "fake_tag": "e"},
        )
        assert r.status_code == 200, r.text
        r = c.post("/v1/embeddings", json={"model": "fake", "input": "x", "fake_tag": "e2"})
        assert r.status_code == 200, r.text
    with http(gw.url, ADMIN_KEY) as c:
        assert c.post("/v1/chat/completions", json={**chat, "fake_tag": "i"}).status_code == 200
    # Chat: the header (vLLM reads it before the body's field); embeddings: the body.
    assert [a[:3] for a in _arrivals(fake, since)] == [
        ["c", "10", -100],
        ["e", None, 10],
        ["e2", None, 10],
        ["i", "0", None],
    ]


def _post_all(url: str, key: str, bodies: list[dict[str, Any]]) -> list[threading.Thread]:
    """POST each completion from a thread of its own."""

    def one(body: dict[str, Any]) -> None:
        with http(url, key, timeout=30) as c:
            c.post("/v1/completions", json=body)

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    return threads


def _timed_post(url: str, key: str, tag: str) -> tuple[httpx.Response, float]:
    """One completion of the fake's, and the seconds its answer took."""
    with http(url, key) as c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x", "fake_tag": tag})
        return r, time.monotonic() - t0


def _queued(gw_url: str, priority: str) -> float:
    return metric_value(
        http(gw_url).get("/metrics").text, "gateway_queue_length", {"priority": priority}
    )


def test_a_busy_model_serves_the_keys_in_turn_and_never_more_than_its_places(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    """One place (vllm_max_in_flight: 1): a key with five requests waiting and one with
    three take turns; the upstream never has two at once; each request is charged once."""
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "concurrent": 1},
    ]
    gw = gateway_factory(fake, keys=keys, vllm_max_in_flight=1)
    since = len(_stats(fake)["arrivals"])

    def body(tag: str) -> dict[str, Any]:
        return {"model": "fake", "prompt": "x", "fake_delay": 0.2, "fake_tag": tag}

    # user1 may have one request in flight: its queued ones hold no concurrency slot (each
    # is admitted when it gets its place), so none of them is refused. The first holds the
    # place until all seven wait (its gate: however slow the machine is to queue them).
    gate = f"busy-{since}"
    threads = _post_all(gw.url, USER_KEY, [body("u") | {"fake_gate": gate}])
    wait_for(lambda: len(_arrivals(fake, since)) == 1, 10, "the first request")
    threads += _post_all(gw.url, USER_KEY, [body("u") for _ in range(4)])
    wait_for(lambda: _queued(gw.url, "interactive") == 4, 10, "four queued")
    threads += _post_all(gw.url, ADMIN_KEY, [body("a") for _ in range(3)])
    wait_for(lambda: _queued(gw.url, "interactive") == 7, 10, "seven queued")
    with http(fake.url) as c:
        c.post(f"/_open/{gate}").raise_for_status()
    for t in threads:
        t.join(30)
    arrivals = _arrivals(fake, since)
    assert [a[0] for a in arrivals] == ["u", "u", "a", "u", "a", "u", "a", "u"]
    assert [a[3] for a in arrivals] == [1] * 8  # never two at once
    lines = [r for r in gw.logs() if r.get("path") == "/v1/completions"]
    assert sorted(r["status"] for r in lines) == [200] * 8
    assert sum(1 for r in lines if r.get("queue_ms", 0) > 0) == 7
    usage = gw.usage(ADMIN_KEY)
    assert usage["user1"]["total_usage"]["requests"] == 5
    assert usage["admin"]["total_usage"]["requests"] == 3
    text = http(gw.url).get("/metrics").text
    assert metric_value(text, "gateway_queue_wait_seconds_count", {"priority": "interactive"}) == 7


def test_a_queue_timeout_is_a_429_and_a_client_leaving_the_queue_costs_nothing(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "queue_timeout": 0.5},
    ]
    gw = gateway_factory(fake, keys=keys, vllm_max_in_flight=1)
    since = len(_stats(fake)["arrivals"])
    hold = {"model": "fake", "prompt": "x", "fake_delay": 3, "fake_tag": "hold"}
    threads = _post_all(gw.url, ADMIN_KEY, [hold])
    wait_for(lambda: len(_arrivals(fake, since)) == 1, 10, "the holding request")
    r, waited = _timed_post(gw.url, USER_KEY, "t")
    assert r.status_code == 429, r.text
    err = openai_error(r)
    assert err["code"] == "queue_timeout" and err["type"] == "requests"
    assert "busy" in err["message"] and r.headers["retry-after"] == "1"
    assert waited >= 0.5
    # The admin key's own timeout is the config's (30 s): its client leaves after 0.3 s.
    with http(gw.url, ADMIN_KEY, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"model": "fake", "prompt": "x", "fake_tag": "left"})
    wait_for(lambda: _queued(gw.url, "interactive") == 0, 10, "the queue emptied")
    for t in threads:
        t.join(30)
    assert [a[0] for a in _arrivals(fake, since)] == ["hold"]  # neither reached vLLM
    lines = {r["status"]: r for r in gw.logs() if r.get("path") == "/v1/completions"}
    assert lines[429]["limit"] == "queue_timeout"
    assert lines[499]["prompt_tokens"] is None  # never admitted: nothing charged
    usage = gw.usage(ADMIN_KEY)
    assert usage["user1"]["total_usage"]["requests"] == 0
    assert usage["admin"]["total_usage"]["requests"] == 1
    text = http(gw.url).get("/metrics").text
    assert metric_value(text, "gateway_rejections_total", {"reason": "queue_timeout"}) == 1


def test_a_request_over_its_keys_concurrency_waits_for_a_slot_and_is_served(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    """concurrent: 1, and no bound on the model's places: while the key's one request is in
    flight, its next two wait in the key's queue (not a 429) and are served one after the
    other as slots come back; the upstream never has two at once; each is charged once."""
    gw = gateway_factory(fake, keys=keys_with(concurrent=1))
    since = len(_stats(fake)["arrivals"])

    def body(tag: str, delay: float) -> dict[str, Any]:
        return {"model": "fake", "prompt": "x", "fake_delay": delay, "fake_tag": tag}

    threads = _post_all(gw.url, USER_KEY, [body("first", 1.0)])
    wait_for(lambda: len(_arrivals(fake, since)) == 1, 10, "the first request")
    threads += _post_all(gw.url, USER_KEY, [body("next", 0.2), body("next", 0.2)])
    wait_for(lambda: _queued(gw.url, "interactive") == 2, 10, "two waiting for the slot")
    assert len(_arrivals(fake, since)) == 1
    for t in threads:
        t.join(30)
    arrivals = _arrivals(fake, since)
    assert [a[0] for a in arrivals] == ["first", "next", "next"]
    assert [a[3] for a in arrivals] == [1, 1, 1]  # never two at once
    lines = [r for r in gw.logs() if r.get("path") == "/v1/completions"]
    assert [r["status"] for r in lines] == [200] * 3, lines
    assert all(r["limit"] == "allowed" for r in lines)
    assert sorted(r.get("queue_ms", 0) > 0 for r in lines) == [False, True, True]
    assert gw.usage(ADMIN_KEY)["user1"]["total_usage"]["requests"] == 3
    text = http(gw.url).get("/metrics").text
    assert metric_value(text, "gateway_queue_wait_seconds_count", {"priority": "interactive"}) == 2
    assert metric_value(text, "gateway_queue_length", {"priority": "interactive"}) == 0
    reasons = {"reason": "concurrency_key"}
    assert metric_value(text, "gateway_rejections_total", reasons, unseen_is_zero=True) == 0


def test_a_wait_for_a_slot_ends_in_the_limits_429_or_when_its_client_leaves(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    """The key's slot held for 3 s: a request that may wait 0.5 s is refused then by the
    concurrency limit (its 429, Retry-After included); one whose client leaves while it
    waits is 499, holds nothing and is charged nothing; once the slot is back the next
    request is served at once; a key with queue_timeout 0 never waits."""
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True, "concurrent": 1, "queue_timeout": 0},
        {"key": USER_KEY, "user": "user1", "concurrent": 1, "queue_timeout": 0.5},
    ]
    gw = gateway_factory(fake, keys=keys)
    since = len(_stats(fake)["arrivals"])
    hold = {"model": "fake", "prompt": "x", "fake_delay": 3, "fake_tag": "hold"}
    threads = _post_all(gw.url, USER_KEY, [hold])
    admin = _post_all(gw.url, ADMIN_KEY, [hold])
    wait_for(lambda: len(_arrivals(fake, since)) == 2, 10, "the holding requests")
    r, waited = _timed_post(gw.url, USER_KEY, "t")
    assert r.status_code == 429, r.text
    err = openai_error(r)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "concurrent requests (1)" in err["message"]
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "1"
    assert waited >= 0.5
    assert gw.request_log(r.headers["x-request-id"])["limit"] == "concurrency_key"
    # The admin key (queue_timeout 0): refused without waiting, though the slot comes back.
    with http(gw.url, ADMIN_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x", "fake_tag": "a"})
    assert r.status_code == 429 and "concurrent requests (1)" in r.text
    assert gw.request_log(r.headers["x-request-id"]).get("queue_ms") is None
    # A client that leaves while its request waits for the slot.
    with http(gw.url, USER_KEY, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            "/v1/completions",
            json={"model": "fake", "prompt": "x", "fake_tag": "left"},
            headers={"X-Request-ID": "left-waiting"},
        )
    left = gw.request_log("left-waiting")
    assert left["status"] == 499 and left["prompt_tokens"] is None  # never admitted
    wait_for(lambda: _queued(gw.url, "interactive") == 0, 10, "nobody waiting")
    for t in threads + admin:
        t.join(30)
    with http(gw.url, USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x", "fake_tag": "after"})
    assert r.status_code == 200, r.text
    assert [a[0] for a in _arrivals(fake, since)] == ["hold", "hold", "after"]
    usage = gw.usage(ADMIN_KEY)
    assert usage["user1"]["total_usage"]["requests"] == 2  # the hold and "after"


def test_an_interactive_request_overtakes_queued_batch_work_on_real_vllm(
    gateway_factory: GatewayFactory, vllm: Upstream
) -> None:
    """One place in front of real vLLM: a batch key's four long answers, one running and
    three queued; an interactive request sent then is answered before the three."""
    gw = gateway_factory(vllm, keys=PRIORITY_KEYS, vllm_max_in_flight=1)
    done: list[str] = []
    lock = threading.Lock()

    def one(key: str, tag: str, max_tokens: int) -> None:
        body = {**TINY_CHAT, "max_tokens": max_tokens, "ignore_eos": True}
        with http(gw.url, key, timeout=120) as c:
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        with lock:
            done.append(tag)

    batch = [threading.Thread(target=one, args=(USER_KEY, "batch", 200)) for _ in range(4)]
    for t in batch:
        t.start()
    wait_for(lambda: _queued(gw.url, "batch") == 3, 30, "three batch requests queued")
    chat = threading.Thread(target=one, args=(ADMIN_KEY, "chat", 1))
    chat.start()
    for t in [*batch, chat]:
        t.join(120)
    assert done == ["batch", "chat", "batch", "batch", "batch"]
