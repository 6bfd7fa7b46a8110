"""One model over two hosts: `other` is served by vllm-other.service on both gpu hosts
together, tensor parallel 2 with vLLM's multi-node launch (--nnodes 2, the mp backend, the
second host --headless), started by roles/vllm/files/vllm_node.py, which ends every node of
the instance when one ends so that systemd restarts them together."""

from __future__ import annotations

import os
import subprocess
import time

from cluster import (
    GATEWAYS,
    GPU_HOSTS,
    SCENARIO,
    Cluster,
    address,
    chat,
    gateway_url,
    inventory,
    wait_until,
)

testinfra_hosts = ["ansible://llmhost-gw1"]

LEADER, FOLLOWER = GPU_HOSTS
UNIT = "vllm-other.service"
PROJECT = SCENARIO.parent.parent


def _main_pid(cluster: Cluster, host: str) -> str:
    return cluster.run(host, f"systemctl show -p MainPID --value {UNIT}").strip()


def _cmdline(cluster: Cluster, host: str) -> str:
    return cluster.run(host, f"tr '\\0' ' ' < /proc/{_main_pid(cluster, host)}/cmdline")


def _answers(user_key: str, n: int = 2) -> list[int]:
    """Completions of `other` through each gateway: their statuses."""
    statuses = []
    for i, gw in enumerate(GATEWAYS * n):
        body = {
            "model": "other",
            "messages": [{"role": "user", "content": f"two hosts {i}"}],
            "max_tokens": 4,
            "ignore_eos": True,
        }
        r = chat(gateway_url(gw), user_key, body, timeout=60)
        assert r.status_code != 200 or r.json()["usage"]["completion_tokens"] == 4, r.text
        statuses.append(r.status_code)
    return statuses


def test_the_leader_serves_and_the_follower_runs_workers_only(cluster: Cluster, backends):
    leader, follower = _cmdline(cluster, LEADER), _cmdline(cluster, FOLLOWER)
    for cmd in (leader, follower):
        assert "--tensor-parallel-size 2 " in cmd and "--nnodes 2 " in cmd, cmd
        assert f"--master-addr {address(LEADER)} " in cmd, cmd
    assert "vllm_node.py leader --watch" in leader and "--node-rank 0 " in leader, leader
    assert "vllm_node.py follower" in follower and "--node-rank 1 " in follower, follower
    assert "--headless" in follower and "--headless" not in leader
    # The follower has no API server: nothing listens on the instance's port there.
    assert ":8003 " not in cluster.run(FOLLOWER, "ss -Hltn"), "follower serves HTTP"
    # The gateways know one backend for the model: the leader's.
    assert [(b.host, b.port) for b in backends["other"]] == [(LEADER, 8003)]


def test_the_two_hosts_answer_together(user_key):
    assert _answers(user_key) == [200] * 4


def _kill_one_and_see_both_come_back(cluster: Cluster, user_key: str, killed: str) -> None:
    """kill -9 of one node's main process: the other node ends within seconds (their
    heartbeat connection closed), systemd restarts both (Restart=always), they meet again
    at the leader's rendezvous and `other` answers again through both gateways."""
    (other,) = (h for h in GPU_HOSTS if h != killed)
    pids = {h: _main_pid(cluster, h) for h in GPU_HOSTS}
    since = cluster.run(other, "date '+%Y-%m-%d %H:%M:%S'").strip()
    start = time.monotonic()
    cluster.run(killed, f"systemctl kill --kill-whom=main --signal=KILL {UNIT}")
    # The other node went down because this one did, not at some later request.
    wait_until(lambda: _main_pid(cluster, other) != pids[other], 30, f"{other}'s node ended")
    log = cluster.run(other, f"journalctl -u {UNIT} -o cat --no-pager --since '{since}'")
    assert "is gone: exiting, so that every node of the instance restarts together" in log, log
    wait_until(
        lambda: all(
            cluster.active(h, UNIT) and _main_pid(cluster, h) not in ("0", pids[h])
            for h in GPU_HOSTS
        ),
        120,
        "both units running again, with new processes",
    )

    def answering() -> bool:
        try:
            return _answers(user_key, n=1) == [200, 200]
        except Exception:
            return False

    wait_until(answering, 600, "`other` answering again", interval=5)
    print(f"{killed} killed: both nodes back and answering in {time.monotonic() - start:.0f} s")
    assert _answers(user_key) == [200] * 4


def test_a_killed_follower_takes_the_leader_down_and_both_come_back(cluster: Cluster, user_key):
    _kill_one_and_see_both_come_back(cluster, user_key, FOLLOWER)


def test_a_killed_leader_takes_the_follower_down_and_both_come_back(cluster: Cluster, user_key):
    _kill_one_and_see_both_come_back(cluster, user_key, LEADER)


def test_the_preflight_refuses_parallel_sizes_that_do_not_cover_the_hosts():
    """Tensor parallel 3 over two one-process CPU hosts: refused before anything changes."""
    bad = (
        '{"vllm_instances": [{"name": "other", "served_model_name": "other", "port": 8003,'
        ' "model_source": "path", "model_path": "/var/lib/vllm/models/tiny",'
        ' "nodes": ["llmhost-gpu1", "llmhost-gpu2"], "tensor_parallel_size": 3}]}'
    )
    run = subprocess.run(
        [
            *("ansible-playbook", "-i", inventory(), str(PROJECT / "site.yml")),
            *("--limit", "gpu", "--tags", "vllm_preflight", "-e", bad),
        ],
        capture_output=True,
        text=True,
        # JSON results: the YAML format folds the long message.
        env=dict(
            os.environ,
            ANSIBLE_ROLES_PATH=str(PROJECT / "roles"),
            ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ),
        timeout=600,
    )
    out = run.stdout + run.stderr  # the failed task's message is on stderr
    assert run.returncode != 0, out[-3000:]
    assert "tensor_parallel_size x pipeline_parallel_size (3 x 1) must equal" in out, out[-3000:]
    assert "hosts x GPUs per host (2 x 1)" in out
