"""What only this scenario can prove: a second host probing, load to trip a
limit, and re-converges with changed keys (see molecule.yml)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
from load import demo_key_text, max_overlap, request_records

SCENARIO = Path(__file__).resolve().parent.parent
STACK = "llmhost-stack"


@pytest.fixture(scope="module")
def stack(host):
    return host.get_host(
        f"ansible://{STACK}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"]
    )


@pytest.fixture(scope="module")
def probe(host):
    return host.get_host(
        "ansible://llmhost-probe", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"]
    )


@pytest.fixture(scope="module")
def demo_key():
    return demo_key_text("demo-key")


@pytest.fixture(scope="module")
def admin_key():
    return demo_key_text("admin-key")


def _curl(h, url, *headers):
    """Status code of a GET from host h ("000" when nothing answered)."""
    command = "curl -s -o /dev/null -w %s --max-time 10"
    for _ in headers:
        command += " -H %s"
    return h.run(command + " %s", "%{http_code}", *headers, url)


testinfra_hosts = ["ansible://llmhost-probe"]


def test_vllm_and_gateway_are_unreachable_from_another_host(probe):
    for port in (8002, 8001):
        result = _curl(probe, f"http://{STACK}:{port}/health")
        assert result.stdout == "000", f"port {port} answered {result.stdout} from another host"


def test_nginx_serves_another_host(probe, demo_key):
    result = _curl(probe, f"http://{STACK}:8000/v1/models", f"Authorization: Bearer {demo_key}")
    assert result.stdout == "200"
    # vLLM's own unguarded paths stay out of reach through nginx too.
    for path in ("/invocations", "/tokenize", "/pause", "/v1/load_lora_adapter"):
        result = _curl(probe, f"http://{STACK}:8000{path}")
        assert result.stdout in ("403", "404"), path
    # The probe is the monitoring host: nginx lets it scrape both metrics paths.
    for path in ("/metrics", "/metrics/vllm"):
        assert _curl(probe, f"http://{STACK}:8000{path}").stdout == "200", path


STREAM = textwrap.dedent(
    """
    import http.client, json, sys
    key = sys.argv[1]
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=120)
    body = json.dumps({"model": "tiny", "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "Hello"}]})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [l for l in resp.read().decode().splitlines() if l.startswith("data: ")]
    print(json.dumps({"status": resp.status, "type": resp.getheader("Content-Type"),
                      "events": events}))
    """
)


def test_streamed_chat_completion_through_nginx(stack, demo_key):
    result = stack.run("python3 -c %s %s", STREAM, demo_key)
    assert result.rc == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == 200
    assert out["type"].startswith("text/event-stream")
    assert out["events"][-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in out["events"][:-1]]
    assert len(chunks) >= 2
    # The client did not ask for usage: the gateway's own usage chunk is removed.
    assert all(c["choices"] for c in chunks)


CONCURRENT = textwrap.dedent(
    """
    import http.client, json, sys, threading
    key, n = sys.argv[1], int(sys.argv[2])
    answers = []
    def one():
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=300)
        body = json.dumps({"model": "tiny", "max_tokens": 150, "ignore_eos": True, "stream": True,
                           "messages": [{"role": "user", "content": "Count"}]})
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [l for l in resp.read().decode().splitlines() if l.startswith("data: ")]
        answers.append({"status": resp.status, "done": lines[-1:] == ["data: [DONE]"]})
    threads = [threading.Thread(target=one) for _ in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps(answers))
    """
)


def test_beyond_the_keys_concurrency_requests_wait_their_turn(stack, demo_key):
    """The demo key allows 4 requests at once (inventories/local); 10 streams at once: none
    is refused, those past the 4th wait in the gateway for a slot of the key (up to the
    queue's 30 s) and are served as slots come back, whole; the gateway never had more
    than 4 of the key's in flight. (The 429 when a wait runs out, and a key that never
    waits: tests/proxy_app/test_queueing.py and test_limits.py.)"""
    since = float(stack.run("date +%s.%N").stdout)
    result = stack.run("python3 -c %s %s 10", CONCURRENT, demo_key)
    assert result.rc == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers == [{"status": 200, "done": True}] * 10, answers
    records = [
        r
        for r in request_records(stack, since, "demo")
        if r["path"] == "/v1/chat/completions" and r["start"] >= since
    ]
    assert [r["status"] for r in records] == [200] * 10, records
    assert max_overlap(records) == 4
    assert any(r.get("queue_ms", 0) > 0 for r in records), records
    # Every slot came back: a new request is served at once.
    again = stack.run("python3 -c %s %s", STREAM, demo_key)
    assert json.loads(again.stdout)["status"] == 200


def _converge(extra_vars: dict, tags: str = "llm_proxy") -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(extra_vars, f)
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(SCENARIO / "converge.yml"),
            "--tags",
            tags,
            "--limit",
            STACK,
            "-e",
            f"@{f.name}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _main_pid(stack):
    return stack.run("systemctl show -p MainPID --value llm-proxy").stdout.strip()


DEMO_KEYS = [
    {"user": "demo", "key": "{{ demo_api_key }}", "quota": 1000000, "concurrent": 4},
    {"user": "admin", "key": "{{ demo_admin_key }}", "admin": True},
]


def test_a_bad_keys_file_is_refused_before_it_lands(stack, demo_key):
    before = stack.file("/etc/llm-proxy/keys.json").sha256sum
    pid_before = _main_pid(stack)
    duplicate = {"user": "again", "key": "{{ demo_api_key }}"}
    run = _converge({"llm_proxy_api_keys": [*DEMO_KEYS, duplicate]})
    assert run.returncode != 0, "a keys file with a duplicate key was accepted"
    assert "Write the keys file" in run.stdout
    assert stack.file("/etc/llm-proxy/keys.json").sha256sum == before
    assert _main_pid(stack) == pid_before
    result = _curl(stack, "http://127.0.0.1:8000/v1/models", f"Authorization: Bearer {demo_key}")
    assert result.stdout == "200"


def _completion_codes(stack, demo_key, n):
    """Status codes of n quick completions in a row, through nginx."""
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1})
    codes = []
    for _ in range(n):
        result = stack.run(
            "curl -s -o /dev/null -w %s --max-time 60 -H %s -H %s --data-binary %s %s",
            "%{http_code}",
            f"Authorization: Bearer {demo_key}",
            "Content-Type: application/json",
            body,
            "http://127.0.0.1:8000/v1/completions",
        )
        codes.append(result.stdout)
    return codes


def test_keys_and_global_limits_change_in_place_other_settings_restart(stack, demo_key):
    """A key added in the inventory and llm_proxy_rate_limit reload (same PID): the new key
    is served, the new limit refuses; a setting such as the body limit restarts. (One test,
    so that one converge changes keys and limits.)"""
    new_key = "sk-" + secrets.token_urlsafe(36)  # as `llm-proxy new-key` makes them
    pid_before = _main_pid(stack)
    run = _converge(
        {
            "llm_proxy_api_keys": [*DEMO_KEYS, {"user": "added", "key": new_key}],
            "llm_proxy_rate_limit": {"qps": 1, "concurrent": 32},
        }
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert _main_pid(stack) == pid_before, "the gateway restarted for a key or limit change"
    result = _curl(stack, "http://127.0.0.1:8000/v1/models", f"Authorization: Bearer {new_key}")
    assert result.stdout == "200"
    assert "429" in _completion_codes(stack, demo_key, 3)

    run = _converge({"llm_proxy_max_body_bytes": 5 * 1024 * 1024})
    assert run.returncode == 0, run.stdout[-3000:]
    assert _main_pid(stack) != pid_before, "a max_body_bytes change needs a restart"
    # Back to the inventory's settings (qps 50): requests in a row pass again.
    run = _converge({})
    assert run.returncode == 0, run.stdout[-3000:]
    assert _completion_codes(stack, demo_key, 3) == ["200", "200", "200"]


def test_a_run_limited_to_the_serving_host_keeps_the_monitoring_host_allowed(stack, probe):
    """site.yml --limit gpu01 gathers no facts of the monitoring host: nginx's preflight
    gathers its address, so it stays in the allow-list and Prometheus keeps scraping."""
    conf_before = stack.file("/etc/nginx/nginx.conf").sha256sum
    run = _converge({}, tags="nginx")  # --limit llmhost-stack
    assert run.returncode == 0, run.stdout[-3000:]
    assert stack.file("/etc/nginx/nginx.conf").sha256sum == conf_before
    for path in ("/metrics", "/metrics/vllm"):
        assert _curl(probe, f"http://{STACK}:8000{path}").stdout == "200", path


def test_gateway_unit_exposure_is_low(stack):
    result = stack.run("systemd-analyze security --no-pager llm-proxy.service")
    last = result.stdout.strip().splitlines()[-1]
    print(last)
    exposure = float(last.split("exposure level for llm-proxy.service:")[1].split()[0])
    assert exposure <= 3.0, last


def test_a_gpu_host_without_a_gpu_fails_clearly():
    """Without the inventory's CPU-only mark, the driver role refuses a host with no GPU."""
    run = _converge({"nvidia_driver_cpu_only": False}, tags="nvidia_driver")
    assert run.returncode != 0
    # Ansible prints a failed task's message on stderr.
    assert "lspci shows no NVIDIA GPU" in run.stdout + run.stderr, run.stderr[-3000:]
