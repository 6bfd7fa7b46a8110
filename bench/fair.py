"""Fair sharing under a flood: an interactive key's time to first token while a batch key floods
the model, today's way and with each part of the design (issue 25). Not a test.

Real vLLM on the CPU (the tiny model, ``--max-num-seqs`` small so that a flood fills it) behind
a gateway of this checkout, on this machine. A batch key keeps ``--flood`` streams of
``--batch-tokens``-token answers going; an interactive key sends a streamed 8-token request
every ``1 / --rate`` seconds. Measured side by side in one run, each for ``--seconds``:

- ``idle``: the interactive key alone;
- ``today``: under the flood, vLLM first come first served, no queue at the gateway;
- ``vllm_priority``: vLLM's ``--scheduling-policy priority`` alone (the gateway sends each
  key's priority, batch 10, interactive 0; no queue at the gateway);
- ``design``: vLLM's priority and the gateway's queue (``vllm_max_in_flight`` =
  ``--max-num-seqs``, one place kept for interactive keys);
- ``two_batch_keys``: the design, two batch keys flooding with half the streams each: the
  answers each got.

Per mode: the interactive key's TTFT p50 and p95 (ms, first content chunk), the batch
throughput (generated tokens/s), and the ratios: TTFT p95 to idle's (goal: design <= 2x),
batch throughput to today's (goal: >= 0.8), the two batch keys' shares (goal: within 10%).

    .venv/bin/python bench/fair.py [--seconds 30] [--flood 16] [--max-num-seqs 4]

Needs `make vllm-env tiny-model` (LLMHOST_VLLM_PYTHON, LLMHOST_TINY_MODEL as the tests).
Writes bench/fair.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
INTERACTIVE = "sk-bench-interactive-0123456789abcdef"
BATCH = ["sk-bench-batch-a-0123456789abcdef", "sk-bench-batch-b-0123456789abcdef"]
GOALS = {"design_ttft_p95_vs_idle": 2.0, "design_batch_vs_today": 0.8, "batch_share_spread": 0.1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"{what} did not answer {url} within {timeout}s")


@contextlib.contextmanager
def vllm(work: Path, max_num_seqs: int, policy: str) -> Iterator[int]:
    """vLLM on the CPU as the gateway's tests run it (conftest.py says why each setting)."""
    python = os.environ.get("LLMHOST_VLLM_PYTHON", str(REPO / ".venv-vllm/bin/python"))
    model = os.environ.get("LLMHOST_TINY_MODEL", str(REPO / ".cache/tiny-model"))
    port = free_port()
    args = [
        "nice", "-n", "5", python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", "tiny", "--host", "127.0.0.1",
        "--port", str(port), "--enforce-eager", "--kv-cache-memory-bytes", "67108864",
        "--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", str(max_num_seqs),
        "--scheduling-policy", policy,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
    }
    with (work / f"vllm-{policy}.log").open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, f"vLLM ({policy})")
        yield port
    finally:
        proc.terminate()
        proc.wait(60)


@contextlib.contextmanager
def gateway(work: Path, vllm_port: int, max_in_flight: int | None, name: str) -> Iterator[str]:
    d = work / name
    d.mkdir()
    keys = [{"key": INTERACTIVE, "user": "interactive"}]
    keys += [{"key": k, "user": f"batch{i}", "priority": "batch"} for i, k in enumerate(BATCH)]
    (d / "keys.json").write_text(json.dumps({"keys": keys}))
    port = free_port()
    config = {
        "vllm_port": vllm_port,
        "fastapi_port": port,
        "api_keys_file": str(d / "keys.json"),
        "state_dir": str(d / "state"),
        "log_level": "warning",
        "timeouts": {"read": 300, "first_byte": 300},
        "queue": {"timeout": 300},
    }
    if max_in_flight is not None:
        config["vllm_max_in_flight"] = max_in_flight
    (d / "config.yaml").write_text(json.dumps(config))
    with (d / "gateway.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy_app", "--config", str(d / "config.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, "the gateway")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


async def _stream(c: httpx.AsyncClient, key: str, max_tokens: int) -> tuple[float, int]:
    """One streamed chat answer: seconds to its first content chunk, and its chunks."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = None
    chunks = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), chunks


async def warm(url: str) -> None:
    """vLLM's first requests pay one-time costs: not part of any mode."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for _ in range(3):
            await _stream(c, INTERACTIVE, 8)


async def run_mode(url: str, args: argparse.Namespace, batch_keys: list[str]) -> dict:
    stop = time.monotonic() + args.warmup + args.seconds
    measure_from = time.monotonic() + args.warmup
    ttft: list[float] = []
    tokens = dict.fromkeys(batch_keys, 0)
    answers = dict.fromkeys(batch_keys, 0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:

        async def flood(key: str) -> None:
            while time.monotonic() < stop:
                _, n = await _stream(c, key, args.batch_tokens)
                if time.monotonic() >= measure_from:
                    tokens[key] += n
                    answers[key] += 1

        async def interactive() -> None:
            pending = []
            while time.monotonic() < stop:
                pending.append(asyncio.create_task(_stream(c, INTERACTIVE, 8)))
                await asyncio.sleep(1 / args.rate)
            for t in pending:
                with contextlib.suppress(Exception):
                    ttft_s, _ = await t
                    ttft.append(ttft_s)

        per_key = args.flood // max(1, len(batch_keys))
        workers = [flood(k) for k in batch_keys for _ in range(per_key)]
        t0 = time.monotonic()
        await asyncio.gather(interactive(), *workers)
        elapsed = time.monotonic() - t0
    measured = ttft[int(args.warmup * args.rate) :]
    q = statistics.quantiles(measured, n=20) if len(measured) >= 2 else [float("nan")] * 19
    return {
        "ttft_p50_ms": round(statistics.median(measured) * 1000, 1),
        "ttft_p95_ms": round(q[18] * 1000, 1),
        "interactive_requests": len(measured),
        "batch_tokens_per_s": round(sum(tokens.values()) / args.seconds, 1),
        "batch_answers": answers,
        "seconds": round(elapsed, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--flood", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "fair.json")
    args = p.parse_args()
    modes: dict[str, dict] = {}
    n = args.max_num_seqs
    with tempfile.TemporaryDirectory(prefix="llmhost-fair-") as tmp:
        work = Path(tmp)
        with vllm(work, n, "fcfs") as port, gateway(work, port, None, "today") as url:
            asyncio.run(warm(url))
            modes["idle"] = asyncio.run(run_mode(url, args, []))
            modes["today"] = asyncio.run(run_mode(url, args, BATCH[:1]))
        with vllm(work, n, "priority") as port:
            with gateway(work, port, None, "vllm_priority") as url:
                modes["vllm_priority"] = asyncio.run(run_mode(url, args, BATCH[:1]))
            with gateway(work, port, n, "design") as url:
                modes["design"] = asyncio.run(run_mode(url, args, BATCH[:1]))
                modes["two_batch_keys"] = asyncio.run(run_mode(url, args, BATCH))
    idle_p95 = modes["idle"]["ttft_p95_ms"]
    today_tps = modes["today"]["batch_tokens_per_s"]
    for m in modes.values():
        m["ttft_p95_vs_idle"] = round(m["ttft_p95_ms"] / idle_p95, 3)
        if m["batch_tokens_per_s"]:
            m["batch_vs_today"] = round(m["batch_tokens_per_s"] / today_tps, 3)
    shares = list(modes["two_batch_keys"]["batch_answers"].values())
    spread = (max(shares) - min(shares)) / max(1, max(shares))
    design = modes["design"]
    result = {
        "goals": GOALS,
        # Judged on the unrounded ratios.
        "met": {
            "design_ttft_p95_vs_idle": design["ttft_p95_ms"] / idle_p95
            <= GOALS["design_ttft_p95_vs_idle"],
            "design_batch_vs_today": design["batch_tokens_per_s"] / today_tps
            >= GOALS["design_batch_vs_today"],
            "batch_share_spread": spread <= GOALS["batch_share_spread"],
        },
        "batch_share_spread": round(spread, 3),
        "run": {
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
            ).stdout.strip(),
            "load_average_end": round(os.getloadavg()[0], 2),
            "max_num_seqs": n,
            "flood": args.flood,
            "batch_tokens": args.batch_tokens,
            "interactive_rate": args.rate,
            "seconds": args.seconds,
        },
        "modes": modes,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | TTFT p50 ms | TTFT p95 ms | p95 / idle | batch tok/s | batch / today |")
    print("|---|---|---|---|---|---|")
    for name, m in modes.items():
        print(
            f"| {name} | {m['ttft_p50_ms']} | {m['ttft_p95_ms']} | {m['ttft_p95_vs_idle']} | "
            f"{m['batch_tokens_per_s']} | {m.get('batch_vs_today', '-')} |"
        )
    print(f"two batch keys' answers: {shares} (spread {spread:.3f}); goals met: {result['met']}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
