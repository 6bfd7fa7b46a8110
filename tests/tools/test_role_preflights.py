"""The roles' preflights and argument specs refuse what an operator can get wrong,
naming the variable: placeholder and weak secrets, example keys, bad choices.

Each role runs for real (`ansible-playbook --tags <role>_preflight`: its argument
validation and preflight, nothing else) against stand-in hosts on the controller
(connection local; the preflights only evaluate variables).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("llm_proxy", "vllm", "grafana", "redis", "model_mirror")


def _good_key() -> str:
    return "sk-" + secrets.token_urlsafe(30)


def _good_vars() -> dict:
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "llm_proxy_api_keys": [
            {"user": "alice", "key": _good_key()},
            {"user": "bob", "key_sha256": hashlib.sha256(_good_key().encode()).hexdigest()},
        ],
        "vllm_api_key": _good_key(),
        "grafana_admin_password": secrets.token_urlsafe(18),
        "redis_password": secrets.token_urlsafe(30),
        # Every stand-in host is a gpu, gateway and redis host at once: vLLM stays on
        # loopback, and the gateways are given their Redis (else their preflight
        # asks for one, rightly: 15 gateways).
        "vllm_host": "127.0.0.1",
        "llmhost_private_address": "10.0.0.9",
        "llm_proxy_redis_url": "redis://127.0.0.1:6379/0",
        # These plays are written to a temporary folder, not the bundle's playbooks/.
        "llm_proxy_source_dir": str(ROOT),
        # The default source (hub), pinned.
        "vllm_model_revision": "0123456789abcdef0123456789abcdef01234567",
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# host name -> (variables over the good ones, what the refusal must say)
CASES = {
    "key-placeholder": (
        {"llm_proxy_api_keys": [{"user": "alice", "key": "sk-change-me-alice-0000000000000000"}]},
        "llm_proxy_api_keys[0] (user alice).key is a placeholder",
    ),
    "key-short": (
        {"llm_proxy_api_keys": [{"user": "alice", "key": "sk-abcdefghijklmnop"}]},
        "llm_proxy_api_keys[0] (user alice).key has about 10 bits of randomness, fewer than 128",
    ),
    "key-not-random": (
        {"llm_proxy_api_keys": [{"user": "alice", "key": "sk-" + "ab" * 20}]},
        "llm_proxy_api_keys[0] (user alice).key has about 26 bits of randomness, fewer than 128",
    ),
    "key-of-words": (
        {
            "llm_proxy_api_keys": [
                {"user": "alice", "key": "sk-added-by-the-stack-scenario-0123456789"}
            ]
        },
        "llm_proxy_api_keys[0] (user alice).key has about 87 bits of randomness, fewer than 128",
    ),
    "hash-of-foo": (
        {"llm_proxy_api_keys": [{"user": "bob", "key_sha256": _sha("foo")}]},
        "llm_proxy_api_keys[0] (user bob).key_sha256 is the hash of an example key",
    ),
    "hash-of-bar": (
        {"llm_proxy_api_keys": [{"user": "ops", "key_sha256": _sha("bar"), "admin": True}]},
        "llm_proxy_api_keys[0] (user ops).key_sha256 is the hash of an example key",
    ),
    "hash-placeholder": (
        {
            "llm_proxy_api_keys": [
                {"user": "bob", "key_sha256": "change-me: from llm-proxy new-key"}
            ]
        },
        "llm_proxy_api_keys[0] (user bob).key_sha256 is a placeholder",
    ),
    "key-and-hash": (
        {"llm_proxy_api_keys": [{"user": "bob", "key": _good_key(), "key_sha256": _sha("x")}]},
        "parameters are mutually exclusive: key|key_sha256",
    ),
    "key-priority-fcfs": (
        {
            "llm_proxy_api_keys": [
                {"user": "alice", "key": _good_key()},
                {"user": "batchjob", "key": _good_key(), "priority": "batch"},
            ]
        },
        "llm_proxy_api_keys[1] (user batchjob) has priority batch, but vLLM serves its model "
        "qwen3-80b on",
    ),
    "vllm-key-placeholder": (
        {"vllm_api_key": "change-me-long-random-string"},
        "vllm_api_key is a placeholder",
    ),
    "vllm-key-short": ({"vllm_api_key": "k3y-Sh0rt"}, "vllm_api_key has about 59 bits"),
    "vllm-key-of-words": (
        {"vllm_api_key": "correct-horse-battery-staple-for-vllm"},
        "vllm_api_key has about 113 bits of randomness, fewer than 128",
    ),
    "vllm-device-choice": ({"vllm_device": "gpu"}, "vllm_device must be one of: cuda, cpu"),
    "vllm-mirror-without-url": (
        {"vllm_model_source": "mirror", "vllm_model_mirror_url": "mirror.internal/qwen3"},
        "vllm_model_source is mirror: set vllm_model_sync_src",
    ),
    "vllm-hub-branch": (
        {"vllm_model_revision": "main"},
        'vllm_model_revision is "main", not a commit: pin the commit of Qwen/Qwen3-Next-80B',
    ),
    "vllm-instance-hub-unset": (
        {
            "vllm_instances": [
                {"name": "coder", "served_model_name": "coder", "port": 8003, "model_revision": ""}
            ]
        },
        'vllm_instances (coder).model_revision is "", not a commit',
    ),
    "mirror-hub-branch": (
        {"model_mirror_models": [{"name": "coder", "hub_id": "acme/coder", "revision": "main"}]},
        'item 1 (coder): revision "main" is not a commit: pin the 40-hex commit of acme/coder',
    ),
    "mirror-src-and-hub": (
        {"model_mirror_models": [{"name": "coder", "src": "/tmp", "hub_id": "acme/coder"}]},
        "item 1 (coder): give src (a directory on the controller) or hub_id and revision",
    ),
    "mirror-bad-name": (
        {"model_mirror_models": [{"name": "../up", "src": "/tmp"}]},
        'model_mirror_models: item 1: name "../up" is not a directory name',
    ),
    "mirror-src-missing": (
        {"model_mirror_models": [{"name": "tiny", "src": "/nonexistent/tiny"}]},
        "model_mirror_models, tiny: /nonexistent/tiny is not a directory on the controller.",
    ),
    "grafana-default": ({"grafana_admin_password": "admin"}, "Grafana's default (admin)"),
    "redis-placeholder": (
        {"redis_password": "change-me-redis-password-long-random-string"},
        "redis_password is a placeholder",
    ),
    "redis-short": (
        {"redis_password": "k3y-Sh0rt"},
        "redis_password has about 59 bits of randomness, fewer than 128",
    ),
    "redis-repeated": (
        {"redis_password": "Password123" * 4},
        "redis_password has about 32 bits of randomness, fewer than 128",
    ),
    "grafana-placeholder": (
        {"grafana_admin_password": "change-me-grafana"},
        "grafana_admin_password is a placeholder",
    ),
    "grafana-short": ({"grafana_admin_password": "s3cret"}, "fewer than 12 characters"),
    "source-not-the-bundle": (
        {"llm_proxy_source_dir": "/tmp"},
        "llm_proxy_source_dir is /tmp, which holds no gateway sources",
    ),
    "wheel-missing": (
        {"llm_proxy_wheel_src": "/nonexistent/llmhost.whl"},
        "llm_proxy_wheel_src is /nonexistent/llmhost.whl, which is not a file on the controller",
    ),
    "grafana-source-choice": (
        {"grafana_install_source": "tarball"},
        "grafana_install_source must be one of: repository, deb, none",
    ),
}


# Good choices beside the good host's (host name -> variables over the good ones).
GOOD = {
    "vllm-hub-branch-unpinned": {
        "vllm_model_revision": "main",
        "vllm_model_revision_unpinned": True,
    },
}


def _preflights(inventory: Path, tmp_path: Path, *extra: str) -> dict[str, list[str]]:
    """Run each role's argument validation and preflight; failure messages per host."""
    failures: dict[str, list[str]] = {}
    for role in ROLES:
        play = tmp_path / f"{role}.yml"
        group = {"grafana": "monitoring", "redis": "redis", "model_mirror": "model_mirror"}
        group = group.get(role, "gpu")
        play.write_text(yaml.safe_dump([{"hosts": group, "gather_facts": False, "roles": [role]}]))
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
            ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
        )
        command = ["ansible-playbook", "-i", str(inventory), str(play)]
        run = subprocess.run(
            [*command, "--tags", f"{role}_preflight", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
            cwd=ROOT,
        )
        result = json.loads(run.stdout)
        for play_result in result["plays"]:
            for task in play_result["tasks"]:
                for host, outcome in task["hosts"].items():
                    if outcome.get("failed"):
                        failures.setdefault(host, []).append(str(outcome.get("msg")))
                        # A loop's failure: each failed item's own message.
                        failures[host] += [
                            str(r.get("msg")) for r in outcome.get("results", []) if r.get("failed")
                        ]
        assert result["stats"], run.stderr[-2000:]
    return failures


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, list[str]]:
    tmp_path = tmp_path_factory.mktemp("preflights")
    hosts = {"good": _good_vars(), **{n: {**_good_vars(), **o} for n, o in GOOD.items()}}
    for name, (override, _) in CASES.items():
        hosts[name] = {**_good_vars(), **override}
    inventory = tmp_path / "hosts.yml"
    everywhere = {"hosts": hosts}
    # The mirror's role only for its own cases and the good host: a play less over every host.
    mirror = {"hosts": {h: v for h, v in hosts.items() if h == "good" or h.startswith("mirror-")}}
    groups = {g: everywhere for g in ("gpu", "monitoring", "redis")} | {"model_mirror": mirror}
    inventory.write_text(yaml.safe_dump({"all": {"children": groups}}))
    return _preflights(inventory, tmp_path)


def test_good_secrets_pass(refusals):
    assert "good" not in refusals, refusals.get("good")


@pytest.mark.parametrize("case", sorted(GOOD))
def test_other_good_choices_pass(refusals, case):
    assert case not in refusals, refusals.get(case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_weak_or_wrong_input_is_refused_naming_it(refusals, case):
    expected = CASES[case][1]
    assert case in refusals, f"{case} passed the preflight"
    assert any(expected in message for message in refusals[case]), refusals[case]


def test_no_refusal_shows_the_secret(refusals):
    for case, messages in refusals.items():
        for secret in (
            "sk-change-me-alice",
            "abababab",
            "k3y-Sh0rt",
            "change-me-grafana",
            "stack-scenario",
            "horse-battery",
            "Password123",
        ):
            assert secret not in " ".join(messages), case


def test_the_example_inventory_as_shipped_is_refused(tmp_path):
    refusals = _preflights(
        ROOT / "inventories" / "example",
        tmp_path,
        "-e",
        f"ansible_connection=local ansible_python_interpreter={sys.executable}"
        f" llmhost_private_address=10.0.0.9 llm_proxy_source_dir={ROOT}",
    )
    gateway = " ".join(refusals["gpu01.example.internal"])
    for user in ("alice", "bob", "check"):
        assert f"(user {user})" in gateway, gateway
    assert "vllm_api_key is a placeholder" in gateway
    redis = " ".join(refusals["redis01.example.internal"])
    assert "redis_password is a placeholder" in redis, redis
    monitoring = " ".join(refusals["mon01.example.internal"])
    assert "grafana_admin_password is a placeholder" in monitoring
    assert 'revision "<40-hex commit of the model on the hub>" is not a commit' in monitoring


def test_the_example_inventory_works_once_its_placeholders_are_replaced(tmp_path):
    inventory = tmp_path / "prod"
    shutil.copytree(ROOT / "inventories" / "example", inventory)
    vault = inventory / "group_vars" / "all" / "vault.yml"
    values = yaml.safe_load(vault.read_text())
    for name, value in values.items():
        if value:
            values[name] = secrets.token_urlsafe(30)
    vault.write_text(yaml.safe_dump(values))
    gateway = inventory / "group_vars" / "all" / "gateway.yml"
    settings = yaml.safe_load(gateway.read_text())
    for entry in settings["llm_proxy_api_keys"]:
        if "key_sha256" in entry:
            entry["key_sha256"] = _sha(_good_key())
    gateway.write_text(yaml.safe_dump(settings))
    mirror = inventory / "group_vars" / "model_mirror" / "model_mirror.yml"
    mirror.write_text(
        mirror.read_text().replace("<40-hex commit of the model on the hub>", "ab" * 20)
    )
    refusals = _preflights(
        inventory,
        tmp_path,
        "-e",
        f"ansible_connection=local ansible_python_interpreter={sys.executable}"
        f" llmhost_private_address=10.0.0.9 llm_proxy_source_dir={ROOT}",
    )
    assert refusals == {}
