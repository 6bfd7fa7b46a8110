"""A vLLM change on the one gpu host, the way the README tells operators to apply one: the
rolling update (playbooks/rolling-update.yml) changes an argument while a client on the host
sends requests through nginx. With one host there is no other vLLM to serve while it
restarts: the clients see a gap, whose length goes to molecule/stack/gap.json (the docs'
figure, rendered by tools/readme_figures.py). Measured, not asserted.

Last in the scenario: it leaves vLLM with another setting than the inventory's."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from load import LOAD, demo_key_text

testinfra_hosts = ["ansible://llmhost-stack"]

SCENARIO = Path(__file__).resolve().parent.parent
PROJECT = SCENARIO.parent.parent
RESULTS = SCENARIO / "gap.json"
# A light load: enough to see the gap to within a fraction of a second, without taking the
# CPU that vLLM loads with (the test host shares this machine's cores).
RATE = 5
DONE = "/run/llmhost-test-roll-done"
OUT = "/run/llmhost-test-roll-load.json"


def _vllm(host) -> tuple[str, str]:
    pid = host.run("systemctl show -p MainPID --value vllm").stdout.strip()
    return pid, host.run("tr '\\0' ' ' < /proc/%s/cmdline", pid).stdout


def test_a_vllm_change_on_the_one_gpu_host_means_a_gap_whose_length_is_recorded(host):
    """The roll (max_num_seqs 16 -> 17) while 5 requests a second go through nginx: the
    roll succeeds and vLLM runs again with a new PID and the new argument; some requests
    fail while it restarts, each with a JSON error (vLLM's while it shuts down, then the
    gateway's; never a hang or a reset connection), and every request after the gap is
    answered. The gap (from the first
    failed request's sending to that of the first answered one after the last failure)
    and what the clients got go to gap.json."""
    key = demo_key_text("admin-key")  # no per-key limit: the load measures the gap
    pid_before, cmdline = _vllm(host)
    assert "--max-num-seqs 16 " in cmdline, cmdline
    wait = f"until [ -e {DONE} ]; do sleep 0.2; done"
    with host.sudo():
        host.run("rm -f %s %s", DONE, OUT)
        # The load runs on the host in its own unit (3 s of load, then it waits for DONE,
        # then 5 s more) while the controller runs the roll.
        started = host.run(
            "systemd-run --collect --unit llmhost-test-roll-load -p StandardOutput=file:%s "
            "python3 -c %s %s %s sh -c %s",
            OUT,
            LOAD,
            key,
            str(RATE),
            wait,
        )
    assert started.rc == 0, started.stderr
    load_average = os.getloadavg()[0]
    time.sleep(5)
    begin = time.monotonic()
    roll = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(PROJECT / "playbooks" / "rolling-update.yml"),
            "-e",
            "vllm_max_num_seqs=17",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles")),
        cwd=PROJECT,
    )
    roll_seconds = time.monotonic() - begin
    with host.sudo():
        host.run("touch %s", DONE)
        for _ in range(100):
            if host.run("systemctl is-active llmhost-test-roll-load").stdout.strip() != "active":
                break
            time.sleep(2)
        result = json.loads(host.run("cat %s", OUT).stdout)
    assert roll.returncode == 0, roll.stdout[-4000:] + roll.stderr[-2000:]
    pid_after, cmdline = _vllm(host)
    assert pid_after != pid_before and "--max-num-seqs 17 " in cmdline, cmdline
    assert result["sent"] >= RATE * (8 + result["action_seconds"]) * 0.8, result["sent"]

    sent = result["sent_at"]  # [send time, status], in order
    failed = [i for i, (_, status) in enumerate(sent) if status != 200]
    assert failed, "no request failed: with one vLLM host a restart must show a gap"
    statuses = Counter(r["status"] for r in result["failed"])
    # 500: vLLM's own answer while it shuts down ("cannot schedule new futures after
    # shutdown"); 502/503: the gateway's, while nothing listens.
    assert set(statuses) <= {500, 502, 503}, [(r["status"], r["body"]) for r in result["failed"]]
    assert all('"error"' in r["body"] for r in result["failed"]), result["failed"][:5]
    after = sent[failed[-1] + 1 :]
    assert after and all(status == 200 for _, status in after), sent[-20:]
    gap = after[0][0] - sent[failed[0]][0]
    print(f"gap {gap:.1f} s: {len(failed)} of {len(sent)} failed ({dict(statuses)})")
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
                    "load_average_start": round(load_average, 1),
                },
                "rate_per_second": RATE,
                "requests": len(sent),
                "failed": len(failed),
                "statuses": {str(s): n for s, n in sorted(statuses.items())},
                "gap_seconds": round(gap, 1),
                "roll_seconds": round(roll_seconds, 1),
            },
            indent=2,
        )
        + "\n"
    )
