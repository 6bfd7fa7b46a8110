"""What an outside probe of the gateway found, each case answered properly now.

Against the fake upstream (tests/proxy_app/fake_upstream.py): these need answers a real
vLLM does not give (a malformed model list, a body without usage, a request that never gets
response headers). Framing cases talk raw HTTP over a socket, as a probe would.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from proxy_harness import (
    ADMIN_KEY,
    ERROR_FIELDS,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    http,
    keys_with,
    metric_value,
    openai_error,
    wait_for,
)


def _fake_stats(fake: Upstream) -> dict:
    with http() as c:
        return c.get(fake.url + "/_stats").json()


@pytest.fixture(scope="module")
def gw(module_gateway_factory: GatewayFactory, fake_upstream: Upstream) -> Gateway:
    """One gateway for the module: each test reads only its own requests, or counts before
    and after."""
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "concurrent": 1},
        {"key": "sk-restricted-0123456789", "user": "restricted", "models": ["fake"]},
    ]
    # A first-byte timeout far beyond the tests' waits: what frees a slot must be the
    # client leaving, not the timeout.
    return module_gateway_factory(
        fake_upstream,
        keys=keys,
        timeouts={"connect": 2, "first_byte": 120, "read": 120, "total": 300},
    )


def _count(gw: Gateway, name: str, labels: dict[str, str]) -> float:
    return metric_value(gw.metrics(), name, labels, unseen_is_zero=True)


@pytest.fixture
def models_body(fake: Upstream) -> Iterator[None]:
    yield
    with http() as c:
        c.post(fake.url + "/_models", content=b"")


@pytest.mark.parametrize(
    "listing",
    [b"<html>oops</html>", b'[{"id": "fake"}]', b'{"data": ["fake", 3]}', b'{"data": 7}'],
    ids=["not-json", "json-list", "items-not-objects", "data-not-list"],
)
@pytest.mark.parametrize("key", [USER_KEY, "sk-restricted-0123456789"], ids=["all", "restricted"])
@pytest.mark.usefixtures("models_body")
def test_a_malformed_model_list_from_vllm_is_502(
    gw: Gateway, fake: Upstream, listing: bytes, key: str
) -> None:
    with http() as c:
        c.post(fake.url + "/_models", content=listing)
    with gw.client(key) as c:
        r = c.get("/v1/models")
    assert r.status_code == 502
    assert openai_error(r)["code"] == "upstream_error"
    assert not any(rec.get("event") == "unhandled_error" for rec in gw.logs())


def test_a_streamed_client_leaving_before_the_headers_frees_its_slot(
    gw: Gateway, fake: Upstream
) -> None:
    """The key allows one request at a time: the second gets in once the first client left."""
    disconnects = _fake_stats(fake)["disconnects"]
    estimated = _count(gw, "gateway_usage_estimated_total", {"reason": "client_disconnect"})
    body = {"model": "fake-hang", "prompt": "x", "stream": True}
    with gw.client(USER_KEY, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body, headers={"X-Request-ID": "left-early"})
    line = gw.request_log("left-early")
    assert line["status"] == 499 and line["error"] == "client_disconnect"
    assert line["tokens_estimated"] is True and line["prompt_tokens"] >= 1
    # vLLM (here the fake) saw its connection close: it stops generating.
    wait_for(lambda: _fake_stats(fake)["disconnects"] > disconnects, 10, "upstream to see it")
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 200, r.text
    after = _count(gw, "gateway_usage_estimated_total", {"reason": "client_disconnect"})
    assert after == estimated + 1


@pytest.mark.parametrize("model", ["fake-nousage", "fake-notjson"])
def test_an_answer_without_usage_is_charged_an_estimate(gw: Gateway, model: str) -> None:
    before = gw.usage(ADMIN_KEY)["user1"]["total_usage"]
    estimated = _count(gw, "gateway_usage_estimated_total", {"reason": "usage_missing"})
    with gw.client(USER_KEY) as c:
        r = c.post(
            "/v1/completions",
            json={"model": model, "prompt": "x" * 400},
            headers={"X-Request-ID": f"nousage-{model}"},
        )
    assert r.status_code == 200
    line = gw.request_log(f"nousage-{model}")
    assert line["tokens_estimated"] is True
    assert line["prompt_tokens"] >= 100 and line["completion_tokens"] >= 1
    usage = gw.usage(ADMIN_KEY)["user1"]["total_usage"]
    assert usage["prompt_tokens"] - before["prompt_tokens"] == line["prompt_tokens"]
    assert usage["completion_tokens"] - before["completion_tokens"] == line["completion_tokens"]
    after = _count(gw, "gateway_usage_estimated_total", {"reason": "usage_missing"})
    assert after == estimated + 1


def _raw(gw: Gateway, data: bytes) -> bytes:
    """Send bytes as they are and read the answer until the gateway closes."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, json.loads(body)


def test_headers_over_the_size_limit_are_431_in_openai_shape(gw: Gateway) -> None:
    # 200 KB of one header, never finished: the gateway answers once it has read 64 KiB.
    raw = _raw(gw, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
    status, headers, body = _parse(raw)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "request_headers_too_large"


def test_too_many_headers_are_431_in_openai_shape(gw: Gateway) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    raw = _raw(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    status, _, body = _parse(raw)
    assert status == 431
    assert body["error"]["code"] == "request_headers_too_large"


def test_a_moderate_number_of_headers_is_fine(gw: Gateway) -> None:
    some = {f"X-H{i}": "v" for i in range(60)}
    with gw.client() as c:
        assert c.get("/health", headers=some).status_code == 200


@pytest.mark.parametrize(
    "data",
    [b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nContent-Length: -5\r\n\r\n"],
    ids=["not-http", "bad-content-length"],
)
def test_malformed_framing_is_400_in_openai_shape(gw: Gateway, data: bytes) -> None:
    status, headers, body = _parse(_raw(gw, data))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert set(body["error"]) == ERROR_FIELDS
    assert body["error"]["code"] == "invalid_http_request"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("GET", "/admin/reload-keys", "POST"),
    ],
)
def test_405_says_which_methods_are_allowed(
    gw: Gateway, method: str, path: str, allow: str
) -> None:
    with gw.client(ADMIN_KEY) as c:
        r = c.request(method, path)
    assert r.status_code == 405
    assert openai_error(r)["code"] == "method_not_allowed"
    assert r.headers["allow"] == allow


@pytest.mark.parametrize("path", ["/admin/usage/", "/admin/usage%2f", "/admin/usage%2F"])
def test_admin_paths_never_redirect(gw: Gateway, path: str) -> None:
    with gw.client(ADMIN_KEY) as c:
        r = c.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404
    assert "location" not in r.headers
    assert openai_error(r)["code"] == "unknown_url"


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/chat/completions"), ("GET", "/admin/usage")]
)
def test_two_authorization_headers_are_refused(gw: Gateway, method: str, path: str) -> None:
    headers = [("authorization", f"Bearer {USER_KEY}"), ("authorization", f"Bearer {ADMIN_KEY}")]
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with http(gw.url) as c:
        r = c.request(method, path, headers=headers, json=body if method == "POST" else None)
    assert r.status_code == 400
    assert openai_error(r)["code"] == "duplicate_header"


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [("/admin/nothing-here", 404, "not_found"), ("/admin/usage?user=" + "u" * 200, 400, None)],
)
def test_admin_errors_are_logged_and_counted(
    gw: Gateway, path: str, status: int, error: str | None
) -> None:
    label = error or "bad_request"
    errors = _count(gw, "http_errors_total", {"type": label})
    with gw.client(ADMIN_KEY) as c:
        r = c.get(path, headers={"X-Request-ID": f"admin-err-{status}"})
    assert r.status_code == status
    openai_error(r)
    line = gw.request_log(f"admin-err-{status}")
    assert line["error"] == label and line["user"] == "admin"
    assert _count(gw, "http_errors_total", {"type": label}) == errors + 1


def _reload(gw: Gateway) -> httpx.Response:
    with gw.client(ADMIN_KEY) as c:
        return c.post("/admin/reload-keys")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"keys": []}', "no keys"),
        (
            '{"keys": [{"key": "sk-new-key-0123456789", "user": "x", "admin": true}],'
            ' "keys": [{"key": "sk-other-key-0123456789", "user": "y"}]}',
            "'keys' given more than once",
        ),
        (
            '{"keys": [{"key": "sk-new-key-0123456789", "user": "x", "user": "y"}]}',
            "'user' given more than once",
        ),
    ],
    ids=["empty", "keys-twice", "member-twice"],
)
def test_keys_files_that_would_lock_out_or_mislead_are_refused(
    gw: Gateway, content: str, expected: str
) -> None:
    good = gw.keys_path.read_text()
    try:
        gw.write_keys(content)
        r = _reload(gw)
        assert r.status_code == 422
        assert expected in openai_error(r)["message"]
        with gw.client(USER_KEY) as c:
            ok = c.post("/v1/completions", json={"model": "fake", "prompt": "x"})
        assert ok.status_code == 200
    finally:
        gw.write_keys(good)


def test_a_keys_file_over_the_size_limit_is_refused(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    gw = gateway_factory(fake, keys=keys_with(), keys_file_max_bytes=4096)
    many = [{"key": f"sk-generated-key-{i:06d}", "user": f"u{i}"} for i in range(200)]
    gw.write_keys([*keys_with(), *many])
    r = _reload(gw)
    assert r.status_code == 422
    assert "keys_file_max_bytes" in openai_error(r)["message"]
    with gw.client(USER_KEY) as c:
        assert c.post("/v1/completions", json={"model": "fake", "prompt": "x"}).status_code == 200
