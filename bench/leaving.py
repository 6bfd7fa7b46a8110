"""How soon vLLM stops after a client leaves, through nginx and the gateway, on `make demo`.

Not a test: a measurement on the deployed demo host (``make demo`` first). It pipes
bench/leaving_probe.py into the host's python3 (the client then runs on the host, next to
nginx, as close as a client gets) twice: on a quiet machine, and with every core of this
machine kept busy by spinning processes at normal priority (the test hosts are containers
sharing those cores: a busy CI machine). Each run leaves a stream after its third event and a
whole answer once vLLM runs it, ``--rounds`` times each, and records how many milliseconds
after the close vLLM reported no request running, and the tokens it generated meanwhile.
The goal of issue 21: vLLM stops within 100 ms of the client leaving, streamed or not.

    .venv/bin/python bench/leaving.py [--host llmhost-demo] [--rounds 5]

Writes bench/leaving.json; tools/readme_figures.py renders the ``leaving`` block
from it (make lint fails when they differ).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "bench" / "leaving_probe.py"
GOAL_MS = 100


@contextlib.contextmanager
def busy_cores() -> Iterator[int]:
    """One spinning process per core of this machine, for the block's duration."""
    n = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield n
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def probe(args: argparse.Namespace, key: str) -> dict[str, list[dict[str, float]]]:
    cmd = [
        "docker", "exec", "-i", args.host, "python3", "-", "--url",
        f"http://127.0.0.1:{args.nginx_port}/v1/completions",
        "--metrics", f"http://127.0.0.1:{args.vllm_port}/metrics",
        "--key", key, "--model", args.model, "--rounds", str(args.rounds),
    ]  # fmt: skip
    with PROBE.open("rb") as script:
        out = subprocess.run(cmd, stdin=script, capture_output=True, check=False)
    if out.returncode != 0:
        sys.exit(f"the probe failed on {args.host}:\n{out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout)


def summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    stops = [r["stop_ms"] for r in rounds]
    return {
        "median_ms": round(statistics.median(stops), 1),
        "max_ms": max(stops),
        "median_tokens_after": round(statistics.median(r["tokens_after"] for r in rounds)),
        "asked": rounds[0]["asked"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="llmhost-demo")
    p.add_argument("--nginx-port", type=int, default=8000)
    p.add_argument("--vllm-port", type=int, default=8002)
    p.add_argument("--model", default="tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "leaving.json")
    args = p.parse_args()
    key = "sk-" + (REPO / ".cache" / "demo" / "demo-key").read_text().split()[0]
    runs = {}
    # The 1-minute load average at each run's end: it lags, so it says more of a run than
    # at its start.
    load = {}
    runs["quiet"] = probe(args, key)
    load["quiet"] = round(os.getloadavg()[0], 2)
    with busy_cores() as spinners:
        runs["busy"] = probe(args, key)
        load["busy"] = round(os.getloadavg()[0], 2)
    result = {
        "goal_ms": GOAL_MS,
        "run": {
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "load_average_end": load,
            "busy_spinners": spinners,
            "rounds": args.rounds,
        },
        "summary": {
            load: {mode: summary(rounds) for mode, rounds in modes.items()}
            for load, modes in runs.items()
        },
        "rounds": runs,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for load, modes in result["summary"].items():
        for mode, s in modes.items():
            print(
                f"{load:5} {mode:6} vLLM stopped after median {s['median_ms']} ms "
                f"(max {s['max_ms']}), {s['median_tokens_after']} tokens after the close"
            )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
