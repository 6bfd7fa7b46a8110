"""Changing the running cluster under load: a rolling update of vLLM over both gpu hosts
(playbooks/rolling-update.yml). Last in the scenario: the roll leaves the hosts with
another setting than the inventory's."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from cluster import (
    CLIENT,
    GATEWAYS,
    GPU_HOSTS,
    SCENARIO,
    Cluster,
    _auth,
    gateway_url,
    inventory,
)

testinfra_hosts = ["ansible://llmhost-gw1"]

PROJECT = SCENARIO.parent.parent
# `other`, over both gpu hosts (test_multinode.py): its backend is its leader's.
SPANNING = "llmhost-gpu1/other"
# Where the README's figure of the roll comes from (tools/readme_figures.py).
ROLL_RESULTS = SCENARIO / "roll.json"


class SteadyLoad:
    """``rate`` chat requests a second through one gateway, every other one streamed, each
    on its own thread, for as long as the ``with`` block lasts. What each got: the status,
    and for a stream whether it ended with [DONE] and no error event."""

    def __init__(self, url: str, key: str, rate: float) -> None:
        self.url, self.key, self.interval = url, key, 1 / rate
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _one(self, n: int) -> None:
        body = {
            "model": "tiny",
            # Short answers: the load must not starve the restarting vLLM of the CPU it
            # loads with (this machine's 2 cores serve every test host).
            "max_tokens": 2,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Steady request {n}."}],
        }
        out: dict[str, Any] = {"n": n, "stream": n % 2 == 1}
        try:
            if out["stream"]:
                body["stream"] = True
                with CLIENT.stream(
                    "POST",
                    f"{self.url}/v1/chat/completions",
                    json=body,
                    headers=_auth(self.key),
                    timeout=120,
                ) as r:
                    out["status"] = r.status_code
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                out["done"] = bool(lines) and lines[-1] == "data: [DONE]"
                events = [json.loads(x[6:]) for x in lines if x != "data: [DONE]"]
                out["error_events"] = [e for e in events if "error" in e]
            else:
                r = CLIENT.post(
                    f"{self.url}/v1/chat/completions",
                    json=body,
                    headers=_auth(self.key),
                    timeout=120,
                )
                out["status"] = r.status_code
                if r.status_code != 200:
                    out["body"] = r.text[:300]
        except httpx.HTTPError as e:
            out["exception"] = repr(e)
        with self._lock:
            self.results.append(out)

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = threading.Thread(target=self._one, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
            n += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SteadyLoad:
        self._runner = threading.Thread(target=self._run, daemon=True)
        self._runner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._runner.join()
        for t in self._threads:
            t.join(150)

    def failures(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.results
            if r.get("status") != 200
            or (r["stream"] and (not r.get("done") or r.get("error_events")))
        ]


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


def _drain_events(cluster: Cluster, since: str) -> list[dict[str, Any]]:
    events = []
    for gw in GATEWAYS:
        lines = cluster.run(gw, f"journalctl -u llm-proxy -o cat --no-pager --since '{since}'")
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
