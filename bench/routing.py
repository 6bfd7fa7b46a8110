"""Routing policies measured by vLLM's own prefix-cache counters, on `make demo-cluster`.

Not a test: a measurement on the deployed demo cluster (``make demo-cluster`` first). For
each routing policy (prefix, least_outstanding, round_robin), set on every gateway with the
operator's command (``ansible-playbook site.yml --tags llm_proxy -e
llm_proxy_routing_policy=...``), two workloads go through the gateways (requests alternate
between them, 4 at a time, 40 a second: under the demo's global limit), with text of their
own for each policy (nothing one run cached helps another):

- ``documents``: many questions about the same documents, each a new conversation (a
  retrieval or tool-list front end): 40 documents of ~680 tokens, 10 questions each,
  shuffled; the user message is the document, then the question;
- ``conversations``: 30 conversations of 4 turns, the first message ~680 tokens, turns of
  different conversations interleaved (a chat front end).

The KV cache of each gpu host holds fewer tokens than either workload's shared text, so a
policy that sends the same text to both hosts makes them evict each other's. Read from each
vLLM's /metrics before and after: ``vllm:prefix_cache_hits_total`` over
``vllm:prefix_cache_queries_total`` (prompt tokens found in the cache over prompt tokens
asked), and each host's share of the queries. The goal (issue 22): prefix beats round_robin
by at least 1.5x in hit rate on both workloads. The inventory's policy is put back at the end.

    .venv/bin/python bench/routing.py [--inventory inventories/local-cluster]

Writes bench/routing.json; tools/readme_figures.py renders the ``routing`` block
from it (make lint fails when they differ).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from demo_hosts import REPO, address, groups, read_on, secret, this_run

POLICIES = ("prefix", "least_outstanding", "round_robin")
GOAL_RATIO = 1.5
DOCUMENTS, QUESTIONS = 40, 10
CONVERSATIONS, TURNS = 30, 4
# ~680 tokens of the tiny model (its 512-token BPE makes ~1.6 characters of these words a
# token); the token counts reported are vLLM's own (usage.prompt_tokens).
TEXT_CHARS = 1100
CONCURRENCY = 4
# Under the demo's global limit of 50 requests a second (a 429 would not say anything about
# routing).
RATE = 40

WORDS = (  # noqa: SIM905 (a sentence of words reads better than a list)
    "the gateway model server request key quota limit token stream chunk client host cache "
    "prefix backend route policy health probe metric alert deploy inventory role handler "
    "unit socket restart reload drain roll update limit second minute window burst share "
    "fair queue batch priority weight mirror manifest shard file disk memory core thread "
    "engine worker kernel driver network packet latency answer question document table row "
    "value field name path port address user team project report usage ledger day month"
).split()


def text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def documents_workload(seed: str) -> list[list[list[dict]]]:
    """Independent requests (each a list of messages), shuffled: one list of one turn each."""
    rng = random.Random(f"documents-{seed}")
    docs = [f"Document {d} ({seed}). " + text(rng, TEXT_CHARS) for d in range(DOCUMENTS)]
    requests = [
        [
            {"role": "system", "content": "Answer the question from the document."},
            {"role": "user", "content": f"{doc}\n\nQuestion {q}: {text(rng, 60)}?"},
        ]
        for doc in docs
        for q in range(QUESTIONS)
    ]
    rng.shuffle(requests)
    return [[r] for r in requests]


def conversations_workload(seed: str) -> list[list[list[dict]]]:
    """Per turn, the requests of every conversation at that turn (the history so far)."""
    rng = random.Random(f"conversations-{seed}")
    history = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Conversation {c} ({seed}). " + text(rng, TEXT_CHARS)},
        ]
        for c in range(CONVERSATIONS)
    ]
    turns = []
    for t in range(TURNS):
        if t:
            for h in history:
                h += [
                    {"role": "assistant", "content": text(rng, 40)},
                    {"role": "user", "content": f"And {t}: {text(rng, 60)}?"},
                ]
        order = [list(h) for h in history]
        rng.shuffle(order)
        turns.append(order)
    return turns


def prefix_cache(hosts: list[str], port: int) -> dict[str, dict[str, float]]:
    """Each gpu host's vLLM counters (read on the host: vLLM admits only known peers)."""
    out = {}
    for h in hosts:
        metrics = read_on(h, f"http://{address(h)}:{port}/metrics")
        values = {}
        for name in ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens"):
            found = re.findall(rf"^vllm:{name}_total{{[^}}]*}} ([0-9.e+]+)$", metrics, re.M)
            values[name] = sum(float(v) for v in found)
        blocks = re.search(r'^vllm:cache_config_info{[^}]*num_gpu_blocks="(\d+)"', metrics, re.M)
        size = re.search(r'^vllm:cache_config_info{[^}]*block_size="(\d+)"', metrics, re.M)
        values["kv_tokens"] = int(blocks.group(1)) * int(size.group(1)) if blocks and size else 0
        out[h] = values
    return out


def decisions(gateway_hosts: list[str], port: int, model: str) -> dict[str, float]:
    """The gateways' routing decisions so far (prefix policy): kept where the prompt's home
    is, or spilled by bounded load."""
    out = {"affinity": 0.0, "spilled": 0.0}
    for h in gateway_hosts:
        metrics = read_on(h, f"http://127.0.0.1:{port}/metrics")
        for decision in out:
            series = f'gateway_routing_decisions_total{{decision="{decision}",model="{model}"}}'
            found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.M)
            out[decision] += float(found.group(1)) if found else 0.0
    return out


def set_policy(inventory: str, policy: str | None) -> None:
    """The operator's way: the llm_proxy role with the policy (None: the inventory's own)."""
    cmd = ["ansible-playbook", "-i", inventory, "site.yml", "--tags", "llm_proxy"]
    if policy is not None:
        cmd += ["-e", f"llm_proxy_routing_policy={policy}"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")


def send(gateways: list[str], key: str, model: str, batches: list[list[list[dict]]]) -> dict:
    """Each batch's requests 4 at a time (at most RATE a second), alternating gateways;
    batches one after another."""
    prompt_tokens, errors, n = [], Counter(), 0
    lock, pace = threading.Lock(), [time.monotonic()]
    with (
        httpx.Client(timeout=120, trust_env=False) as client,
        ThreadPoolExecutor(CONCURRENCY) as pool,
    ):

        def one(i: int, messages: list[dict]) -> int | None:
            with lock:  # one start every 1/RATE s
                pace[0] = max(pace[0] + 1 / RATE, time.monotonic())
                wait = pace[0] - time.monotonic()
            time.sleep(max(0.0, wait))
            body = {"model": model, "messages": messages, "max_tokens": 1}
            url = f"{gateways[i % len(gateways)]}/v1/chat/completions"
            r = client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            if r.status_code != 200:
                with lock:
                    errors[f"{r.status_code} {r.text[:160]}"] += 1
                return None
            return r.json()["usage"]["prompt_tokens"]

        for batch in batches:
            prompt_tokens += [t for t in pool.map(one, range(n, n + len(batch)), batch) if t]
            n += len(batch)
    return {
        "requests": n,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "mean_prompt_tokens": round(sum(prompt_tokens) / max(1, len(prompt_tokens))),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inventory", default="inventories/local-cluster")
    p.add_argument("--model", default="tiny")
    p.add_argument("--vllm-port", type=int, default=8002)
    p.add_argument("--nginx-port", type=int, default=8000)
    p.add_argument("--gateway-port", type=int, default=8001)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "routing.json")
    args = p.parse_args()

    g = groups(args.inventory)
    gpus, gateway_hosts = g.get("gpu", []), g.get("gateway") or g.get("gpu", [])
    if len(gpus) < 2:
        sys.exit(f"routing needs two gpu hosts or more; {args.inventory} has {len(gpus)}")
    gateways = [f"http://{address(h)}:{args.nginx_port}" for h in gateway_hosts]
    key = "sk-" + secret("admin-key")
    workloads = {"documents": documents_workload, "conversations": conversations_workload}
    results: dict[str, dict] = {}
    load_start = round(os.getloadavg()[0], 2)
    try:
        for policy in POLICIES:
            set_policy(args.inventory, policy)
            results[policy] = {}
            for name, make in workloads.items():
                before = prefix_cache(gpus, args.vllm_port)
                routed = decisions(gateway_hosts, args.gateway_port, args.model)
                sent = send(gateways, key, args.model, make(policy))
                after = prefix_cache(gpus, args.vllm_port)
                routed_after = decisions(gateway_hosts, args.gateway_port, args.model)
                counted = ("prefix_cache_queries", "prefix_cache_hits")
                delta = {h: {k: after[h][k] - before[h][k] for k in counted} for h in gpus}
                queries = sum(d["prefix_cache_queries"] for d in delta.values())
                hits = sum(d["prefix_cache_hits"] for d in delta.values())
                results[policy][name] = {
                    **sent,
                    "hit_rate": round(hits / queries, 4) if queries else 0.0,
                    "query_share": {
                        h: round(d["prefix_cache_queries"] / queries, 3) if queries else 0.0
                        for h, d in delta.items()
                    },
                    "kv_tokens_per_host": {h: after[h]["kv_tokens"] for h in gpus},
                    "spilled": routed_after["spilled"] - routed["spilled"],
                }
                r = results[policy][name]
                print(
                    f"{policy:18} {name:13} hit rate {r['hit_rate']:.1%}, shares "
                    f"{list(r['query_share'].values())}, {r['spilled']:.0f} spilled, "
                    f"{r['requests']} requests "
                    f"({r['failed']} failed), {r['mean_prompt_tokens']} prompt tokens each",
                    flush=True,
                )
    finally:
        set_policy(args.inventory, None)
    ratios = {}
    for name in workloads:
        rr = results["round_robin"][name]["hit_rate"]
        ratios[name] = round(results["prefix"][name]["hit_rate"] / rr, 2) if rr else None
    result = {
        "goal": {"prefix_over_round_robin": GOAL_RATIO},
        "run": {
            **this_run(),
            "inventory": args.inventory,
            "gateways": gateway_hosts,
            "load_average_start": load_start,
            "concurrency": CONCURRENCY,
        },
        "workloads": {
            "documents": {"documents": DOCUMENTS, "questions_each": QUESTIONS},
            "conversations": {"conversations": CONVERSATIONS, "turns": TURNS},
        },
        "policies": results,
        "prefix_over_round_robin": ratios,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"prefix over round_robin, hit rate: {ratios} (goal {GOAL_RATIO}x)\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
