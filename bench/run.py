"""Benchmark: the gateway against direct access and against LiteLLM's proxy, on loopback.

One run starts a fast vLLM-shaped upstream (bench/upstream.py), the gateway in front of it
with every control on, and LiteLLM's proxy in front of the same upstream, then drives each
with wrk at several concurrencies, non-streamed and streamed, and measures the gateway's
resident memory before and after many requests. The figures go to bench/results.json
(every figure of the tables, rounded as shown) and bench/RESULTS.md (rendered from that data
by render_results); tools/readme_figures.py renders the README's benchmark block from the JSON.
The JSON's "comparisons" (side-by-side A/B runs recorded by bench/ab.py --record) are kept
when a run rewrites it, and rendered after the tables.

Usage: python bench/run.py [--duration 10] [--concurrency 1,8,32] [--rss-requests 50000]
                           [--litellm-venv .cache/bench-litellm] [--no-litellm]
                           [--out bench/RESULTS.md] [--json bench/results.json]

Needs wrk (apt-get install wrk) and, for the LiteLLM column, a venv holding
``litellm[proxy]`` (see bench/README.md). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
KEY = "sk-bench-0123456789abcdef"
LITELLM_KEY = "sk-litellm-master-0123456789"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
WARMUP_SECONDS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not answer {url} within {timeout}s")


@contextlib.contextmanager
def process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process for the duration of the block; it is stopped by its own pid."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_script(workdir: Path, name: str, auth: str | None, stream: bool) -> Path:
    body = dict(BODY, stream=True) if stream else BODY
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(json.dumps(body))}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if auth:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {auth}"')
    path = workdir / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, script: Path, conns: int, seconds: float) -> Run:
    out = subprocess.run(
        # A long timeout: a slow answer must count in the latency, not vanish as an error.
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Run(rps, p50, p99, errors, total)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gateway_files(workdir: Path, upstream_port: int, port: int, extra: dict | None = None) -> Path:
    keys = {
        "keys": [
            {
                "key": KEY,
                "user": "bench",
                "quota": 10**15,
                "qps": 1_000_000,
                "concurrent": 10_000,
                "tokens_per_minute": 10**12,
            }
        ]
    }
    (workdir / "keys.json").write_text(json.dumps(keys))
    config = {
        "vllm_host": "127.0.0.1",
        "vllm_port": upstream_port,
        "fastapi_host": "127.0.0.1",
        "fastapi_port": port,
        "api_keys_file": str(workdir / "keys.json"),
        "state_dir": str(workdir / "state"),
        "rate_limit": {"qps": 1_000_000, "concurrent": 10_000, "tokens_per_minute": 10**12},
        "log_level": "info",
        **(extra or {}),
    }
    path = workdir / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def litellm_config(workdir: Path, upstream_port: int) -> Path:
    config = {
        "model_list": [
            {
                "model_name": "tiny",
                "litellm_params": {
                    "model": "openai/tiny",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "none",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"telemetry": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config))
    return path


def measure(
    targets: dict[str, tuple[str, str | None]],
    workdir: Path,
    conns: list[int],
    seconds: float,
) -> dict[tuple[str, bool, int], Run]:
    results: dict[tuple[str, bool, int], Run] = {}
    for stream in (False, True):
        for c in conns:
            for name, (url, auth) in targets.items():
                script = wrk_script(workdir, f"{name}-{stream}", auth, stream)
                wrk(url, script, c, WARMUP_SECONDS)
                run = wrk(url, script, c, seconds)
                results[(name, stream, c)] = run
                kind = "stream" if stream else "plain"
                print(
                    f"{kind:6} c={c:<3} {name:8} {run.rps:9.0f} req/s  p50 {run.p50_ms:7.3f} ms"
                    f"  p99 {run.p99_ms:8.3f} ms  errors {run.errors}",
                    flush=True,
                )
    return results


def memory_run(
    url: str, workdir: Path, pid: int, total: int
) -> tuple[float, list[tuple[int, float]]]:
    """RSS now, then after ``total`` more requests, twice: (now, [(requests so far, RSS)])."""
    script = wrk_script(workdir, "rss", KEY, False)
    now = rss_mib(pid)
    later = []
    done = 0
    for _ in range(2):
        target = done + total
        while done < target:
            done += wrk(url, script, 32, 5).requests
        later.append((done, rss_mib(pid)))
        print(f"rss after {done} more requests: {later[-1][1]:.1f} MiB", flush=True)
    return now, later


def results_data(
    results: dict[tuple[str, bool, int], Run],
    conns: list[int],
    rss_fresh: float,
    rss_after: float,
    rss_later: list[tuple[int, float]],
    seconds: float,
    litellm_version: str | None,
) -> dict:
    """Every figure of RESULTS.md, rounded as it shows them (bench/results.json)."""
    targets = ["direct", "gateway"] + (["litellm"] if litellm_version is not None else [])

    def row(stream: bool, c: int) -> dict:
        d = results[("direct", stream, c)]
        out: dict = {"conns": c}
        for name in targets:
            r = results[(name, stream, c)]
            out[name] = {"rps": round(r.rps), "errors": r.errors}
            if name != "direct":
                out[name]["added_p50_ms"] = round(r.p50_ms - d.p50_ms, 3)
                out[name]["added_p99_ms"] = round(r.p99_ms - d.p99_ms, 3)
        if litellm_version is not None:
            g, lite = results[("gateway", stream, c)], results[("litellm", stream, c)]
            out["gateway_per_litellm"] = round(g.rps / lite.rps, 1)
        return out

    return {
        "run": {
            "time_utc": datetime.now(UTC).isoformat(timespec="minutes"),
            "host": platform.node(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "cpus": os.cpu_count(),
            "load_average_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "seconds_per_cell": seconds,
            "warmup_seconds": WARMUP_SECONDS,
            "litellm_version": litellm_version,
        },
        "non_streamed": [row(False, c) for c in conns],
        "streamed": [row(True, c) for c in conns],
        "memory": {
            "fresh_mib": round(rss_fresh, 1),
            "after_throughput_mib": round(rss_after, 1),
            "later": [{"requests": n, "rss_mib": round(mib, 1)} for n, mib in rss_later],
        },
    }


def _and(values: list[int]) -> str:
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def render_results(data: dict) -> str:
    """bench/RESULTS.md from the data of results_data (the one rendering of the tables)."""
    run = data["run"]
    version = run["litellm_version"]
    has_litellm = version is not None
    when = datetime.fromisoformat(run["time_utc"])
    conns = [r["conns"] for r in data["non_streamed"]]
    lines = [
        "# Gateway benchmark",
        "",
        f"Run {when:%Y-%m-%d %H:%M} UTC on {run['host']}: "
        f"{run['cpus']} CPUs (load average {run['load_average_end']:.2f} at the end), "
        f"Python {run['python']}, loopback only. "
        f"wrk -t1, {run['seconds_per_cell']:g} s per cell after a {run['warmup_seconds']:g} s "
        f"warm-up; {'all three' if has_litellm else 'both'} targets in front of "
        "the same upstream (bench/upstream.py: raw ASGI on uvicorn + httptools, answering a "
        "vLLM-shaped chat completion at once; streamed: 8 chunks + usage + [DONE]).",
        "",
        "- **direct**: wrk to the upstream.",
        "- **gateway**: llmhost proxy_app with every control on: key auth, global and per-key "
        "QPS / concurrency / tokens-per-minute limits (high ceilings), quota check, usage "
        "written to SQLite before each response ends, Prometheus metrics, one JSON log line "
        "per request.",
    ]
    if has_litellm:
        lines.append(
            f"- **LiteLLM**: `litellm[proxy]=={version}` proxy, master-key auth, no "
            "database, one worker."
        )
    added = (
        "Added latency = target p50/p99 minus direct p50/p99 at the same concurrency "
        "(streamed: time to the end of the stream)."
    )
    if conns[0] == 1 and len(conns) > 1:
        added += (
            f" At 1 connection it is the cost of one request; at {_and(conns[1:])} every "
            "server runs flat out and latency is mostly queueing (connections / throughput)."
        )
    lines += ["", added, ""]
    for mode, title in (("non_streamed", "Non-streamed"), ("streamed", "Streamed")):
        lines.append(f"## {title}")
        lines.append("")
        head = "| conns | direct req/s | gateway req/s |"
        sep = "|---|---|---|"
        if has_litellm:
            head += " LiteLLM req/s | gateway / LiteLLM |"
            sep += "---|---|"
        head += " gateway added p50 | gateway added p99 |"
        sep += "---|---|"
        if has_litellm:
            head += " LiteLLM added p50 | LiteLLM added p99 |"
            sep += "---|---|"
        head += " errors |"
        sep += "---|"
        lines += [head, sep]
        for r in data[mode]:
            d, g = r["direct"], r["gateway"]
            line = f"| {r['conns']} | {d['rps']:,.0f} | {g['rps']:,.0f} |"
            errors = d["errors"] + g["errors"]
            if has_litellm:
                lite = r["litellm"]
                line += f" {lite['rps']:,.0f} | {r['gateway_per_litellm']:.1f}x |"
                errors += lite["errors"]
            line += f" {g['added_p50_ms']:.3f} ms | {g['added_p99_ms']:.3f} ms |"
            if has_litellm:
                line += f" {lite['added_p50_ms']:.3f} ms | {lite['added_p99_ms']:.3f} ms |"
            line += f" {errors} |"
            lines.append(line)
        lines.append("")
    memory = data["memory"]
    lines += [
        "## Gateway memory (RSS)",
        "",
        "| when | RSS |",
        "|---|---|",
        f"| fresh, before any request | {memory['fresh_mib']:.1f} MiB |",
        f"| after the throughput runs above | {memory['after_throughput_mib']:.1f} MiB |",
    ]
    lines += [
        f"| {p['requests']:,} requests later | {p['rss_mib']:.1f} MiB |" for p in memory["later"]
    ]
    lines += [
        "",
        "Reproduce: `make bench` (see bench/README.md).",
        "",
    ]
    comparisons = data.get("comparisons", {})
    for kind in sorted(comparisons, key=_comparison_rank):
        lines += render_comparison(comparisons[kind])
    return "\n".join(lines)


# The A/B sections of RESULTS.md, in this order; a kind not named here comes after them.
COMPARISON_KINDS = ("client", "base", "routing")


def _comparison_rank(kind: str) -> tuple[int, str]:
    known = kind in COMPARISON_KINDS
    return (COMPARISON_KINDS.index(kind) if known else len(COMPARISON_KINDS), kind)


def comparison_cell_name(stream: bool, conns: int) -> str:
    """A cell of an A/B table: `non-streamed, 8 conn`."""
    return f"{'streamed' if stream else 'non-streamed'}, {conns} conn"


def render_comparison(comparison: dict) -> list[str]:
    """One A/B section of RESULTS.md from a comparison recorded by bench/ab.py (its meta,
    its cells rounded as shown, its verdict sentence)."""
    meta = comparison["meta"]
    when = datetime.fromisoformat(meta["time_utc"])
    lines = [
        f"## A/B: {meta['title']}",
        "",
        f"Run {when:%Y-%m-%d %H:%M} UTC on {meta['host']}: {meta['cpus']} CPUs (load average "
        f"{meta['load_average_start']:.2f} at the start, {meta['load_average_end']:.2f} at "
        f"the end), Python {meta['python']}, {meta['tree']}. A = {meta['a']}; B = {meta['b']}. "
        "Both gateways run at once in front of bench/upstream.py with every control on (as "
        f"above), wrk -t1; per cell a {meta['warmup_seconds']:g} s warm-up of each, then "
        f"{meta['rounds']} rounds of {meta['seconds_per_round']:g} s alternating A, B, so that "
        "other load on the machine falls on both alike. Medians over the rounds; spread = "
        "(max - min) / median of a side's req/s over its rounds: a difference smaller than "
        "the spread is noise.",
        "",
        "| cell | A req/s | B req/s | B/A req/s | A p50 | B p50 | B/A p50 "
        "| spread A | spread B | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparison["cells"]:
        lines.append(
            f"| {comparison_cell_name(c['stream'], c['conns'])} | {c['a_rps']:,} "
            f"| {c['b_rps']:,} | {c['rps_ratio']:.2f}x | {c['a_p50_ms']:.3f} ms "
            f"| {c['b_p50_ms']:.3f} ms | {c['p50_ratio']:.2f}x | {c['a_spread']:.0%} "
            f"| {c['b_spread']:.0%} | {c['errors']} |"
        )
    lines += [
        "",
        comparison["verdict"],
        "",
        f"Reproduce: `{meta['command']}` (`make bench-ab` runs every comparison).",
        "",
    ]
    return lines


def litellm_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rss-requests", type=int, default=50_000)
    parser.add_argument("--litellm-venv", type=Path, default=REPO / ".cache/bench-litellm")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.concurrency.split(",")]
    lite_python = args.litellm_venv / "bin/python"
    use_litellm = not args.no_litellm
    if use_litellm and not lite_python.exists():
        print(
            f"no LiteLLM venv at {args.litellm_venv}: run bench/setup_litellm.sh, "
            "or pass --no-litellm",
            file=sys.stderr,
        )
        return 2

    workdir = BENCH / "results" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    up_port, gw_port, lite_port = free_port(), free_port(), free_port()
    py = sys.executable
    with contextlib.ExitStack() as stack:
        procs = {
            "direct": stack.enter_context(
                process([py, str(BENCH / "upstream.py"), str(up_port)], workdir / "upstream.log")
            )
        }
        config = gateway_files(workdir, up_port, gw_port)
        procs["gateway"] = stack.enter_context(
            process([py, "-m", "proxy_app", "--config", str(config)], workdir / "gateway.log")
        )
        targets: dict[str, tuple[str, str | None]] = {
            "direct": (f"http://127.0.0.1:{up_port}/v1/chat/completions", None),
            "gateway": (f"http://127.0.0.1:{gw_port}/v1/chat/completions", KEY),
        }
        version = None
        if use_litellm:
            version = litellm_version(lite_python)
            lite_config = litellm_config(workdir, up_port)
            procs["litellm"] = stack.enter_context(
                process(
                    [
                        str(args.litellm_venv / "bin/litellm"),
                        "--config",
                        str(lite_config),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(lite_port),
                        "--num_workers",
                        "1",
                    ],
                    workdir / "litellm.log",
                    env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
                )
            )
            targets["litellm"] = (f"http://127.0.0.1:{lite_port}/v1/chat/completions", LITELLM_KEY)

        health = {"direct": "/health", "gateway": "/health", "litellm": "/health/liveliness"}
        for name, (url, _) in targets.items():
            wait_http(url.rsplit("/v1/", 1)[0] + health[name], 120, procs[name], name)

        rss_fresh = rss_mib(procs["gateway"].pid)
        results = measure(targets, workdir, conns, args.duration)
        rss_after, rss_later = memory_run(
            targets["gateway"][0], workdir, procs["gateway"].pid, args.rss_requests
        )
    data = results_data(results, conns, rss_fresh, rss_after, rss_later, args.duration, version)
    # A/B comparisons are recorded by bench/ab.py, not measured here: keep them.
    if args.json.exists() and (kept := json.loads(args.json.read_text()).get("comparisons")):
        data["comparisons"] = kept
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.out.write_text(render_results(data))
    print(f"results written to {args.json} and {args.out}; logs in {workdir}")
    print("README's figures: python tools/readme_figures.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
