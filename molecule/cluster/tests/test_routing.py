"""Two gpu hosts behind two gateways as one endpoint: a model goes only where it is served,
conversations keep their backend (and its prefix cache) from either gateway, a hot prefix
does not pile onto one host, and a killed vLLM costs no request sent after it was noticed.

Real requests from the controller to both gateways' nginx; the figures are vLLM's own
counters (prefix cache, finished requests) and the gateways' metrics.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from cluster import (
    GATEWAYS,
    Cluster,
    chat,
    gateway_url,
    metric_sum,
    parallel,
    wait_until,
)

testinfra_hosts = ["ansible://llmhost-gw1"]

# --- a model goes only to its own backends ---------------------------------------------


def test_a_model_is_served_only_by_the_host_serving_it(cluster: Cluster, user_key, backends):
    other = backends["other"]
    # One backend: the second model spans both gpu hosts, and gpu1 leads (test_multinode.py).
    assert len(other) == 1 and other[0].host == "llmhost-gpu1", other
    everyone = [b for bs in backends.values() for b in bs]

    def finished(b) -> float:
        return metric_sum(cluster.vllm_metrics(b), "vllm:request_success_total")

    before = {b.name: finished(b) for b in everyone}
    for i, gw in enumerate(GATEWAYS * 4):
        body = {
            "model": "other",
            "messages": [{"role": "user", "content": f"hi {i}"}],
            "max_tokens": 2,
        }
        r = chat(gateway_url(gw), user_key, body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "other"
    after = {b.name: finished(b) for b in everyone}
    assert after[other[0].name] - before[other[0].name] == 8
    for b in everyone:
        if b is not other[0]:
            assert after[b.name] == before[b.name], b.name


def test_the_model_list_has_both_models_from_either_gateway(user_key):
    import httpx

    for gw in GATEWAYS:
        r = httpx.get(
            f"{gateway_url(gw)}/v1/models",
            headers={"Authorization": f"Bearer {user_key}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        ids = sorted(m["id"] for m in r.json()["data"])
        assert ids == ["other", "tiny"]
        # vLLM's own entries, with its max_model_len, not a stand-in
        assert all("max_model_len" in m for m in r.json()["data"])


def test_an_unknown_model_is_404_model_not_found(user_key):
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    r = chat(gateway_url(GATEWAYS[1]), user_key, body)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# --- prefix affinity ---------------------------------------------------------------------

# The workload, in the regime where routing matters (as the anchors' benchmarks choose
# theirs): 40 conversations of 3 turns, each with its own system prompt of about 960
# characters (hundreds of tokens of the tiny tokenizer), distinct prefixes that together do
# not fit one host's KV cache (16 MiB, 16,384 tokens of the tiny model: 2 layers x K and V
# x 2 KV heads x 32 dims x 4 bytes = 1 KiB a token; inventories/local-cluster) while each
# host's share does. Round robin sends a conversation's turns to either host, so each host
# sees every prefix and its LRU cache drops a conversation before it comes back there;
# prefix routing keeps each conversation on one host, whose cache holds its share. Turns go
# out a round at a time in a shuffled order, one request at a time per lane (bounded load
# has no reason to spill), the two lanes through the two gateways.
CONVERSATIONS = 40
TURNS = 3
# Requests a second per lane (one lane per gateway): two lanes stay under the scenario's
# global limit, 100 a second, however fast the hosts answer (a quiet machine answered
# 1-token turns fast enough for 429s, failing a fresh-clone run).
LANE_RATE = 40
_WORDS = [
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "island",
    "juniper",
    "kelp",
    "lagoon",
    "meadow",
    "nectar",
    "orchard",
    "prairie",
    "quartz",
    "river",
    "summit",
    "tundra",
    "upland",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
    "anchor",
    "beacon",
    "canyon",
    "dune",
    "estuary",
    "forest",
    "glacier",
    "heath",
    "inlet",
    "jetty",
    "knoll",
    "ledge",
]


def _system_prompt(phase: str, i: int) -> str:
    rng = random.Random(f"{phase}-{i}")
    return f"[{phase} {i}] " + " ".join(rng.choice(_WORDS) for _ in range(140))


def _turn(phase: str, i: int, turn: int) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": _system_prompt(phase, i)},
        {"role": "user", "content": f"First question of conversation {i}?"},
    ]
    for t in range(1, turn + 1):
        messages.append({"role": "assistant", "content": f"Answer {t} of conversation {i}."})
        messages.append({"role": "user", "content": f"Question {t + 1} of conversation {i}?"})
    return {"model": "tiny", "messages": messages, "max_tokens": 1}


def _run_workload(urls: list[str], key: str, phase: str, conversations: int) -> list[str]:
    """Every turn of every conversation, each round of turns in a shuffled order; request k
    through urls[k % len(urls)], one request at a time per URL and at most LANE_RATE a
    second. The request ids, in order (turn by turn, conversation by conversation)."""
    ids: dict[tuple[int, int], str] = {}
    for turn in range(TURNS):
        order = list(range(conversations))
        random.Random(f"{phase}-order-{turn}").shuffle(order)
        lanes = [order[k :: len(urls)] for k in range(len(urls))]
        start = time.monotonic()

        def lane(k: int, convs: list[int], turn: int = turn, start: float = start) -> None:
            for j, i in enumerate(convs):
                time.sleep(max(0.0, start + j / LANE_RATE - time.monotonic()))
                r = chat(urls[k], key, _turn(phase, i, turn))
                assert r.status_code == 200, r.text
                ids[(i, turn)] = r.headers["x-request-id"]

        for result in parallel(
            [lambda k=k, c=c: lane(k, c) for k, c in enumerate(lanes)], len(lanes)
        ):
            if isinstance(result, Exception):
                raise result
    return [ids[(i, t)] for t in range(TURNS) for i in range(conversations)]


def _prefix_counters(cluster: Cluster, instances) -> tuple[float, float]:
    queries = hits = 0.0
    for b in instances:
        m = cluster.vllm_metrics(b)
        queries += metric_sum(m, "vllm:prefix_cache_queries_total")
        hits += metric_sum(m, "vllm:prefix_cache_hits_total")
    return queries, hits


def _hit_rate(cluster: Cluster, instances, run) -> float:
    q0, h0 = _prefix_counters(cluster, instances)
    run()
    q1, h1 = _prefix_counters(cluster, instances)
    assert q1 > q0, "vLLM counted no prefix cache queries: is prefix caching on?"
    return (h1 - h0) / (q1 - q0)


@pytest.fixture(scope="module")
def affinity(cluster: Cluster, user_key, backends, extra_gateway):
    """The three runs of the workload and what they measured (shared by the tests below)."""
    tiny = backends["tiny"]
    assert len(tiny) == 2, tiny
    single = extra_gateway(
        "single",
        8101,
        {
            "routing": {"policy": "prefix"},
            "models": [{"name": "tiny", "backends": [tiny[1].as_config()]}],
        },
    )
    round_robin = extra_gateway("round-robin", 8102, {"routing": {"policy": "round_robin"}})
    half = CONVERSATIONS // 2
    one_host = _hit_rate(
        cluster, tiny, lambda: _run_workload([single, single], user_key, "single", half)
    )
    urls = [gateway_url(gw) for gw in GATEWAYS]
    ids: list[str] = []

    def prefix_run() -> None:
        ids.extend(_run_workload(urls, user_key, "prefix", CONVERSATIONS))

    by_prefix = _hit_rate(cluster, tiny, prefix_run)
    rr = _hit_rate(
        cluster, tiny, lambda: _run_workload([round_robin] * 2, user_key, "rr", CONVERSATIONS)
    )
    backend_of = cluster.request_backends(ids)
    rates = {"one_host": one_host, "prefix": by_prefix, "round_robin": rr}
    print(f"prefix cache hit rates: {rates}")
    return rates, ids, backend_of


def test_prefix_routing_keeps_the_cache_hit_rate_of_one_host(affinity):
    rates, _, _ = affinity
    # One host serving the half of the conversations it gets in the cluster: the rate the
    # cluster would reach if spreading the conversations over two hosts lost nothing.
    assert rates["prefix"] >= 0.9 * rates["one_host"], rates


def test_prefix_routing_beats_round_robin_by_half_again(affinity):
    rates, _, _ = affinity
    assert rates["prefix"] >= 1.5 * rates["round_robin"], rates


def test_a_conversation_lands_on_the_same_backend_from_either_gateway(affinity):
    _, ids, backend_of = affinity
    assert len(backend_of) == len(ids), "a request is missing from the gateways' logs"
    same = 0
    for i in range(CONVERSATIONS):
        turns = [backend_of[ids[t * CONVERSATIONS + i]] for t in range(TURNS)]
        home = max(set(turns), key=turns.count)
        same += turns.count(home)
    assert same / len(ids) >= 0.99, same
    # ...and the conversations are spread over both hosts, not all on one.
    assert len(set(backend_of.values())) == 2


# --- load guard ----------------------------------------------------------------------------


HOT_ANSWER_TOKENS = 128


def test_a_hot_prefix_does_not_pile_onto_one_host(cluster: Cluster, user_key, backends):
    """80% of 400 requests share one prompt start (system prompt and first user message),
    from 24 clients (12 per gateway) of 128-token answers. By prefix alone its backend would
    take about 90% of them (the hot 80% and half the cold); the bounded load spills what
    would put it over (1 + epsilon) x the mean in flight: both gateways spilled some, and it
    took at most 85% (the gateways' own counters of requests per backend, summed over both).
    How far below depends on how busy the clients keep the gateways (with one request or
    none in flight there is nothing to balance), and on both hosts serving: when one host's
    vLLM stalls, its requests pile up in flight and the other rightly takes nearly all (96%,
    when the test hosts' engines were all pinned to one core). The answers are long enough
    for requests to overlap on a quiet machine too: with 48-token answers a fresh-clone run
    on a quiet, fast VM had a few requests in flight, below the floor of 2 a backend must
    have to spill, and the hot host took 89%."""
    tiny = backends["tiny"]
    hot = "You are the hot prefix. " + " ".join(["steady"] * 120)
    rng = random.Random(7)
    bodies = []
    for n in range(400):
        is_hot = rng.random() < 0.8
        system = hot if is_hot else f"cold {n} " + " ".join(["calm"] * 120)
        question = "Go on." if is_hot else f"n={n}"
        bodies.append(
            {
                "model": "tiny",
                "max_tokens": HOT_ANSWER_TOKENS,
                "ignore_eos": True,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            }
        )

    def counters() -> dict[tuple[str, str], float]:
        out = {}
        for gw in GATEWAYS:
            samples = cluster.gateway_metrics(gw)
            for b in tiny:
                out[gw, b.name] = metric_sum(
                    samples, "gateway_backend_requests_total", backend=b.name
                )
            out[gw, "spilled"] = metric_sum(
                samples, "gateway_routing_decisions_total", model="tiny", decision="spilled"
            )
        return out

    urls = [gateway_url(gw) for gw in GATEWAYS]
    # At most 40 requests a second: with the hot prompt cached, the 24 clients went past
    # the global limit of the time, 50 a second (429s, in CI).
    start = time.monotonic() + 1

    def paced(k: int, body: dict[str, Any]) -> httpx.Response:
        time.sleep(max(0.0, start + k / 40 - time.monotonic()))
        return chat(urls[k % 2], user_key, body)

    calls = [lambda k=k, b=b: paced(k, b) for k, b in enumerate(bodies)]
    before = counters()
    results = parallel(calls, 24)
    after = counters()
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in results), [
        r if isinstance(r, Exception) else r.text
        for r in results
        if isinstance(r, Exception) or r.status_code != 200
    ][:3]
    sent = {b.name: sum(after[gw, b.name] - before[gw, b.name] for gw in GATEWAYS) for b in tiny}
    share = max(sent.values()) / sum(sent.values())
    print(f"requests per backend: {sent}, the busiest's share {share:.2f}")
    assert sum(sent.values()) == len(bodies), sent
    assert share <= 0.85, sent
    assert all(after[gw, "spilled"] > before[gw, "spilled"] for gw in GATEWAYS), (before, after)


# --- failover ----------------------------------------------------------------------------


def test_a_killed_vllm_costs_no_request_sent_two_seconds_later(
    cluster: Cluster, user_key, backends
):
    """10 requests a second through both gateways while vLLM on gpu2 is killed (SIGKILL to
    its main process, the API server, as a crash would): requests sent from 2 s after the
    kill all succeed; both gateways mark it down within 2 s (their log's time against the
    kill's); once its /health answers again
    (systemd restarts it), both take it back within 5 s. (SIGKILL to every process of the
    unit at once left a vLLM worker unkillable for minutes on the test hosts.)"""
    victim = next(b for b in backends["tiny"] if b.host == "llmhost-gpu2")
    urls = [gateway_url(gw) for gw in GATEWAYS]
    outcomes: list[tuple[float, int | str]] = []
    done = threading.Event()

    def load() -> None:
        k = 0
        start = time.monotonic()
        while not done.is_set():
            sent = time.time()  # the hosts' clock (the test hosts share this machine's)
            body = {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": f"failover {k % 17}"},
                    {"role": "user", "content": "hi"},
                ],
            }
            try:
                code: int | str = chat(urls[k % 2], user_key, body, timeout=30).status_code
            except Exception as e:
                code = repr(e)
            outcomes.append((sent, code))
            k += 1
            time.sleep(max(0.0, start + k * 0.1 - time.monotonic()))

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    try:
        time.sleep(3)
        # The kill's time on the hosts' clock (the test hosts share this machine's), against
        # which the gateways' log says when each marked the backend down and the requests'
        # send times are read: the command's own round trip from here (seconds on a loaded
        # machine) counts in neither.
        kill = f"date +%s.%N && systemctl kill -s KILL --kill-whom=main {victim.unit}"
        killed_at = float(cluster.run(victim.host, kill).split()[0])
        for gw in GATEWAYS:
            wait_until(lambda gw=gw: cluster.backend_up(gw, victim.name) == 0, 10, f"{gw}: down")
        time.sleep(5)
        done.set()  # the load has shown what it must; vLLM's restart is easier without it
        wait_until(lambda: cluster.vllm_health(victim), 600, "vLLM back", interval=0.5)
        for gw in GATEWAYS:
            back = wait_until(
                lambda gw=gw: cluster.backend_up(gw, victim.name) == 1, 5, f"{gw}: back"
            )
            print(f"{gw}: back in rotation {back:.1f} s after /health answered")
        time.sleep(2)
    finally:
        done.set()
        runner.join(60)
        # Whatever happened above, the tests after this one need the victim serving.
        wait_until(lambda: cluster.vllm_health(victim), 600, "vLLM back", interval=0.5)
    for gw in GATEWAYS:
        down = _marked_down_at(cluster, gw, victim.name, killed_at)
        print(f"{gw}: marked {victim.name} down {down - killed_at:.2f} s after the kill")
        assert down - killed_at <= 2.0, f"{gw} took longer than 2 s to mark it down"
    late = [(t, c) for t, c in outcomes if t >= killed_at + 2.0]
    failed = [(round(t - killed_at, 2), c) for t, c in late if c != 200]
    assert late and not failed, failed


def _marked_down_at(cluster: Cluster, gateway: str, backend: str, since: float) -> float:
    """When (epoch s) the gateway process first logged ``backend`` down after ``since``."""
    log = cluster.run(gateway, f"journalctl -u llm-proxy -o cat --no-pager --since @{int(since)}")
    for line in log.splitlines():
        if '"backend_down"' in line and f'"{backend}"' in line:
            ts = json.loads(line)["ts"]
            at = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if at >= since - 0.01:
                return at
    raise AssertionError(f"{gateway} logged no backend_down of {backend}")


def test_vllm_answers_the_gateways_and_nobody_else(cluster: Cluster, backends):
    """Off the gateway hosts vLLM listens on its private address behind the host
    firewall: the controller (another machine on the same network) gets no connection,
    the gateway hosts get /health."""
    import httpx
    from cluster import address

    for b in (b for bs in backends.values() for b in bs):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{address(b.host)}:{b.port}/health", timeout=3)
        assert cluster.vllm_health(b), b
