"""Changes on the running stack host under load: an nginx reload, a key reload, a gateway
restart, each while a client on the host sends 25 chat completions a second through nginx; a
key's concurrency limit across a gateway restart. (llmhost.target stopping and starting the
whole stack is in test_monitoring.py: it brings back the vLLM that the alert test stops.)

25 a second, half the demo inventory's global limit of 50 requests in any second (an exact
moving window): a client or a gateway slowed by a busy machine sends or takes requests in
bunches: at 45 a second, 0.12 s of bunching puts 51 in one second (a CI run saw 4 answered
429 during a key reload, as the limit must). At 25 a second it takes a second's delay."""

from __future__ import annotations

import hashlib
import json
import secrets
import textwrap
import time

import pytest
from load import LOAD, demo_key_text, max_overlap, request_records

testinfra_hosts = ["ansible://llmhost-stack"]

RATE = 25


@pytest.fixture(scope="module")
def admin_key() -> str:
    # No per-key limit: the load measures the reload, not the key's concurrency.
    return demo_key_text("admin-key")


@pytest.fixture(scope="module")
def demo_key() -> str:
    # The demo inventory's user key: 4 concurrent requests.
    return demo_key_text("demo-key")


def _under_load(host, key: str, *action: str) -> dict:
    with host.sudo():  # the action (systemctl) needs root
        command = "python3 -c %s %s %s" + " %s" * len(action)
        out = host.run(command, LOAD, key, str(RATE), *action)
    assert out.rc == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["action_rc"] == 0, result["action_out"]
    # The load really ran for the whole window: 3 s before, the action, 5 s after.
    assert result["sent"] >= RATE * (8 + result["action_seconds"]) * 0.8, result["sent"]
    print(
        f"{' '.join(action)}: {result['sent']} requests, {len(result['failed'])} failed, "
        f"slowest {result['slowest']:.2f} s, the action took {result['action_seconds']:.1f} s"
    )
    return result


def _main_pid(host, unit: str) -> str:
    return host.run("systemctl show -p MainPID --value %s", unit).stdout.strip()


def test_an_nginx_reload_under_load_fails_no_request(host, admin_key):
    before = _main_pid(host, "nginx")
    result = _under_load(host, admin_key, "systemctl", "reload", "nginx")
    assert result["failed"] == [], result["failed"][:5]
    assert _main_pid(host, "nginx") == before  # a reload: the master stayed


# Run on the stack host as root: the keys file rewritten as an operator's converge would
# (a new file moved into place), one key added and one removed, then the gateway reloaded.
CHANGE_KEYS = textwrap.dedent(
    """
    import json, os, subprocess, sys
    path, add, remove = "/etc/llm-proxy/keys.json", sys.argv[1], sys.argv[2]
    keys = json.load(open(path))
    keys["keys"] = [k for k in keys["keys"] if k.get("key_sha256") != remove]
    keys["keys"].append({"user": "added-under-load", "key_sha256": add})
    st = os.stat(path)
    with open(path + ".new", "w") as f:
        json.dump(keys, f, indent=2)
    os.chown(path + ".new", st.st_uid, st.st_gid)
    os.chmod(path + ".new", 0o640)
    os.replace(path + ".new", path)
    subprocess.run(["systemctl", "reload", "llm-proxy"], check=True)
    """
)


def _models_status(host, key: str) -> str:
    return host.run(
        "curl -s -o /dev/null -w %s -H %s http://127.0.0.1:8000/v1/models",
        "%{http_code}",
        f"Authorization: Bearer {key}",
    ).stdout


def _until_status(host, key: str, want: str, timeout: float = 15) -> str:
    """The key's status on /v1/models once it is ``want`` (a reload is a signal: the gateway
    reads the file a moment after `systemctl reload` returns), or the last one seen."""
    deadline = time.monotonic() + timeout
    while (status := _models_status(host, key)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def test_a_key_reload_under_load_fails_no_request(host, admin_key, demo_key):
    """A key added and another removed (the keys file replaced, then `systemctl reload`)
    while the admin key sends 25 requests a second: no request fails, the gateway keeps its
    PID, the added key is served and the removed one refused at once. The file in force
    before is put back after (the later tests use the demo key)."""
    added = "sk-" + secrets.token_urlsafe(36)
    digest = hashlib.sha256
    before = _main_pid(host, "llm-proxy")
    with host.sudo():
        assert host.run("cp -p /etc/llm-proxy/keys.json /root/keys.json.before").rc == 0
    try:
        assert _models_status(host, demo_key) == "200"
        assert _models_status(host, added) == "401"
        result = _under_load(
            host,
            admin_key,
            "python3",
            "-c",
            CHANGE_KEYS,
            digest(added.encode()).hexdigest(),
            digest(demo_key.encode()).hexdigest(),
        )
        assert result["failed"] == [], result["failed"][:5]
        assert _main_pid(host, "llm-proxy") == before  # in place: same PID
        # The load went on 5 s after the reload: both changes are in force by now.
        assert _models_status(host, added) == "200"
        assert _models_status(host, demo_key) == "401"
    finally:
        with host.sudo():
            put_back = host.run(
                "cp -p /root/keys.json.before /etc/llm-proxy/keys.json"
                " && systemctl reload llm-proxy"
            )
        assert put_back.rc == 0, put_back.stderr
    assert _until_status(host, demo_key, "200") == "200"
    assert _until_status(host, added, "401") == "401"


def test_a_gateway_restart_under_load_refuses_no_connection_and_drops_no_request(host, admin_key):
    """`systemctl restart llm-proxy`: systemd keeps the listening socket (llm-proxy.socket),
    the old process lets its requests end and nginx close its idle connections, the new one
    answers what waited in the socket's queue meanwhile: no 5xx, no reset connection.

    Not 0 refusals: the requests that waited (about a second and a half of them: the old
    process's drain and the new one's start) reach the new process at once, and global
    limits below that burst (the demo's 32 concurrent, 50 a second) may answer the excess
    429, as they must. Every failure must be such a 429; the count is
    printed."""
    before = _main_pid(host, "llm-proxy")
    result = _under_load(host, admin_key, "systemctl", "restart", "llm-proxy")
    assert _main_pid(host, "llm-proxy") != before
    others = [
        r
        for r in result["failed"]
        # The admin key has no limit of its own: a 429 is one of the global limits'.
        if not (r["status"] == 429 and '"code":"rate_limit_exceeded"' in r["body"])
    ]
    assert others == [], others[:5]
    print(f"429 from the global limits after the restart: {len(result['failed'])}")


# Run on the stack host as root, with vLLM's engine frozen (SIGSTOP to every process under
# its API server, which goes on taking requests) so that requests stay in flight for as
# long as the script says: four streams of `key` (the demo key: 4 concurrent)
# take its slots; a fifth is refused; `systemctl restart llm-proxy` starts (the old process
# waits for the four); half a second later six more requests of the key are sent; a second
# after that vLLM goes on (SIGCONT), the four end, the old process exits and the new one
# takes what waited.
HOLD_ACROSS_RESTART = textwrap.dedent(
    """
    import http.client, json, os, signal, subprocess, sys, threading, time
    key, vllm = sys.argv[1], int(sys.argv[2])
    out, lock = {"held": [], "during": []}, threading.Lock()
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}

    def post(body):
        c = http.client.HTTPConnection("127.0.0.1", 8000, timeout=180)
        c.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        return c.getresponse()

    def hold(n):
        r = post({"model": "tiny", "max_tokens": 20, "stream": True,
                  "messages": [{"role": "user", "content": "hold %d" % n}]})
        rest = r.read().decode(errors="replace")
        with lock:
            out["held"].append({"status": r.status, "done": rest.rstrip().endswith("data: [DONE]")})

    def during(n):
        r = post({"model": "tiny", "max_tokens": 100, "ignore_eos": True,
                  "messages": [{"role": "user", "content": "during %d" % n}]})
        body = r.read().decode(errors="replace")
        with lock:
            out["during"].append({"status": r.status, "body": body[:300]})

    # nginx drops idle gateway connections after 4 s: none of an earlier test's is left.
    time.sleep(5)
    out["since"] = time.time()
    def engine(sig):  # every process under the API server (a stopped API server, resumed,
        # ran its keep-alive timers first and closed connections the gateway had reused)
        kids = [vllm]
        for pid in kids:
            found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
            kids += [int(p) for p in found.stdout.split()]
        for pid in kids[1:]:
            os.kill(pid, sig)

    engine(signal.SIGSTOP)
    try:
        holders = [threading.Thread(target=hold, args=(n,)) for n in range(4)]
        for t in holders:
            t.start()
        time.sleep(1)
        restart = subprocess.Popen(["systemctl", "restart", "llm-proxy"])
        time.sleep(0.5)
        others = [threading.Thread(target=during, args=(n,)) for n in range(6)]
        for t in others:
            t.start()
        time.sleep(1)
    finally:
        engine(signal.SIGCONT)
    out["restart_rc"] = restart.wait()
    for t in holders + others:
        t.join(180)
    print(json.dumps(out))
    """
)


def test_a_keys_concurrency_limit_holds_across_a_gateway_restart(host, demo_key):
    """The demo key admits 4 at once. Four streams hold its slots (vLLM frozen) and
    `systemctl restart llm-proxy` starts; six more requests of the key arrive during the
    restart. The old process ends the four streams whole before it exits (systemd starts
    the next only then); the new one admits 4 of the six, and the 2 others wait for a slot
    of the key (not a 429): all six answered, and the gateway's request log never has more
    than 4 of the key's requests in flight at once."""
    before = _main_pid(host, "llm-proxy")
    vllm = _main_pid(host, "vllm")
    with host.sudo():
        run = host.run("python3 -c %s %s %s", HOLD_ACROSS_RESTART, demo_key, vllm)
    assert run.rc == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["restart_rc"] == 0
    assert _main_pid(host, "llm-proxy") != before
    assert out["held"] == [{"status": 200, "done": True}] * 4, out["held"]
    assert [r["status"] for r in out["during"]] == [200] * 6, out["during"]
    admitted = [r for r in request_records(host, out["since"], "demo") if r["status"] == 200]
    assert len(admitted) == 4 + 6, admitted
    assert max_overlap(admitted) == 4
    assert any(r.get("queue_ms", 0) > 0 for r in admitted), admitted
