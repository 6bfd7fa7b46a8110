"""The cluster layout benchmarked with vLLM's own client: each vLLM directly, and each gateway
host's nginx + gateway in front of both, interleaved, twice. On `make demo-cluster`.

Not a test: a measurement on the deployed demo cluster (``make demo-cluster`` first). The
client is `vllm bench serve` (bench/cluster_client.py, piped into the python of the first
gpu host's vLLM venv), as a user would run it: random 64-token prompts, 16-token answers
(``--ignore-eos``), 150 prompts at 12 requests a second, 4 at a time, streamed. Each path
is run ``--rounds`` times, the paths interleaved (every path once, then again), so that a
slow minute of the machine falls on all of them, each round starting one path further on (no
path always runs first, or right after the same other). The direct paths use vLLM's key; the
gateways the demo's admin key (no limit of its own: the run measures the path, not a
key's limits).

    .venv/bin/python bench/cluster.py [--inventory inventories/local-cluster] [--rounds 2]

Writes bench/cluster.json; tools/readme_figures.py renders the ``cluster-bench``
block from it (make lint fails when they differ). The goal (issue 22): through the stack,
median TTFT within 2 ms of direct, median TPOT equal within noise, 0 failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from demo_hosts import REPO, address, groups, secret, this_run

CLIENT = REPO / "bench" / "cluster_client.py"
VLLM_PYTHON = "/opt/vllm/venv/bin/python"
GOAL_TTFT_MS = 2.0
# The workload of issue 22's measurement.
WORKLOAD = {
    "dataset": "random",
    "input_tokens": 64,
    "output_tokens": 16,
    "prompts": 150,
    "request_rate": 12,
    "max_concurrency": 4,
}


def tokenizer(client_host: str, url: str, key: str, model: str) -> str:
    """The model directory vLLM serves ``model`` from, on the client's host (GET /v1/models)."""
    script = (
        "import json, sys, urllib.request\n"
        "r = urllib.request.Request(sys.argv[1] + '/v1/models', "
        "headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
        "models = json.load(urllib.request.urlopen(r, timeout=10))['data']\n"
        "print([m['root'] for m in models if m['id'] == sys.argv[3]][0])\n"
    )
    out = subprocess.run(
        ["docker", "exec", "-i", client_host, "python3", "-", url, key, model],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"cannot read {url}/v1/models from {client_host}:\n{out.stderr[-2000:]}")
    return out.stdout.strip()


def bench(client_host: str, url: str, key: str, model: str, tokenizer_dir: str) -> dict:
    """One `vllm bench serve` run from ``client_host`` against ``url``."""
    w = WORKLOAD
    cmd = [
        "docker", "exec", "-i", client_host, VLLM_PYTHON, "-",
        "--base-url", url, "--model", model, "--tokenizer", tokenizer_dir,
        "--dataset-name", w["dataset"], "--random-input-len", str(w["input_tokens"]),
        "--random-output-len", str(w["output_tokens"]), "--ignore-eos",
        "--num-prompts", str(w["prompts"]), "--request-rate", str(w["request_rate"]),
        "--max-concurrency", str(w["max_concurrency"]), "--seed", "0",
        "--metric-percentiles", "50,90,99", "--header", f"Authorization=Bearer {key}",
    ]  # fmt: skip
    with CLIENT.open("rb") as script:
        out = subprocess.run(cmd, stdin=script, capture_output=True, check=False)
    lines = [line for line in out.stdout.decode().splitlines() if line.startswith("BENCH_RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(
            f"vllm bench serve against {url} failed on {client_host}:\n"
            f"{out.stdout.decode()[-2000:]}\n{out.stderr.decode()[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def summary(runs: list[dict]) -> dict:
    """Medians over a path kind's runs (each run's own median, mean or p90)."""

    def med(field: str) -> float:
        return round(statistics.median(r[field] for r in runs), 2)

    return {
        "runs": len(runs),
        "failed": sum(r["failed"] for r in runs),
        "request_throughput": med("request_throughput"),
        "median_ttft_ms": med("median_ttft_ms"),
        "mean_ttft_ms": med("mean_ttft_ms"),
        "p90_ttft_ms": med("p90_ttft_ms"),
        "median_tpot_ms": med("median_tpot_ms"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inventory", default="inventories/local-cluster")
    p.add_argument("--model", default="tiny")
    p.add_argument("--vllm-port", type=int, default=8002)
    p.add_argument("--nginx-port", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "cluster.json")
    args = p.parse_args()

    g = groups(args.inventory)
    gpus, gateways = g.get("gpu", []), g.get("gateway") or g.get("gpu", [])
    if not gpus:
        sys.exit(f"no host in the gpu group of {args.inventory}")
    client = gpus[0]
    vllm_key, admin_key = secret("vllm-api-key"), "sk-" + secret("admin-key")
    paths = [
        {
            "name": f"vLLM directly on {h}",
            "kind": "direct",
            "url": f"http://{address(h)}:{args.vllm_port}",
            "key": vllm_key,
        }
        for h in gpus
    ] + [
        {
            "name": f"nginx + gateway on {h}",
            "kind": "stack",
            "url": f"http://{address(h)}:{args.nginx_port}",
            "key": admin_key,
        }
        for h in gateways
    ]
    tokenizer_dir = tokenizer(client, paths[0]["url"], vllm_key, args.model)
    load_start = round(os.getloadavg()[0], 2)
    runs = []
    for round_ in range(1, args.rounds + 1):
        turn = (round_ - 1) % len(paths)
        for path in paths[turn:] + paths[:turn]:
            result = bench(client, path["url"], path["key"], args.model, tokenizer_dir)
            run = {"path": path["name"], "kind": path["kind"], "round": round_, **result}
            runs.append(run)
            print(
                f"round {round_} {path['name']:32} {result['request_throughput']:.2f} req/s, "
                f"TTFT median {result['median_ttft_ms']:.1f} ms (p90 "
                f"{result['p90_ttft_ms']:.1f}), TPOT median {result['median_tpot_ms']:.2f} ms, "
                f"{result['failed']} failed",
                flush=True,
            )
    kinds = {kind: summary([r for r in runs if r["kind"] == kind]) for kind in ("direct", "stack")}
    result = {
        "goal": {
            "median_ttft_ms_over_direct": GOAL_TTFT_MS,
            "median_tpot": "equal within noise",
            "failed": 0,
        },
        "run": {
            **this_run(),
            "inventory": args.inventory,
            "client_host": client,
            "load_average_start": load_start,
            "load_average_end": round(os.getloadavg()[0], 2),
            "rounds": args.rounds,
        },
        "workload": WORKLOAD,
        "summary": {
            **kinds,
            "median_ttft_ms_over_direct": round(
                kinds["stack"]["median_ttft_ms"] - kinds["direct"]["median_ttft_ms"], 2
            ),
        },
        "runs": runs,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(
        f"through the stack: median TTFT {s['median_ttft_ms_over_direct']:+.2f} ms over direct "
        f"(goal {GOAL_TTFT_MS} ms), median TPOT {s['stack']['median_tpot_ms']} vs "
        f"{s['direct']['median_tpot_ms']} ms, {s['stack']['failed']} failed\nwrote {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
