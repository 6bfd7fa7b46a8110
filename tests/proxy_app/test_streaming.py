"""Streaming edge cases, against the tests' fake upstream (see fake_upstream.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from proxy_harness import (
    ADMIN_KEY,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    http,
    keys_with,
    metric_value,
    wait_for,
)


def _fake_stats(fake: Upstream) -> dict:
    with http(fake.url) as c:
        return c.get("/_stats").json()


def _events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _user_usage(gw: Gateway) -> dict[str, int]:
    return gw.usage(ADMIN_KEY)["user1"]["total_usage"]


@pytest.fixture(scope="module")
def gw(module_gateway_factory: GatewayFactory, fake_upstream: Upstream) -> Gateway:
    """One gateway with the default settings for the tests that read only what their own
    request did (usage as a difference, logs by request id)."""
    return module_gateway_factory(fake_upstream)


def test_gateway_asks_for_usage_and_hides_it(gw: Gateway, fake: Upstream) -> None:
    before = _user_usage(gw)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        events = _events(r)
    sent = _fake_stats(fake)["last_body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == body["messages"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5 and all(ch["choices"] for ch in chunks)
    assert all("usage" not in ch for ch in chunks)
    after = _user_usage(gw)
    spent = {k: after[k] - before[k] for k in ("prompt_tokens", "completion_tokens")}
    assert spent == {"prompt_tokens": 7, "completion_tokens": 5}


def test_client_that_asked_for_usage_gets_it(gw: Gateway) -> None:
    body = {
        "model": "fake",
        "prompt": "hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


def test_stream_options_false_is_overridden_upstream_only(gw: Gateway, fake: Upstream) -> None:
    before = _user_usage(gw)
    body = {
        "model": "fake",
        "prompt": "hi",
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        events = _events(r)
    assert _fake_stats(fake)["last_body"]["stream_options"] == {"include_usage": True}
    assert all("usage" not in json.loads(e) for e in events[:-1])
    assert _user_usage(gw)["completion_tokens"] - before["completion_tokens"] == 5


def test_client_disconnect_cancels_upstream_and_charges_estimate(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(concurrent=1))
    disconnects = _fake_stats(fake)["disconnects"]
    body = {"model": "fake-slow", "prompt": "hello there", "stream": True}
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        rid = r.headers["x-request-id"]
        received = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 3:
                break
    line = gw.request_log(rid)
    assert line["status"] == 499 and line["error"] == "client_disconnect"
    assert line["tokens_estimated"] is True
    # fake-slow sends 200 chunks over 10 s: the gateway stopped long before the end.
    assert 3 <= line["completion_tokens"] < 200
    assert line["prompt_tokens"] >= 1
    wait_for(
        lambda: _fake_stats(fake)["disconnects"] > disconnects, 10, "the upstream to see the close"
    )
    usage = gw.usage(ADMIN_KEY)["user1"]["total_usage"]
    assert usage["completion_tokens"] == line["completion_tokens"]
    # The concurrency slot came back: the key (concurrent: 1) can stream again.
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 200
    assert metric_value(gw.metrics(), "gateway_client_disconnects_total") == 1.0


def test_upstream_drop_mid_stream_ends_with_error_event(gw: Gateway) -> None:
    before = _user_usage(gw)
    body = {"model": "fake-drop", "prompt": "x", "stream": True}
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        events = _events(r)
    assert len(events) == 4 and "[DONE]" not in events
    err = json.loads(events[-1])["error"]
    assert err["code"] == "upstream_error" and err["type"] == "server_error"
    line = gw.request_log(rid)
    assert line["completion_tokens"] == 3 and line["tokens_estimated"] is True
    assert _user_usage(gw)["completion_tokens"] - before["completion_tokens"] == 3


def test_upstream_stall_mid_stream_times_out(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, timeouts={"connect": 2, "first_byte": 5, "read": 0.5, "total": 30})
    body = {"model": "fake-stall", "prompt": "x", "stream": True}
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        events = _events(r)
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    assert len(events) == 3


def test_request_id_goes_to_vllm_and_back(gw: Gateway, fake: Upstream) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "fake", "prompt": "x"},
            headers={"X-Request-ID": "nginx-req-42"},
        )
    assert r.headers["x-request-id"] == "nginx-req-42"
    headers = _fake_stats(fake)["last_headers"]
    assert headers["x-request-id"] == "nginx-req-42"
    # The client's key never reaches vLLM.
    assert "authorization" not in headers
    assert gw.request_log("nginx-req-42")["status"] == 200
