"""`make check` on the cluster layout: every host checked for what its groups make it run
(the host checks of tests/hosts/ ran in this verify already, through Molecule, before any
test changed a host); with units stopped on a gateway-only host and on the Redis host it
fails, naming each host and unit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import CLIENT, GATEWAYS, GPU_HOSTS, REDIS, Cluster, gateway_url, wait_until

ROOT = Path(__file__).resolve().parents[3]
testinfra_hosts = [f"ansible://{GATEWAYS[0]}"]


def _check(*pytest_args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLECULE_SCENARIO")}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "check_hosts.py"),
            "--inventory",
            os.environ["MOLECULE_INVENTORY_FILE"],
            *pytest_args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def _rows(output: str) -> dict[str, list[str]]:
    """The host table's rows: host -> [groups, passed, failed, first failure...]."""
    section = output.split("llmhost host checks", 1)[1]
    return {
        line.split()[0]: line.split()[1:]
        for line in section.splitlines()
        if line.startswith("llmhost-")
    }


def test_check_fails_naming_the_host_and_unit_stopped_on_a_gateway_and_redis(cluster: Cluster):
    gateway = GATEWAYS[1]
    # The socket too: it would start the gateway again at the next connection (Prometheus
    # scrapes through nginx every few seconds).
    cluster.run(gateway, "systemctl stop llm-proxy.socket llm-proxy.service")
    cluster.run(REDIS, "systemctl stop redis-server.service")
    try:
        run = _check("-k", "test_every_unit_of_llmhost_target_is_active")
    finally:
        # As an operator brings a host's services back: llmhost.target starts what stopping
        # the socket stopped with it (the standby gateway, bound to the socket).
        cluster.run(REDIS, "systemctl start llmhost.target")
        cluster.run(gateway, "systemctl start llmhost.target")
        wait_until(lambda: cluster.active(gateway, "llm-proxy-standby"), 60, "the standby up")
        for gw in GATEWAYS:
            wait_until(
                lambda gw=gw: CLIENT.get(f"{gateway_url(gw)}/ready").status_code == 200,
                60,
                f"{gw} ready again",
            )
    out = run.stdout
    assert run.returncode == 1, out[-4000:]
    assert f"on {gateway}: " in out and "llm-proxy.service is inactive" in out, out[-4000:]
    assert "llm-proxy-standby.service is inactive" in out, out[-4000:]
    assert f"on {REDIS}: " in out and "redis-server.service is inactive" in out, out[-4000:]
    rows = _rows(out)
    # Each host was checked (one row each), and only the two changed ones failed.
    assert set(rows) == {*GPU_HOSTS, *GATEWAYS, REDIS}, rows
    failed = {host for host, row in rows.items() if int(row[2]) > 0}
    assert failed == {gateway, REDIS}, rows
    assert rows[gateway][0] == "gateway" and "redis" in rows[REDIS][0], rows
