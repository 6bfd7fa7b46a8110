"""Request logs, client addresses and metric names, as an operator reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from proxy_harness import USER_KEY, Gateway, GatewayFactory, Upstream

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(
    module_gateway_factory: GatewayFactory,
    fake_upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    """One gateway with the default settings and a request log file, for tests that read
    only their own requests."""
    log_file = tmp_path_factory.mktemp("request-log") / "requests.log"
    return module_gateway_factory(fake_upstream, log_file=str(log_file))


def test_one_json_line_per_request_with_the_facts(gw: Gateway) -> None:
    log_file = Path(gw.config["log_file"])
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    line = gw.request_log(r.headers["x-request-id"])
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["duration_ms"] > 0
    assert line["client_ip"] == "127.0.0.1"
    assert line["user"] == "user1" and len(line["key_id"]) == 12
    assert line["model"] == "fake" and line["stream"] is False
    assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 5)
    assert line["limit"] == "allowed"
    # The same line also lands in the configured log file.
    in_file = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert any(x.get("request_id") == r.headers["x-request-id"] for x in in_file)


def test_forwarded_for_is_believed_only_from_trusted_proxies(
    gw: Gateway, gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    xff = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
    trusting = gw  # default: 127.0.0.1 is nginx
    distrusting = gateway_factory(fake, name="distrusting", trusted_proxies=["10.0.0.0/8"])
    with trusting.client(USER_KEY) as c:
        r1 = c.post("/v1/chat/completions", json=CHAT, headers=xff)
    with distrusting.client(USER_KEY) as c:
        r2 = c.post("/v1/chat/completions", json=CHAT, headers=xff)
    assert trusting.request_log(r1.headers["x-request-id"])["client_ip"] == "203.0.113.7"
    assert distrusting.request_log(r2.headers["x-request-id"])["client_ip"] == "127.0.0.1"


def test_metrics_exposes_the_documented_series(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        c.post("/v1/chat/completions", json=CHAT)
        c.post("/v1/chat/completions", json={"model": 1})
    with gw.client() as c:
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in (
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_active_requests",
        "http_errors_total",
        "token_usage_total",
        "gateway_rejections_total",
        "upstream_time_to_first_token_seconds_bucket",
        "upstream_request_duration_seconds_bucket",
        "upstream_up",
        "gateway_keys_loaded",
    ):
        assert f"\n{name}" in r.text or f"# TYPE {name}" in r.text, name


def test_request_logs_off_at_warning_level(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake, log_level="warning")
    with gw.client(USER_KEY) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.get("/admin/usage").status_code == 403
    assert not [r for r in gw.logs() if r.get("event") == "request"]
