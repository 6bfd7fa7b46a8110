"""What the benchmarks run on `make demo`'s or `make demo-cluster`'s test hosts share: the
inventory's groups, a host's address on the demo network, the secrets the converge generated,
a page read on a host (vLLM admits only known peers), and the description of the run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".cache" / "demo"


def groups(inventory: str) -> dict[str, list[str]]:
    """The inventory's groups and their hosts."""
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--list"], check=True, capture_output=True, text=True
    ).stdout
    return {name: group.get("hosts", []) for name, group in json.loads(out).items()}


def address(host: str) -> str:
    """The test host's address on the demo network (where vLLM and nginx listen)."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    out = subprocess.run(["docker", "inspect", "-f", fmt, host], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.split():
        sys.exit(f"{host} has no address: is the demo up? (make demo-cluster)")
    return out.stdout.split()[0]


def secret(name: str) -> str:
    """A secret the demo's converge generated into .cache/demo/ (a key, a password)."""
    path = DEMO / name
    if not path.exists():
        sys.exit(f"no {path}: the demo's converge writes it (make demo-cluster)")
    return path.read_text().split()[0]


def read_on(host: str, url: str) -> str:
    """GET ``url`` from the host itself."""
    return subprocess.run(
        ["docker", "exec", host, "curl", "-sf", url], capture_output=True, text=True, check=True
    ).stdout


def this_run() -> dict[str, object]:
    """When, where and at which commit the benchmark ran."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "commit": commit,
    }
