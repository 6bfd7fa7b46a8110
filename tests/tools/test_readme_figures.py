"""tools/readme_figures.py: the blocks of README.md and docs/*.md rendered from
bench/results.json, the alert rules and the stack scenario's timed re-run
(molecule/stack/rerun.json), each in the page that holds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "readme_figures.py"
RULES = REPO / "roles/prometheus/files/rules/llmhost.rules.yml"

RESULTS = {
    "run": {
        "time_utc": "2030-01-02T03:04+00:00",
        "host": "fixture",
        "cpus": 4,
        "load_average_end": 0.5,
        "python": "3.11.0",
        "seconds_per_cell": 3,
        "warmup_seconds": 1,
        "litellm_version": None,
    },
    "non_streamed": [
        {
            "conns": c,
            "direct": {"rps": 10000 * c, "errors": 0},
            "gateway": {"rps": 1234 * c, "errors": 0, "added_p50_ms": 0.25, "added_p99_ms": 0.5},
        }
        for c in (1, 4)
    ],
    "streamed": [
        {
            "conns": c,
            "direct": {"rps": 900 * c, "errors": 0},
            "gateway": {"rps": 456 * c, "errors": 1, "added_p50_ms": 1.5, "added_p99_ms": 2.0},
        }
        for c in (1, 4)
    ],
    "memory": {
        "fresh_mib": 50.0,
        "after_throughput_mib": 51.25,
        "later": [{"requests": 12345, "rss_mib": 52.0}],
    },
}

RERUN = {
    "run": {
        "time_utc": "2030-01-02T03:04+00:00",
        "cpus": 4,
        "load_average_start": 0.42,
        "connection": "ssh",
    },
    "playbook": "site.yml",
    "seconds": 37.46,
    "hosts": {
        "stack": {"ok": 120, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 40},
        "probe": {"ok": 60, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 9},
    },
}

ROLL = {
    "run": {"time_utc": "2030-01-02T03:04+00:00", "cpus": 4, "load_average_start": 1.5},
    "rate_per_second": 10,
    "max_tokens": 8,
    "key_concurrent": 4,
    "hosts": 2,
    "requests": 2345,
    "failed": 0,
    "queued": 17,
    "longest_queue_ms": 1234,
    "roll_seconds": 300.0,
    "out_of_rotation_seconds": {"gpu1": 140.2, "gpu2": 120.7},
}

GAP = {
    "run": {"time_utc": "2030-01-02T03:04+00:00", "cpus": 4, "load_average_start": 0.5},
    "rate_per_second": 5,
    "requests": 321,
    "failed": 150,
    "statuses": {"500": 10, "503": 140},
    "gap_seconds": 30.4,
    "roll_seconds": 95.0,
}

LEAVING = {
    "goal_ms": 100,
    "run": {
        "time_utc": "2030-01-02T03:04+00:00",
        "cpus": 4,
        "load_average_end": {"quiet": 0.4, "busy": 4.2},
        "busy_spinners": 4,
        "rounds": 5,
    },
    "summary": {
        load: {
            mode: {"median_ms": ms, "max_ms": ms * 2, "median_tokens_after": 8, "asked": 8000}
            for mode, ms in (("stream", base), ("whole", base + 1))
        }
        for load, base in (("quiet", 11), ("busy", 21))
    },
}
STAGES = {
    "run": {"time_utc": "2030-01-02T03:04:05+00:00", "cpus": 4, "commit": "abc1234"},
    "seconds": 1500,
    "passed": True,
    "stages": [
        {"name": "setup", "seconds": 20, "load_average_start": 0.1, "passed": True},
        {
            "name": "molecule-stack",
            "seconds": 1480,
            "load_average_start": 1.25,
            "cpu_busy": 0.625,
            "passed": True,
            "background": True,
            "beside": ["setup"],
            "steps": {"converge": 400, "cleanup": 0, "verify": 1000, "destroy 2": 80},
        },
    ],
    "skipped": [],
}


def _bench_run(path: str, kind: str, round_: int, ttft: float, tpot: float) -> dict:
    return {
        "path": path,
        "kind": kind,
        "round": round_,
        "completed": 150,
        "failed": 0,
        "request_throughput": 11.95,
        "median_ttft_ms": ttft,
        "mean_ttft_ms": ttft + 1,
        "p90_ttft_ms": ttft + 5,
        "median_tpot_ms": tpot,
    }


CLUSTER = {
    "goal": {"median_ttft_ms_over_direct": 2.0, "median_tpot": "equal within noise", "failed": 0},
    "run": {
        "time_utc": "2030-01-02T03:04:05+00:00",
        "cpus": 4,
        "client_host": "gpu1",
        "load_average_start": 0.75,
        "rounds": 2,
    },
    "workload": {
        "dataset": "random",
        "input_tokens": 64,
        "output_tokens": 16,
        "prompts": 150,
        "request_rate": 12,
        "max_concurrency": 4,
    },
    "summary": {
        "direct": {"median_ttft_ms": 10.25, "median_tpot_ms": 1.9, "failed": 0},
        "stack": {"median_ttft_ms": 11.5, "median_tpot_ms": 1.95, "failed": 0},
        "median_ttft_ms_over_direct": 1.25,
    },
    "runs": [
        _bench_run("vLLM directly on gpu1", "direct", 1, 10.0, 1.9),
        _bench_run("nginx + gateway on gw1", "stack", 1, 11.5, 1.95),
        _bench_run("vLLM directly on gpu1", "direct", 2, 10.5, 1.85),
        _bench_run("nginx + gateway on gw1", "stack", 2, 11.25, 2.0),
    ],
}


def _routing(hits: float, shares: tuple[float, float]) -> dict:
    return {
        "requests": 300,
        "failed": 0,
        "mean_prompt_tokens": 712,
        "hit_rate": hits,
        "query_share": {"gpu1": shares[0], "gpu2": shares[1]},
        "kv_tokens_per_host": {"gpu1": 16384, "gpu2": 16384},
    }


ROUTING = {
    "goal": {"prefix_over_round_robin": 1.5},
    "run": {"time_utc": "2030-01-02T03:04:05+00:00", "cpus": 4, "concurrency": 4},
    "workloads": {
        "documents": {"documents": 30, "questions_each": 10},
        "conversations": {"conversations": 30, "turns": 4},
    },
    "policies": {
        "prefix": {
            "documents": _routing(0.8, (0.5, 0.5)),
            "conversations": _routing(0.7, (0.45, 0.55)),
        },
        "round_robin": {
            "documents": _routing(0.4, (0.5, 0.5)),
            "conversations": _routing(0.35, (0.5, 0.5)),
        },
    },
    "prefix_over_round_robin": {"documents": 2.0, "conversations": 2.0},
}


def _transfer(first: float, again: float, vs_copy: tuple[float, float]) -> dict:
    return {
        "first_seconds": first,
        "no_change_seconds": again,
        "first_vs_copy": vs_copy[0],
        "no_change_vs_copy": vs_copy[1],
    }


TRANSFER = {
    "run": {
        "time_utc": "2026-12-08T01:00:00+00:00",
        "cpus": 2,
        "commit": "abc1234",
        "gpu_hosts": ["gpu1", "gpu2"],
    },
    "model": {"bytes": 4 * (1 << 30) + 1000, "files": 8, "shard_bytes": 1 << 30},
    "mirror_intake": {"copy_seconds": 30.5, "manifest_seconds": 12.25},
    "sources": {
        "copy": _transfer(100.0, 40.0, (1.0, 1.0)),
        "rsync": _transfer(50.0, 2.0, (0.5, 0.05)),
        "mirror": {
            **_transfer(20.0, 1.5, (0.2, 0.0375)),
            "no_change_host_seconds": {"gpu1": 0.05, "gpu2": 0.07},
        },
    },
    "projection": {
        "bytes": 160 * 10**9,
        "hosts": 6,
        "scale": 111.76,
        "rule": "first: measured x (bytes / model bytes) x (hosts / gpu hosts)",
        "sources": {
            "copy": {"first_seconds": 11176, "no_change_seconds": 4470.4},
            "rsync": {"first_seconds": 5588, "no_change_seconds": 2.0},
            "mirror": {"first_seconds": 2235, "no_change_seconds": 1.5},
        },
    },
}


def _fair(p50: float, p95: float, tps: float, vs_idle: float, vs_today: float | None) -> dict:
    mode = {"ttft_p50_ms": p50, "ttft_p95_ms": p95, "batch_tokens_per_s": tps}
    mode |= {"ttft_p95_vs_idle": vs_idle, "batch_answers": {"batch0": 10}}
    return mode | ({"batch_vs_today": vs_today} if vs_today is not None else {})


FAIR = {
    "goals": {
        "design_ttft_p95_vs_idle": 2.0, "design_batch_vs_today": 0.8, "batch_share_spread": 0.1,
    },
    "met": {
        "design_ttft_p95_vs_idle": True, "design_batch_vs_today": False, "batch_share_spread": True,
    },
    "batch_share_spread": 0.05,
    "run": {
        "time_utc": "2030-01-02T03:04:05+00:00", "cpus": 4, "max_num_seqs": 4, "flood": 16,
        "batch_tokens": 128, "interactive_rate": 2.0, "seconds": 30, "commit": "abc1234",
    },
    "modes": {
        "idle": _fair(10, 20, 0, 1.0, None),
        "today": _fair(500, 800, 3000, 40.0, 1.0),
        "vllm_priority": _fair(80, 200, 3100, 10.0, 1.033),
        "design": _fair(12, 30, 2100, 1.5, 0.7),
        "two_batch_keys": _fair(12, 31, 2000, 1.55, 0.667)
        | {"batch_answers": {"batch0": 100, "batch1": 95}},
    },
}  # fmt: skip
README = """# project

Prose before.

<!-- bench:begin: generated -->
Added p50 is under 1 ms up to 8 connections.
<!-- bench:end -->

Prose between.

<!-- alerts:begin: generated -->
| `VLLMDown` | for 5 m |
<!-- alerts:end -->

Prose after.

<!-- rerun:begin: generated -->
A re-run took 99 s.
<!-- rerun:end -->

<!-- roll:begin: generated -->
A roll took forever.
<!-- roll:end -->

<!-- gap:begin: generated -->
No gap at all.
<!-- gap:end -->
<!-- leaving:begin: generated -->
vLLM never stops.
<!-- leaving:end -->
<!-- testtime:begin: generated -->
Tests take no time.
<!-- testtime:end -->
<!-- cluster-bench:begin: generated -->
The cluster is fast.
<!-- cluster-bench:end -->
<!-- routing:begin: generated -->
Routing is perfect.
<!-- routing:end -->
<!-- fair:begin: generated -->
Everyone is served at once.
<!-- fair:end -->
<!-- transfer:begin: generated -->
Models arrive at once.
<!-- transfer:end -->
"""


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "readme": tmp_path / "README.md",
        "results": tmp_path / "results.json",
        "results-md": tmp_path / "RESULTS.md",
        "rules": tmp_path / "rules.yml",
        "rerun": tmp_path / "rerun.json",
        "roll": tmp_path / "roll.json",
        "gap": tmp_path / "gap.json",
        "leaving": tmp_path / "leaving.json",
        "stages": tmp_path / "stages.json",
        "cluster": tmp_path / "cluster.json",
        "routing": tmp_path / "routing.json",
        "fair": tmp_path / "fair.json",
        "transfer": tmp_path / "model_transfer.json",
        "docs": tmp_path / "docs",
    }
    paths["docs"].mkdir()
    paths["readme"].write_text(README)
    paths["results"].write_text(json.dumps(RESULTS))
    paths["rerun"].write_text(json.dumps(RERUN))
    paths["roll"].write_text(json.dumps(ROLL))
    paths["gap"].write_text(json.dumps(GAP))
    paths["leaving"].write_text(json.dumps(LEAVING))
    paths["stages"].write_text(json.dumps(STAGES))
    paths["cluster"].write_text(json.dumps(CLUSTER))
    paths["routing"].write_text(json.dumps(ROUTING))
    paths["fair"].write_text(json.dumps(FAIR))
    paths["transfer"].write_text(json.dumps(TRANSFER))
    paths["rules"].write_text(RULES.read_text())
    return paths


def tool(paths: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [f"--{name}={path}" for name, path in paths.items()]
    return subprocess.run(
        [sys.executable, str(TOOL), *args, *extra], capture_output=True, text=True, timeout=60
    )


def test_the_blocks_are_rendered_from_the_json_and_the_rules_and_nothing_else(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    prose = " ".join(readme.split())  # sentences are wrapped to the README's width

    assert "| non-streamed | 1 | 10,000 | 1,234 | 0.250 ms | 0.500 ms |" in readme
    assert "| | 4 | 3,600 | 1,824 | 1.500 ms | 2.000 ms |" in readme
    assert "run 2030-01-02 on 4 CPUs" in prose
    assert "at 4 connections every server runs flat out" in prose
    assert "50.0 MiB fresh, 51.2 MiB after the throughput runs, 52.0 MiB after 12,345" in prose
    assert "LiteLLM" not in readme
    assert "under 1 ms" not in readme
    # The rules say `for: 2m` over a 5m window at 5 %.
    assert "over 5 % of `/v1` requests in the last 5 m failed with 5xx, for 2 m" in readme
    assert "| `VLLMDown` | critical | vLLM's metrics do not answer for 1 m |" in readme
    for kept in ("Prose before.", "Prose between.", "Prose after."):
        assert kept in readme
    assert "Run 2030-01-02 03:04 UTC on fixture: 4 CPUs" in sources["results-md"].read_text()
    assert (
        "A re-run of `site.yml` with nothing to change took **37 s** over SSH (`probe`: ok=60, "
        "skipped=9, changed=0; `stack`: ok=120, skipped=40, changed=0;" in prose
    )
    assert "run 2030-01-02 on 4 CPUs, load average 0.4 at its start" in prose
    assert "99 s" not in readme

    assert tool(sources, "--check").returncode == 0


def test_check_fails_and_changes_nothing_when_a_figure_was_typed_by_hand(sources):
    tool(sources)
    edited = sources["readme"].read_text().replace("1,234", "9,999")
    sources["readme"].write_text(edited)

    check = tool(sources, "--check")

    assert check.returncode == 1
    assert f"{sources['readme']} differs" in check.stderr
    assert "-| non-streamed | 1 | 10,000 | 9,999 |" in check.stderr
    assert sources["readme"].read_text() == edited


def test_check_fails_when_a_rule_changes_under_the_alert_table(sources):
    tool(sources)
    sources["rules"].write_text(RULES.read_text().replace("for: 2m", "for: 7m"))

    check = tool(sources, "--check")

    assert check.returncode == 1
    assert (
        "+| `VLLMNotReady` | critical | the gateway's probe of vLLM (`upstream_up`) fails for 7 m"
        in (check.stderr)
    )


def test_an_alert_without_readme_wording_is_refused_by_name(sources):
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"].append({"alert": "BrandNewAlert", "expr": "vector(1) > 0"})
    sources["rules"].write_text(yaml.safe_dump(rules))

    check = tool(sources, "--check")

    assert check.returncode == 2
    assert "alert BrandNewAlert has no README row" in check.stderr


def test_check_fails_when_a_new_rerun_was_recorded_and_not_rendered(sources):
    tool(sources)
    sources["rerun"].write_text(json.dumps({**RERUN, "seconds": 52.0}))

    check = tool(sources, "--check")

    assert check.returncode == 1
    assert "+A re-run of `site.yml` with nothing to change took **52 s**" in check.stderr


def test_the_roll_figures_come_from_roll_json(sources):
    assert tool(sources).returncode == 0
    prose = " ".join(sources["readme"].read_text().split())
    assert "over 2 gpu hosts took **5.0 min**" in prose
    assert "`gpu1` 140 s, `gpu2` 121 s" in prose
    assert "2,345 requests, 0 failed; 17 of them waited" in prose
    assert "(at most 1,234 ms)" in prose
    assert "8-token answers" in prose and "allowed 4 at once" in prose
    assert "forever" not in prose
    sources["roll"].write_text(json.dumps({**ROLL, "failed": 3}))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "roll.json" in check.stderr
    assert tool(sources).returncode == 0
    assert "requests, 3 failed" in " ".join(sources["readme"].read_text().split())


def test_the_single_host_gap_comes_from_gap_json(sources):
    assert tool(sources).returncode == 0
    prose = " ".join(sources["readme"].read_text().split())
    assert "took 95 s, and its clients had a gap of **30 s**" in prose
    assert "of 321 requests sent at 5 a second, 150 failed (10 x 500 and 140 x 503," in prose
    assert "the 500s are vLLM's own" in prose
    assert "No gap" not in prose
    sources["gap"].write_text(json.dumps({**GAP, "gap_seconds": 61.0}))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "gap.json" in check.stderr


def test_the_client_leaving_table_comes_from_leaving_json(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    assert "| quiet | 0.4 | 11 ms (max 22) | 12 ms (max 24) |" in readme
    assert (
        "| every core also spun by 4 processes | 4.2 | 21 ms (max 42) | 22 ms (max 44) |" in readme
    )
    assert "goal 100 ms" in " ".join(readme.split())
    assert "never stops" not in readme
    busy = LEAVING["summary"]["busy"]
    slower = {**busy, "whole": {**busy["whole"], "median_ms": 950}}
    sources["leaving"].write_text(
        json.dumps({**LEAVING, "summary": {**LEAVING["summary"], "busy": slower}})
    )
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "leaving.json" in check.stderr


def test_the_test_time_comes_from_stages_json(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    assert "`make test` took **25 minutes**" in " ".join(readme.split())
    assert "| molecule-stack | 1,480 | 1.2 | 62% | in the background beside setup |" in readme
    assert "| setup | 20 | 0.1 | - |  |" in readme  # a record from before CPU busy was kept
    assert "| &nbsp;&nbsp;converge | 400 | | | |" in readme
    assert "cleanup" not in readme
    assert "no time" not in readme
    sources["stages"].write_text(json.dumps({**STAGES, "seconds": 2400}))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "stages.json" in check.stderr


def test_the_cluster_benchmark_comes_from_cluster_json(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    assert (
        "| vLLM directly on gpu1 | 11.95 / 11.95 | 10.0 / 10.5 ms | 11.0 / 11.5 ms "
        "| 15.0 / 15.5 ms | 1.90 / 1.85 ms | 0 |" in readme
    )
    assert "| nginx + gateway on gw1 | 11.95 / 11.95 | 11.5 / 11.2 ms |" in readme
    flat = " ".join(readme.split())
    assert (
        "11.50 ms through the stack, 10.25 ms direct (+1.25 ms; the goal, at most 2 ms more, met)"
        in flat
    )
    assert "random 64-token prompts, 16-token answers, 150 prompts at 12 requests" in flat
    assert "is fast" not in readme
    runs = [{**r, "failed": 3} if r["kind"] == "stack" else r for r in CLUSTER["runs"]]
    sources["cluster"].write_text(json.dumps({**CLUSTER, "runs": runs}))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "cluster.json" in check.stderr
    slower = {**CLUSTER["summary"], "median_ttft_ms_over_direct": 2.01}
    sources["cluster"].write_text(json.dumps({**CLUSTER, "summary": slower}))
    assert tool(sources).returncode == 0
    assert "(+2.01 ms; the goal, at most 2 ms more, not met)" in (
        " ".join(sources["readme"].read_text().split())
    )


def test_the_routing_table_comes_from_routing_json(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    assert "| prefix | 80.0% | 50% / 50% | 70.0% | 45% / 55% |" in readme
    assert "| round_robin | 40.0% | 50% / 50% | 35.0% | 50% / 50% |" in readme
    flat = " ".join(readme.split())
    assert "documents 2.00x, conversations 2.00x (the goal, at least 1.5x on each, met)" in flat
    assert "30 documents of about 712 tokens, 10 questions each" in flat
    assert "holds 16,384 tokens" in flat
    assert "is perfect" not in readme
    worse = {**ROUTING, "prefix_over_round_robin": {"documents": 1.1, "conversations": 2.0}}
    sources["routing"].write_text(json.dumps(worse))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "routing.json" in check.stderr
    assert tool(sources).returncode == 0
    assert "documents 1.10x, conversations 2.00x (the goal, at least 1.5x on each, not met)" in (
        " ".join(sources["readme"].read_text().split())
    )


def test_the_fair_sharing_table_comes_from_fair_json(sources):
    assert tool(sources).returncode == 0
    readme = sources["readme"].read_text()
    assert "Everyone is served at once." not in readme
    assert (
        "| under the flood: vLLM's priority and the gateway's queue | 12 ms | 30 ms | 1.50x "
        "| 2,100 | 0.700 |"
    ) in readme
    assert "| the interactive key alone | 10 ms | 20 ms | 1.00x | - | - |" in readme
    flat = " ".join(readme.split())
    assert "The two batch keys got 100 and 95 answers (spread 5%)" in flat
    assert "p95 within 2x idle met, batch at least 80% NOT met, batch keys within 10% met" in flat
    assert "Measured at commit abc1234" in flat


ROUTING_BLOCK = """<!-- routing:begin: generated -->
Routing is perfect.
<!-- routing:end -->
"""


def test_a_block_in_a_docs_page_is_rendered_there_and_checked_there(sources):
    sources["readme"].write_text(README.replace(ROUTING_BLOCK, ""))
    page = sources["docs"] / "scaling.md"
    page.write_text("# Scaling\n\nProse of the page.\n\n" + ROUTING_BLOCK + "\nMore prose.\n")
    (sources["docs"] / "other.md").write_text("# Another page, with no block\n")

    assert tool(sources).returncode == 0

    text = page.read_text()
    assert "| prefix | 80.0% | 50% / 50% | 70.0% | 45% / 55% |" in text
    assert "Prose of the page." in text and "More prose." in text
    assert "is perfect" not in text
    assert "routing:begin" not in sources["readme"].read_text()
    assert "| `VLLMDown` | critical |" in sources["readme"].read_text()  # the others stay
    assert (sources["docs"] / "other.md").read_text() == "# Another page, with no block\n"
    assert tool(sources, "--check").returncode == 0

    page.write_text(text.replace("80.0%", "99.9%"))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert f"{page} differs" in check.stderr
    assert f"{sources['readme']} differs" not in check.stderr
    assert "-| prefix | 99.9% |" in check.stderr


def test_a_block_in_two_pages_is_refused_by_name(sources):
    page = sources["docs"] / "scaling.md"
    page.write_text("# Scaling\n\n" + ROUTING_BLOCK)

    run = tool(sources)

    assert run.returncode == 2
    assert "block routing:" in run.stderr
    assert f"found in {sources['readme']}, {page}" in run.stderr
    assert page.read_text() == "# Scaling\n\n" + ROUTING_BLOCK  # nothing rewritten
    assert sources["readme"].read_text() == README


def test_a_block_in_no_page_is_refused_by_name(sources):
    sources["readme"].write_text(README.replace(ROUTING_BLOCK, ""))

    check = tool(sources, "--check")

    assert check.returncode == 2
    assert "block routing:" in check.stderr
    assert "found in none of them" in check.stderr


def _figures_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_each_figure_names_its_commit_and_how_old_its_measured_code_is(sources):
    """Every block ends with the commit it was measured at; the fixtures' commit is not in
    this repository's history, which the sentence says."""
    stages = {**STAGES, "run": {**STAGES["run"], "commit": "0000000"}}
    sources["stages"].write_text(json.dumps(stages))
    assert tool(sources).returncode == 0
    prose = " ".join(sources["readme"].read_text().split())
    assert "Measured at commit 0000000 (not in this clone's history)." in prose
    # Results that name no commit and are not tracked by git: said so, not guessed.
    assert "The commit these figures were measured at is not recorded." in prose


def test_the_age_counts_commits_to_the_measured_code_only():
    figures = _figures_module()
    if _git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone has no history to count")
    head = _git("rev-parse", "--short", "HEAD")
    # The second newest commit to proxy_app/ (not counting Markdown): at least one commit to
    # proxy_app/ came after it, and exactly as many as git counts.
    older = _git("log", "-2", "--format=%h", "--", "proxy_app/", ":(exclude,glob)**/*.md")
    older = older.split()[-1]
    count = int(
        _git("rev-list", "--count", f"{older}..HEAD", "--", "proxy_app/", ":(exclude,glob)**/*.md")
    )
    assert count >= 1
    said = figures.provenance("bench", {"run": {"commit": older}}, Path("x.json"))
    ago = f"{count} commit{'s' if count > 1 else ''} to `proxy_app/` ago."
    assert said == f"Measured at commit {older}, {ago}"
    # Nothing measured changed between HEAD and HEAD.
    said = figures.provenance("bench", {"run": {"commit": head}}, Path("x.json"))
    assert said == f"Measured at commit {head}; `proxy_app/` unchanged since."


def test_the_transfer_table_comes_from_model_transfer_json(sources):
    assert tool(sources).returncode == 0
    docs = sources["readme"].read_text()
    assert (
        "| mirror (`llmhost-model fetch`) | 20.0 s | 0.20x | 1.5 s | 0.04x | 37 min | 1.5 s |"
        in docs
    )
    assert (
        "| copy (`ansible.builtin.copy`, `sync` before) | 100.0 s | 1.00x | 40.0 s | 1.00x" in docs
    )
    flat = " ".join(docs.split())
    assert "a synthetic model of 4.0 GiB in 8 files" in flat
    assert "took 0.05 s, 0.07 s by the hosts' clocks" in flat
    assert "30.5 s to copy the model onto it, 12.2 s to write its SHA256SUMS" in flat
    assert "arrive at once" not in docs
    slower = {**TRANSFER, "mirror_intake": {"copy_seconds": 31.0, "manifest_seconds": 12.25}}
    sources["transfer"].write_text(json.dumps(slower))
    check = tool(sources, "--check")
    assert check.returncode == 1
    assert "model_transfer.json" in check.stderr
