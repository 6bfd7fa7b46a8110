"""Every host: llmhost.target holds the units the host's groups make it run (and none that
they do not), each of them is active, and each service among them is sandboxed."""

from __future__ import annotations

import fnmatch

import pytest
from hostcheck import EXPOSURE_CEILING, hosts_running, inventory_groups, unit_exposure

# Collected for every host (hostcheck.hosts_running).
SERVICE = "all"
testinfra_hosts = ["ansible://all"]

# What each kind of host runs, as units (patterns) llmhost.target must want; a host not of
# that kind must want none of them.
UNITS = {
    "vllm": ["vllm.service", "vllm-*.service"],
    "gateway": ["llm-proxy.service", "nginx.service"],
    "redis": ["redis-server.service"],
    "monitoring": ["prometheus.service"],
    "model_mirror": ["llmhost-model-mirror.service"],
    "all": ["prometheus-node-exporter.service"],
}


@pytest.fixture
def kinds(request, host) -> set[str]:
    """The kinds of service this host runs, from the inventory's groups."""
    inventory = request.config.getoption("ansible_inventory")
    runs = hosts_running(inventory_groups(inventory))
    name = host.backend.get_hostname()
    return {kind for kind, hosts in runs.items() if name in hosts}


@pytest.fixture
def wanted(host) -> list[str]:
    """The units llmhost.target wants on this host."""
    out = host.run("systemctl show -p Wants --value llmhost.target")
    assert out.rc == 0, out.stderr
    units = out.stdout.split()
    assert units, "llmhost.target wants no unit (is it installed?)"
    return units


def test_llmhost_target_holds_what_the_host_runs_and_nothing_else(host, kinds, wanted):
    name = host.backend.get_hostname()
    for kind, patterns in UNITS.items():
        found = [u for u in wanted if any(fnmatch.fnmatch(u, p) for p in patterns)]
        if kind in kinds:
            assert found, f"{name} runs {kind} but llmhost.target wants none of {patterns}"
            if kind == "gateway":
                assert set(patterns) <= set(found), (name, kind, found)
        else:
            assert not found, f"{name} is not a {kind} host yet llmhost.target wants {found}"


def test_every_unit_of_llmhost_target_is_active(host, wanted):
    name = host.backend.get_hostname()
    states = {u: host.run("systemctl is-active %s", u).stdout.strip() for u in wanted}
    down = {u: s for u, s in states.items() if s != "active"}
    assert not down, f"on {name}: " + ", ".join(
        f"{u} is {s} (systemctl status {u})" for u, s in sorted(down.items())
    )


def test_every_service_of_llmhost_target_is_sandboxed(host, wanted):
    name = host.backend.get_hostname()
    over = {}
    for unit in wanted:
        if unit.endswith(".service"):
            exposure = unit_exposure(host, unit)
            print(f"{name} {unit}: exposure {exposure}")
            if exposure > EXPOSURE_CEILING:
                over[unit] = exposure
    assert not over, f"on {name}, over {EXPOSURE_CEILING}: {over} (systemd-analyze security)"
