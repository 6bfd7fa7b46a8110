"""The usage ledger across the cluster: requests through both gateways, for two keys, both
models and three end users, streamed and not; `llm-proxy usage` on each gateway host, run as
the gateway's user as an operator would, gives the same report, the sum of the usage blocks
the clients received."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import httpx
from cluster import GATEWAYS, Cluster, gateway_url

testinfra_hosts = ["ansible://llmhost-gw1"]

MODELS = ("tiny", "other")


def _usage(cluster: Cluster, gw: str) -> list[dict[str, Any]]:
    out = cluster.run(
        gw,
        "runuser -u llm-proxy -- /opt/llm-proxy/venv/bin/llm-proxy usage "
        "--config /etc/llm-proxy/config.yaml --by key,model,user --format json",
    )
    return json.loads(out)["data"]


def test_both_gateways_report_what_the_clients_were_told(cluster: Cluster, keys, demo_key):
    run = os.urandom(3).hex()  # end users of this run only: the ledger outlives a verify
    users = {"ann": f"ann-{run}", "bob": f"bob-{run}", "carol": f"carol-{run}"}
    expected: Counter[tuple[str, ...]] = Counter()
    plan = [(k, m, s) for k in ("user", "demo") for m in MODELS for s in (False, True)]
    for i, (key_user, model, stream) in enumerate(plan * 2):
        gw = GATEWAYS[i % 2]
        end_user = list(users.values())[i % 3]
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 2 + i % 3,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Count {i}."}],
        }
        headers = {
            "Authorization": "Bearer " + (demo_key if key_user == "demo" else keys[key_user])
        }
        if end_user.startswith("bob"):
            body["user"] = end_user
        else:
            headers["X-End-User"] = end_user
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        r = httpx.post(
            f"{gateway_url(gw)}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            usage = chunks[-1]["usage"]
        else:
            usage = r.json()["usage"]
        expected[(key_user, model, end_user, "requests")] += 1
        expected[(key_user, model, end_user, "prompt_tokens")] += usage["prompt_tokens"]
        expected[(key_user, model, end_user, "completion_tokens")] += usage["completion_tokens"]
    want = []
    for group in sorted({k[:3] for k in expected}):
        p, c = expected[(*group, "prompt_tokens")], expected[(*group, "completion_tokens")]
        want.append(
            dict(zip(("key", "model", "user"), group, strict=True))
            | {"requests": expected[(*group, "requests")], "errors": 0}
            | {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        )
    assert len(want) == 2 * 2 * 3
    reports = {gw: _usage(cluster, gw) for gw in GATEWAYS}
    assert reports[GATEWAYS[0]] == reports[GATEWAYS[1]]
    mine = [row for row in reports[GATEWAYS[0]] if row["user"] in users.values()]
    assert mine == want
