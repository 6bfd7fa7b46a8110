"""Fixtures of the cluster scenario's tests (helpers in cluster.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import (
    GATEWAYS,
    GPU_HOSTS,
    REDIS,
    BackendInfo,
    Cluster,
    address,
    inventory,
    wait_until,
)

_STARTS_CLEAN: list[bool] = []  # checked once per run, by the first test's cluster
# The module whose tests change the hosts for good (rolls with other settings, the last one
# failing): it runs last.
LAST_MODULE = "test_updates"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "late: run after every other test but test_updates.py's (a wait on a clock, such as "
        "a killed gateway's leases running out, overlaps the tests in between)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The host checks of tests/hosts/ first (they read the hosts as deployed: a test that
    kills a process leaves a restart count behind); tests marked ``late`` move to just
    before test_updates.py's, in their order."""
    checks = [i for i in items if Path(str(i.fspath)).parent.name == "hosts"]
    late = [i for i in items if i.get_closest_marker("late")]
    last = [i for i in items if i.module.__name__ == LAST_MODULE and i not in late]
    rest = [i for i in items if i not in checks and i not in late and i not in last]
    items[:] = checks + rest + late + last


@pytest.fixture(scope="module")
def cluster(host, admin_key) -> Cluster:
    names = (*GPU_HOSTS, *GATEWAYS, REDIS)
    cluster = Cluster(
        {n: host.get_host(f"ansible://{n}", ansible_inventory=inventory()) for n in names}
    )
    if not _STARTS_CLEAN:
        # The scenario's last test leaves its first gpu host drained (a roll that failed).
        # Tests run on hosts left so would fail far from the cause (routing, the roll).
        left = {
            f"{gw}:{port}": sorted(b) for (gw, port), b in cluster.drained(admin_key).items() if b
        }
        if left:
            pytest.exit(
                f"backends drained before any test ran: {left}. A verify of this scenario "
                "leaves its first gpu host drained (its last test, a roll that fails). Bring "
                "the host back as an operator does (playbooks/rolling-update.yml with working "
                "settings; a converge alone leaves them drained) or make the hosts anew.",
                returncode=1,
            )
        _STARTS_CLEAN.append(True)
    return cluster


@pytest.fixture(scope="module")
def backends(cluster: Cluster) -> dict[str, list[BackendInfo]]:
    """Every model's backends as the first gateway's config lists them, each with the
    systemd unit of the vLLM started with its port (asked of its host)."""
    config = cluster.gateway_config(GATEWAYS[0])
    by_address = {address(h): h for h in GPU_HOSTS}
    out: dict[str, list[BackendInfo]] = {}
    for model in config["models"]:
        for b in model["backends"]:
            host = by_address.get(b["host"], b["host"])
            assert host in GPU_HOSTS, (b, by_address)
            units = cluster.run(host, "systemctl list-units 'vllm*' --plain --no-legend")
            unit = next(
                u
                for u in (line.split()[0] for line in units.splitlines() if line.strip())
                if f"--port {b['port']} " in cluster.run(host, f"systemctl show -p ExecStart {u}")
            )
            assert unit.startswith("vllm"), (b, unit)
            info = BackendInfo(b["name"], model["name"], host, int(b["port"]), unit)
            out.setdefault(model["name"], []).append(info)
    return out


@pytest.fixture(scope="module")
def extra_gateway(cluster: Cluster):
    """Start another gateway process on a gateway host (the first by default), from that
    host's config with ``overrides`` (another routing policy, fewer backends, another Redis
    failure mode), listening on ``port`` of the host's address; yields a function returning
    its URL. Each is stopped at the end of the test module."""
    started: list[tuple[str, str]] = []
    py = "/opt/llm-proxy/venv/bin/python"

    def start(name: str, port: int, overrides: dict[str, Any], on: str = GATEWAYS[0]) -> str:
        config = cluster.gateway_config(on)
        config.update(overrides)
        config.update(
            fastapi_host="0.0.0.0",
            fastapi_port=port,
            state_dir=f"/var/lib/llmhost-test/{name}",
        )
        path = f"/var/lib/llmhost-test/{name}.json"  # JSON is YAML
        cluster.run(on, "mkdir -p /var/lib/llmhost-test")
        cluster.run_stdin(on, ["tee", path], json.dumps(config))
        unit = f"llmhost-test-{name}"
        cluster.run(on, f"systemd-run --unit {unit} {py} -m proxy_app --config {path}")
        started.append((on, unit))
        url = f"http://{address(on)}:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, f"the {name} gateway")
        return url

    yield start
    for on, unit in started:
        with cluster.hosts[on].sudo():
            cluster.hosts[on].run(f"systemctl stop {unit}")


def _key(name: str) -> str:
    """A key the scenario's inventory generated into .cache/demo/ (see host_vars)."""
    cache = Path(os.environ["LLMHOST_CACHE_DIR"]) / "demo"
    return "sk-" + (cache / name).read_text().split()[0]


@pytest.fixture(scope="session")
def keys() -> dict[str, str]:
    """The test keys by user: user (no limit), limited (concurrency 3, QPS 5), quota100
    (100 tokens in total), shared4 (concurrency 4), held (concurrency 3: the slots a killed
    gateway held)."""
    users = ("user", "limited", "quota100", "shared4", "held")
    return {u: _key(f"cluster-{u}-key") for u in users}


@pytest.fixture(scope="session")
def user_key(keys: dict[str, str]) -> str:
    return keys["user"]


@pytest.fixture(scope="session")
def demo_key() -> str:
    """The demo inventory's user key: concurrency 4, and the default queue timeout (30 s)."""
    return _key("demo-key")


@pytest.fixture(scope="session")
def admin_key() -> str:
    return _key("admin-key")
