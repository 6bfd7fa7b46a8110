"""Limits and usage exact across two gateways sharing Redis: concurrency, QPS and a token
quota hold whichever gateway a request goes through; a gateway killed under load keeps its
slots until their leases expire, then gives them back, and loses no completed request's
usage; with Redis stopped, `closed` answers 503 and `local` admits each gateway its share,
and the usage recorded meanwhile reaches Redis.

Real requests from the controller to both gateways (the keys are the scenario's, see
inventories/local-cluster); usage is read back through the admin API.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx
import pytest
from cluster import (
    CLIENT,
    GATEWAYS,
    REDIS,
    Cluster,
    Pending,
    chat,
    frozen_vllm,
    gateway_url,
    parallel,
    wait_until,
)

testinfra_hosts = ["ansible://llmhost-gw1"]


def _long(max_tokens: int = 600) -> dict[str, Any]:
    """A chat completion that keeps its concurrency slot for seconds (600 tokens on the
    CPU; the context is 1,024)."""
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


def _post(url: str, key: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return chat(url, key, body, timeout)


def _usage(cluster: Cluster, admin_key: str, user: str) -> int:
    """Total tokens the key of ``user`` has used, as the gateways' shared store says
    (asked of a gateway on its host: /admin/ is not served to the controller)."""
    port = cluster.gateway_port(GATEWAYS[1])
    url = f"http://127.0.0.1:{port}/admin/usage?user={user}"
    out = cluster.run_stdin(
        GATEWAYS[1], ["curl", "-sf", "-H", "@-", url], f"Authorization: Bearer {admin_key}"
    )
    return sum(k["total_usage"]["total_tokens"] for k in json.loads(out)["data"])


def _leases(cluster: Cluster, key_id: str) -> tuple[int, list[int]]:
    """Redis' time and the expiry of each concurrency lease of a key, in milliseconds (the
    set of leases expires with its last one)."""
    script = (
        "local t = redis.call('TIME'); "
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000); "
        "local out = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'); "
        "table.insert(out, 1, tostring(now)); return out"
    )
    lines = cluster.redis("EVAL", script, "1", f"llmhost:conc:key:{key_id}").split()
    return int(lines[0]), [int(float(score)) for score in lines[2::2]]


def _live_leases(cluster: Cluster, key_id: str) -> int:
    """Concurrency leases of a key that have not expired on Redis' clock, as the admission
    script counts them (expiry after now)."""
    now, expiries = _leases(cluster, key_id)
    return sum(e > now for e in expiries)


def _key_id(cluster: Cluster, user: str, within: float = 600) -> str:
    """The key id of ``user``'s key, as the gateways log it (a request of the last
    ``within`` seconds)."""
    records = cluster.request_log(time.time() - within, user)
    assert records, f"no request of {user} in the gateways' logs"
    return str(records[-1]["key_id"])


def _codes(responses: list[Any]) -> list[int | str]:
    """Status codes; an error's code too, for the assertion messages ("503 limit_...")."""
    out: list[int | str] = []
    for r in responses:
        if not isinstance(r, httpx.Response):
            out.append(repr(r))
        elif r.status_code in (200, 429):
            out.append(r.status_code)
        else:
            out.append(f"{r.status_code} {r.text[:200]}")
    return out


def _refused_for_concurrency(r: httpx.Response | Exception, limit: int) -> bool:
    if not isinstance(r, httpx.Response):
        return False
    return r.status_code == 429 and f"concurrent requests ({limit})" in r.text


def _send(urls: list[str], key: str, n: int, max_tokens: int = 4) -> Pending:
    """``n`` requests at once, alternately through ``urls``, in threads."""
    body = _long(max_tokens)
    return Pending([lambda k=k: _post(urls[k % len(urls)], key, body) for k in range(n)])


# What the killed gateway left in Redis, for the `late` test that waits for it to run out:
# the key's id and its leases' expiry (Redis' clock, ms).
_KILLED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def limited_key_id(cluster: Cluster, keys) -> str:
    """The concurrency-3 key's id (its leases' name in Redis), from a request's log line."""
    assert _post(gateway_url(GATEWAYS[0]), keys["limited"], _long(1)).status_code == 200
    return _key_id(cluster, "limited")


def test_a_gateway_killed_under_load_keeps_its_slots_and_loses_no_usage(
    cluster: Cluster, keys, admin_key
):
    """vLLM frozen, three requests of the concurrency-3 key `held` through gw1, which is then
    killed with SIGKILL: the slots it held stay taken, their three leases in Redis expiring
    the request timeout + 60 s after they were taken (on Redis' clock), so gw2 admits none
    of three more. Meanwhile steady traffic of another key through both gateways: every
    request that completed is in the shared usage, and systemd brings gw1 back. That the
    slots come back when the leases run out is the `late` test below: the tests in between
    run while they do. (First in the module: the longer the leases run alongside other
    tests, the shorter the wait at the end.)"""
    gw1, gw2 = (gateway_url(gw) for gw in GATEWAYS)
    assert _post(gw2, keys["held"], _long(1)).status_code == 200
    key_id = _key_id(cluster, "held")
    before = _usage(cluster, admin_key, "user")
    completed: list[int] = []
    done = threading.Event()

    def steady() -> None:
        k = 0
        while not done.is_set():
            try:
                r = _post((gw1, gw2)[k % 2], keys["user"], _long(4), timeout=30)
                if r.status_code == 200:
                    completed.append(r.json()["usage"]["total_tokens"])
            except httpx.HTTPError:
                pass  # the killed gateway's requests: not completed, nothing to find
            k += 1

    runner = threading.Thread(target=steady, daemon=True)
    runner.start()
    try:
        with frozen_vllm(cluster):
            holders = _send([gw1], keys["held"], 3)
            wait_until(lambda: _live_leases(cluster, key_id) == 3, 20, "3 leases", 0.5)
            now, expiries = _leases(cluster, key_id)
            ttl = cluster.lease_ttl()
            # Taken in the last seconds (under 45 on a busy machine), each for the request
            # timeout + 60 s.
            assert all(ttl - 45 <= (e - now) / 1000 <= ttl for e in expiries), (ttl, now, expiries)
            cluster.run(GATEWAYS[0], "systemctl kill -s KILL llm-proxy")
            _KILLED.update(key_id=key_id, expiries=expiries)
            # The dead gateway's three leases stay, and gw2 counts them: it admits none.
            assert _live_leases(cluster, key_id) == 3
            more = _send([gw2], keys["held"], 3).all(20)
            assert all(_refused_for_concurrency(r, 3) for r in more), _codes(more)
        holders.all(30)  # cut by the kill
        # Traffic through both gateways again, gw1's standby and then gw1 answering there.
        count = len(completed)
        wait_until(lambda: len(completed) >= count + 6, 60, "requests completed after the kill")
    finally:
        done.set()
        runner.join(60)
    wait_until(lambda: cluster.active(GATEWAYS[0], "llm-proxy"), 60, "gw1 restarted")
    assert _usage(cluster, admin_key, "user") - before >= sum(completed)


def test_concurrency_3_holds_across_both_gateways(cluster: Cluster, keys, limited_key_id):
    """vLLM frozen, ten requests of the concurrency-3 key at once, alternately through both
    gateways: seven are refused for concurrency at once, three wait in vLLM (three leases
    in Redis). Ten more through either gateway are refused too; with vLLM going on, the
    three are answered."""
    urls = [gateway_url(gw) for gw in GATEWAYS]
    time.sleep(1.1)  # a fresh QPS window: only the concurrency limit is at stake here
    with frozen_vllm(cluster):
        pending = _send(urls, keys["limited"], 10)
        refused = pending.wait_answered(7, 20)
        assert len(refused) == 7 and all(_refused_for_concurrency(r, 3) for r in refused), _codes(
            refused
        )
        assert _live_leases(cluster, limited_key_id) == 3
        more = _send(urls, keys["limited"], 10).all(20)
        assert len(more) == 10 and all(_refused_for_concurrency(r, 3) for r in more), _codes(more)
        assert len(pending.answered()) == 7  # the three still wait
    answers = pending.all(60)
    assert _codes(answers).count(200) == 3, _codes(answers)
    wait_until(lambda: _live_leases(cluster, limited_key_id) == 0, 10, "slots freed")


def test_qps_5_holds_across_both_gateways(cluster: Cluster, keys, limited_key_id):
    """Twenty short requests as fast as three clients can send them (the key's concurrency
    is 3), alternately through both gateways: in no second are more than five admitted.
    Seconds of the limiter's own clock: Redis' MONITOR feed shows each admission's entry in
    the key's window as the admission script wrote it, stamped with Redis' time (the
    script's). (Earlier forms read arrival times, from the controller and then from the
    gateways' logs: the decision comes a Redis round trip later, and on a busy machine six
    arrivals within 0.37 s were admitted more than a second apart.)"""
    urls = [gateway_url(gw) for gw in GATEWAYS]
    body = _long(1)
    prefix = f"qps-{time.time_ns()}-"
    since = time.time() - 5
    time.sleep(1.1)

    def one(k: int) -> int:
        return chat(urls[k % 2], keys["limited"], body, request_id=f"{prefix}{k}").status_code

    with cluster.redis_commands() as commands:
        results = parallel([lambda k=k: one(k) for k in range(20)], 3)
    assert all(isinstance(r, int) for r in results), results
    assert set(results) == {200, 429}, results
    records = cluster.request_log(since, "limited", prefix)
    assert len(records) == 20, len(records)
    assert sorted(r["status"] for r in records) == sorted(results)
    # ZADD <prefix>qps:key:<id> <now in ms> <lease>: one per admission, nothing else adds there.
    window = re.compile(rf'"ZADD" "llmhost:qps:key:{limited_key_id}" "(\d+)"')
    admitted = sorted(int(m.group(1)) for line in commands if (m := window.search(line)))
    assert len(admitted) == results.count(200), (admitted, results)
    for i, t in enumerate(admitted):
        within = [u for u in admitted[i:] if u < t + 1000]
        assert len(within) <= 5, [u - admitted[0] for u in admitted]
    assert len(admitted) >= 5, results


def test_a_100_token_quota_ends_at_most_at_100_tokens(cluster: Cluster, keys, admin_key):
    """20 concurrent requests of max_tokens 5 through both gateways against a 100-token
    quota: the reservations admit only what fits, and the total used stays <= 100."""
    # A fresh quota (a verify run again on the same hosts would find the last one's usage).
    for name in cluster.redis("--scan", "--pattern", "llmhost:usage:*").split():
        cluster.redis("DEL", name)
    urls = [gateway_url(gw) for gw in GATEWAYS]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "ignore_eos": True,
    }
    results = parallel(
        [lambda k=k: _post(urls[k % 2], keys["quota100"], body) for k in range(20)], 20
    )
    codes = _codes(results)
    assert codes.count(200) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    used = _usage(cluster, admin_key, "quota100")
    served = sum(
        r.json()["usage"]["total_tokens"]
        for r in results
        if isinstance(r, httpx.Response) and r.status_code == 200
    )
    assert used == served, (used, served)
    assert used <= 100, (used, codes)


def test_with_redis_stopped_closed_refuses_and_local_serves_its_share(
    cluster: Cluster, keys, admin_key, extra_gateway
):
    """The scenario's first gateway runs `llm_proxy_redis_failure_mode: closed`, the second
    `local` (its host_vars: the role's variable, the deployed units, gateway_count 2 from the
    inventory); a third gateway process on the first host runs `local` too, so that the two
    local ones share each limit as two gateway hosts would. Redis stopped: the closed one
    answers 503 in OpenAI's shape; each local one admits 2 of a concurrency-4 key (its
    share, never 4); what the local ones charged is in Redis once it is back (replayed from
    their spools)."""
    # The scenario's gateways all up (a test before may have restarted one).
    for gw in GATEWAYS:
        wait_until(lambda gw=gw: cluster.active(gw, "llm-proxy"), 60, f"{gw} up")
        wait_until(
            lambda gw=gw: CLIENT.get(f"{gateway_url(gw)}/ready").status_code == 200,
            60,
            f"{gw} ready",
        )
    assert cluster.gateway_config(GATEWAYS[0])["redis_failure_mode"] == "closed"
    deployed = cluster.gateway_config(GATEWAYS[1])
    assert (deployed["redis_failure_mode"], deployed["gateway_count"]) == ("local", 2)
    local = [
        gateway_url(GATEWAYS[1]),
        extra_gateway("local-0", 8110, {"redis_failure_mode": "local", "gateway_count": 2}),
    ]
    # The local gateways read the key's quota usage while Redis is up (a quota they have
    # never read is refused in local mode).
    for url in local:
        assert _post(url, keys["shared4"], _long(1)).status_code == 200
    before = _usage(cluster, admin_key, "shared4")
    cluster.run(REDIS, "systemctl stop redis-server")
    served: list[int] = []
    try:
        r = _post(gateway_url(GATEWAYS[0]), keys["user"], _long(1))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "limit_store_unavailable"
        for url in local:
            with frozen_vllm(cluster):
                pending = _send([url], keys["shared4"], 4)
                refused = pending.wait_answered(2, 20)
                assert all(_refused_for_concurrency(r, 2) for r in refused), _codes(refused)
                time.sleep(1)
                assert len(pending.answered()) == 2  # the other two wait in vLLM
            answers = pending.all(60)
            assert _codes(answers).count(200) == 2, _codes(answers)
            served += [
                r.json()["usage"]["total_tokens"]
                for r in answers
                if isinstance(r, httpx.Response) and r.status_code == 200
            ]
    finally:
        cluster.run(REDIS, "systemctl start redis-server")
    wait_until(
        lambda: _usage(cluster, admin_key, "shared4") - before >= sum(served),
        60,
        "the local gateways' usage in Redis",
        interval=2,
    )
    assert _usage(cluster, admin_key, "shared4") - before == sum(served)


@pytest.mark.late
def test_a_killed_gateways_slots_come_back_when_their_leases_expire(cluster: Cluster, keys):
    """The three leases gw1 held when it was killed (the first test of this module) run out
    at their expiry on Redis' clock, and then gw2 admits the key `held` again. Marked `late`
    (conftest.py): it runs after the other modules' tests (but the rolls), which ran while
    the leases ran out (in a whole run, they are gone by then)."""
    assert _KILLED, "no leases of a killed gateway: the test that kills it failed or did not run"
    key_id, expiries = _KILLED["key_id"], _KILLED["expiries"]
    now, _ = _leases(cluster, key_id)
    left = max(0.0, (max(expiries) - now) / 1000)
    print(f"the killed gateway's leases run out in {left:.0f} s")
    # Redis' clock past the last expiry: no lease of the key is live, and gw2 admits it.
    wait_until(lambda: _leases(cluster, key_id)[0] > max(expiries), left + 15, "expiry", 2)
    assert _live_leases(cluster, key_id) == 0
    r = _post(gateway_url(GATEWAYS[1]), keys["held"], _long(1))
    assert r.status_code == 200, r.text
