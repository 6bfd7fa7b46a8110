"""Read-only checks of deployed hosts: `make check INVENTORY=inventories/<env>`.

Runs the testinfra host checks of tests/hosts/ over an inventory, connecting
the way the inventory says (SSH and become, the test hosts too), then
prints a table per host. Nothing on the hosts is changed: the checks only
read, and commands that would write are refused (see tests/hosts/hostcheck.py).
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _host_groups(inventory: str) -> dict[str, list[str]]:
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--list"], check=True, capture_output=True, text=True
    ).stdout
    groups: dict[str, list[str]] = defaultdict(list)
    for name, group in json.loads(out).items():
        for host in group.get("hosts", []) if isinstance(group, dict) else []:
            if name not in ("all", "ungrouped"):
                groups[host].append(name)
    return groups


class HostTable:
    """Collects results per host and prints host, groups, passed, failed, first failure."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.groups = groups
        self.passed: dict[str, int] = defaultdict(int)
        self.failed: dict[str, int] = defaultdict(int)
        self.first_failure: dict[str, str] = {}

    def _host_of(self, report: pytest.TestReport) -> str:
        marker = "[ansible://"
        if marker not in report.nodeid:
            return "?"
        inside = report.nodeid.split(marker, 1)[1].rstrip("]")
        # Parametrized tests append "-<param>" after the host name: match a known host.
        for host in sorted(self.groups, key=len, reverse=True):
            if inside == host or inside.startswith(host + "-"):
                return host
        return inside

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and not (report.failed or report.skipped):
            return
        if report.skipped:
            return
        host = self._host_of(report)
        if report.passed and report.when == "call":
            self.passed[host] += 1
        elif report.failed:
            self.failed[host] += 1
            if host not in self.first_failure:
                test = report.nodeid.split("::")[-1].split("[")[0]
                message = (
                    report.longrepr.reprcrash.message
                    if hasattr(report.longrepr, "reprcrash")
                    else ""
                )
                self.first_failure[host] = f"{test}: {message.splitlines()[0] if message else ''}"[
                    :110
                ]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        hosts = sorted(set(self.passed) | set(self.failed))
        terminalreporter.section("llmhost host checks")
        header = f"{'host':<24} {'groups':<22} {'passed':>6} {'failed':>6}  first failure"
        terminalreporter.write_line(header)
        for host in hosts:
            groups = ",".join(self.groups.get(host, []))
            terminalreporter.write_line(
                f"{host:<24} {groups:<22} {self.passed[host]:>6} {self.failed[host]:>6}  "
                f"{self.first_failure.get(host, '')}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", required=True, help="inventory directory or file")
    # Anything else goes to pytest as is (e.g. -k nginx, -x).
    args, pytest_args = parser.parse_known_args()

    os.environ["LLMHOST_CHECK"] = "1"  # read-only mode of tests/hosts/hostcheck.py
    table = HostTable(_host_groups(args.inventory))
    code = pytest.main(
        [
            str(ROOT / "tests" / "hosts"),
            "--connection=ansible",
            f"--ansible-inventory={args.inventory}",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfEs",
            *pytest_args,
        ],
        plugins=[table],
    )
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
