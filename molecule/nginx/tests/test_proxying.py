"""What the nginx scenario proves with its stand-in gateway (see files/stand_in_gateway.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

testinfra_hosts = ["ansible://gpu"]

STREAM_CLIENT = textwrap.dedent(
    """
    import http.client, json, sys
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=20)
    conn.request("GET", "/v1/stream")
    resp = conn.getresponse()
    first = resp.read1(65536)  # whatever has arrived: the first event only
    # The stand-in holds the rest of the stream until we release it: if nginx
    # buffered the response, this read would time out instead.
    release = http.client.HTTPConnection("127.0.0.1", 8000, timeout=20)
    release.request("POST", "/v1/release", body=b"")
    release.getresponse().read()
    rest = resp.read()
    print(json.dumps({"status": resp.status, "first": first.decode(), "rest": rest.decode()}))
    """
)


def _python(host, code):
    result = host.run("python3 -c %s", code)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_stream_chunks_arrive_before_the_response_ends(host):
    result = _python(host, STREAM_CLIENT)
    assert result["status"] == 200
    assert "data: first" in result["first"]
    assert "data: last" in result["rest"]


def test_request_reaches_the_gateway_with_forwarding_headers(host):
    from conftest import http

    status, headers, body = http(
        host,
        "POST",
        "http://127.0.0.1:8000/v1/echo",
        headers={"X-Request-ID": "req-abc-123"},
        body='{"model": "m"}',
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/v1/echo"
    assert seen["headers"]["x-request-id"] == "req-abc-123"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-request-id"] == "req-abc-123"
    # Upstream keep-alive: nginx must not ask the gateway to close each connection.
    assert seen["headers"].get("connection", "") != "close"


def test_request_id_is_generated_when_absent(host):
    from conftest import http

    status, headers, body = http(host, "GET", "http://127.0.0.1:8000/v1/echo")
    assert status == 200
    generated = json.loads(body)["headers"]["x-request-id"]
    assert len(generated) == 32
    assert headers["x-request-id"] == generated


def test_body_size_limit_is_enforced(host):
    # The scenario sets nginx_client_max_body_size to 1m.
    result = host.run(
        "head -c 1200000 /dev/zero | curl -s -o /dev/null -w '%{http_code}' "
        "--data-binary @- http://127.0.0.1:8000/v1/echo"
    )
    assert result.stdout == "413"


@pytest.mark.parametrize("path", ["/metrics", "/admin/usage"])
def test_restricted_paths_are_forwarded_from_loopback(host, path):
    from conftest import http

    status, _, body = http(host, "GET", f"http://127.0.0.1:8000{path}")
    assert status == 200
    assert json.loads(body)["path"] == path
