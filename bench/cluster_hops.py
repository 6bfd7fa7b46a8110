"""Where a request's time goes on a gateway host of `make demo-cluster`, hop by hop, on one clock.

Not a test: a measurement. tcpdump runs in the gateway host's network namespace (``nsenter``:
the controller's tcpdump, nothing installed on the host) and records, for every packet that
carries data, when it passed: the client's request reaching nginx (port 8000), nginx's to the
gateway (8001, loopback), the gateway's admission script to Redis (6379) and its answer, the
request to vLLM (8002), vLLM's first bytes, and those bytes leaving the gateway and nginx. The
client (curl on the first gpu host) sends ``--requests`` streamed requests one at a time, 0.3 s
apart, so that each request's packets follow one another. Printed per hop: median and p90.

    .venv/bin/python bench/cluster_hops.py [--gateway llmhost-demo-gw1] [--requests 60]

Needs tcpdump on the controller (``apt-get install tcpdump``) and root (nsenter).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_hosts import REPO, address

PORTS = {"nginx": 8000, "gateway": 8001, "redis": 6379, "vllm": 8002}
_PACKET = re.compile(r"^(\d+\.\d+)\s+\S+\s+\S+\s+IP (\S+)\.(\d+) > \S+\.(\d+): tcp (\d+)")
HOPS = {
    "client -> nginx -> gateway": ("request", "to_gateway"),
    "gateway: request in, admission out": ("to_gateway", "to_redis"),
    "Redis round trip": ("to_redis", "from_redis"),
    "gateway: admitted, request out to vLLM": ("from_redis", "to_vllm"),
    "vLLM: request in, its headers out": ("to_vllm", "from_vllm"),
    "gateway: vLLM's headers relayed": ("from_vllm", "gateway_out"),
    "nginx: the headers relayed": ("gateway_out", "nginx_out"),
}


def capture(gateway: str, client: str, requests: int, out: Path) -> None:
    pid = subprocess.check_output(
        ["docker", "inspect", "-f", "{{.State.Pid}}", gateway], text=True
    ).strip()
    ports = " or ".join(f"port {p}" for p in PORTS.values())
    expr = f"tcp and ({ports}) and (tcp[tcpflags] & tcp-push != 0)"
    tcpdump = ["nsenter", "-t", pid, "-n", "tcpdump", "-i", "any", "-tt", "-n", "-l", "-q", expr]
    key = (REPO / ".cache" / "demo" / "demo-key").read_text().strip()
    key = key if key.startswith("sk-") else "sk-" + key
    body = json.dumps(
        {
            "model": "tiny",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello there, how are you"}],
        }
    )
    curl = shlex.join(
        [
            "curl", "-sfN", "-o", "/dev/null",
            "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json",
            "-d", body, f"http://{address(gateway)}:{PORTS['nginx']}/v1/chat/completions",
        ]
    )  # fmt: skip
    loop = f"for i in $(seq {requests}); do {curl} || exit 1; sleep 0.3; done"
    with out.open("w") as f:
        dump = subprocess.Popen(tcpdump, stdout=f, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # tcpdump listening
            subprocess.run(["docker", "exec", client, "sh", "-c", loop], check=True)
            time.sleep(1)
        finally:
            dump.terminate()
            dump.wait()


def _first(
    packets: list[tuple[float, int, int]], after: float | None, sport: int = 0, dport: int = 0
) -> float | None:
    """When the first packet from ``sport`` or to ``dport`` passed at or after ``after``."""
    if after is None:
        return None
    for t, s, d in packets:
        if t >= after and (s == sport or d == dport):
            return t
    return None


def hops(lines: list[str], client_ip: str) -> list[dict[str, float]]:
    """Per request, the time of each event (seconds), from the packets of one capture."""
    requests: list[list[tuple[float, int, int]]] = []
    for line in lines:
        m = _PACKET.match(line)
        if not m or int(m.group(5)) == 0:
            continue
        t, src, sport, dport = float(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if dport == PORTS["nginx"] and src == client_ip:
            requests.append([])  # Prometheus' scrapes come from another host
        if requests:
            requests[-1].append((t, sport, dport))
    rows = []
    for packets in requests:
        e: dict[str, float | None] = {"request": packets[0][0]}
        e["to_gateway"] = _first(packets, e["request"], dport=PORTS["gateway"])
        e["to_redis"] = _first(packets, e["to_gateway"], dport=PORTS["redis"])
        e["from_redis"] = _first(packets, e["to_redis"], sport=PORTS["redis"])
        e["to_vllm"] = _first(packets, e["from_redis"], dport=PORTS["vllm"])
        e["from_vllm"] = _first(packets, e["to_vllm"], sport=PORTS["vllm"])
        e["gateway_out"] = _first(packets, e["from_vllm"], sport=PORTS["gateway"])
        e["nginx_out"] = _first(packets, e["gateway_out"], sport=PORTS["nginx"])
        if all(v is not None for v in e.values()):
            rows.append({k: v for k, v in e.items() if v is not None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="llmhost-demo-gw1")
    parser.add_argument("--client", default="llmhost-demo-gpu1")
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capture.txt"
        capture(args.gateway, args.client, args.requests, out)
        rows = hops(out.read_text().splitlines(), address(args.client))
    if not rows:
        print("no request's packets were all seen (is make demo-cluster up?)", file=sys.stderr)
        return 1
    print(f"{len(rows)} of {args.requests} requests, {args.gateway}, ms:")
    added = []
    for name, (a, b) in HOPS.items():
        v = sorted((r[b] - r[a]) * 1000 for r in rows)
        print(f"  {name:40} median {statistics.median(v):6.3f}  p90 {v[int(len(v) * 0.9)]:6.3f}")
    for r in rows:
        vllm = r["from_vllm"] - r["to_vllm"]
        added.append((r["nginx_out"] - r["request"] - vllm) * 1000)
    print(f"  {'added by the stack (all but vLLM)':40} median {statistics.median(added):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
