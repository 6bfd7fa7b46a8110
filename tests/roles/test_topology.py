"""The cluster's shape (roles/common/filter_plugins/topology.py), derived once for the roles and
the rolling update, on the layouts the bundle supports: one host, the cluster, several
instances per host, an instance over several hosts, a gateway group or none.

The roles' rendered files did not change when they moved to it: their variables and
prometheus.yml were rendered for every host of inventories/local, local-cluster and example,
the stack and cluster scenarios' inventories and a layout with every variation, before and
after, and compared (the commit that made the plugin says how).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).parents[2] / "roles"
spec = importlib.util.spec_from_file_location(
    "topology", ROLES / "common/filter_plugins/topology.py"
)
assert spec is not None and spec.loader is not None
topology = importlib.util.module_from_spec(spec)
spec.loader.exec_module(topology)
shape = topology.topology


def facts(address: str) -> dict:
    return {"ansible_default_ipv4": {"address": address, "interface": "eth0"}}


def test_one_host_is_its_own_gateway_and_vllm_stays_on_loopback() -> None:
    groups = {"all": ["h"], "gpu": ["h"], "monitoring": ["h"]}
    s = shape({"h": facts("10.0.0.1")}, groups)
    assert s["gateways"] == ["h"] and s["standbys"] == []
    assert s["vllm"]["h"]["address"] == "127.0.0.1"
    # Its vLLM's max_num_seqs is what the gateway sends it at once (the roles' defaults).
    backend = {"name": "h/qwen3-80b", "host": "127.0.0.1", "port": 8002, "max_in_flight": 256}
    assert s["backends"] == [
        {"model": "qwen3-80b", "backend": backend, "scheduling_policy": "fcfs"}
    ]
    assert s["admin"] == [{"host": "h", "address": "127.0.0.1", "port": 8001}]
    assert topology.listen_address({"h": facts("10.0.0.1")}, groups, "h") == "127.0.0.1"


CLUSTER_GROUPS = {
    "gpu": ["gpu1", "gpu2"],
    "gateway": ["gw1", "gw2"],
    "redis": ["r"],
    "monitoring": ["r"],
}


def cluster_hostvars() -> dict:
    big = {
        "name": "big",
        "served_model_name": "big",
        "port": 8003,
        "nodes": ["gpu1", "gpu2"],
        "max_num_seqs": 4,
        "scheduling_policy": "priority",
    }
    gpu = {"vllm_served_model_name": "tiny", "vllm_instances": [big], "vllm_max_num_seqs": 16}
    return {
        "gpu1": gpu | facts("10.0.0.11"),
        "gpu2": gpu | facts("10.0.0.12"),
        "gw1": facts("10.0.0.21"),
        "gw2": facts("10.0.0.22") | {"llm_proxy_standby_port": 8111},
        "r": facts("10.0.0.31"),
    }


def test_the_cluster_routes_to_private_addresses_and_every_gateway_has_a_standby() -> None:
    s = shape(cluster_hostvars(), CLUSTER_GROUPS)
    assert s["gateways"] == ["gw1", "gw2"] and s["standbys"] == ["gw1", "gw2"]
    assert s["admin"] == [
        {"host": "gw1", "address": "127.0.0.1", "port": 8001},
        {"host": "gw1", "address": "127.0.0.1", "port": 8011},
        {"host": "gw2", "address": "127.0.0.1", "port": 8001},
        {"host": "gw2", "address": "127.0.0.1", "port": 8111},
    ]
    assert [(h, v["address"]) for h, v in s["vllm"].items()] == [
        ("gpu1", "10.0.0.11"),
        ("gpu2", "10.0.0.12"),
    ]
    # The instance over both hosts is one backend, its first node's.
    assert s["models"] == [
        {
            "name": "tiny",
            "backends": [
                {"name": "gpu1/tiny", "host": "10.0.0.11", "port": 8002, "max_in_flight": 16},
                {"name": "gpu2/tiny", "host": "10.0.0.12", "port": 8002, "max_in_flight": 16},
            ],
        },
        {
            "name": "big",
            "backends": [
                {"name": "gpu1/big", "host": "10.0.0.11", "port": 8003, "max_in_flight": 4}
            ],
        },
    ]
    assert [b["backend"]["name"] for b in s["backends"]] == ["gpu1/tiny", "gpu1/big", "gpu2/tiny"]
    # Each instance's own scheduling policy, else the host's (the roles' default: fcfs).
    assert [b["scheduling_policy"] for b in s["backends"]] == ["fcfs", "priority", "fcfs"]


def test_an_instance_over_several_hosts_is_served_by_its_first_node_and_named_after_it() -> None:
    hostvars = cluster_hostvars()
    on_gpu2 = topology.instances(hostvars, "gpu2")
    assert [(i["name"], i["served_here"], i["multinode"]) for i in on_gpu2] == [
        ("tiny", True, False),
        ("big", False, True),
    ]
    # The roll drains it as gpu1's backend whichever of its hosts restarts.
    assert [i["backend"] for i in on_gpu2] == ["gpu2/tiny", "gpu1/big"]
    assert [i["unit"] for i in on_gpu2] == ["vllm.service", "vllm-big.service"]


def test_several_instances_on_a_host_come_after_the_flat_one_in_order() -> None:
    hostvars = {
        "g": facts("10.0.0.1")
        | {
            "vllm_port": 9000,
            "vllm_instance_name": "main",
            "vllm_instances": [
                {"name": "small", "served_model_name": "small", "port": 8010},
                {"name": "embed", "served_model_name": "small-embed", "port": 8020},
            ],
        }
    }
    s = shape(hostvars, {"gpu": ["g"]})
    assert [(b["model"], b["backend"]["name"], b["backend"]["port"]) for b in s["backends"]] == [
        ("qwen3-80b", "g/main", 9000),
        ("small", "g/small", 8010),
        ("small-embed", "g/embed", 8020),
    ]
    assert [i["flat"] for i in s["vllm"]["g"]["instances"]] == [True, False, False]


def test_without_a_gateway_group_the_gpu_hosts_are_the_gateways_on_private_addresses() -> None:
    hostvars = {"a": facts("10.0.0.1"), "b": facts("10.0.0.2")}
    groups = {"gpu": ["a", "b"], "gateway": []}
    s = shape(hostvars, groups)
    assert s["gateways"] == ["a", "b"]
    assert [v["address"] for v in s["vllm"].values()] == ["10.0.0.1", "10.0.0.2"]
    assert topology.listen_address(hostvars, groups, "a") == "10.0.0.1"
    # A host that runs no vLLM (a gateway, the monitoring host) keeps loopback.
    assert topology.listen_address(hostvars | {"m": {}}, groups, "m") == "127.0.0.1"


@pytest.mark.parametrize(
    ("variables", "address"),
    [
        ({"vllm_host": "10.9.9.9"} | facts("10.0.0.1"), "10.9.9.9"),
        ({"llmhost_private_address": "10.1.1.1"} | facts("10.0.0.1"), "10.1.1.1"),
        (facts("10.0.0.1"), "10.0.0.1"),
        ({"ansible_default_ipv4": {}}, "a"),  # no default route: its inventory name
        ({}, "a"),
    ],
)
def test_a_gpu_hosts_address_by_precedence(variables: dict, address: str) -> None:
    s = shape({"a": variables, "b": facts("10.0.0.2")}, {"gpu": ["a", "b"]})
    assert s["vllm"]["a"]["address"] == address
    assert s["backends"][0]["backend"]["host"] == address


@pytest.mark.parametrize(
    ("port", "redis_url", "redis_hosts", "standby"),
    [
        (8011, "", ["r"], True),
        (8011, "redis://r:6379/0", [], True),
        (8011, "", [], False),  # limits in memory: a standby would count them apart
        (0, "redis://r:6379/0", ["r"], False),
        ("8011", "", ["r"], True),
    ],
)
def test_the_standby_rule(port, redis_url: str, redis_hosts: list, standby: bool) -> None:
    assert topology.standby(port, redis_url, {"redis": redis_hosts}) is standby


def test_other_group_names_are_followed() -> None:
    """The prometheus role names its groups (prometheus_serving_group, ..._gateway_group)."""
    hostvars = {"s": facts("10.0.0.1"), "e": facts("10.0.0.2")}
    s = shape(hostvars, {"serving": ["s"], "edge": ["e"]}, "serving", "edge")
    assert s["gateways"] == ["e"] and list(s["vllm"]) == ["s"]
    assert s["vllm"]["s"]["address"] == "10.0.0.1"


def test_an_instance_name_holds_only_what_a_unit_name_can() -> None:
    assert topology.instance_name("Qwen/Qwen3-80B:fp8 v2") == "Qwen-Qwen3-80B-fp8-v2"
    assert topology.instance_name("tiny_1-b") == "tiny_1-b"


def test_the_defaults_are_the_roles_own() -> None:
    defaults = {}
    for role in ("vllm", "llm_proxy"):
        defaults |= yaml.safe_load((ROLES / role / "defaults/main.yml").read_text())
    assert {k: defaults[k] for k in topology.DEFAULTS} == topology.DEFAULTS
