"""Happy paths against real vLLM (CPU, tiny model) through the gateway."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator

import openai
import orjson
import pytest
from proxy_harness import (
    ADMIN_KEY,
    USER_KEY,
    VLLM_MAX_MODEL_LEN,
    Gateway,
    Upstream,
    http,
    metric_value,
    upstream_metric,
    wait_for,
)

RESTRICTED_KEY = "sk-restricted-0123456789"
# ignore_eos makes the random model produce exactly max_tokens tokens.
EXACT = {"ignore_eos": True}
# The longest generation the context allows for a prompt of a few tokens ("go": 2), with
# nothing that may end it early: thousands of engine steps, seconds on any CPU.
LONG_TOKENS = VLLM_MAX_MODEL_LEN - 16
LONG = {"max_tokens": LONG_TOKENS, "min_tokens": LONG_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def gw(vllm: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from proxy_harness import free_port

    d = tmp_path_factory.mktemp("gw-vllm")
    port = free_port()
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "quota": 1_000_000},
        {"key": RESTRICTED_KEY, "user": "restricted", "models": ["other-model"]},
    ]
    conf = {
        "vllm_port": vllm.port,
        "fastapi_port": port,
        "api_keys_file": str(d / "keys.json"),
        "state_dir": str(d / "state"),
        "timeouts": {"connect": 2, "first_byte": 60, "read": 30, "total": 120},
    }
    g = Gateway(d, port, conf, keys=keys).start()
    yield g
    g.stop()


@pytest.fixture
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with http() as c:
        yield openai.OpenAI(base_url=gw.url + "/v1", api_key=USER_KEY, http_client=c, max_retries=0)


def _user_usage(gw: Gateway) -> dict[str, int]:
    return gw.usage(ADMIN_KEY)["user1"]["total_usage"]


def _vllm_idle(vllm: Upstream) -> None:
    wait_for(lambda: upstream_metric(vllm, "vllm:num_requests_running") == 0, 60, "vLLM idle")


def test_chat_completion_counts_vllm_tokens(gw: Gateway, client: openai.OpenAI) -> None:
    before = _user_usage(gw)
    r = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=5,
        extra_body=EXACT,
    )
    resp = r.parse()
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    after = _user_usage(gw)
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == resp.usage.prompt_tokens
    assert after["completion_tokens"] - before["completion_tokens"] == 5
    line = gw.request_log(r.headers["x-request-id"])
    assert line["status"] == 200 and line["user"] == "user1" and line["model"] == "tiny"
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["completion_tokens"] == 5


def test_completion(gw: Gateway, client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=4, extra_body=EXACT
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    assert isinstance(resp.choices[0].text, str)


def test_stream_without_include_usage_hides_usage_but_counts(
    gw: Gateway, client: openai.OpenAI
) -> None:
    before = _user_usage(gw)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=6,
        stream=True,
        extra_body=EXACT,
    )
    chunks = list(stream)
    assert chunks, "no chunks streamed"
    # The gateway asked vLLM for usage; the client did not, so it must not see it.
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    after = _user_usage(gw)
    assert after["completion_tokens"] - before["completion_tokens"] == 6
    assert after["prompt_tokens"] > before["prompt_tokens"]


def test_stream_with_include_usage_passes_usage(gw: Gateway, client: openai.OpenAI) -> None:
    before = _user_usage(gw)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.usage is not None and last.choices == []
    assert last.usage.completion_tokens == 6
    after = _user_usage(gw)
    spent = (after["prompt_tokens"] + after["completion_tokens"]) - (
        before["prompt_tokens"] + before["completion_tokens"]
    )
    assert spent == last.usage.total_tokens


def test_stream_is_passed_chunk_by_chunk(gw: Gateway, vllm: Upstream) -> None:
    """The first token reaches the client while vLLM is still generating the rest."""
    # 512 tokens that nothing can end early: hundreds of engine steps, seconds of streaming.
    tokens = 512
    _vllm_idle(vllm)
    body = {
        "model": "tiny",
        "prompt": "go",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
        "min_tokens": tokens,
        **EXACT,
    }
    sent = time.monotonic()
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        events = [next(lines)]
        first_at = time.monotonic() - sent
        events += list(lines)
        last_at = time.monotonic() - sent
    # A gateway that buffered the stream would deliver the first chunk when vLLM finished,
    # with the last. (Not vLLM's num_requests_running at the first chunk: under CPU
    # contention its /metrics answered seconds late, after the generation ended.)
    assert first_at < last_at / 2, f"first chunk after {first_at:.2f} s, last {last_at:.2f} s"
    assert events[-1] == "data: [DONE]"
    usage = orjson.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == tokens
    assert len(events) > 2  # tokens came in more than one chunk


def test_models_listed_per_key(gw: Gateway, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "other"]
    with gw.client(RESTRICTED_KEY) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200
        assert r.json()["data"] == []


def test_model_not_allowed_is_403(gw: Gateway) -> None:
    with gw.client(RESTRICTED_KEY) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "model_not_allowed" and err["param"] == "model"
    assert err["type"] == "permission_error"


def test_vllm_errors_pass_through_in_openai_shape(gw: Gateway) -> None:
    before = _user_usage(gw)
    with gw.client(USER_KEY) as c:
        too_long = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5000}
        )
        unknown = c.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert too_long.status_code == 400
    assert set(too_long.json()["error"]) == {"message", "type", "param", "code"}
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    assert _user_usage(gw)["requests"] == before["requests"]


def test_usage_is_in_sqlite(gw: Gateway, client: openai.OpenAI) -> None:
    client.completions.create(model="tiny", prompt="x", max_tokens=3, extra_body=EXACT)
    api = _user_usage(gw)
    db = sqlite3.connect(gw.state_dir / "usage.sqlite3")
    try:
        row = db.execute(
            "SELECT SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) "
            "FROM usage_daily WHERE user = 'user1'"
        ).fetchone()
    finally:
        db.close()
    assert row == (api["requests"], api["prompt_tokens"], api["completion_tokens"])


def test_client_disconnect_stops_vllm_and_charges_tokens(gw: Gateway, vllm: Upstream) -> None:
    # 16 x 2032 tokens that nothing can end early: about 10 s of generation here on a quiet
    # machine, while the gateway drops vLLM's connection in the event-loop turn in which the
    # client's close arrives (vLLM then stops within tens of milliseconds: bench/leaving.py).
    n = 16
    body = {"model": "tiny", "prompt": "go", "n": n, "stream": True, **LONG}
    _vllm_idle(vllm)
    generated_before = upstream_metric(vllm, "vllm:generation_tokens_total")
    before = _user_usage(gw)
    with gw.client(USER_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    line = gw.request_log(rid)
    assert line["status"] == 499 and line["error"] == "client_disconnect"
    assert line["tokens_estimated"] is True
    assert line["completion_tokens"] >= 3
    after = _user_usage(gw)
    assert after["completion_tokens"] - before["completion_tokens"] == line["completion_tokens"]
    # vLLM stopped generating: idle again, short of the tokens it was asked for.
    _vllm_idle(vllm)
    generated = upstream_metric(vllm, "vllm:generation_tokens_total") - generated_before
    assert generated < n * LONG_TOKENS, f"vLLM generated all {generated} tokens"


def test_client_leaving_a_whole_answer_stops_vllm(gw: Gateway, vllm: Upstream) -> None:
    """Not streamed: the client gives up waiting; vLLM stops instead of finishing for nobody."""
    # 16 x 2032 tokens that nothing can end early: thousands of engine steps (about 10 s
    # here on a quiet machine). The client leaves once the gateway has sent the request to
    # vLLM, an event, not a time: the gateway must notice the close itself, at any moment.
    n = 16
    body = orjson.dumps({"model": "tiny", "prompt": "go", "n": n, **LONG})
    _vllm_idle(vllm)
    generated_before = upstream_metric(vllm, "vllm:generation_tokens_total")
    before = _user_usage(gw)
    rid = f"whole-answer-left-{time.time_ns()}"
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"X-Request-ID: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (USER_KEY.encode(), rid.encode(), len(body), body)
        )
        # The gateway's own count: vLLM's gauges can lag its engine by seconds on 2 busy cores.
        wait_for(
            lambda: metric_value(gw.metrics(), "gateway_backend_in_flight") > 0, 60, "forwarded"
        )
    line = gw.request_log(rid)
    assert line["status"] == 499 and line["error"] == "client_disconnect"
    assert line["tokens_estimated"] is True and line["completion_tokens"] == 0
    after = _user_usage(gw)
    assert after["requests"] - before["requests"] == 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == line["prompt_tokens"] >= 1
    _vllm_idle(vllm)
    generated = upstream_metric(vllm, "vllm:generation_tokens_total") - generated_before
    assert generated < n * LONG_TOKENS, f"vLLM generated all {generated} tokens"


def test_metrics_after_traffic(gw: Gateway, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=2, extra_body=EXACT
    )
    text = gw.metrics()
    ok = {"method": "POST", "endpoint": "/v1/chat/completions", "status": "200"}
    assert metric_value(text, "http_requests_total", ok) >= 1
    assert metric_value(text, "token_usage_total", {"user": "user1", "type": "prompt"}) > 0
    assert metric_value(text, "token_usage_total", {"user": "user1", "type": "completion"}) > 0
    assert metric_value(text, "upstream_up") == 1.0
    ttft = {"endpoint": "/v1/chat/completions"}
    assert metric_value(text, "upstream_time_to_first_token_seconds_count", ttft) >= 1
    assert metric_value(text, "upstream_request_duration_seconds_count", ttft) >= 1


def test_ready_when_vllm_answers(gw: Gateway) -> None:
    with gw.client() as c:
        r = c.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
