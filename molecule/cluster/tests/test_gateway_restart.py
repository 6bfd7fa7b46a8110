"""`systemctl restart llm-proxy` on a gateway host under load fails no request: while the
gateway restarts, the standby gateway (llm-proxy-standby.service) answers on the gateway's
socket (systemd hands it to both; the gateway's ExecStop tells the standby), and restarts in
its turn once the gateway is ready again. Both keep the limits in Redis, so a key's
concurrency limit holds across the restart, whichever process answers.

Real requests from the controller through gw1's nginx; the processes' timestamps and
request logs are read from systemd and the journal on gw1.
"""

from __future__ import annotations

import json
import textwrap
import time

from cluster import (
    GATEWAY_UNITS,
    GATEWAYS,
    Cluster,
    SteadyLoad,
    frozen_vllm,
    gateway_url,
    wait_until,
)

testinfra_hosts = ["ansible://llmhost-gw1"]

GW = GATEWAYS[0]
UNITS = ("llm-proxy", "llm-proxy-standby")


def _unit(cluster: Cluster, unit: str) -> dict[str, str]:
    props = "MainPID,ActiveState,Job,ActiveEnterTimestampMonotonic,ActiveExitTimestampMonotonic"
    out = cluster.run(GW, f"systemctl show -p {props} {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _settled(cluster: Cluster, before: dict[str, dict[str, str]]) -> bool:
    """Both processes restarted (new PIDs), active, with no job left."""
    now = {u: _unit(cluster, u) for u in UNITS}
    return all(
        now[u]["MainPID"] != before[u]["MainPID"]
        and now[u]["ActiveState"] == "active"
        and not now[u]["Job"]
        for u in UNITS
    )


def _logged_at(cluster: Cluster, unit: str, pid: str, text: str, since: float) -> float:
    """When (epoch s) process ``pid`` of ``unit`` first logged a line containing ``text``."""
    out = cluster.run(GW, f"journalctl -u {unit} _PID={pid} -o json --since @{int(since)}")
    for line in out.splitlines():
        entry = json.loads(line)
        if text in str(entry.get("MESSAGE", "")):
            return int(entry["__REALTIME_TIMESTAMP"]) / 1e6
    raise AssertionError(f"{unit} ({pid}) did not log {text!r}")


def test_a_gateway_restart_under_50_requests_a_second_fails_none(cluster: Cluster, user_key):
    """50 requests a second through gw1 while `systemctl restart llm-proxy` runs there,
    one in five a chat completion (every other one of those streamed), the others GET
    /v1/models (50 completions a second overloaded the CPU test hosts: the global
    concurrency limit refused some before any restart): every answer 200, every stream
    whole. The gateway and then the standby got new PIDs, the standby's stop began only
    once the new gateway was active (ExecStartPost, After=), and the standby answered
    requests of the load: the ones that came while the gateway restarted."""
    before = {u: _unit(cluster, u) for u in UNITS}
    since = time.time()
    with SteadyLoad(gateway_url(GW), user_key, rate=50, completions_every=5) as load:
        time.sleep(3)  # the load is on before the restart
        cluster.run(GW, "systemctl restart llm-proxy")
        wait_until(lambda: _settled(cluster, before), 90, "both gateway processes restarted")
        time.sleep(3)  # and stays on after it
    results = load.results
    chats = sum(r["chat"] for r in results)
    seconds = load.sending_seconds
    print(f"restart under load: {len(results)} requests ({chats} chat) sent in {seconds:.0f} s")
    # What the gateway processes logged as errors, first in the message: why a request failed.
    errors = [
        f"{e.get('event')}: {e.get('error') or e.get('message')}"
        for e in (
            json.loads(line)
            for line in cluster.run(
                GW, f"journalctl {GATEWAY_UNITS} -o cat --no-pager --since @{int(since)}"
            ).splitlines()
            if line.startswith("{")
        )
        if e.get("level") == "error"
    ]
    assert load.failures() == [], f"gateways logged {errors[:3]}; requests {load.failures_told()}"
    assert len(results) >= 50 * seconds * 0.8, len(results)

    after = {u: _unit(cluster, u) for u in UNITS}
    # The new gateway served (uvicorn logs this just before READY=1) before the old standby
    # was told to stop.
    serving = _logged_at(
        cluster, "llm-proxy", after["llm-proxy"]["MainPID"], "Ready: serving requests", since
    )
    stopping = _logged_at(
        cluster, "llm-proxy-standby", before["llm-proxy-standby"]["MainPID"], "Shutting down", since
    )
    assert serving < stopping, (serving, stopping)
    served = cluster.request_log(since - 1, "user", gateways=[GW], units="-u llm-proxy-standby")
    assert served, "the standby answered none of the load's requests"
    assert all(r["status"] == 200 for r in served), served[:3]
    print(f"answered by the standby: {len(served)}")


# Run on gw1 (the controller's round trips to the host take seconds on the loaded test
# machine), while the controller keeps vLLM's engine stopped (SIGSTOP, frozen_vllm): three
# answers of the key through nginx, which wait on vLLM; `systemctl restart --no-block
# llm-proxy`; as soon as the standby says it serves the gateway's socket and the old gateway
# that it is shutting down (it closes its copy of the socket then), four short requests on
# new connections to that socket; once they are answered, DURING_DONE tells the controller,
# which lets vLLM go on. Prints what each got. (Long answers instead of a stopped vLLM raced
# the hand-over: on a quiet machine 1,000 tokens were generated before it.)
DURING_DONE = "/run/llmhost-test-during-done"
HOLD_ACROSS_RESTART = textwrap.dedent(
    """
    import http.client, json, os, subprocess, sys, threading, time
    key, since, done = os.environ["KEY"], sys.argv[1], sys.argv[2]
    out, lock = {"held": [], "during": []}, threading.Lock()
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}

    def post(port, body, field):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
        c.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        r = c.getresponse()
        text = r.read().decode(errors="replace")
        with lock:
            out[field].append({"status": r.status, "body": text[:300], "at": time.time()})

    held = {"model": "tiny", "max_tokens": 20, "messages": [{"role": "user", "content": "hold"}]}
    holders = [threading.Thread(target=post, args=(8000, held, "held")) for _ in range(3)]
    for t in holders:
        t.start()
    time.sleep(1)
    subprocess.run(["systemctl", "restart", "--no-block", "llm-proxy"], check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        log = subprocess.run(["journalctl", "-u", "llm-proxy-standby", "-u", "llm-proxy",
                              "-o", "cat", "--since", "@" + since],
                             capture_output=True, text=True).stdout
        # The standby serves the socket, and the old gateway no longer accepts from it.
        if "serving the gateway's socket" in log and "Shutting down" in log:
            break
        time.sleep(0.05)
    out["handed_over"] = time.time()
    short = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    others = [threading.Thread(target=post, args=(8001, short, "during")) for _ in range(4)]
    for t in others:
        t.start()
    for t in others:
        t.join(60)
    open(done, "w").close()
    for t in holders:
        t.join(180)
    print(json.dumps(out))
    """
)


def test_a_keys_concurrency_limit_holds_across_a_gateway_restart(cluster: Cluster, keys):
    """The concurrency-3 key holds its three slots with three answers through gw1's nginx
    that wait on a stopped vLLM; `systemctl restart llm-proxy` begins and the old gateway
    lets those three run on. As soon as the standby answers on the gateway's socket, four
    more requests of the key on new connections to that socket reach the standby, which
    refuses all four for concurrency: it counts the old gateway's three in Redis. Then vLLM
    goes on: the three end whole (after the four), and both processes come back."""
    before = {u: _unit(cluster, u) for u in UNITS}
    time.sleep(1.1)  # a fresh QPS window (the key admits 5 a second)
    since = int(time.time())
    result = "/run/llmhost-test-hold.json"
    cluster.run(GW, f"rm -f {result} {DURING_DONE}")
    with frozen_vllm(cluster):
        cluster.run(
            GW,
            "systemd-run --collect --unit llmhost-test-hold -p StandardOutput=file:%s -E KEY=%s "
            "timeout 200 python3 -c %s %s %s",
            result,
            keys["limited"],
            HOLD_ACROSS_RESTART,
            str(since),
            DURING_DONE,
        )
        wait_until(
            lambda: cluster.hosts[GW].run(f"test -e {DURING_DONE}").rc == 0,
            90,
            "the four requests during the hand-over answered",
            interval=0.5,
        )
    wait_until(lambda: not cluster.active(GW, "llmhost-test-hold"), 200, "the three answered")
    out = json.loads(cluster.run(GW, f"cat {result}"))
    wait_until(lambda: _settled(cluster, before), 90, "both gateway processes restarted")

    assert [r["status"] for r in out["held"]] == [200] * 3, out["held"]
    assert all(r["at"] > out["handed_over"] for r in out["held"]), out
    assert [r["status"] for r in out["during"]] == [429] * 4, out["during"]
    refused = cluster.request_log(since - 1, "limited", gateways=[GW], units="-u llm-proxy-standby")
    assert [(r["status"], r["limit"]) for r in refused] == [(429, "concurrency_key")] * 4, refused
