"""`ansible-playbook site.yml --check --diff` against the converged stack: every play
runs through (probes that later tasks read run in check mode too; waits for a service
are skipped) and reports nothing to change on either host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent.parent
testinfra_hosts = ["ansible://llmhost-stack"]


def test_check_mode_on_the_converged_stack_reports_no_change():
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(SCENARIO / "converge.yml"),
            "--check",
            "--diff",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    recap = [line for line in run.stdout.splitlines() if " : ok=" in line]
    assert {line.split()[0] for line in recap} == {"llmhost-stack", "llmhost-probe"}, recap
    for line in recap:
        assert " changed=0 " in line and " failed=0 " in line, (line, output[-4000:])
