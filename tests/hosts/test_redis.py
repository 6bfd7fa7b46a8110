"""Redis on the redis hosts: running, stable, sandboxed, never listening everywhere, and
refusing whoever has no password."""

from __future__ import annotations

from hostcheck import assert_unit_hardened, assert_unit_healthy

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "redis"
testinfra_hosts = ["ansible://all"]


def test_redis_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, "redis-server")


def test_redis_unit_is_sandboxed(host):
    assert_unit_hardened(host, "redis-server")


def test_redis_listens_on_its_addresses_only(host, hostvar):
    port = hostvar("redis_port", 6379)
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert not host.socket(f"tcp://:::{port}").is_listening
    assert host.socket(f"tcp://127.0.0.1:{port}").is_listening


def test_redis_refuses_a_client_without_the_password(host, hostvar):
    port = hostvar("redis_port", 6379)
    answer = host.run(f"redis-cli -h 127.0.0.1 -p {port} PING")
    assert "NOAUTH" in answer.stdout + answer.stderr, answer.stdout
