"""Pure functions of the hot path, checked without processes."""

from __future__ import annotations

import ipaddress
import json

import orjson
import pytest

from proxy_app.apis import APIS
from proxy_app.asgi import ClientAddress
from proxy_app.errors import ApiError
from proxy_app.proxy import openai_error_body, parse_request
from proxy_app.ratelimit import format_duration
from proxy_app.sse import SseScanner


def _ev(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHUNK = {"choices": [{"delta": {"content": "a"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
STREAM = _ev(CHUNK) + _ev(CHUNK) + _ev(USAGE) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("keep_usage", [True, False])
@pytest.mark.parametrize("piece", [1, 7, 64, len(STREAM)])
def test_sse_scanner_any_split(keep_usage: bool, piece: int) -> None:
    s = SseScanner(keep_usage)
    out = b""
    for i in range(0, len(STREAM), piece):
        out += s.feed(STREAM[i : i + piece])
    assert s.done and s.usage == USAGE["usage"] and s.chunks == 2
    # [DONE] is held back until the caller has stored the usage.
    assert b"[DONE]" not in out
    out += s.rest()
    expected = STREAM if keep_usage else _ev(CHUNK) + _ev(CHUNK) + b"data: [DONE]\n\n"
    assert out == expected


def test_sse_scanner_forwards_unterminated_tail() -> None:
    s = SseScanner(False)
    assert s.feed(_ev(CHUNK) + b"data: {partial") == _ev(CHUNK)
    assert s.rest() == b"data: {partial"


def test_stream_options_injected_without_reserialising() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "\\u00e9"}], "stream": true}  \n'
    )
    req = parse_request(body, APIS["/v1/chat/completions"])
    assert req.stream and not req.wants_usage
    assert req.body.startswith(body.rstrip()[:-1])
    sent = orjson.loads(req.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == orjson.loads(body)["messages"]


def test_non_stream_body_untouched() -> None:
    body = b'{"model": "m", "prompt": "x", "max_tokens": 3}'
    assert parse_request(body, APIS["/v1/completions"]).body is body


def test_parse_request_rejects_bool_as_int() -> None:
    with pytest.raises(ApiError) as e:
        parse_request(b'{"model": "m", "prompt": "x", "max_tokens": true}', APIS["/v1/completions"])
    assert e.value.param == "max_tokens"


def test_error_body_wrapping() -> None:
    ok = b'{"error": {"message": "m", "type": "t", "param": null, "code": 1}}'
    assert openai_error_body(400, ok) is ok
    wrapped = json.loads(openai_error_body(404, b'{"detail": "Not Found"}'))["error"]
    assert "Not Found" in wrapped["message"] and wrapped["code"] == "upstream_404"
    assert (
        json.loads(openai_error_body(502, b"<html>bad</html>"))["error"]["type"] == "server_error"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (59.0, "59s"), (360, "6m0s")]
)
def test_reset_duration_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_client_address() -> None:
    ca = ClientAddress([ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")])
    assert ca.resolve("127.0.0.1", b"1.2.3.4, 10.0.0.5") == "1.2.3.4"
    assert ca.resolve("192.0.2.1", b"1.2.3.4") == "192.0.2.1"
    assert ca.resolve("127.0.0.1", None) == "127.0.0.1"
    assert ca.resolve("127.0.0.1", b"garbage") == "127.0.0.1"
