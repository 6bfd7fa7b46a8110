"""Side-by-side A/B of two gateways in front of the same upstream, measured interleaved.

Two gateways run at once in front of bench/upstream.py; for each cell (non-streamed and
streamed, at each concurrency) both are warmed up, then measured in turns A, B, A, B, ... so
that whatever else loads the machine loads both alike. A cell reports the median req/s and
median p50 of each side over the rounds, B/A, and the spread of each side's rounds (max-min
over median: what a difference must exceed to be more than noise).

  --client    A: the working tree with upstream.py; B: the working tree with
              upstream_aiohttp.py (the issue's rule: switch if B is within 15% on every cell)
  --base REV  A: the gateway at git revision REV (a temporary `git worktree`); B: the
              working tree
  --routing N A: the working tree with one backend (no `models` in its config); B: the
              same code with N backends for the model (all the same upstream, under
              different names), routed by prefix: what choosing a backend costs
  --store     A: the working tree with its limits and usage in memory and SQLite; B: the
              same code with them in Redis (a local redis-server): what sharing them costs

--redis puts both sides' limits and usage in one local redis-server (each its own key
prefix), as a cluster's gateways run: with --base, what a change costs in Redis mode.

The table goes to stdout and to bench/results/ab-<time>.md and .json (with every round).
--record also keeps it as the latest comparison of its kind ("client" or "base") in
bench/results.json's "comparisons", re-renders bench/RESULTS.md from that file (bench/run.py's
render_results, which puts the comparisons after the main tables, and keeps them when it
rewrites the file) and runs tools/readme_figures.py. Needs wrk. Not a test: figures depend on
the machine.

Usage: python bench/ab.py (--client | --base REV | --routing N | --store) [--redis]
                          [--concurrency 1,8] [--rounds 4] [--duration 5] [--warmup 2] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

# bench/run.py's helpers (this file's folder is on sys.path when it runs as a script).
from run import (
    BENCH,
    KEY,
    REPO,
    Run,
    comparison_cell_name,
    free_port,
    gateway_files,
    process,
    render_comparison,
    render_results,
    wait_http,
    wrk,
    wrk_script,
)

LAUNCHER = BENCH / "gateway_with_client.py"
SWITCH_WITHIN = 0.15  # the rule for --client


@dataclass
class Side:
    label: str  # what the table calls it
    code: Path  # the folder proxy_app is imported from
    client: str  # gateway_with_client.py --client
    config: dict | None = None  # added to the gateway's config


@dataclass
class Cell:
    stream: bool
    conns: int
    a: list[Run]
    b: list[Run]

    @property
    def name(self) -> str:
        return comparison_cell_name(self.stream, self.conns)

    @property
    def rps_ratio(self) -> float:
        """B's median req/s over A's, unrounded (the switch rule is applied to this)."""
        return statistics.median(r.rps for r in self.b) / statistics.median(r.rps for r in self.a)

    def summary(self) -> dict[str, float | int]:
        def side(runs: list[Run]) -> tuple[float, float, float]:
            rps = [r.rps for r in runs]
            med = statistics.median(rps)
            return med, statistics.median(r.p50_ms for r in runs), (max(rps) - min(rps)) / med

        a_rps, a_p50, a_spread = side(self.a)
        b_rps, b_p50, b_spread = side(self.b)
        return {
            "a_rps": round(a_rps),
            "b_rps": round(b_rps),
            "rps_ratio": round(b_rps / a_rps, 3),
            "a_p50_ms": round(a_p50, 3),
            "b_p50_ms": round(b_p50, 3),
            "p50_ratio": round(b_p50 / a_p50, 3),
            "a_spread": round(a_spread, 3),
            "b_spread": round(b_spread, 3),
            "errors": sum(r.errors for r in self.a + self.b),
        }


@contextlib.contextmanager
def base_worktree(rev: str) -> Iterator[tuple[Path, str]]:
    """REV checked out in a temporary worktree, removed afterwards; yields (path, short sha)."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="llmhost-ab-"))
    path = tmp / "base"
    git = ["git", "-C", str(REPO), "worktree"]
    subprocess.run([*git, "add", "--detach", str(path), sha], capture_output=True, check=True)
    try:
        yield path, sha
    finally:
        subprocess.run([*git, "remove", "--force", str(path)], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A local redis-server, without persistence, for the run; yields its URL."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    workdir.mkdir(parents=True)
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(workdir)]
    with process(args, workdir / "redis.log"):
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"redis-server did not answer on {port} (see {workdir})")
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def gateway(side: Side, workdir: Path, upstream_port: int) -> Iterator[str]:
    """One gateway serving ``side``'s code; yields its completion URL."""
    workdir.mkdir(parents=True)
    port = free_port()
    config = gateway_files(workdir, upstream_port, port, side.config)
    args = [sys.executable, str(LAUNCHER), "--client", side.client, "--config", str(config)]
    log = workdir / "gateway.log"
    with process(args, log, env={"PYTHONPATH": str(side.code)}) as proc:
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc, side.label)
        # An editable install could shadow PYTHONPATH: make sure the intended code runs.
        expected = str(side.code / "proxy_app" / "__init__.py")
        if f"proxy_app={expected}" not in log.read_text(errors="replace"):
            raise RuntimeError(f"{side.label}: the gateway did not load {expected} (see {log})")
        yield f"http://127.0.0.1:{port}/v1/chat/completions"


def measure(
    urls: tuple[str, str],
    workdir: Path,
    conns: list[int],
    rounds: int,
    seconds: int,
    warmup: int,
) -> list[Cell]:
    cells = []
    for stream in (False, True):
        script = wrk_script(workdir, f"ab-{'stream' if stream else 'plain'}", KEY, stream)
        for c in conns:
            for url in urls:
                wrk(url, script, c, warmup)
            cell = Cell(stream, c, [], [])
            for i in range(rounds):
                for runs, url, tag in ((cell.a, urls[0], "A"), (cell.b, urls[1], "B")):
                    runs.append(wrk(url, script, c, seconds))
                    print(
                        f"{cell.name:22} round {i + 1} {tag} {runs[-1].rps:8.0f} req/s"
                        f"  p50 {runs[-1].p50_ms:.3f} ms",
                        flush=True,
                    )
            cells.append(cell)
    return cells


def verdict(mode: str, cells: list[Cell]) -> str:
    """The sentence under the table: the switch rule (--client), or the largest difference
    set against the spread of its rounds (--base)."""
    ratios = {c.name: c.rps_ratio for c in cells}
    if mode == "routing":
        one = min((c for c in cells if not c.stream), key=lambda c: c.conns)
        s = one.summary()
        added = s["b_p50_ms"] - s["a_p50_ms"]
        return (
            f"Added p50 at {one.conns} connection(s), non-streamed: {added:+.3f} ms "
            f"({s['a_p50_ms']:.3f} -> {s['b_p50_ms']:.3f} ms; the issue's bound: 0.3 ms)."
        )
    if mode == "store":
        fewest = min(c.conns for c in cells)
        added = [
            f"{'streamed' if c.stream else 'non-streamed'} {s['b_p50_ms'] - s['a_p50_ms']:+.3f} ms"
            f" ({s['a_p50_ms']:.3f} -> {s['b_p50_ms']:.3f})"
            for c in cells
            if c.conns == fewest
            for s in (c.summary(),)
        ]
        return f"Added p50 in Redis at {fewest} connection(s): {'; '.join(added)}."
    if mode == "client":
        rule = f"By the rule (aiohttp within {SWITCH_WITHIN:.0%} on req/s in every cell): "
        worst = min(ratios, key=ratios.__getitem__)
        if all(r >= 1 - SWITCH_WITHIN for r in ratios.values()):
            return f"{rule}switch; the closest cell is {worst} at {ratios[worst]:.3f}x."
        short = "; ".join(
            f"{n} {1 - r:.1%} slower" for n, r in ratios.items() if r < 1 - SWITCH_WITHIN
        )
        return f"{rule}keep upstream.py; aiohttp is past it in: {short}."
    noise = {c.name: max(c.summary()["a_spread"], c.summary()["b_spread"]) for c in cells}
    beyond = [n for n in ratios if abs(1 - ratios[n]) > noise[n]]
    far = max(ratios, key=lambda n: abs(1 - ratios[n]))
    where = "beyond" if far in beyond else "within"
    return (
        f"Largest req/s difference: {far} at {ratios[far]:.2f}x (B/A), {where} the larger "
        f"spread of its rounds ({noise[far]:.0%}); {len(beyond)} of {len(cells)} cells differ "
        "by more than their larger spread."
    )


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def tree_state() -> str:
    """Which working tree was measured: HEAD, and any uncommitted change to the gateway."""
    head = git("rev-parse", "--short", "HEAD")
    changed = sorted(
        set(git("diff", "--name-only", "HEAD", "--", "proxy_app").split())
        | set(git("ls-files", "--others", "--exclude-standard", "--", "proxy_app").split())
    )
    if not changed:
        return f"working tree at {head} (proxy_app/ as committed)"
    return f"working tree at {head} with uncommitted changes to {', '.join(changed)}"


def record(kind: str, comparison: dict) -> None:
    """Keep ``comparison`` as the latest of its kind in bench/results.json, re-render
    bench/RESULTS.md from it and bring the README's generated blocks in line."""
    results = BENCH / "results.json"
    if not results.exists():
        raise SystemExit(f"no {results}: run bench/run.py first")
    data = json.loads(results.read_text())
    data.setdefault("comparisons", {})[kind] = comparison
    results.write_text(json.dumps(data, indent=2) + "\n")
    (BENCH / "RESULTS.md").write_text(render_results(data))
    print(f"recorded as comparisons.{kind} in {results}; bench/RESULTS.md re-rendered")
    subprocess.run([sys.executable, str(REPO / "tools" / "readme_figures.py")], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", action="store_true", help="upstream.py vs upstream_aiohttp.py")
    which.add_argument("--base", metavar="REV", help="the gateway at REV vs the working tree")
    which.add_argument(
        "--routing", metavar="N", type=int, help="one backend vs N backends routed by prefix"
    )
    which.add_argument("--store", action="store_true", help="limits in memory vs in Redis")
    parser.add_argument("--redis", action="store_true", help="both sides' limits in Redis")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=5, help="seconds per round")
    parser.add_argument("--warmup", type=int, default=2, help="seconds, each side")
    parser.add_argument(
        "--record",
        action="store_true",
        help="keep it in bench/results.json's comparisons and re-render bench/RESULTS.md",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.concurrency.split(",")]
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    workdir = BENCH / "results" / f"ab-{stamp}"
    workdir.mkdir(parents=True)
    tree = tree_state()
    load_start = os.getloadavg()[0]

    with contextlib.ExitStack() as stack:
        if args.client:
            mode, title = "client", "forwarding client, upstream.py vs aiohttp"
            a = Side("the gateway with upstream.py", REPO, "builtin")
            b = Side("the gateway with bench/upstream_aiohttp.py", REPO, "aiohttp")
        elif args.routing:
            mode, title = "routing", f"one backend vs {args.routing} backends (prefix routing)"
            a = Side("the gateway with one backend", REPO, "builtin")
            b = Side(f"the gateway with {args.routing} backends", REPO, "builtin", {"models": None})
        elif args.store:
            mode, title = "store", "limits and usage in memory vs in Redis"
            a = Side("the gateway, limits in memory", REPO, "builtin")
            b = Side("the gateway, limits in Redis", REPO, "builtin", {})
        else:
            path, sha = stack.enter_context(base_worktree(args.base))
            mode, title = "base", f"the gateway at {sha} vs the working tree"
            a = Side(f"the gateway at {sha}", path, "builtin")
            b = Side("the gateway of the working tree", REPO, "builtin")
        up_port = free_port()
        py = sys.executable
        upstream = stack.enter_context(
            process([py, str(BENCH / "upstream.py"), str(up_port)], workdir / "upstream.log")
        )
        wait_http(f"http://127.0.0.1:{up_port}/health", 60, upstream, "upstream")
        if args.redis or args.store:
            url = stack.enter_context(redis_server(workdir / "redis"))
            for side, prefix in ((a, "a:"), (b, "b:")):
                if args.redis or side is b:
                    side.config = {**(side.config or {}), "redis_url": url, "redis_prefix": prefix}
                    side.label += " (Redis)" if args.redis else ""
        if args.routing:
            backends = [
                {"name": f"gpu{i}/tiny", "host": "127.0.0.1", "port": up_port}
                for i in range(args.routing)
            ]
            b.config = {**(b.config or {}), "models": [{"name": "tiny", "backends": backends}]}
        urls = (
            stack.enter_context(gateway(a, workdir / "A", up_port)),
            stack.enter_context(gateway(b, workdir / "B", up_port)),
        )
        cells = measure(urls, workdir, conns, args.rounds, args.duration, args.warmup)

    comparison = {
        "meta": {
            "title": title,
            "time_utc": now.isoformat(timespec="minutes"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "tree": tree,
            "a": a.label,
            "b": b.label,
            "rounds": args.rounds,
            "seconds_per_round": args.duration,
            "warmup_seconds": args.warmup,
            "command": shlex.join(["bench/ab.py", *sys.argv[1:]]),
        },
        "cells": [{"stream": c.stream, "conns": c.conns, **c.summary()} for c in cells],
        "verdict": verdict(mode, cells),
    }
    text = "\n".join(render_comparison(comparison))
    rounds = [
        {
            "stream": c.stream,
            "conns": c.conns,
            "a": [asdict(r) for r in c.a],
            "b": [asdict(r) for r in c.b],
        }
        for c in cells
    ]
    out = BENCH / "results" / f"ab-{stamp}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({**comparison, "rounds": rounds}, indent=2) + "\n"
    )
    print("\n" + text)
    print(f"written to {out}.md and .json; logs in {workdir}")
    if args.record:
        record(mode, comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
