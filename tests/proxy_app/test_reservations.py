"""Tokens reserved at admission and settled at the end: quotas and tokens per minute hold
under concurrency, in one gateway and across gateways sharing Redis; the per-key max_tokens
cap; per-endpoint limits.

Against the fake upstream: its ``fake-usage`` model answers after a delay (so that requests
overlap) with the usage the test chose. test_vllm_reservation_covers_real_tokenization
checks the estimate against the real tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from proxy_harness import (
    ADMIN_KEY,
    TINY_CHAT,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    keys_with,
    metric_value,
    openai_error,
)

from proxy_app.__main__ import main
from proxy_app.config import KeyDefaults, Reservation
from proxy_app.keys import KeysFileError, parse_keys
from proxy_app.ledger import Row, day_of
from proxy_app.ratelimit import Admission, Check, reservation
from proxy_app.ratelimit.redis_state import RedisState
from proxy_app.usage import SpooledUsage, read_redis_ledger

# 16 prompt tokens + 5 completion tokens: 21 tokens per answer, one second each.
SLOW_21 = {
    "model": "fake-usage",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 5,
    "fake_prompt_tokens": 16,
    "fake_delay": 1.0,
}
FAKE_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _post(gw: Gateway, body: dict, key: str = USER_KEY, path: str = "/v1/chat/completions"):
    with gw.client(key) as c:
        return c.post(path, json=body)


def _at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda f: f(), calls))


def _used(gw: Gateway) -> int:
    return int(gw.usage(ADMIN_KEY)["user1"]["total_usage"]["total_tokens"])


def _assert_quota_refusals(answers: list[httpx.Response]) -> int:
    """Every answer is a success or a quota refusal; returns the successes."""
    ok = 0
    for r in answers:
        if r.status_code == 200:
            ok += 1
            continue
        assert r.status_code == 429, r.text
        err = openai_error(r)
        assert err["code"] in ("insufficient_quota", "rate_limit_exceeded"), err
        assert "quota" in err["message"]
    return ok


def test_concurrent_requests_never_overspend_a_quota(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    # Checked but not reserved, all 20 were admitted at usage 0 and spent 420 tokens (4.2x).
    gw = gateway_factory(fake, keys=keys_with(quota=100))
    answers = _at_once([lambda: _post(gw, SLOW_21)] * 20)
    ok = _assert_quota_refusals(answers)
    assert ok >= 1
    assert _used(gw) == 21 * ok <= 100
    # Once those have ended, what is left is spent by requests one at a time, never past it.
    while _post(gw, SLOW_21 | {"fake_delay": 0}).status_code == 200:
        pass
    assert _used(gw) <= 100
    r = _post(gw, SLOW_21)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_concurrent_requests_never_overspend_a_quota_across_two_gateways(
    gateway_factory: GatewayFactory, fake: Upstream, redis_url: str
) -> None:
    keys = keys_with(quota=100)
    a = gateway_factory(fake, keys=keys, name="a", redis_url=redis_url)
    b = gateway_factory(fake, keys=keys, name="b", redis_url=redis_url)
    answers = _at_once([lambda: _post(a, SLOW_21), lambda: _post(b, SLOW_21)] * 10)
    ok = _assert_quota_refusals(answers)
    assert ok >= 1
    assert _used(a) == _used(b) == 21 * ok <= 100
    # Every reservation was freed when its request was settled.
    client = redis.Redis.from_url(redis_url)
    try:
        sums = [int(client.get(k) or 0) for k in client.keys("llmhost:ressum:*")]
        assert sums and all(s == 0 for s in sums)
    finally:
        client.close()


def test_tokens_per_minute_hold_under_concurrency(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(tokens_per_minute=100))
    answers = _at_once([lambda: _post(gw, SLOW_21)] * 20)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(ok) >= 1 and 21 * len(ok) <= 100
    for r in refused:
        assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == "100"
        assert gw.request_log(r.headers["x-request-id"])["limit"] == "tpm_key"


def test_tokens_per_minute_hold_under_concurrency_across_two_gateways(
    gateway_factory: GatewayFactory, fake: Upstream, redis_url: str
) -> None:
    keys = keys_with(tokens_per_minute=100)
    a = gateway_factory(fake, keys=keys, name="a", redis_url=redis_url)
    b = gateway_factory(fake, keys=keys, name="b", redis_url=redis_url)
    answers = _at_once([lambda: _post(a, SLOW_21), lambda: _post(b, SLOW_21)] * 10)
    ok = sum(r.status_code == 200 for r in answers)
    assert ok >= 1 and 21 * ok <= 100
    assert all(r.status_code in (200, 429) for r in answers)


def test_a_failed_request_gives_its_reservation_back(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(quota=100))
    # The whole quota reserved by requests that fail (500) or never answer (timeout): each
    # one's reservation is freed, so the quota is whole again for the next.
    for _ in range(5):
        assert _post(gw, {**FAKE_CHAT, "model": "fake-500", "max_tokens": 90}).status_code == 500
    assert _post(gw, {**FAKE_CHAT, "max_tokens": 90}).status_code == 200


def test_reservations_of_a_dead_gateway_expire(redis_url: str) -> None:
    # A reservation never settled (its gateway was killed) stops counting after its TTL.
    async def run() -> None:
        from redis.asyncio import Redis

        r = Redis.from_url(redis_url)
        state = RedisState(r, "llmhost:", lease_ttl=0.5)
        quota = [Check("quota", "quota:k1:total", 100, "quota", "")]
        first, _ = await state.admit(quota, 80, "k1", "total", Admission(lease_id="a"))
        assert first is None
        refused, _ = await state.admit(quota, 80, "k1", "total", Admission(lease_id="b"))
        assert refused is not None and refused.reserved == 80
        await asyncio.sleep(0.6)
        again, _ = await state.admit(quota, 80, "k1", "total", Admission(lease_id="c"))
        assert again is None
        await r.aclose()

    asyncio.run(run())


def test_spooled_usage_is_replayed_once(redis_url: str) -> None:
    # A replay cut short (Redis has the row, the spool still does) and run again counts once:
    # the usage, its ledger row, and the ledger's error row of a request never charged.
    async def run() -> None:
        from redis.asyncio import Redis

        r = Redis.from_url(redis_url)
        state = RedisState(r, "llmhost:", lease_ttl=10)
        now = time.time()
        charged = SpooledUsage(1, "row-1", "k1", "u", 7, 5, now, "m", "spooled-ann", False, True)
        failed = SpooledUsage(2, "row-2", "k1", "u", 0, 0, now, "m", "spooled-bob", True, False)
        for _ in range(2):
            await state.replay(charged)
            await state.replay(failed)
        assert int(await r.hget("llmhost:usage:k1:total", "tokens")) == 12
        assert int(await r.hget("llmhost:usage:k1:total", "requests")) == 1
        day = day_of(now)
        rows = {row.user: row for row in await read_redis_ledger(r, "llmhost:", day, day)}
        assert rows["spooled-ann"] == Row("u", "m", "spooled-ann", day, 1, 0, 7, 5)
        assert rows["spooled-bob"] == Row("u", "m", "spooled-bob", day, 1, 1, 0, 0)
        await r.aclose()

    asyncio.run(run())


def test_reservation_estimate() -> None:
    s = Reservation(bytes_per_token=2, default_max_tokens=1000)
    chat = {"messages": [{"role": "user", "content": "hi"}]}  # 32 bytes of JSON
    assert reservation(chat | {"max_tokens": 5}, "/v1/chat/completions", None, s) == 16 + 8 + 5
    assert reservation(chat | {"max_tokens": 5, "n": 3}, "/v1/chat/completions", None, s) == 39
    assert reservation(chat | {"max_completion_tokens": 7}, "/v1/chat/completions", 9, s) == 31
    # No max_tokens: the key's cap, else the configured default.
    assert reservation(chat, "/v1/chat/completions", 9, s) == 24 + 9
    assert reservation(chat, "/v1/chat/completions", None, s) == 24 + 1000
    assert reservation({"input": "hello"}, "/v1/embeddings", None, s) == 4 + 8


@pytest.mark.parametrize(
    "content",
    ["hi", "Hello there!", "Say something nice.", "Write a short poem about the sea."],
)
def test_vllm_reservation_covers_real_tokenization(vllm: Upstream, content: str) -> None:
    # The quota guarantee rests on the estimate being at least vLLM's count for short
    # English prompts (the test model's tokenizer is a small-vocabulary one: ~2 bytes/token).
    body = {**TINY_CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 5}
    with httpx.Client(base_url=vllm.url, timeout=60, trust_env=False) as c:
        usage = c.post("/v1/chat/completions", json=body).json()["usage"]
    estimate = reservation(body, "/v1/chat/completions", None, Reservation())
    assert estimate >= usage["total_tokens"], (estimate, usage)


# The per-key max_tokens cap.


def test_max_tokens_over_the_key_cap_is_400(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(max_tokens=8))
    r = _post(gw, {**FAKE_CHAT, "max_tokens": 9})
    assert r.status_code == 400
    err = openai_error(r)
    assert err["param"] == "max_tokens" and err["code"] == "max_tokens_exceeded"
    assert "8" in err["message"] and err["type"] == "invalid_request_error"
    r = _post(gw, {**FAKE_CHAT, "max_completion_tokens": 20})
    assert r.status_code == 400 and openai_error(r)["param"] == "max_completion_tokens"
    assert _post(gw, {**FAKE_CHAT, "max_tokens": 8}).status_code == 200


def test_the_key_cap_is_sent_when_the_request_sets_no_max_tokens(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    # From key_defaults: vLLM is told the cap, so it never generates past the reservation.
    gw = gateway_factory(fake, key_defaults={"max_tokens": 8})
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    assert _post(gw, body).status_code == 200
    with httpx.Client(base_url=fake.url, trust_env=False) as c:
        assert c.get("/_stats").json()["last_body"]["max_tokens"] == 8
    # Embeddings generate nothing: no cap applies, nothing is added.
    r = _post(gw, {"model": "fake", "input": "hello"}, path="/v1/embeddings")
    assert r.status_code == 200


# Per-endpoint limits.


def test_global_endpoint_qps(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake, rate_limit={"endpoints": {"embeddings": {"qps": 1}}})
    emb = {"model": "fake", "input": "hello"}
    answers = _at_once([lambda: _post(gw, emb, path="/v1/embeddings")] * 3)
    assert sorted(r.status_code for r in answers) == [200, 429, 429]
    r = next(r for r in answers if r.status_code == 429)
    assert r.headers["x-ratelimit-limit-requests"] == "1"
    assert "/v1/embeddings" in r.json()["error"]["message"]
    assert gw.request_log(r.headers["x-request-id"])["limit"] == "qps_global_endpoint"
    # Chat has no such limit.
    answers = _at_once([lambda: _post(gw, FAKE_CHAT)] * 3)
    assert [r.status_code for r in answers] == [200] * 3
    text = gw.metrics()
    assert metric_value(text, "gateway_rejections_total", {"reason": "qps_global_endpoint"}) == 2


def test_key_endpoint_concurrency(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(
        fake, keys=keys_with(endpoints={"chat": {"concurrent": 1}}, queue_timeout=0)
    )
    with gw.client(USER_KEY) as c:
        slow = {"model": "fake-slow", "messages": [{"role": "user", "content": "x"}]}
        with c.stream("POST", "/v1/chat/completions", json=slow | {"stream": True}) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            next(lines)
            r = _post(gw, FAKE_CHAT)
            assert r.status_code == 429
            assert gw.request_log(r.headers["x-request-id"])["limit"] == (
                "concurrency_key_endpoint"
            )
            # Another endpoint, and another key, are not held by it.
            assert (
                _post(gw, {"model": "fake", "prompt": "x"}, path="/v1/completions").status_code
                == 200
            )
            assert _post(gw, FAKE_CHAT, key=ADMIN_KEY).status_code == 200


def test_key_defaults_endpoint_tokens_per_minute(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    # Embeddings cost 3 tokens with the fake: the first one spends most of the 10.
    gw = gateway_factory(
        fake, key_defaults={"endpoints": {"embeddings": {"tokens_per_minute": 10}}}
    )
    emb = {"model": "fake", "input": "hello"}
    assert _post(gw, emb, path="/v1/embeddings").status_code == 200
    r = _post(gw, emb, path="/v1/embeddings")
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == "10"
    assert gw.request_log(r.headers["x-request-id"])["limit"] == "tpm_key_endpoint"
    assert _post(gw, FAKE_CHAT).status_code == 200


def test_unknown_endpoint_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-abcdefgh12", "user": "u"}]}))
    for section in ("rate_limit", "key_defaults"):
        conf = tmp_path / "config.yaml"
        conf.write_text(
            yaml.safe_dump(
                {"api_keys_file": str(keys), section: {"endpoints": {"chatt": {"qps": 1}}}}
            )
        )
        assert main(["check-config", "--config", str(conf)]) == 2
        err = capsys.readouterr().err
        assert f"{section}.endpoints" in err and "'chatt'" in err and "chat, completions" in err
    raw = json.dumps(
        {"keys": [{"key": "sk-abcdefgh12", "user": "u", "endpoints": {"chat-completions": {}}}]}
    ).encode()
    with pytest.raises(KeysFileError, match=r"keys\.0\.endpoints.*'chat-completions'"):
        parse_keys(raw, KeyDefaults())


def test_limits_do_not_wait_on_each_other(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    # Reservations cost nothing visible when far from the limits: 10 at once all pass.
    gw = gateway_factory(fake, keys=keys_with(quota=100000, tokens_per_minute=100000))
    t0 = time.monotonic()
    answers = _at_once([lambda: _post(gw, SLOW_21)] * 10)
    assert [r.status_code for r in answers] == [200] * 10
    assert time.monotonic() - t0 < 5
