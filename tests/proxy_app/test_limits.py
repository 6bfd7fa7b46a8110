"""Rate limits, concurrency, tokens per minute and quotas (in memory).

Against the real vLLM, with token counts as vLLM gives them. The concurrency tests hold a
slot with the fake's slow stream (a real stream's length depends on the CPU), and the
failure cases need the fake's faults.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest
from proxy_harness import (
    ADMIN_KEY,
    TINY_CHAT,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    chat_cost,
    keys_with,
    metric_value,
    total_tokens,
    wait_for,
)

from proxy_app.errors import format_duration

CHAT = TINY_CHAT
FAKE_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def _post(gw: Gateway, body: dict | None = None, key: str = USER_KEY) -> httpx.Response:
    with gw.client(key) as c:
        return c.post("/v1/chat/completions", json=body or CHAT)


def _burst(gw: Gateway, n: int, key: str = USER_KEY) -> list[httpx.Response]:
    """``n`` requests at once: all reach the gateway within far less than a second, however
    long vLLM takes to answer them."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: _post(gw, key=key), range(n)))


def _refused_of_burst(gw: Gateway, n: int, admitted: int) -> httpx.Response:
    """Of ``n`` simultaneous requests exactly ``admitted`` are served; one refusal returned."""
    answers = _burst(gw, n)
    assert sorted(r.status_code for r in answers) == [200] * admitted + [429] * (n - admitted)
    return next(r for r in answers if r.status_code == 429)


@contextmanager
def _held_stream(gw: Gateway) -> Iterator[httpx.Response]:
    """A slow stream in flight (holding a concurrency slot) for the duration of the block."""
    c = gw.client(USER_KEY)
    body = {"model": "fake-slow", "prompt": "x", "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        # Keep the line iterator alive: dropping it would close the response.
        lines = r.iter_lines()
        next(lines)  # the stream has started: the slot is taken
        yield r
    c.close()


def _assert_rate_limit_error(r: httpx.Response, kind: str) -> None:
    assert r.status_code == 429
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers[f"x-ratelimit-limit-{kind}"]
    assert r.headers[f"x-ratelimit-remaining-{kind}"] == "0"
    assert r.headers[f"x-ratelimit-reset-{kind}"]


def test_key_qps_limit(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, keys=keys_with(qps=3))
    r = _refused_of_burst(gw, 6, admitted=3)
    _assert_rate_limit_error(r, "requests")
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert "this API key" in r.json()["error"]["message"]
    text = gw.metrics()
    assert metric_value(text, "gateway_rejections_total", {"reason": "qps_key"}) >= 1
    assert metric_value(text, "http_errors_total", {"type": "rate_limit"}) >= 1
    line = gw.request_log(r.headers["x-request-id"])
    assert line["limit"] == "qps_key" and line["status"] == 429


def test_global_qps_limit(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, rate_limit={"qps": 3, "concurrent": None, "tokens_per_minute": None})
    r = _refused_of_burst(gw, 6, admitted=3)
    _assert_rate_limit_error(r, "requests")
    assert "the service" in r.json()["error"]["message"]


def test_key_concurrency_limit_and_release_on_success(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    # queue_timeout 0: the key's requests never wait for a slot (test_queueing.py: waiting).
    gw = gateway_factory(fake, keys=keys_with(concurrent=1, queue_timeout=0))
    with _held_stream(gw):
        r = _post(gw, FAKE_CHAT)
        _assert_rate_limit_error(r, "requests")
        assert r.headers["x-ratelimit-limit-requests"] == "1"
        assert gw.request_log(r.headers["x-request-id"])["limit"] == "concurrency_key"
    # Slot released when the client left; a finished request releases it too.
    wait_for(lambda: _post(gw, FAKE_CHAT).status_code == 200, 10, "the slot to come back")
    assert _post(gw, FAKE_CHAT).status_code == 200
    assert metric_value(gw.metrics(), "http_active_requests") == 1.0  # the /metrics call itself


def test_global_concurrency_limit(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    # Queue timeout 0: no request waits for a slot (test_queueing.py: waiting).
    gw = gateway_factory(fake, rate_limit={"concurrent": 1}, queue={"timeout": 0})
    with _held_stream(gw):
        r = _post(gw, FAKE_CHAT, key=ADMIN_KEY)
        assert r.status_code == 429
        assert "the service" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def gw_one_slot(module_gateway_factory: GatewayFactory, fake_upstream: Upstream) -> Gateway:
    """concurrent: 1 and short timeouts, shared by the failure cases: each ends by proving
    the slot free."""
    return module_gateway_factory(
        fake_upstream,
        keys=keys_with(concurrent=1),
        timeouts={"connect": 2, "first_byte": 0.5, "read": 0.5, "total": 30},
    )


@pytest.mark.parametrize(
    ("model", "status"),
    [("fake-500", 500), ("fake-hang", 504), ("fake-drop", 200), ("fake-stall", 200)],
)
def test_concurrency_slot_released_on_failures(
    gw_one_slot: Gateway, model: str, status: int
) -> None:
    gw = gw_one_slot
    stream = model in ("fake-drop", "fake-stall")
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": "x", "stream": stream})
    assert r.status_code == status
    # The failed request must have given its slot back: the next one is served.
    assert _post(gw, FAKE_CHAT).status_code == 200


def test_tokens_per_minute(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    # The first answer costs more than the minute's 10 tokens: then the budget is spent.
    gw = gateway_factory(vllm, keys=keys_with(tokens_per_minute=10))
    assert total_tokens(_post(gw)) > 10
    r = _post(gw)
    _assert_rate_limit_error(r, "tokens")
    assert r.headers["x-ratelimit-limit-tokens"] == "10"
    assert r.json()["error"]["type"] == "tokens"
    assert gw.request_log(r.headers["x-request-id"])["limit"] == "tpm_key"


def test_global_tokens_per_minute(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, rate_limit={"tokens_per_minute": 10})
    assert total_tokens(_post(gw)) > 10
    r = _post(gw, key=ADMIN_KEY)  # another key: the service's budget is spent all the same
    _assert_rate_limit_error(r, "tokens")
    assert gw.request_log(r.headers["x-request-id"])["limit"] == "tpm_global"


def test_quota_exhausted(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    cost = chat_cost(vllm)
    quota = cost + cost // 2  # room for one answer, not two
    gw = gateway_factory(vllm, keys=keys_with(quota=quota))
    spent = total_tokens(_post(gw))  # admitted at 0
    # The next may use as much again, more than is left: refused before it overspends (when
    # the quota was only checked, it was admitted and the quota ended 1/3 over).
    r = _post(gw)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
    assert f"{spent} of {quota} tokens used" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(quota - spent)
    assert r.headers["x-ratelimit-limit-tokens"] == str(quota)
    # A total quota never resets: nothing says when to retry.
    assert "retry-after" not in r.headers and "x-ratelimit-reset-tokens" not in r.headers
    usage = gw.usage(ADMIN_KEY)["user1"]
    assert usage["remaining"] == quota - spent and usage["period_usage"]["total_tokens"] == spent
    assert metric_value(gw.metrics(), "gateway_rejections_total", {"reason": "quota"}) == 1.0


def test_monthly_quota_says_when_it_resets(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, keys=keys_with(quota=1, quota_period="monthly"))
    assert _post(gw).status_code == 200
    r = _post(gw)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    # Retry-After is the time to the first of next month (UTC); the reset says the same.
    now = datetime.now(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    to_month_end = datetime(year, month, 1, tzinfo=UTC).timestamp() - now.timestamp()
    retry_after = int(r.headers["retry-after"])
    assert to_month_end - 60 < retry_after <= to_month_end + 1, (retry_after, to_month_end)
    assert r.headers["x-ratelimit-reset-tokens"] == format_duration(retry_after)
    assert gw.usage(ADMIN_KEY)["user1"]["period"].startswith("month:")


def test_key_defaults_apply_to_keys_without_own_limits(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True, "concurrent": None},
        {"key": USER_KEY, "user": "user1"},
    ]
    gw = gateway_factory(fake, keys=keys, key_defaults={"concurrent": 1}, queue={"timeout": 0})
    with _held_stream(gw):
        assert _post(gw, FAKE_CHAT).status_code == 429
        # The admin entry set its own (unlimited) concurrency: not affected by the default.
        assert _post(gw, FAKE_CHAT, key=ADMIN_KEY).status_code == 200


def test_concurrent_burst_never_exceeds_limit(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(concurrent=2, queue_timeout=0))
    statuses: list[int] = []
    lock = threading.Lock()

    def stream_once() -> None:
        with gw.client(USER_KEY) as c:
            body = {"model": "fake-slow", "prompt": "x", "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                with lock:
                    statuses.append(r.status_code)
                if r.status_code == 200:
                    # Hold the slot until every thread has its answer.
                    wait_for(lambda: len(statuses) == 6, 20, "all answers")

    threads = [threading.Thread(target=stream_once) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
