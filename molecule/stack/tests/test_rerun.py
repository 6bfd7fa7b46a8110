"""A re-run of the whole site with nothing to change, as operators run it after every
inventory edit: it changes nothing on any host, and how long it took is written to
molecule/stack/rerun.json, from which tools/readme_figures.py renders its figure (docs/).
It is also the scenario's idempotence check (the scenario has no Molecule idempotence step):
the tests before it change no setting, so it meets the hosts as the converge left them, and
a test that left something site.yml would put back fails it too.

The duration is recorded, not asserted: on a shared machine it says as much about the
load as about the playbook (the load average at the start is recorded beside it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent.parent
RESULTS = SCENARIO / "rerun.json"
testinfra_hosts = ["ansible://llmhost-stack"]

_RECAP = re.compile(r"^(\S+)\s+: ((?:\w+=\d+\s*)+)$")


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP's counters per host: {"host": {"ok": 114, "changed": 0, ...}}."""
    hosts = {}
    for line in stdout.splitlines():
        match = _RECAP.match(line.strip())
        if match:
            counters = dict(pair.split("=") for pair in match.group(2).split())
            hosts[match.group(1)] = {name: int(value) for name, value in counters.items()}
    return hosts


def _connection(inventory: str, host: str) -> str:
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--host", host],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out).get("ansible_connection", "ssh")


def test_a_rerun_with_nothing_to_change_changes_nothing_and_its_time_is_recorded():
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    load = os.getloadavg()[0]
    started = time.monotonic()
    run = subprocess.run(
        ["ansible-playbook", "-i", inventory, str(SCENARIO / "converge.yml")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    seconds = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    hosts = _recap(run.stdout)
    assert hosts, output[-4000:]
    for name, counters in hosts.items():
        assert counters["changed"] == 0, (name, counters, output[-4000:])
        assert counters["failed"] == 0 and counters["unreachable"] == 0, (name, counters)

    RESULTS.write_text(
        json.dumps(
            {
                "run": {
                    "time_utc": datetime.now(UTC).isoformat(timespec="minutes"),
                    "cpus": os.cpu_count(),
                    # The commit measured (tools/readme_figures.py says how old it is).
                    "commit": subprocess.run(
                        ["git", "rev-parse", "--short", "HEAD"],
                        cwd=Path(__file__).parent,
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout.strip(),
                    "load_average_start": round(load, 2),
                    "connection": _connection(inventory, sorted(hosts)[0]),
                },
                "playbook": "site.yml",
                "seconds": round(seconds, 1),
                "hosts": hosts,
            },
            indent=2,
        )
        + "\n"
    )
