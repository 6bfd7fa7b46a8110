"""Render the generated blocks of README.md and docs/*.md, so that no figure is typed by hand.

    python tools/readme_figures.py           rewrite the blocks (and bench/RESULTS.md)
    python tools/readme_figures.py --check   fail when any of them differs (make lint)

Ten blocks, each between its marker comments (`<!-- name:begin ... -->` and
`<!-- name:end -->` lines) in exactly one of README.md and docs/*.md: a block is rendered in
the file that holds it, so that a figure sits next to the text that explains it. A block in no
file or in two is an error naming it. The blocks:

- ``bench``: the benchmark table and its sentences, from bench/results.json (written by
  bench/run.py);
- ``rerun``: how long a re-run of site.yml with nothing to change took, from
  molecule/stack/rerun.json (written by molecule/stack/tests/test_rerun.py);
- ``roll``: how long a rolling update of vLLM took and what its clients saw, from
  molecule/cluster/roll.json (written by molecule/cluster/tests/test_updates.py);
- ``gap``: how long clients of a single gpu host got errors while a rolling update
  restarted its vLLM, from molecule/stack/gap.json (written by
  molecule/stack/tests/test_updates.py);
- ``leaving``: how soon vLLM stopped after a client left, through nginx and the gateway,
  from bench/leaving.json (written by bench/leaving.py on `make demo`'s host);
- ``cluster-bench``: the cluster layout measured with vLLM's own client, each vLLM directly
  and each gateway host's nginx + gateway, from bench/cluster.json (written by
  bench/cluster.py, `make bench-cluster`, on `make demo-cluster`'s hosts);
- ``routing``: the routing policies' prefix-cache hit rates on two workloads, from
  bench/routing.json (written by bench/routing.py, `make bench-routing`, on
  `make demo-cluster`'s hosts);
- ``fair``: an interactive key's time to first token while a batch key floods the model,
  today's way and with each part of fair sharing, from bench/fair.json (written by
  bench/fair.py, `make bench-fair`);
- ``transfer``: a model's way to the gpu hosts by source (copy, rsync, the mirror), first
  transfer and a re-run with nothing to change, from bench/model_transfer.json (written by
  bench/model_transfer.py, `make bench-transfer`, on `make demo-cluster`'s hosts);
- ``testtime``: how long `make test` took, stage by stage, from tests/stages.json (written
  by tools/test_stages.py when every stage passed);
- ``alerts``: the alert table, from roles/prometheus/files/rules/llmhost.rules.yml: each
  rule's `for:`, its threshold and range window are read from the rule; the wording of a row
  is in ALERTS below, with those values as placeholders.

Each of those blocks but the alerts ends with the commit its figures were measured at (the
results' ``run.commit``; for results that predate it, the commit that recorded the file) and
how many commits to the code it measured came after it (MEASURED below): "measured N commits
to `proxy_app/` ago". The count runs to HEAD, so run this tool after committing a change to
that code (and commit the README or docs page it rewrites on its own), or `--check` finds the
page one commit behind.

bench/RESULTS.md is checked too: it must be what bench/run.py's render_results makes of
bench/results.json.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parent.parent
WIDTH = 96

# Placeholders: {for} (the rule's `for:`), {window} (the first range window of its expression),
# {threshold} (the first number its expression compares with), {percent} (that number as %),
# {quantile} (`p95` for histogram_quantile(0.95, ...)).
ALERTS: dict[str, tuple[str, str]] = {
    "LLMGatewayDown": (
        "Prometheus cannot scrape the gateway through nginx for {for}",
        "`systemctl status llm-proxy nginx`, `journalctl -u llm-proxy`",
    ),
    "VLLMDown": (
        "vLLM's metrics do not answer for {for}",
        "`systemctl status vllm`, `journalctl -u vllm`: out of GPU memory, a crashed engine, "
        "a model still loading",
    ),
    "VLLMNotReady": (
        "the gateway's probe of vLLM (`upstream_up`) fails for {for}",
        "clients get 503: see vLLM's log; the gateway itself is fine",
    ),
    "LLMGateway5xxRatioHigh": (
        "over {percent} of `/v1` requests in the last {window} failed with 5xx, for {for}",
        "the gateway's JSON log (`journalctl -u llm-proxy`) says which upstream error",
    ),
    "LLMGateway429RatioHigh": (
        "over {percent} of `/v1` requests in the last {window} were refused by one limit "
        "(label `reason`), for {for}",
        "raise that limit or the key's, or tell the user",
    ),
    "LLMGatewayInteractiveQueueing": (
        "interactive requests wait in the gateway's queue, {threshold} or more on average over "
        "{window}, for {for}",
        "the model is busy with interactive work alone: add capacity, raise "
        "`vllm_max_num_seqs` if the KV cache has room, or give heavy users batch keys",
    ),
    "VLLMRequestsWaiting": (
        "more than {threshold} requests queue in vLLM for {for}",
        "the model is saturated: lower `max_num_seqs` pressure, add GPUs or hosts, or lower "
        "the gateway's concurrency",
    ),
    "VLLMKVCacheNearlyFull": (
        "KV cache above {percent} for {for}",
        "expect preemptions: raise `vllm_gpu_memory_utilization`, lower `vllm_max_model_len` "
        "or `vllm_max_num_seqs`",
    ),
    "VLLMTimeToFirstTokenHigh": (
        "{quantile} time to first token over the last {window} above {threshold} s, for {for}",
        "queueing or long prompts: see waiting requests and KV cache",
    ),
    "HostDiskNearlyFull": (
        "a real filesystem has less than {percent} free for {for}",
        "model cache, Prometheus data (`prometheus_retention_*`), journals",
    ),
}


# What each block measured: the paths whose commits after the figure's own make it say so.
# The results files themselves never count (recording a figure is not a change to the code),
# nor do Markdown files.
MEASURED: dict[str, tuple[str, ...]] = {
    "bench": ("proxy_app/",),
    "rerun": ("roles/", "playbooks/", "site.yml"),
    "roll": ("roles/", "playbooks/", "proxy_app/"),
    "gap": ("roles/", "playbooks/", "proxy_app/"),
    "leaving": ("proxy_app/", "roles/nginx/", "roles/llm_proxy/"),
    "cluster-bench": ("proxy_app/", "roles/"),
    "routing": ("proxy_app/",),
    "fair": ("proxy_app/",),
    "transfer": ("roles/vllm/", "roles/model_mirror/", "roles/common/files/"),
    "testtime": (
        "Makefile", "tests/", "molecule/", "tools/", "proxy_app/", "roles/", "playbooks/",
    ),
}  # fmt: skip
RESULTS_FILES = (
    "tests/stages.json",
    "molecule/stack/rerun.json",
    "molecule/stack/gap.json",
    "molecule/cluster/roll.json",
    "molecule/cluster/mirror.json",
)


def _git(*args: str) -> str | None:
    run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return run.stdout.strip() if run.returncode == 0 else None


def provenance(name: str, data: dict, source: Path) -> str:
    """The sentence that says at which commit a block's figures were measured and whether
    the code they measured changed since (commits to MEASURED[name], counted up to HEAD:
    run this tool after committing a change, so that the count includes it)."""
    commit = data.get("run", {}).get("commit")
    verb = "Measured at"
    if not commit:
        # Results written before they named their commit: the commit that recorded them.
        commit = _git("log", "-1", "--format=%h", "--", str(source))
        verb = "Recorded at"
        if not commit:
            return "The commit these figures were measured at is not recorded."
    paths = MEASURED[name]
    count = _git(
        "rev-list", "--count", f"{commit}..HEAD", "--", *paths,
        *(f":(exclude){f}" for f in RESULTS_FILES), ":(exclude,glob)**/*.md",
    )  # fmt: skip
    where = _and([f"`{p}`" for p in paths])
    if count is None:
        return f"{verb} commit {commit} (not in this clone's history)."
    if count == "0":
        return f"{verb} commit {commit}; {where} unchanged since."
    n = int(count)
    return f"{verb} commit {commit}, {n} commit{'s' if n > 1 else ''} to {where} ago."


class FiguresError(Exception):
    """A source the README and docs are rendered from is missing or does not fit."""


def _and(values: list[str]) -> str:
    return ", ".join(values[:-1]) + " and " + values[-1] if len(values) > 1 else "".join(values)


def _duration(text: str) -> str:
    """Prometheus' `2m` or `1h30m` as the README writes it: `2 m`, `1 h 30 m`."""
    return re.sub(r"(\d+)([a-z]+)(?=\d|$)", r"\1 \2 ", text).strip()


def render_bench(data: dict) -> str:
    """The benchmark block from bench/results.json."""
    run = data["run"]
    version = run["litellm_version"]
    lite = version is not None
    intro = (
        f"Benchmark (`make bench`; run {run['time_utc'][:10]} on {run['cpus']} CPUs, loopback; "
        "figures from `bench/results.json`, full tables in `bench/RESULTS.md`): the gateway "
        "with every control on, against direct access to the same fast upstream"
        + (f" and LiteLLM's proxy ({version}, master key)" if lite else "")
        + ":"
    )
    head = "| | conns | direct req/s | gateway req/s |"
    if lite:
        head += " LiteLLM req/s | gateway / LiteLLM |"
    head += " gateway added p50 | gateway added p99 |"
    lines = [textwrap.fill(intro, WIDTH, break_on_hyphens=False), "", head]
    lines.append("|" + "---|" * (head.count("|") - 1))
    for mode, label in (("non_streamed", "non-streamed"), ("streamed", "streamed")):
        for i, r in enumerate(data[mode]):
            d, g = r["direct"], r["gateway"]
            first = f" {label} " if i == 0 else " "
            line = f"|{first}| {r['conns']} | {d['rps']:,.0f} | {g['rps']:,.0f} |"
            if lite:
                line += f" {r['litellm']['rps']:,.0f} | {r['gateway_per_litellm']:.1f}x |"
            line += f" {g['added_p50_ms']:.3f} ms | {g['added_p99_ms']:.3f} ms |"
            lines.append(line)
    conns = [r["conns"] for r in data["non_streamed"]]
    notes = []
    if conns[0] == 1 and len(conns) > 1:
        busy = _and([str(c) for c in conns[1:]])
        notes.append(
            "At 1 connection the added time is what one request costs; at "
            f"{busy} connections every server runs flat out and it is mostly queueing."
        )
    memory = data["memory"]
    rss = (
        f"Gateway RSS: {memory['fresh_mib']:.1f} MiB fresh, "
        f"{memory['after_throughput_mib']:.1f} MiB after the throughput runs"
    )
    if memory["later"]:
        last = memory["later"][-1]
        rss += f", {last['rss_mib']:.1f} MiB after {last['requests']:,} more requests"
    notes.append(rss + ".")
    lines += ["", textwrap.fill(" ".join(notes), WIDTH, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def render_rerun(data: dict) -> str:
    """The re-run sentence from molecule/stack/rerun.json."""
    run = data["run"]
    connection = "SSH" if run["connection"] == "ssh" else f"the `{run['connection']}` connection"
    hosts = "; ".join(
        f"`{name}`: ok={c['ok']}, skipped={c['skipped']}, changed={c['changed']}"
        for name, c in sorted(data["hosts"].items())
    )
    text = (
        f"A re-run of `{data['playbook']}` with nothing to change took **{data['seconds']:.0f} s** "
        f"over {connection} ({hosts}; `molecule/stack/tests/test_rerun.py`, run "
        f"{run['time_utc'][:10]} on {run['cpus']} CPUs, load average "
        f"{run['load_average_start']:.1f} at its start; figures from `molecule/stack/rerun.json`)."
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n"


def render_roll(data: dict) -> str:
    """The rolling-update sentence from molecule/cluster/roll.json."""
    run = data["run"]
    hosts = ", ".join(
        f"`{name}` {seconds:.0f} s"
        for name, seconds in sorted(data["out_of_rotation_seconds"].items())
    )
    text = (
        f"A rolling update of vLLM (one argument changed, every instance restarted) over "
        f"{data['hosts']} gpu hosts took **{data['roll_seconds'] / 60:.1f} min**; each host was "
        f"out of rotation from its drain to its return for {hosts}. A client sent "
        f"{data['rate_per_second']} requests a second of {data['max_tokens']}-token answers "
        f"through a gateway the whole time, with a key allowed {data['key_concurrent']} at once: "
        f"{data['requests']:,} requests, {data['failed']} failed; {data['queued']} of them "
        f"waited in the gateway's queue (at most {data['longest_queue_ms']:,} ms) rather than "
        f"being refused "
        f"(`molecule/cluster/tests/test_updates.py`, run {run['time_utc'][:10]} on "
        f"{run['cpus']} CPUs shared by the five test hosts, load average "
        f"{run['load_average_start']:.1f} at its start; most of a host's time is vLLM's CPU "
        f"build loading on a busy machine; figures from `molecule/cluster/roll.json`)."
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n"


def render_gap(data: dict) -> str:
    """The single-host gap sentence from molecule/stack/gap.json."""
    run = data["run"]
    statuses = _and([f"{n} x {status}" for status, n in sorted(data["statuses"].items())])
    why_500 = (
        ": the 500s are vLLM's own, which answers while it shuts down"
        if "500" in data["statuses"]
        else ""
    )
    text = (
        f"In the stack scenario (one gpu host) a rolling update changing one vLLM argument "
        f"took {data['roll_seconds']:.0f} s, and its clients had a gap of "
        f"**{data['gap_seconds']:.0f} s**: of {data['requests']:,} requests sent at "
        f"{data['rate_per_second']} a second, {data['failed']} failed ({statuses}, each with "
        f"a JSON error{why_500}), from the first failure to the first answer after the "
        f"last (`molecule/stack/tests/test_updates.py`, run {run['time_utc'][:10]} on "
        f"{run['cpus']} CPUs, load average {run['load_average_start']:.1f} at its start; "
        f"the tiny model loads in seconds, a large one for minutes; figures from "
        f"`molecule/stack/gap.json`)."
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n"


def render_leaving(data: dict) -> str:
    """The client-leaving table from bench/leaving.json."""
    run = data["run"]
    machine = {
        "quiet": "quiet",
        "busy": f"every core also spun by {run['busy_spinners']} processes",
    }
    lines = [
        "| machine | load average | a stream, left after its third event "
        "| a whole answer, left while vLLM ran it |",
        "|---|---|---|---|",
    ]
    for load, modes in data["summary"].items():
        cells = " | ".join(
            f"{modes[mode]['median_ms']:.0f} ms (max {modes[mode]['max_ms']:.0f})"
            for mode in ("stream", "whole")
        )
        lines.append(f"| {machine[load]} | {run['load_average_end'][load]:.1f} | {cells} |")
    text = (
        f"How soon vLLM stops after a client leaves: milliseconds from the client's close to "
        f"vLLM reporting no request running, through nginx and the gateway on `make demo`'s "
        f"host, median of {run['rounds']} rounds (`bench/leaving.py`, run "
        f"{run['time_utc'][:10]} on {run['cpus']} CPUs, "
        f"{data['summary']['quiet']['stream']['asked']:,} tokens asked per request; goal "
        f"{data['goal_ms']} ms; figures from `bench/leaving.json`):"
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n\n" + "\n".join(lines) + "\n"


_FAIR_MODES = {
    "idle": "the interactive key alone",
    "today": "under the flood: vLLM first come first served, no queue at the gateway",
    "vllm_priority": "under the flood: vLLM's priority scheduling alone",
    "design": "under the flood: vLLM's priority and the gateway's queue",
    "two_batch_keys": "the same, two batch keys flooding with half the streams each",
}


def render_fair(data: dict) -> str:
    """The fair-sharing table from bench/fair.json (`make bench-fair`)."""
    run, goals = data["run"], data["goals"]
    lines = [
        "| mode | interactive TTFT p50 | p95 | p95 / idle | batch tokens/s | batch / today |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in data["modes"].items():
        batch = f"{m['batch_tokens_per_s']:,.0f}" if m["batch_tokens_per_s"] else "-"
        today = f"{m['batch_vs_today']:.3f}" if "batch_vs_today" in m else "-"
        lines.append(
            f"| {_FAIR_MODES[name]} | {m['ttft_p50_ms']:.0f} ms | {m['ttft_p95_ms']:.0f} ms "
            f"| {m['ttft_p95_vs_idle']:.2f}x | {batch} | {today} |"
        )
    met = data["met"]
    verdict = ", ".join(
        f"{what} {'met' if met[key] else 'NOT met'}"
        for key, what in (
            ("design_ttft_p95_vs_idle", f"p95 within {goals['design_ttft_p95_vs_idle']:g}x idle"),
            ("design_batch_vs_today", f"batch at least {goals['design_batch_vs_today']:.0%}"),
            ("batch_share_spread", f"batch keys within {goals['batch_share_spread']:.0%}"),
        )
    )
    answers = data["modes"]["two_batch_keys"]["batch_answers"]
    text = (
        f"Fair sharing under a flood (`bench/fair.py`, run {run['time_utc'][:10]} on "
        f"{run['cpus']} CPUs: real vLLM on the CPU, `--max-num-seqs {run['max_num_seqs']}`, "
        f"a batch key keeping {run['flood']} streams of {run['batch_tokens']}-token answers "
        f"going, an interactive key sending an 8-token request {run['interactive_rate']:g} "
        f"times a second, {run['seconds']:g} s per mode; figures from `bench/fair.json`). "
        f"The two batch keys got {' and '.join(str(a) for a in answers.values())} answers "
        f"(spread {data['batch_share_spread']:.0%}). Goals: {verdict}."
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n\n" + "\n".join(lines) + "\n"


def render_cluster_bench(data: dict) -> str:
    """The cluster benchmark table from bench/cluster.json (`make bench-cluster`)."""
    run, w, s = data["run"], data["workload"], data["summary"]
    lines = [
        "| path | req/s | median TTFT | mean TTFT | p90 TTFT | median TPOT | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    paths = list(dict.fromkeys(r["path"] for r in data["runs"]))
    for path in paths:
        runs = [r for r in data["runs"] if r["path"] == path]

        def cells(field: str, digits: int, runs: list = runs) -> str:
            return " / ".join(f"{r[field]:.{digits}f}" for r in runs)

        lines.append(
            f"| {path} | {cells('request_throughput', 2)} | {cells('median_ttft_ms', 1)} ms "
            f"| {cells('mean_ttft_ms', 1)} ms | {cells('p90_ttft_ms', 1)} ms "
            f"| {cells('median_tpot_ms', 2)} ms | {sum(r['failed'] for r in runs)} |"
        )
    text = (
        f"The cluster layout measured with vLLM's own client (`vllm bench serve` on "
        f"{run['client_host']}: random {w['input_tokens']}-token prompts, "
        f"{w['output_tokens']}-token answers, {w['prompts']} prompts at {w['request_rate']} "
        f"requests a second, {w['max_concurrency']} at a time, streamed), each path "
        f"{run['rounds']} times, interleaved, one figure per run (`make bench-cluster`, run "
        f"{run['time_utc'][:10]} on {run['cpus']} CPUs shared by every host of the cluster, "
        f"load average {run['load_average_start']:.1f} at the start; figures from "
        f"`bench/cluster.json`):"
    )
    goal = data["goal"]["median_ttft_ms_over_direct"]
    met = "met" if s["median_ttft_ms_over_direct"] <= goal else "not met"
    verdict = (
        f"Median of the runs' median TTFT: {s['stack']['median_ttft_ms']:.2f} ms through "
        f"the stack, {s['direct']['median_ttft_ms']:.2f} ms direct "
        f"({s['median_ttft_ms_over_direct']:+.2f} ms; the goal, at most {goal:g} ms more, "
        f"{met}); median TPOT "
        f"{s['stack']['median_tpot_ms']:.2f} vs {s['direct']['median_tpot_ms']:.2f} ms; "
        f"{s['stack']['failed'] + s['direct']['failed']} failed."
    )
    return (
        textwrap.fill(text, WIDTH, break_on_hyphens=False)
        + "\n\n"
        + "\n".join(lines)
        + "\n\n"
        + textwrap.fill(verdict, WIDTH, break_on_hyphens=False)
        + "\n"
    )


def render_routing(data: dict) -> str:
    """The routing table from bench/routing.json (`make bench-routing`)."""
    run, w, policies = data["run"], data["workloads"], data["policies"]
    names = list(w)
    lines = [
        "| policy | " + " | ".join(f"{n}: hit rate | {n}: hosts' shares" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for policy, results in policies.items():
        cells = []
        for n in names:
            r = results[n]
            shares = " / ".join(f"{v:.0%}" for v in r["query_share"].values())
            failed = f", {r['failed']} failed" if r["failed"] else ""
            cells.append(f"{r['hit_rate']:.1%}{failed} | {shares}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    docs, conv = w["documents"], w["conversations"]
    kv = next(iter(policies.values()))[names[0]]["kv_tokens_per_host"]
    tokens = next(iter(policies.values()))[names[0]]["mean_prompt_tokens"]
    text = (
        f"Routing policies by vLLM's own prefix-cache counters (prompt tokens found in the "
        f"cache over prompt tokens asked, both gpu hosts; `make bench-routing` on "
        f"`make demo-cluster`, run {run['time_utc'][:10]} on {run['cpus']} CPUs, requests "
        f"alternating between the gateways, {run['concurrency']} at a time; figures from "
        f"`bench/routing.json`). `documents`: {docs['documents']} documents of about "
        f"{tokens} tokens, {docs['questions_each']} questions each, every question a new "
        f"conversation, shuffled; `conversations`: {conv['conversations']} conversations of "
        f"{conv['turns']} turns, interleaved. Each gpu host's KV cache holds "
        f"{min(kv.values()):,} tokens: less than either workload's text, so a policy that "
        f"sends the same text to both hosts makes them evict each other's."
    )
    ratios = data["prefix_over_round_robin"]
    goal = data["goal"]["prefix_over_round_robin"]
    met = "met" if all(ratios[n] is not None and ratios[n] >= goal for n in names) else "not met"
    verdict = (
        "prefix over round_robin in hit rate: "
        + ", ".join(f"{n} {ratios[n]:.2f}x" for n in names)
        + f" (the goal, at least {goal}x on each, {met})."
    )
    return (
        textwrap.fill(text, WIDTH, break_on_hyphens=False)
        + "\n\n"
        + "\n".join(lines)
        + "\n\n"
        + textwrap.fill(verdict[0].upper() + verdict[1:], WIDTH, break_on_hyphens=False)
        + "\n"
    )


def render_transfer(data: dict) -> str:
    """The model transfer table from bench/model_transfer.json (`make bench-transfer`)."""
    run, model, src, proj = data["run"], data["model"], data["sources"], data["projection"]
    names = {
        "copy": "copy (`ansible.builtin.copy`, `sync` before)",
        "rsync": "rsync (`ansible.posix.synchronize`, `sync` now)",
        "mirror": "mirror (`llmhost-model fetch`)",
    }
    gb, hosts = proj["bytes"] / 1e9, proj["hosts"]
    lines = [
        "| source | first transfer | vs copy | re-run, nothing to change | vs copy "
        f"| {gb:g} GB to {hosts} hosts: first | re-run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in src.items():
        p = proj["sources"][name]
        lines.append(
            f"| {names.get(name, name)} | {r['first_seconds']:.1f} s | {r['first_vs_copy']:.2f}x "
            f"| {r['no_change_seconds']:.1f} s | {r['no_change_vs_copy']:.2f}x "
            f"| {_minutes(p['first_seconds'])} | {_minutes(p['no_change_seconds'])} |"
        )
    text = (
        f"A model's way to the gpu hosts, by source (`make bench-transfer` on `make "
        f"demo-cluster`'s {len(run['gpu_hosts'])} gpu hosts at once, run {run['time_utc'][:10]} "
        f"on {run['cpus']} CPUs; a synthetic model of {model['bytes'] / (1 << 30):.1f} GiB in "
        f"{model['files']} files, random bytes; each step's time from Ansible's own results, "
        f"the page cache dropped before each; figures from `bench/model_transfer.json`):"
    )
    mirror, intake = src.get("mirror", {}), data["mirror_intake"]
    hosts_said = ", ".join(f"{s:.2f} s" for s in mirror.get("no_change_host_seconds", {}).values())
    after = (
        f"The mirror's own no-change fetch took {hosts_said} by the hosts' clocks. Its intake, "
        f"once per model and not per host: {intake['copy_seconds']:.1f} s to copy the model onto "
        f"it, {intake['manifest_seconds']:.1f} s to write its SHA256SUMS. Projected columns: "
        f"{proj['rule']} (x{proj['scale']:g} here)."
    )
    return (
        textwrap.fill(text, WIDTH, break_on_hyphens=False)
        + "\n\n"
        + "\n".join(lines)
        + "\n\n"
        + textwrap.fill(after, WIDTH, break_on_hyphens=False)
        + "\n"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def render_testtime(data: dict) -> str:
    """The test-time table from tests/stages.json (steps under a second left out)."""
    run = data["run"]
    lines = [
        "| stage | seconds | load average at its start | CPU busy | ran |",
        "|---|---|---|---|---|",
    ]
    for stage in data["stages"]:
        ran = "in the background" if stage.get("background") else ""
        if stage.get("beside"):
            ran += (" beside " if ran else "beside ") + ", ".join(stage["beside"])
        busy = f"{stage['cpu_busy']:.0%}" if "cpu_busy" in stage else "-"
        lines.append(
            f"| {stage['name']} | {stage['seconds']:,} | {stage['load_average_start']:.1f} "
            f"| {busy} | {ran} |"
        )
        for step, seconds in stage.get("steps", {}).items():
            if seconds:
                lines.append(f"| &nbsp;&nbsp;{step} | {seconds:,} | | | |")
    text = (
        f"`make test` took **{data['seconds'] / 60:.0f} minutes** (run {run['time_utc'][:10]} "
        f"on {run['cpus']} CPUs; every stage passed; figures from "
        f"`tests/stages.json`, which `make test` rewrites when every stage passes):"
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n\n" + "\n".join(lines) + "\n"


def _rule_values(rule: dict) -> dict[str, str]:
    expr = " ".join(str(rule["expr"]).split())
    values = {"for": _duration(str(rule.get("for", "0s")))}
    window = re.search(r"\[(\d+[a-z]+)\]", expr)
    if window:
        values["window"] = _duration(window.group(1))
    quantile = re.search(r"histogram_quantile\(\s*(\d*\.?\d+)", expr)
    if quantile:
        values["quantile"] = f"p{round(float(quantile.group(1)) * 100, 6):g}"
    # The first comparison with a number is the threshold (`> 0.05`, `< 0.10`, `== 0`).
    threshold = re.search(r"(?:==|!=|>=|<=|>|<)\s*(-?\d+(?:\.\d+)?)", expr)
    if threshold:
        number = float(threshold.group(1))
        values["threshold"] = f"{number:g}"
        values["percent"] = f"{round(number * 100, 6):g} %"
    return values


def render_alerts(rules: dict) -> str:
    """The alert table from the Prometheus rules file."""
    lines = ["| alert | severity | fires when | what to do |", "|---|---|---|---|"]
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            names.append(name)
            if name not in ALERTS:
                raise FiguresError(
                    f"alert {name} has no README row: add its wording to ALERTS in "
                    "tools/readme_figures.py"
                )
            when, action = ALERTS[name]
            try:
                when = when.format(**_rule_values(rule))
            except KeyError as missing:
                raise FiguresError(
                    f"alert {name}: its README wording needs {missing}, which its rule lacks"
                ) from None
            severity = rule.get("labels", {}).get("severity", "")
            lines.append(f"| `{name}` | {severity} | {when} | {action} |")
    if stale := sorted(set(ALERTS) - set(names)):
        raise FiguresError(
            f"ALERTS in tools/readme_figures.py names alerts not in the rules: {stale}"
        )
    return "\n".join(lines) + "\n"


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"^(<!-- {name}:begin\b[^\n]*-->\n)(.*?)^(<!-- {name}:end -->)$", re.M | re.S
    )


def _begins(text: str, name: str) -> int:
    return len(re.findall(rf"^<!-- {re.escape(name)}:begin\b", text, re.M))


def replace_block(text: str, name: str, body: str) -> str:
    """Put body between the lines `<!-- name:begin ... -->` and `<!-- name:end -->`."""
    pattern = _block(name)
    if len(pattern.findall(text)) != 1:
        raise FiguresError(
            f"block {name}: needs exactly one block between `<!-- {name}:begin -->` and "
            f"`<!-- {name}:end -->` lines"
        )
    return pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), text)


def place_block(pages: dict[Path, str], name: str, body: str) -> None:
    """Render a block in whichever page holds it: exactly one of them must."""
    holders = [path for path, text in pages.items() if _begins(text, name)]
    if len(holders) != 1 or _begins(pages[holders[0]], name) != 1:
        where = ", ".join(str(p) for p in holders) or "none of them"
        raise FiguresError(
            f"block {name}: exactly one of {_and([str(p) for p in pages]) or 'no page'} must "
            f"hold one `<!-- {name}:begin -->` ... `<!-- {name}:end -->` block; found in {where}"
        )
    pages[holders[0]] = replace_block(pages[holders[0]], name, body)


def pages_of(readme: Path, docs: Path) -> list[Path]:
    """README.md and every Markdown page of docs/ (none where docs/ does not exist)."""
    return [readme, *sorted(docs.glob("*.md"))] if docs.is_dir() else [readme]


def _bench_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", path)
    if spec is None or spec.loader is None:
        raise FiguresError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _diff(path: Path, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(True), new.splitlines(True), f"{path} (now)", f"{path} (rendered)", n=1
    )
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail on drift")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument(
        "--docs", type=Path, default=REPO / "docs", help="folder of the other pages (*.md)"
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--results-md", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--bench", type=Path, default=REPO / "bench" / "run.py")
    parser.add_argument("--rerun", type=Path, default=REPO / "molecule" / "stack" / "rerun.json")
    parser.add_argument("--roll", type=Path, default=REPO / "molecule" / "cluster" / "roll.json")
    parser.add_argument("--gap", type=Path, default=REPO / "molecule" / "stack" / "gap.json")
    parser.add_argument("--leaving", type=Path, default=REPO / "bench" / "leaving.json")
    parser.add_argument("--stages", type=Path, default=REPO / "tests" / "stages.json")
    parser.add_argument("--cluster", type=Path, default=REPO / "bench" / "cluster.json")
    parser.add_argument("--routing", type=Path, default=REPO / "bench" / "routing.json")
    parser.add_argument("--fair", type=Path, default=REPO / "bench" / "fair.json")
    parser.add_argument("--transfer", type=Path, default=REPO / "bench" / "model_transfer.json")
    parser.add_argument(
        "--rules", type=Path, default=REPO / "roles/prometheus/files/rules/llmhost.rules.yml"
    )
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
        pages = {path: path.read_text() for path in pages_of(args.readme, args.docs)}
        before = dict(pages)
        blocks = {
            "bench": (render_bench, data, args.results),
            "rerun": (render_rerun, json.loads(args.rerun.read_text()), args.rerun),
            "roll": (render_roll, json.loads(args.roll.read_text()), args.roll),
            "gap": (render_gap, json.loads(args.gap.read_text()), args.gap),
            "leaving": (render_leaving, json.loads(args.leaving.read_text()), args.leaving),
            "testtime": (render_testtime, json.loads(args.stages.read_text()), args.stages),
            "cluster-bench": (
                render_cluster_bench, json.loads(args.cluster.read_text()), args.cluster,
            ),
            "routing": (render_routing, json.loads(args.routing.read_text()), args.routing),
            "fair": (render_fair, json.loads(args.fair.read_text()), args.fair),
            "transfer": (render_transfer, json.loads(args.transfer.read_text()), args.transfer),
        }  # fmt: skip
        place_block(pages, "alerts", render_alerts(yaml.safe_load(args.rules.read_text())))
        for name, (render, block_data, source) in blocks.items():
            said = textwrap.fill(provenance(name, block_data, source), WIDTH)
            body = render(block_data) + "\n" + said + "\n"
            place_block(pages, name, body)
        results_md = _bench_module(args.bench).render_results(data)
    except (FiguresError, OSError, KeyError, ValueError, yaml.YAMLError) as e:
        print(f"readme_figures: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    outputs = [(path, new) for path, new in pages.items() if new != before[path]]
    outputs.append((args.results_md, results_md))
    drift = [(p, new) for p, new in outputs if not p.exists() or p.read_text() != new]
    if not args.check:
        for path, new in drift:
            path.write_text(new)
            print(f"rewrote {path}")
        return 0
    for path, new in drift:
        old = path.read_text() if path.exists() else ""
        print(_diff(path, old, new), file=sys.stderr, end="")
        print(
            f"{path} differs from what tools/readme_figures.py renders from {args.results.name}, "
            f"{args.rules.name}, {args.rerun.name}, {args.roll.name}, {args.gap.name}, "
            f"{args.leaving.name}, {args.stages.name}, {args.cluster.name}, "
            f"{args.routing.name}, {args.fair.name} and {args.transfer.name}: do not "
            "edit it by hand; "
            "run `python tools/readme_figures.py` (after `make bench`, `make bench-cluster`, "
            "`make bench-routing`, `make bench-transfer`, "
            "a run of the stack or "
            "cluster scenario, or "
            "after changing the rules or the wording in tools/readme_figures.py)",
            file=sys.stderr,
        )
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
