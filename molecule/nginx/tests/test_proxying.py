"""What the nginx scenario proves with its stand-in gateway (see files/stand_in_gateway.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

testinfra_hosts = ["ansible://gpu"]

STREAM_CLIENT = textwrap.dedent(
    """
    import http.client, json, ssl, sys, urllib.parse
    base = urllib.parse.urlsplit(sys.argv[1])
    def connect():
        if base.scheme == "https":
            # By address; test_reconverge checks the certificate against the host's name.
            context = ssl._create_unverified_context()
            return http.client.HTTPSConnection(
                base.hostname, base.port, timeout=20, context=context
            )
        return http.client.HTTPConnection(base.hostname, base.port, timeout=20)
    conn = connect()
    conn.request("GET", "/v1/stream")
    resp = conn.getresponse()
    first = resp.read1(65536)  # whatever has arrived: the first event only
    # The stand-in holds the rest of the stream until we release it: if nginx
    # buffered the response, this read would time out instead.
    release = connect()
    release.request("POST", "/v1/release", body=b"")
    release.getresponse().read()
    rest = resp.read()
    print(json.dumps({"status": resp.status, "first": first.decode(), "rest": rest.decode()}))
    """
)


@pytest.fixture
def base_url(host):
    """nginx on this host: https on the TLS host (its inventory says so), http on the other."""
    tls = host.ansible.get_variables().get("nginx_tls_enabled", False)
    return f"{'https' if tls else 'http'}://127.0.0.1:8000"


def _python(host, code, *args):
    result = host.run("python3 -c %s" + " %s" * len(args), code, *args)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_stream_chunks_arrive_before_the_response_ends(host, base_url):
    result = _python(host, STREAM_CLIENT, base_url)
    assert result["status"] == 200
    assert "data: first" in result["first"]
    assert "data: last" in result["rest"]


def test_request_reaches_the_gateway_with_forwarding_headers(host, base_url):
    from hostcheck import http

    status, headers, body = http(
        host,
        "POST",
        base_url + "/v1/echo",
        headers={"X-Request-ID": "req-abc-123"},
        body='{"model": "m"}',
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/v1/echo"
    assert seen["headers"]["x-request-id"] == "req-abc-123"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == base_url.partition(":")[0]
    assert headers["x-request-id"] == "req-abc-123"
    # Upstream keep-alive: nginx must not ask the gateway to close each connection.
    assert seen["headers"].get("connection", "") != "close"


def test_websocket_upgrade_headers_reach_the_gateway(host, base_url):
    from hostcheck import http

    status, _, body = http(
        host,
        "GET",
        base_url + "/v1/echo",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen["upgrade"] == "websocket"
    assert seen["connection"] == "upgrade"


def test_request_id_is_generated_when_absent(host, base_url):
    from hostcheck import http

    status, headers, body = http(host, "GET", base_url + "/v1/echo")
    assert status == 200
    generated = json.loads(body)["headers"]["x-request-id"]
    assert len(generated) == 32
    assert headers["x-request-id"] == generated


def test_body_size_limit_is_enforced(host, base_url):
    # The scenario sets nginx_client_max_body_size to 1m.
    result = host.run(
        "head -c 1200000 /dev/zero | curl -s --insecure -o /dev/null -w '%%{http_code}' "
        "--data-binary @- %s",
        base_url + "/v1/echo",
    )
    assert result.stdout == "413"


@pytest.mark.parametrize("path", ["/metrics", "/admin/usage"])
def test_restricted_paths_are_forwarded_from_loopback(host, base_url, path):
    from hostcheck import http

    status, _, body = http(host, "GET", base_url + path)
    assert status == 200
    assert json.loads(body)["path"] == path
