"""Each host of the cluster has what its groups promise: units up, vLLM on the private
address behind the nftables rule, Redis answering only with its password, AOF on."""

from __future__ import annotations

import json
import re
import time

import pytest


def _groups(host) -> set[str]:
    return set(host.ansible.get_variables().get("group_names", []))


def _private_address(host) -> str:
    return host.ansible("setup", "gather_subset=!all,network", check=False)["ansible_facts"][
        "ansible_default_ipv4"
    ]["address"]


def _listening(host, port: int) -> set[str]:
    out = host.run(f"ss -ltnH 'sport = :{port}'").stdout
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line}


def _ruleset(host) -> str:
    with host.sudo():
        return host.check_output("nft list ruleset")


def test_gpu_hosts_run_every_vllm_instance_on_the_private_address(host):
    if "gpu" not in _groups(host):
        pytest.skip("not a gpu host")
    instances = [("vllm.service", 8002)] + [
        (f"vllm-{i['name']}.service", int(i["port"]))
        for i in host.ansible.get_variables().get("vllm_instances", [])
    ]
    private = _private_address(host)
    for unit, port in instances:
        assert host.service(unit).is_running, unit
        # A follower node of an instance over several hosts has no API server.
        follower = "--headless" in host.check_output(f"systemctl show -p ExecStart {unit}")
        expected = set() if follower else {private}
        assert _listening(host, port) == expected, f"{unit} listens on {_listening(host, port)}"


def test_gpu_hosts_admit_vllm_ports_only_from_the_firewall_list(host):
    if "gpu" not in _groups(host):
        pytest.skip("not a gpu host")
    assert host.service("llmhost-firewall.service").is_enabled
    ruleset = _ruleset(host)
    assert "table inet llmhost_vllm" in ruleset
    instances = host.ansible.get_variables().get("vllm_instances", [])
    ports = {8002} | {int(i["port"]) for i in instances}
    # An instance over several hosts: its rendezvous and heartbeat ports, from its nodes only.
    ports |= {p for i in instances if "nodes" in i for p in (29501, 29502)}
    drop = re.search(r"tcp dport (\{[^}]*\}|\d+) counter packets \d+ bytes \d+ drop", ruleset)
    assert drop, ruleset
    assert {int(p) for p in re.findall(r"\d+", drop.group(1))} == ports, ruleset
    assert "ip saddr @allowed_v4 accept" in ruleset


def test_gateway_hosts_run_the_gateway_with_every_backend_and_redis(host):
    if "gateway" not in _groups(host):
        pytest.skip("not a gateway host")
    assert host.service("llm-proxy.service").is_running
    assert host.service("nginx.service").is_running
    with host.sudo():
        config = host.check_output("cat /etc/llm-proxy/config.yaml")
    assert "models:" in config and "redis_url: redis://" in config and "gateway_count: 2" in config
    # No vLLM here, and no firewall asked for.
    assert not host.service("vllm.service").is_running


def test_gateway_hosts_run_a_standby_gateway_on_the_gateways_socket(host):
    """With Redis, a standby gateway on its own loopback port gets the gateway's socket from
    systemd too; the gateway's ExecStop hands it over, its ExecStartPost restarts it."""
    if "gateway" not in _groups(host):
        pytest.skip("not a gateway host")
    assert host.service("llm-proxy-standby.service").is_running
    assert host.service("llm-proxy-standby.service").is_enabled
    assert host.service("llm-proxy.socket").is_running
    assert _listening(host, 8001) == {"127.0.0.1"}
    assert _listening(host, 8011) == {"127.0.0.1"}
    with host.sudo():
        standby = host.check_output("cat /etc/llm-proxy/standby.yaml")
        nginx = host.check_output("cat /etc/nginx/nginx.conf")
    assert "fastapi_port: 8011" in standby and "state_dir: /var/lib/llm-proxy-standby" in standby
    assert "location = /metrics/standby" in nginx
    assert "proxy_pass http://127.0.0.1:8011/metrics;" in nginx
    unit = host.check_output("systemctl cat llm-proxy.service")
    assert "Type=notify" in unit
    assert "ExecStartPost=-+/bin/systemctl --no-block try-restart llm-proxy-standby.service" in unit
    assert "ExecStop=-+/bin/systemctl kill --kill-whom=main --signal=SIGUSR1" in unit
    unit = host.check_output("systemctl cat llm-proxy-standby.service")
    assert "Sockets=llm-proxy.socket" in unit and " --standby" in unit
    # `systemctl reload llm-proxy` reaches the standby too (ReloadPropagatedFrom=).
    since = host.check_output("date +%s")
    with host.sudo():
        host.run_expect([0], "systemctl reload llm-proxy")
    deadline = time.monotonic() + 30
    while '"source":"sighup"' not in (
        log := host.check_output(f"journalctl -u llm-proxy-standby -o cat --since @{since}")
    ):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.5)
    assert "llm-proxy-standby.service" in host.check_output(
        "systemctl list-dependencies llmhost.target --plain"
    )


def test_prometheus_scrapes_both_processes_of_each_gateway(host):
    if "monitoring" not in _groups(host):
        pytest.skip("not a monitoring host")
    expected = {
        (gw, process) for gw in ("llmhost-gw1", "llmhost-gw2") for process in ("", "standby")
    }
    deadline = time.monotonic() + 90  # a first scrape of each target
    while True:
        targets = json.loads(
            host.check_output("curl -sf 'http://127.0.0.1:9090/api/v1/targets?state=active'")
        )["data"]["activeTargets"]
        found = {
            (t["labels"]["instance"], t["labels"].get("process", "")): t["health"]
            for t in targets
            if t["labels"]["job"] == "llm-gateway"
        }
        if (
            set(found) == expected and set(found.values()) == {"up"}
        ) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert set(found) == expected and set(found.values()) == {"up"}, found


def test_redis_answers_ping_with_the_password_only(host):
    if "redis" not in _groups(host):
        pytest.skip("not a redis host")
    assert host.service("redis-server.service").is_running
    with host.sudo():
        password = host.check_output("sed -n 's/^requirepass //p' /etc/redis/redis.conf")
    assert len(password) >= 32
    private = _private_address(host)
    assert _listening(host, 6379) == {"127.0.0.1", private}
    without = host.run(f"redis-cli -h {private} PING").stdout
    assert "NOAUTH" in without, without
    cli = f"REDISCLI_AUTH='{password}' redis-cli -h {private}"
    assert host.check_output(f"{cli} PING") == "PONG"
    assert host.check_output(f"{cli} CONFIG GET appendonly").split() == ["appendonly", "yes"]
    assert host.check_output(f"{cli} CONFIG GET appendfsync").split() == [
        "appendfsync",
        "everysec",
    ]


def test_redis_is_behind_the_firewall_and_exported(host):
    if "redis" not in _groups(host):
        pytest.skip("not a redis host")
    ruleset = _ruleset(host)
    assert "table inet llmhost_redis" in ruleset and "6379" in ruleset, ruleset
    assert host.service("prometheus-redis-exporter.service").is_running
    metrics = host.check_output(f"curl -sf http://{_private_address(host)}:9121/metrics")
    assert re.search(r"^redis_up 1$", metrics, re.M), "the exporter cannot reach Redis"
    # The password reaches the exporter through its environment file, not argv.
    assert "REDIS_PASSWORD" not in host.check_output("ps -o args= -C prometheus-redis-exporter")


def test_redis_unit_is_hardened(host):
    if "redis" not in _groups(host):
        pytest.skip("not a redis host")
    out = host.check_output("systemd-analyze security redis-server.service --no-pager")
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    print(f"redis-server.service exposure {exposure}")
    assert exposure <= 3.0, out
