"""Fair sharing in the cluster (issue 25): each gateway sends every request with its key's
vLLM priority, and both gpu hosts' vLLM run the priority scheduling policy the inventory asks.

The requests are read where vLLM receives them: a packet socket in each gpu host's network
namespace (sniff.py, run from the controller with nsenter) prints every request to vLLM's
port with its X-Vllm-Priority header. The demo keys are interactive (priority 0); which
number a key's class is, and that a client cannot send its own, the gateway's tests check
(tests/proxy_app/test_queueing.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from cluster import GATEWAYS, GPU_HOSTS, Cluster, address, chat, gateway_url, wait_until

testinfra_hosts = ["ansible://llmhost-gw1"]

SNIFF = Path(__file__).resolve().parent / "sniff.py"


@contextlib.contextmanager
def requests_received(hosts: tuple[str, ...], port: int) -> Iterator[dict[str, list[dict]]]:
    """What each host's vLLM port receives while the block runs, by host."""
    seen: dict[str, list[dict]] = {h: [] for h in hosts}
    procs = []
    for h in hosts:
        pid = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", h],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        proc = subprocess.Popen(
            ["nsenter", "-t", pid, "-n", sys.executable, str(SNIFF), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        assert ready == "ready", f"the sniffer on {h} did not start: {proc.stderr.read()}"

        def read(proc: subprocess.Popen = proc, h: str = h) -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                seen[h].append(json.loads(line))

        threading.Thread(target=read, daemon=True).start()
        procs.append(proc)
    try:
        yield seen
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_each_request_reaches_vllm_with_its_keys_priority_on_both_hosts_from_both_gateways(
    cluster: Cluster, user_key
):
    for h in GPU_HOSTS:
        command = cluster.run(h, "systemctl show -p ExecStart --value vllm")
        assert "--scheduling-policy priority" in command, command
    run = uuid.uuid4().hex[:8]
    sent: dict[str, str] = {}
    with requests_received(GPU_HOSTS, 8002) as seen:
        for gw in GATEWAYS:
            # Different conversations: prefix routing spreads them over both hosts.
            for i in range(12):
                rid = f"priority-{run}-{gw}-{i}"
                body = {
                    "model": "tiny",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": f"conversation {run} {i}"}],
                }
                r = chat(gateway_url(gw), user_key, body, request_id=rid)
                assert r.status_code == 200, r.text
                sent[rid] = gw

        def all_seen() -> bool:
            ids = {rec["request_id"] for recs in seen.values() for rec in recs}
            return set(sent) <= ids

        wait_until(all_seen, 10, "every request seen at a vLLM port")
    paths = set()
    for h, records in seen.items():
        for rec in records:
            gw = sent.get(rec["request_id"])
            if gw is None:
                continue  # another client's (a probe's, the other gateway process's)
            assert rec["priority"] == "0", rec  # the demo key: interactive
            assert rec["src"] == address(gw), (rec, address(gw))
            paths.add((gw, h))
    assert paths == {(gw, h) for gw in GATEWAYS for h in GPU_HOSTS}, paths
