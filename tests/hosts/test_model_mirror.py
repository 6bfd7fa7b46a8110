"""The models' mirror on the model_mirror hosts: running, sandboxed, serving each model's
manifest on loopback, and nothing to write with."""

from __future__ import annotations

from hostcheck import assert_unit_hardened, assert_unit_healthy

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "model_mirror"
testinfra_hosts = ["ansible://all"]

UNIT = "llmhost-model-mirror"


def test_mirror_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, UNIT)


def test_mirror_unit_is_sandboxed(host):
    assert_unit_hardened(host, UNIT)


def test_mirror_serves_each_models_manifest(host, hostvar):
    port = hostvar("model_mirror_port", 8090)
    models = hostvar("model_mirror_models", [])
    assert models, "a model_mirror host with no model_mirror_models"
    for model in models:
        url = f"http://127.0.0.1:{port}/{model['name']}/SHA256SUMS"
        answer = host.run("curl -sS -o /dev/null -w '%%{http_code}' %s", url)
        assert answer.stdout == "200", (url, answer.stdout, answer.stderr)


def test_mirror_refuses_anything_but_reading(host, hostvar):
    port = hostvar("model_mirror_port", 8090)
    url = f"http://127.0.0.1:{port}/probe"
    answer = host.run("curl -sS -o /dev/null -w '%%{http_code}' -X PUT --data x %s", url)
    assert answer.stdout == "403", (url, answer.stdout, answer.stderr)
