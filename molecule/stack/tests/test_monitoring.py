"""Monitoring, proven on real traffic: every dashboard panel's PromQL returns
data from the real Prometheus, and stopping vLLM makes its alert fire."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from load import demo_key_text

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))
import dashboard_queries  # noqa: E402 - a tool of the repository, not a package

DASHBOARDS = sorted((ROOT / "roles/grafana/files/dashboards").glob("*.json"))
testinfra_hosts = ["ansible://llmhost-stack"]

# One round of what users do: answers, streams, and the errors and limits the
# dashboards count (401, 404, 400; 429 for a request that may use more tokens than the demo
# key's quota has left); eight long streams on the demo key, four at once, the others waiting
# in the gateway for a slot (the queue's panels).
TRAFFIC = textwrap.dedent(
    """
    import http.client, json, sys, threading
    key = sys.argv[1]
    def call(body, auth=key, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=300)
        data = raw if raw is not None else json.dumps(body)
        headers = {"Authorization": "Bearer " + auth, "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body=data, headers=headers)
        resp = conn.getresponse(); resp.read(); return resp.status
    msg = [{"role": "user", "content": "Hello there"}]
    codes = [call({"model": "tiny", "max_tokens": 8, "messages": msg}) for _ in range(3)]
    codes.append(call({"model": "tiny", "max_tokens": 8, "messages": msg, "stream": True}))
    codes.append(call({"model": "tiny", "max_tokens": 8, "messages": msg, "stream": True,
                       "stream_options": {"include_usage": True}}))
    codes.append(call({"model": "tiny", "messages": msg}, auth="sk-wrong-key-000000"))
    codes.append(call({"model": "no-such-model", "messages": msg}))
    codes.append(call(None, raw="{not json"))
    codes.append(call({"model": "tiny", "max_tokens": 2000000, "messages": msg}))
    long = {"model": "tiny", "max_tokens": 300, "ignore_eos": True, "stream": True, "messages": msg}
    out = []
    threads = [threading.Thread(target=lambda: out.append(call(long))) for _ in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(json.dumps(codes + out))
    """
)


@pytest.fixture(scope="module")
def prometheus(host):
    probe = host.get_host(
        "ansible://llmhost-probe", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"]
    )
    address = probe.interface("eth0").addresses[0]
    return f"http://{address}:9090"


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


def _traffic(host) -> list[int]:
    key = demo_key_text("demo-key")
    result = host.run("python3 -c %s %s", TRAFFIC, key)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_every_dashboard_panel_returns_data(host, prometheus):
    # Counters born during the first round read as flat to rate() until they move
    # again: two rounds, a scrape apart (the local inventory scrapes every 5 s).
    codes = _traffic(host)
    assert {200, 401, 404, 400, 429} <= set(codes), codes
    time.sleep(12)
    # A panel reading 0 is no data (tools/dashboard_queries.py): the error and 429
    # panels read the second round, so it must have had each kind of answer too.
    codes = _traffic(host)
    assert {200, 401, 404, 400, 429} <= set(codes), codes
    time.sleep(12)
    queries = [
        q for path in DASHBOARDS for q in dashboard_queries.queries(path, include_variables=True)
    ]
    assert len(queries) > 30
    missing = queries
    deadline = time.monotonic() + 60
    while missing and time.monotonic() < deadline:
        missing = [q for q in missing if not dashboard_queries.evaluate(prometheus, q).has_data()]
        if missing:
            time.sleep(5)
    assert not missing, "panels without data (no series, or all 0):\n" + "\n".join(
        f"{q.panel}: {q.expr}" for q in missing
    )


def _alert_state(prometheus: str, name: str) -> str | None:
    alerts = _query(prometheus, f'ALERTS{{alertname="{name}"}}')
    states = {a["metric"]["alertstate"] for a in alerts}
    return "firing" if "firing" in states else ("pending" if states else None)


# VLLMDown holds `for: 1m` (a 5 s scrape and evaluation interval here) before it fires.
# The minute is not waited out: conftest.py runs tests on the probe host, which need nothing
# of this host, between the test that stops vLLM and the one that reads the alert's history.
_VLLM_STOPPED_AT: list[float] = []  # the test hosts share this machine's clock


def test_stopping_vllm_makes_its_alert_pending(host, prometheus):
    """vLLM stopped: VLLMDown goes pending (it fires in the test after the probe's)."""
    assert _alert_state(prometheus, "VLLMDown") is None
    _VLLM_STOPPED_AT.append(time.time())
    host.run("systemctl stop vllm")
    try:
        state = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and state is None:
            time.sleep(1)
            state = _alert_state(prometheus, "VLLMDown")
        assert state == "pending", state
    except BaseException:
        host.run("systemctl start vllm")  # the tests after this one need it
        raise


def test_its_alert_fires_after_a_minute_pending_then_llmhost_target_restarts_the_stack(
    host, prometheus
):
    """VLLMDown, read from Prometheus' own samples: pending first, firing from one minute
    after it went pending. Then the whole stack goes down and comes back through
    llmhost.target: `systemctl stop llmhost.target` stops every unit of it, `systemctl
    start llmhost.target` starts them all again (vLLM too) and a completion goes through
    nginx. One test, so that vLLM loads once for both."""
    assert _VLLM_STOPPED_AT, "runs after test_stopping_vllm_makes_its_alert_pending"
    try:
        deadline = time.monotonic() + 60 + 45
        while _alert_state(prometheus, "VLLMDown") != "firing":
            assert time.monotonic() < deadline, "VLLMDown did not fire"
            time.sleep(2)
        # The alert's samples since vLLM stopped, at Prometheus' evaluation times.
        since = int(time.time() - _VLLM_STOPPED_AT[0]) + 1
        series = _query(prometheus, f'ALERTS{{alertname="VLLMDown"}}[{since}s]')
        times = {s["metric"]["alertstate"]: [float(t) for t, _ in s["values"]] for s in series}
        assert set(times) == {"pending", "firing"}, times
        assert max(times["pending"]) < min(times["firing"]), times
        # Prometheus fires at the first evaluation at least `for` after the first pending.
        assert min(times["firing"]) - min(times["pending"]) >= 60, times
    except BaseException:
        host.run("systemctl start vllm")  # the tests after this one need it
        raise
    _stop_and_start_llmhost_target(host)


def _stop_and_start_llmhost_target(host) -> None:
    units = host.run("systemctl list-dependencies llmhost.target --plain").stdout.split()
    for unit in ("vllm.service", "llm-proxy.service", "llm-proxy.socket", "nginx.service"):
        assert unit in units, units
        assert "llmhost.target" in host.run("systemctl show -p PartOf --value %s", unit).stdout
    # No Redis on this host: one gateway process, no standby (two would each count limits).
    assert "llm-proxy-standby.service" not in units
    with host.sudo():
        host.run_expect([0], "systemctl stop llmhost.target")
        # systemctl returns once the target is stopped; its units may still be stopping
        # (the gateway lets its connections end).
        members = [u for u in units if u.endswith((".service", ".socket"))]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = {u: host.run("systemctl is-active %s", u).stdout.strip() for u in members}
            if all(state == "inactive" for state in states.values()):
                break
            time.sleep(1)
        assert all(state == "inactive" for state in states.values()), states
        host.run_expect([0], "systemctl start llmhost.target")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready = host.run("curl -s -o /dev/null -w %s http://127.0.0.1:8001/ready", "%{http_code}")
        if ready.stdout == "200":
            break
        time.sleep(1)
    for unit in units:
        if unit.endswith((".service", ".socket")):
            assert host.run("systemctl is-active %s", unit).stdout.strip() == "active", unit
    status = host.run(
        "curl -s -o /dev/null -w %s -H %s -H 'Content-Type: application/json' "
        "-d %s http://127.0.0.1:8000/v1/chat/completions",
        "%{http_code}",
        f"Authorization: Bearer {demo_key_text('admin-key')}",
        json.dumps(
            {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
        ),
    )
    assert status.stdout == "200"
