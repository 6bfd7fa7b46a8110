"""Prometheus on the monitoring hosts: up, every target up, rules loaded."""

from __future__ import annotations

import json

from hostcheck import assert_unit_hardened, assert_unit_healthy

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "monitoring"
testinfra_hosts = ["ansible://all"]


def _api(host, hostvar, path):
    port = hostvar("prometheus_web_listen_address", "0.0.0.0:9090").rsplit(":", 1)[1]
    result = host.run(f"curl -sf http://127.0.0.1:{port}{path}")
    assert result.rc == 0, f"GET {path}: {result.stderr}"
    return json.loads(result.stdout)["data"]


def test_prometheus_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, "prometheus")


def test_prometheus_unit_is_sandboxed(host):
    """Debian's unit with the role's drop-in: 3.9 without it, 1.2 with it."""
    assert_unit_hardened(host, "prometheus")


def test_prometheus_config_is_valid(host):
    result = host.run("promtool check config /etc/prometheus/prometheus.yml")
    assert result.rc == 0, result.stdout + result.stderr


def test_every_target_is_up(host, hostvar):
    targets = _api(host, hostvar, "/api/v1/targets?state=active")["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets}
    assert {"prometheus", "llm-gateway", "vllm", "node"} <= jobs, jobs
    down = [
        f"{t['labels']['job']}@{t['labels']['instance']}: {t['lastError']}"
        for t in targets
        if t["health"] != "up"
    ]
    assert not down, down


def test_llmhost_rules_are_loaded(host, hostvar):
    groups = _api(host, hostvar, "/api/v1/rules")["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    for alert in ("LLMGatewayDown", "VLLMDown", "HostDiskNearlyFull"):
        assert alert in names, f"{alert} not loaded ({sorted(names)})"
