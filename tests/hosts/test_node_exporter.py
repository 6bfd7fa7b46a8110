"""Node exporter on every host."""

from __future__ import annotations

testinfra_hosts = ["ansible://all"]


def test_node_exporter_is_active_and_answers(host, hostvar):
    service = host.service("prometheus-node-exporter")
    assert service.is_running
    assert service.is_enabled
    port = hostvar("node_exporter_listen_address", ":9100").rsplit(":", 1)[1]
    result = host.run(f"curl -sf http://127.0.0.1:{port}/metrics")
    assert result.rc == 0
    assert "node_filesystem_avail_bytes" in result.stdout
