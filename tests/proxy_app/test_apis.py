"""Every API vLLM serves, behind the same keys, limits and usage: OpenAI's Responses API,
Anthropic's Messages API (and count_tokens), rerank and score.

Against real vLLM on the CPU: the tiny model for responses and messages, the tiny
cross-encoder (``make tiny-model``) for rerank and score, each its own vLLM, one gateway
routing by model. The clients are the official SDKs (``openai``, ``anthropic``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from proxy_harness import (
    ADMIN_KEY,
    USER_KEY,
    Gateway,
    Upstream,
    free_port,
    http,
    metric_value,
    upstream_metric,
    wait_for,
)

RESTRICTED_KEY = "sk-restricted-api-0123456789"  # may use "other" only
ONE_AT_A_TIME_KEY = "sk-one-at-a-time-0123456789"  # concurrency 1
# Long enough that the stream is still running when the test leaves it (see test_vllm.py).
LONG = 1000
# The random tiny model may sample its end-of-text token at any step. The Responses API
# takes vLLM's ignore_eos; Anthropic's does not, so its requests are greedy (temperature 0):
# then the same prompt always gives the same tokens, and for the prompts below (measured on
# the tiny model) never the end-of-text before max_tokens.
EXACT = {"ignore_eos": True}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def gw(
    vllm: Upstream, vllm_scorer: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gw-apis")
    port = free_port()
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "quota": 1_000_000},
        {"key": RESTRICTED_KEY, "user": "restricted", "models": ["other"]},
        # Refused at once over its limit (a request that waits is test_queueing.py's).
        {"key": ONE_AT_A_TIME_KEY, "user": "single", "concurrent": 1, "queue_timeout": 0},
    ]
    conf = {
        "fastapi_port": port,
        "api_keys_file": str(d / "keys.json"),
        "state_dir": str(d / "state"),
        "timeouts": {"connect": 2, "first_byte": 60, "read": 30, "total": 120},
        "models": [
            {
                "name": name,
                "backends": [{"name": f"{name}-0", "host": "127.0.0.1", "port": up.port}],
            }
            for name, up in (("tiny", vllm), ("other", vllm), ("scorer", vllm_scorer))
        ],
        # Per-endpoint limits cover the new endpoints too.
        "rate_limit": {"endpoints": {"score": {"qps": 1}}},
    }
    g = Gateway(d, port, conf, keys=keys).start()
    yield g
    g.stop()


def _usage(gw: Gateway, user: str = "user1") -> dict[str, int]:
    return gw.usage(ADMIN_KEY)[user]["total_usage"]


def _spent(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    return (
        after["prompt_tokens"] - before["prompt_tokens"],
        after["completion_tokens"] - before["completion_tokens"],
    )


@contextlib.contextmanager
def _busy(gw: Gateway) -> Iterator[None]:
    """vLLM kept busy with 16 long generations (another key's stream, left unread): every
    step of a request sent meanwhile takes the time of a 17-sequence batch, so a stream
    that its client leaves after a few tokens is still generating when the gateway sees it
    go (the gateway looks for a client gone once a request has run for a second; the tiny
    model alone generates 1,000 tokens in about that). The admin key's: no test counts it."""
    body = {"model": "tiny", "prompt": "go", "n": 16, "max_tokens": LONG, "stream": True, **EXACT}
    with gw.client(ADMIN_KEY) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        yield


@pytest.fixture
def oai(gw: Gateway) -> Iterator[openai.OpenAI]:
    with http() as c:
        yield openai.OpenAI(base_url=gw.url + "/v1", api_key=USER_KEY, http_client=c, max_retries=0)


def _claude(gw: Gateway, key: str = USER_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=120)


# --- the Responses API -----------------------------------------------------------------


def test_a_response_is_charged_what_vllm_reported(gw: Gateway, oai: openai.OpenAI) -> None:
    before = _usage(gw)
    resp = oai.responses.create(
        model="tiny", input="Say hello", max_output_tokens=5, extra_body=EXACT
    )
    assert resp.output_text is not None
    assert resp.usage is not None and resp.usage.output_tokens == 5
    spent = _spent(before, _usage(gw))
    assert spent == (resp.usage.input_tokens, resp.usage.output_tokens)


def test_a_streamed_response_is_charged_from_response_completed(
    gw: Gateway, oai: openai.OpenAI
) -> None:
    before = _usage(gw)
    events = list(
        oai.responses.create(
            model="tiny", input="Count", max_output_tokens=6, stream=True, extra_body=EXACT
        )
    )
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert "response.output_text.delta" in types
    usage = events[-1].response.usage
    assert usage is not None and usage.output_tokens == 6
    assert _spent(before, _usage(gw)) == (usage.input_tokens, usage.output_tokens)


def test_a_client_leaving_a_streamed_response_is_charged_an_estimate(
    gw: Gateway, vllm: Upstream
) -> None:
    body = {"model": "tiny", "input": "go", "max_output_tokens": LONG, "stream": True, **EXACT}
    before = _usage(gw)
    with _busy(gw), gw.client(USER_KEY) as c, c.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200, r.read()
        rid = r.headers["x-request-id"]
        deltas = 0
        for line in r.iter_lines():
            deltas += line.startswith("event: response.output_text.delta")
            if deltas == 3:
                break
    line = gw.request_log(rid)
    assert line["status"] == 499 and line["error"] == "client_disconnect", line
    assert line["tokens_estimated"] is True and 3 <= line["completion_tokens"] < LONG
    assert _spent(before, _usage(gw)) == (line["prompt_tokens"], line["completion_tokens"])
    estimated = {"reason": "client_disconnect"}
    assert metric_value(gw.metrics(), "gateway_usage_estimated_total", estimated) >= 1
    wait_for(lambda: upstream_metric(vllm, "vllm:num_requests_running") == 0, 60, "vLLM idle")


def test_a_key_cap_sets_max_output_tokens(gw: Gateway, gateway_factory, vllm: Upstream) -> None:
    """A key's max_tokens cap applies as max_output_tokens (the Responses API's name)."""
    capped = gateway_factory(vllm, keys=[{"key": USER_KEY, "user": "capped", "max_tokens": 4}])
    with capped.client(USER_KEY) as c:
        r = c.post("/v1/responses", json={"model": "tiny", "input": "go"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["output_tokens"] <= 4
        r = c.post("/v1/responses", json={"model": "tiny", "input": "go", "max_output_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_exceeded"


def test_stored_responses_and_vllm_only_paths_stay_closed(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        for method, path in (
            ("GET", "/v1/responses/resp_123"),
            ("POST", "/v1/responses/resp_123/cancel"),
            ("POST", "/tokenize"),
            ("POST", "/pause"),
            ("POST", "/invocations"),
            ("POST", "/v2/rerank"),
        ):
            r = c.request(method, path, json={})
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["code"] == "unknown_url"


# --- Anthropic's Messages API -----------------------------------------------------------


def test_a_message_is_charged_what_vllm_reported(gw: Gateway) -> None:
    before = _usage(gw)
    msg = _claude(gw).messages.create(
        model="tiny",
        max_tokens=5,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert msg.role == "assistant" and msg.content and msg.content[0].type == "text"
    assert msg.usage.output_tokens == 5
    assert _spent(before, _usage(gw)) == (msg.usage.input_tokens, msg.usage.output_tokens)


def test_a_streamed_message_is_charged_from_its_events(gw: Gateway) -> None:
    before = _usage(gw)
    with _claude(gw).messages.stream(
        model="tiny",
        max_tokens=6,
        extra_body=GREEDY,
        system="You count.",
        messages=[{"role": "user", "content": "Count"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert isinstance(text, str)
    assert final.usage.output_tokens == 6
    assert _spent(before, _usage(gw)) == (final.usage.input_tokens, final.usage.output_tokens)


def test_the_key_is_taken_from_x_api_key_or_bearer(gw: Gateway) -> None:
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with http() as c:
        r = c.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": USER_KEY})
        assert r.status_code == 200, r.text
        r = c.post(
            gw.url + "/v1/messages", json=body, headers={"authorization": f"Bearer {USER_KEY}"}
        )
        assert r.status_code == 200, r.text
        r = c.post(
            gw.url + "/v1/messages",
            json=body,
            headers={"x-api-key": USER_KEY, "authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        # x-api-key is Anthropic's: the OpenAI endpoints take Authorization only.
        r = c.post(
            gw.url + "/v1/chat/completions",
            json=body | {"messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": USER_KEY},
        )
        assert r.status_code == 401


def test_a_bad_key_is_the_sdks_authentication_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e:
        _claude(gw, "sk-not-a-key-0123456789").messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 401
    assert e.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }


def test_a_model_outside_the_keys_list_is_permission_denied(gw: Gateway) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        _claude(gw, RESTRICTED_KEY).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    # ...and the model it may use is served.
    msg = _claude(gw, RESTRICTED_KEY).messages.create(
        model="other", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.usage.output_tokens >= 1


def test_an_unknown_model_and_a_vllm_error_come_back_in_anthropics_shape(gw: Gateway) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        _claude(gw).messages.create(
            model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    # vLLM refuses more tokens than the context: its error, in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as e:
        _claude(gw).messages.create(
            model="tiny", max_tokens=100_000, messages=[{"role": "user", "content": "hi"}]
        )
    body = e.value.body
    assert body["type"] == "error", body  # type: ignore[index]
    assert body["error"]["type"] == "invalid_request_error", body  # type: ignore[index]
    assert "max_model_len" in body["error"]["message"], body  # type: ignore[index]


def test_beyond_the_keys_concurrency_is_the_sdks_rate_limit_error(gw: Gateway) -> None:
    """A streamed request holds the key's one slot (kept unread: four choices with 20
    log-probabilities a token, megabytes that no buffer takes whole, so the gateway waits
    on the client); a message meanwhile is RateLimitError with retry-after. Once the first
    leaves, the slot is free again."""
    hold = {
        "model": "tiny",
        "prompt": "go",
        "max_tokens": LONG,
        "n": 4,
        "logprobs": 20,
        "stream": True,
        **EXACT,
    }
    with gw.client(ONE_AT_A_TIME_KEY) as c, c.stream("POST", "/v1/completions", json=hold) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        first = next(lines)
        assert first.startswith("data: {") and '"choices"' in first, first[:500]
        with pytest.raises(anthropic.RateLimitError) as e:
            _claude(gw, ONE_AT_A_TIME_KEY).messages.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert int(e.value.response.headers["retry-after"]) >= 1

    def admitted() -> bool:
        try:
            _claude(gw, ONE_AT_A_TIME_KEY).messages.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        except anthropic.RateLimitError:
            return False
        return True

    wait_for(admitted, 10, "the slot freed")


def test_a_client_leaving_a_streamed_message_is_charged_an_estimate(
    gw: Gateway, vllm: Upstream
) -> None:
    """Left after three text deltas: charged an estimate, its prompt tokens exact (what
    message_start said), and the key's one slot free again."""
    body = {
        "model": "tiny",
        "max_tokens": LONG,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
        **GREEDY,
    }
    before = _usage(gw, "single")
    headers = {"x-api-key": ONE_AT_A_TIME_KEY}
    with (
        _busy(gw),
        http() as c,
        c.stream("POST", gw.url + "/v1/messages", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        rid = r.headers["x-request-id"]
        deltas = 0
        for line in r.iter_lines():
            if line.startswith("data:") and '"message_start"' in line:
                prompt = orjson.loads(line[5:])["message"]["usage"]["input_tokens"]
            deltas += line.startswith("event: content_block_delta")
            if deltas == 3:
                break
    line = gw.request_log(rid)
    assert line["status"] == 499 and line["error"] == "client_disconnect", line
    assert line["tokens_estimated"] is True
    assert line["prompt_tokens"] == prompt
    assert 3 <= line["completion_tokens"] < LONG
    spent = _spent(before, _usage(gw, "single"))
    assert spent == (line["prompt_tokens"], line["completion_tokens"])
    msg = _claude(gw, ONE_AT_A_TIME_KEY).messages.create(
        model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.usage.output_tokens >= 1
    wait_for(lambda: upstream_metric(vllm, "vllm:num_requests_running") == 0, 60, "vLLM idle")


def test_count_tokens_is_forwarded_and_charges_nothing(gw: Gateway) -> None:
    before = _usage(gw)
    count = _claude(gw).messages.count_tokens(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert count.input_tokens > 0
    assert _spent(before, _usage(gw)) == (0, 0)
    assert _usage(gw)["requests"] == before["requests"] + 1


# --- rerank and score (a pooling model) -----------------------------------------------


def test_rerank_is_charged_its_prompt_tokens(gw: Gateway) -> None:
    before = _usage(gw)
    with gw.client(USER_KEY) as c:
        r = c.post(
            "/v1/rerank",
            json={"model": "scorer", "query": "a cat", "documents": ["a dog", "the cat"]},
        )
    assert r.status_code == 200, r.text
    assert {x["index"] for x in r.json()["results"]} == {0, 1}
    assert _spent(before, _usage(gw)) == (r.json()["usage"]["prompt_tokens"], 0)


def test_score_is_charged_and_its_endpoint_limit_holds(gw: Gateway) -> None:
    body: dict[str, Any] = {"model": "scorer", "text_1": "a cat", "text_2": ["a dog", "the cat"]}
    time.sleep(1.1)  # a fresh second for score's QPS limit of 1
    before = _usage(gw)
    with gw.client(USER_KEY) as c:
        first = c.post("/v1/score", json=body)
        second = c.post("/v1/score", json=body)
        chat = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
        )
    assert first.status_code == 200, first.text
    assert len(first.json()["data"]) == 2
    assert _spent(before, _usage(gw))[0] >= first.json()["usage"]["prompt_tokens"]
    # rate_limit.endpoints.score.qps = 1: the second within the second is refused; chat is not.
    assert second.status_code == 429, second.text
    assert "requests per second (1/s)" in second.json()["error"]["message"]
    assert chat.status_code == 200, chat.text


# --- each endpoint in the metrics and the log ---------------------------------------------


def test_each_endpoint_is_its_own_label_and_log_path(gw: Gateway) -> None:
    bodies = {
        "/v1/responses": {"model": "tiny", "input": "x", "max_output_tokens": 1},
        "/v1/messages": {
            "model": "tiny",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}],
        },
        "/v1/rerank": {"model": "scorer", "query": "a", "documents": ["b"]},
        "/v1/score": {"model": "scorer", "text_1": "a", "text_2": "b"},
    }
    time.sleep(1.1)  # score's QPS window of 1
    with gw.client(USER_KEY) as c:
        for endpoint, body in bodies.items():
            r = c.post(endpoint, json=body)
            assert r.status_code == 200, (endpoint, r.text)
            assert gw.request_log(r.headers["x-request-id"])["path"] == endpoint
    text = gw.metrics()
    for endpoint in bodies:
        ok = {"endpoint": endpoint, "method": "POST", "status": "200"}
        assert metric_value(text, "http_requests_total", ok) >= 1, endpoint


def test_a_stream_cut_by_vllm_ends_with_an_error_event_in_the_apis_shape() -> None:
    """The relay's error events (a stream vLLM breaks off), without vLLM: the shapes."""
    from proxy_app.apis import APIS
    from proxy_app.errors import upstream_error
    from proxy_app.stream import StreamRelay

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    class _Outcome:
        def failed(self, _: str) -> None:
            pass

    import asyncio

    shapes = {}
    for path in ("/v1/messages", "/v1/responses", "/v1/chat/completions"):
        sent.clear()
        relay = StreamRelay(send, _Outcome(), False, APIS[path])  # type: ignore[arg-type]
        asyncio.run(relay.end_with_error(upstream_error("cut")))
        shapes[path] = sent[-1]["body"]
    event, data = shapes["/v1/messages"].split(b"\n", 1)
    assert event == b"event: error"
    assert orjson.loads(data[6:])["error"]["type"] == "api_error"
    event, data = shapes["/v1/responses"].split(b"\n", 1)
    assert event == b"event: error"
    assert orjson.loads(data[6:])["code"] == "upstream_error"
    assert orjson.loads(shapes["/v1/chat/completions"][6:])["error"]["code"] == "upstream_error"
