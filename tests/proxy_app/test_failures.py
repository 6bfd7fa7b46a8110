"""What clients get when things go wrong: always OpenAI's error shape, never a hang."""

from __future__ import annotations

import httpx
import pytest
from proxy_harness import (
    ADMIN_KEY,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    free_port,
    http,
    keys_with,
    metric_value,
    openai_error,
    wait_for,
)


@pytest.fixture(scope="module")
def gw(module_gateway_factory: GatewayFactory, fake_upstream: Upstream) -> Gateway:
    """One gateway for the module's tests: what each asserts is its own request's answer."""
    return module_gateway_factory(
        fake_upstream,
        max_body_bytes=2048,
        timeouts={"connect": 2, "first_byte": 1, "read": 1, "total": 30},
    )


def test_vllm_down_is_503_quickly(gateway_factory: GatewayFactory) -> None:
    nothing = Upstream(free_port(), proc=None)  # type: ignore[arg-type]
    gw = gateway_factory(nothing)
    with gw.client(USER_KEY, timeout=10) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        ready = c.get("/ready")
    assert r.status_code == 503
    assert openai_error(r)["code"] == "upstream_unavailable"
    assert ready.status_code == 503
    assert metric_value(gw.metrics(), "upstream_up") == 0.0


def test_vllm_hanging_is_504(gw: Gateway) -> None:
    timeouts = {"type": "upstream_timeout"}
    before = metric_value(gw.metrics(), "http_errors_total", timeouts, unseen_is_zero=True)
    with gw.client(USER_KEY, timeout=10) as c:
        r = c.post("/v1/completions", json={"model": "fake-hang", "prompt": "x"})
    assert r.status_code == 504
    assert openai_error(r)["code"] == "upstream_timeout"
    assert metric_value(gw.metrics(), "http_errors_total", timeouts) == before + 1


def test_vllm_dropping_the_connection_is_502(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake-drop", "prompt": "x"})
    assert r.status_code == 502
    assert openai_error(r)["code"] == "upstream_error"


def test_vllm_500_is_passed_in_openai_shape(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake-500", "prompt": "x"})
    assert r.status_code == 500
    err = openai_error(r)
    assert err["type"] == "server_error" and "boom" in err["message"]


def test_missing_usage_is_served_and_logged(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake-nousage", "prompt": "x"})
    assert r.status_code == 200
    assert any(rec.get("event") == "usage_missing" for rec in gw.logs())


def test_body_too_large_is_413(gw: Gateway) -> None:
    big = {"model": "fake", "prompt": "x" * 5000}
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json=big)
        # Same without Content-Length (chunked upload).
        r2 = c.post(
            "/v1/completions",
            content=iter([b'{"model": "fake", "prompt": "', b"x" * 5000, b'"}']),
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"
    assert r2.status_code == 413


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 42, "messages": []}', "model"),
        (b'{"model": "fake"}', "messages"),
        (b'{"model": "fake", "messages": "hi"}', "messages"),
        (b'{"model": "fake", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "fake", "messages": [], "max_tokens": "5"}', "max_tokens"),
        (
            b'{"model": "fake", "messages": [], "stream": true, "stream_options": 1}',
            "stream_options",
        ),
    ],
)
def test_malformed_requests_are_400_naming_the_field(
    gw: Gateway, body: bytes, param: str | None
) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == 400
    err = openai_error(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_unknown_paths_are_404_and_vllm_internals_unreachable(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        for method, path in [
            ("GET", "/nope"),
            ("POST", "/tokenize"),
            ("POST", "/invocations"),
            ("POST", "/pause"),
            ("POST", "/v1/chat/completions/x"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
        ]:
            r = c.request(method, path)
            assert r.status_code == 404, path
            assert openai_error(r)["code"] == "unknown_url"
        # Under /admin/ a key that is not an admin's learns nothing of which paths exist.
        admin = c.get("/admin/nope")
        wrong = c.get("/v1/chat/completions")
    assert admin.status_code == 403 and openai_error(admin)["code"] == "admin_required"
    assert wrong.status_code == 405
    # Unknown paths share one metrics label: label values stay bounded.
    text = gw.metrics()
    assert metric_value(text, "http_requests_total", {"endpoint": "other", "status": "404"}) >= 7
    assert "/tokenize" not in text


def test_embeddings_are_forwarded(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/embeddings", json={"model": "fake", "input": "hello"})
    assert r.status_code == 200
    assert r.json()["data"][0]["embedding"] == [0.1, 0.2]
    line = gw.request_log(r.headers["x-request-id"])
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 0)


def test_client_leaving_before_a_whole_answer_stops_upstream(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    """A non-streamed request whose client gives up: the gateway drops its vLLM connection
    at once (not when its own timeouts expire), charges the prompt and frees the slot."""
    gw = gateway_factory(
        fake,
        keys=keys_with(concurrent=1),
        timeouts={"connect": 2, "first_byte": 60, "read": 60, "total": 120},
    )
    with http(fake.url) as c:
        disconnects = c.get("/_stats").json()["disconnects"]
    with gw.client(USER_KEY, timeout=1) as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            "/v1/completions",
            json={"model": "fake-hang", "prompt": "a prompt of some length"},
            headers={"X-Request-ID": "leaves-early-1"},
        )
    line = gw.request_log("leaves-early-1")
    assert line["status"] == 499 and line["error"] == "client_disconnect"
    assert line["tokens_estimated"] is True
    assert line["prompt_tokens"] >= 1 and line["completion_tokens"] == 0
    # Well before the gateway's 60 s first-byte timeout, the upstream saw the close.
    assert line["duration_ms"] < 10_000

    def upstream_saw_it() -> bool:
        with http(fake.url) as c:
            return c.get("/_stats").json()["disconnects"] > disconnects

    wait_for(upstream_saw_it, 10, "the upstream to see the close")
    usage = gw.usage(ADMIN_KEY)["user1"]["total_usage"]
    assert usage["requests"] == 1 and usage["prompt_tokens"] == line["prompt_tokens"]
    assert metric_value(gw.metrics(), "gateway_client_disconnects_total") == 1.0
    # The concurrency slot came back (concurrent: 1).
    with gw.client(USER_KEY) as c:
        assert c.post("/v1/completions", json={"model": "fake", "prompt": "x"}).status_code == 200
