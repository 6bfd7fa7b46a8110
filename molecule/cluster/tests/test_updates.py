"""Changing the running cluster under load: a rolling update of vLLM over both gpu hosts
(playbooks/rolling-update.yml). Last in the scenario: the roll leaves the hosts with
another setting than the inventory's."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from cluster import (
    GATEWAYS,
    GPU_HOSTS,
    SCENARIO,
    Cluster,
    SteadyLoad,
    gateway_url,
    inventory,
)

testinfra_hosts = ["ansible://llmhost-gw1"]

PROJECT = SCENARIO.parent.parent
# `other`, over both gpu hosts (test_multinode.py): its backend is its leader's.
SPANNING = "llmhost-gpu1/other"
# Where the README's figure of the roll comes from (tools/readme_figures.py).
ROLL_RESULTS = SCENARIO / "roll.json"


def _vllm_processes(cluster: Cluster) -> dict[tuple[str, str], tuple[str, str]]:
    """Every vLLM unit of the gpu hosts: its main PID and command line."""
    out = {}
    for h in GPU_HOSTS:
        units = cluster.run(h, "systemctl list-units 'vllm*' --plain --no-legend").split("\n")
        for unit in (line.split()[0] for line in units if line.strip()):
            pid = cluster.run(h, f"systemctl show -p MainPID --value {unit}").strip()
            cmdline = cluster.run(h, f"tr '\\0' ' ' < /proc/{pid}/cmdline")
            out[h, unit] = (pid, cmdline)
    return out


def _drain_events(cluster: Cluster, since: str, unit: str = "llm-proxy") -> list[dict[str, Any]]:
    events = []
    for gw in GATEWAYS:
        lines = cluster.run(gw, f"journalctl -u {unit} -o cat --no-pager --since '{since}'")
        for line in lines.splitlines():
            if '"backend_draining"' in line or '"backend_undrained"' in line:
                events.append({"gateway": gw, **json.loads(line)})
    return events


def test_a_rolling_update_fails_no_request_and_restarts_every_host(cluster: Cluster, user_key):
    """The roll changes a vLLM argument (max_num_seqs 16 -> 17) on both gpu hosts, one at a
    time, while a client sends 10 requests a second (every other one streamed) through a
    gateway the whole time: every answer 200, every stream whole, every vLLM unit restarted
    (a new PID) with the new argument, and each host drained and back on both gateways. The
    time each host was out of rotation goes to roll.json (the README's figure)."""
    before = _vllm_processes(cluster)
    assert all("--max-num-seqs 16 " in cmd for _, cmd in before.values()), before
    since = cluster.run(GATEWAYS[0], "date '+%Y-%m-%d %H:%M:%S'").strip()
    load_start = os.getloadavg()[0]
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"))
    start = time.monotonic()
    with SteadyLoad(gateway_url(GATEWAYS[0]), user_key, rate=10) as load:
        time.sleep(3)  # the load is on before the roll starts
        roll = subprocess.run(
            [
                "ansible-playbook",
                "-i",
                inventory(),
                str(PROJECT / "playbooks" / "rolling-update.yml"),
                "-e",
                "vllm_max_num_seqs=17",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            env=env,
            cwd=PROJECT,
        )
        roll_seconds = time.monotonic() - start
        time.sleep(3)  # and stays on after it
    assert roll.returncode == 0, roll.stdout[-4000:] + roll.stderr[-2000:]
    results = load.results
    print(f"roll: {roll_seconds:.0f} s, {len(results)} requests during it")
    assert len(results) >= 10 * roll_seconds * 0.8, len(results)
    assert load.failures() == [], load.failures()[:5]

    after = _vllm_processes(cluster)
    assert after.keys() == before.keys()
    for unit, (pid, cmdline) in after.items():
        assert pid != before[unit][0], f"{unit} was not restarted"
        assert "--max-num-seqs 17 " in cmdline, (unit, cmdline)

    # Each host was drained on both gateways, then taken back, one host after the other.
    events = _drain_events(cluster, since)
    own = {
        h: [e for e in events if e["backend"].startswith(f"{h}/") and e["backend"] != SPANNING]
        for h in GPU_HOSTS
    }
    out_of_rotation = {}
    for h, mine in own.items():
        for gw in GATEWAYS:
            kinds = [e["event"] for e in mine if e["gateway"] == gw]
            assert "backend_draining" in kinds and "backend_undrained" in kinds, (h, gw, kinds)
        ts = [datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in mine]
        out_of_rotation[h] = (max(ts) - min(ts)).total_seconds()
    first, second = own.values()
    assert max(e["ts"] for e in first) < min(e["ts"] for e in second), "hosts rolled together"
    # The instance over both hosts restarts at each host's step: out and back twice.
    for gw in GATEWAYS:
        kinds = [e["event"] for e in events if e["backend"] == SPANNING and e["gateway"] == gw]
        assert kinds == ["backend_draining", "backend_undrained"] * 2, (gw, kinds)
    # The standby gateways, which serve while their gateway restarts, drained them too.
    standby = _drain_events(cluster, since, "llm-proxy-standby")
    for h in GPU_HOSTS:
        for gw in GATEWAYS:
            kinds = {
                e["event"]
                for e in standby
                if e["gateway"] == gw and e["backend"].startswith(f"{h}/")
            }
            assert kinds == {"backend_draining", "backend_undrained"}, (h, gw, kinds)
    print(f"out of rotation per host (s): {out_of_rotation}")
    ROLL_RESULTS.write_text(
        json.dumps(
            {
                "run": {
                    "time_utc": datetime.now(UTC).isoformat(timespec="minutes"),
                    "cpus": os.cpu_count(),
                    "load_average_start": round(load_start, 1),
                },
                "rate_per_second": 10,
                "hosts": len(GPU_HOSTS),
                "requests": len(results),
                "failed": len(load.failures()),
                "roll_seconds": round(roll_seconds, 1),
                "out_of_rotation_seconds": {h: round(s, 1) for h, s in out_of_rotation.items()},
            },
            indent=2,
        )
        + "\n"
    )
