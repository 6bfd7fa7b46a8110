"""Grafana on the monitoring hosts: provisioning files, dashboards, and the
service itself when a package was installed."""

from __future__ import annotations

import json

import pytest

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "monitoring"
testinfra_hosts = ["ansible://all"]


def test_datasource_and_dashboards_are_provisioned(host, hostvar):
    provisioning = hostvar("grafana_provisioning_dir", "/etc/grafana/provisioning")
    datasource = host.file(f"{provisioning}/datasources/llmhost.yml")
    assert datasource.exists
    assert "uid: prometheus" in datasource.content_string
    assert host.file(f"{provisioning}/dashboards/llmhost.yml").exists
    dashboards = hostvar("grafana_dashboards_dir", "/var/lib/grafana/dashboards/llmhost")
    for name in ("llmhost-gateway.json", "llmhost-vllm.json"):
        dashboard = json.loads(host.file(f"{dashboards}/{name}").content_string)
        assert dashboard["panels"], name


def test_grafana_serves_when_installed(host, hostvar):
    if hostvar("grafana_install_source", "repository") == "none":
        pytest.skip(
            "grafana_install_source is none: no Grafana package on this host "
            "(provisioning files checked above)"
        )
    assert host.service("grafana-server").is_running
    port = hostvar("grafana_http_port", 3000)
    result = host.run(f"curl -sf http://127.0.0.1:{port}/api/health")
    assert result.rc == 0
