"""Node exporter on every host."""

from __future__ import annotations

import re

import pytest
from hostcheck import assert_unit_hardened

# Collected for every host; conftest.py keeps the hosts that run it (all of them)
# (hostcheck.hosts_running).
SERVICE = "all"
testinfra_hosts = ["ansible://all"]

# Collectors that the sandbox could break and that work on any Linux host:
# timex (adjtimex, a @clock call), netdev (netlink), filesystem (/proc/1/mounts,
# statfs on every mount point), systemd (D-Bus), textfile, and the /proc readers.
COLLECTORS_ANY_HOST = {
    "cpu", "diskstats", "filefd", "filesystem", "loadavg", "meminfo", "netclass", "netdev",
    "netstat", "sockstat", "stat", "systemd", "textfile", "time", "timex", "uname", "vmstat",
}  # fmt: skip
# Every collector that succeeded on the test hosts before the unit was hardened
# (Debian 12's prometheus-node-exporter 1.5, default collectors). Some depend on
# hardware and kernel (thermal zones, PSI, conntrack), hence Molecule only.
COLLECTORS_TEST_HOST = COLLECTORS_ANY_HOST | {
    "arp", "bcache", "btrfs", "conntrack", "cpufreq", "edac", "entropy", "os",
    "powersupplyclass", "pressure", "selinux", "softnet", "thermal_zone", "udp_queues", "xfs",
}  # fmt: skip


def _metrics(host, hostvar) -> str:
    port = hostvar("node_exporter_listen_address", ":9100").rsplit(":", 1)[1]
    result = host.run(f"curl -sf http://127.0.0.1:{port}/metrics")
    assert result.rc == 0, result.stderr
    return result.stdout


def _succeeding_collectors(metrics: str) -> set[str]:
    pattern = re.compile(r'^node_scrape_collector_success\{collector="([^"]+)"\} 1$', re.MULTILINE)
    return set(pattern.findall(metrics))


def test_node_exporter_is_active_and_answers(host, hostvar):
    service = host.service("prometheus-node-exporter")
    assert service.is_running
    assert service.is_enabled
    assert "node_filesystem_avail_bytes" in _metrics(host, hostvar)


def test_node_exporter_unit_is_sandboxed(host):
    """Debian's unit with the role's drop-in: 9.2 without it, 1.7 with it."""
    assert_unit_hardened(host, "prometheus-node-exporter")


def test_collectors_succeed_in_the_sandbox(host, hostvar):
    failing = COLLECTORS_ANY_HOST - _succeeding_collectors(_metrics(host, hostvar))
    assert not failing, f"failing (journalctl -u prometheus-node-exporter): {sorted(failing)}"


@pytest.mark.molecule_only(reason="the list is the test hosts' hardware and kernel")
def test_every_collector_of_the_test_host_succeeds(host, hostvar):
    failing = COLLECTORS_TEST_HOST - _succeeding_collectors(_metrics(host, hostvar))
    assert not failing, f"failing (journalctl -u prometheus-node-exporter): {sorted(failing)}"
