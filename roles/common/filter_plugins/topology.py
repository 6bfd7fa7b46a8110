"""The cluster's shape, derived once from the inventory: which hosts are the gateways and which
of them run a standby, which vLLM instances each gpu host runs and where they listen, which
backends the gateways route each model to. The llm_proxy, vllm, nginx and prometheus roles and
playbooks/rolling-update.yml read it here and keep no rule of their own (docs/scaling.md,
"Scaling out", says the rules in words):

- the gateway hosts are the ``gateway`` group, or the gpu hosts when it is absent or empty
  (a one-host inventory);
- a gpu host's vLLM listens on 127.0.0.1 when that host is the only gateway host, else on the
  host's private address: ``llmhost_private_address``, else its default IPv4 address from
  facts (the roles' preflights gather them), else its inventory name; ``vllm_host`` set on the
  host wins;
- a host's instances are its flat ``vllm_*`` variables' one (``vllm.service``), then each of
  ``vllm_instances`` (``vllm-<name>.service``); an instance over several hosts (``nodes``) is
  served, and is a backend, on its first node only;
- a gateway runs a standby where the gateways keep their limits in Redis (a ``redis`` host in
  the inventory, or ``llm_proxy_redis_url``) and ``llm_proxy_standby_port`` is not 0.

A host's variables come from ``hostvars``, which hold what the inventory sets and never the
roles' defaults: the defaults this shape needs are ``DEFAULTS`` below
(tests/roles/test_topology.py checks that they are the roles' own).

Filters::

    {{ hostvars | llmhost_topology(groups) }}            the whole shape (a dict, below)
    {{ hostvars | llmhost_instances(inventory_hostname) }}  one host's instances, gpu or not
    {{ port | llmhost_standby(redis_url, groups) }}       does a gateway with these run a standby
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# The roles' defaults for the variables read from other hosts' hostvars.
DEFAULTS: dict[str, Any] = {
    "vllm_port": 8002,
    "vllm_served_model_name": "qwen3-80b",
    "vllm_instances": [],
    "vllm_nodes": [],
    "vllm_max_num_seqs": 256,
    "vllm_scheduling_policy": "fcfs",
    "llm_proxy_host": "127.0.0.1",
    "llm_proxy_port": 8001,
    "llm_proxy_standby_port": 8011,
    "llm_proxy_redis_url": "",
}
LOOPBACK = "127.0.0.1"


def _var(hv: Mapping, name: str) -> Any:
    return hv[name] if name in hv else DEFAULTS[name]


def instance_name(served_model_name: str) -> str:
    """The flat instance's name when vllm_instance_name is not set: its served model name,
    with what a unit name cannot hold replaced."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", served_model_name)


def private_address(hostvars: Mapping, host: str) -> str:
    """The address other hosts reach this one at: llmhost_private_address, else its default
    IPv4 address (facts), else its inventory name (a host with no default route)."""
    hv = hostvars[host]
    if "llmhost_private_address" in hv:
        return str(hv["llmhost_private_address"])
    ipv4 = hv.get("ansible_default_ipv4")
    if isinstance(ipv4, Mapping) and "address" in ipv4:
        return str(ipv4["address"])
    return host


def standby(port: Any, redis_url: str, groups: Mapping) -> bool:
    """Does a gateway with this standby port and Redis URL run a standby gateway?"""
    return int(port) > 0 and (len(redis_url) > 0 or len(groups.get("redis") or []) > 0)


def instances(hostvars: Mapping, host: str) -> list[dict[str, Any]]:
    """The host's vLLM instances: the flat variables' one first, then vllm_instances. Each
    with its name, served model name, port, nodes, unit, whether it is served here (an
    instance over several hosts is served by its first node) and its backend's name."""
    hv = hostvars[host]
    served = _var(hv, "vllm_served_model_name")
    flat = {
        "name": hv["vllm_instance_name"] if "vllm_instance_name" in hv else instance_name(served),
        "served_model_name": served,
        "port": _var(hv, "vllm_port"),
        "nodes": _var(hv, "vllm_nodes"),
        "max_num_seqs": _var(hv, "vllm_max_num_seqs"),
        "scheduling_policy": _var(hv, "vllm_scheduling_policy"),
    }
    out = []
    for k, i in enumerate([flat, *_var(hv, "vllm_instances")]):
        nodes = list(i.get("nodes") or [])
        out.append(
            {
                "name": i["name"],
                "served_model_name": i.get("served_model_name", served),
                "port": int(i.get("port", flat["port"])),
                "nodes": nodes,
                "multinode": len(nodes) > 1,
                "flat": k == 0,
                "unit": "vllm.service" if k == 0 else f"vllm-{i['name']}.service",
                "served_here": nodes[:1] in ([], [host]),
                "backend": f"{nodes[0] if nodes else host}/{i['name']}",
                "max_num_seqs": int(i.get("max_num_seqs") or flat["max_num_seqs"]),
                "scheduling_policy": i.get("scheduling_policy") or flat["scheduling_policy"],
            }
        )
    return out


def topology(
    hostvars: Mapping,
    groups: Mapping,
    gpu_group: str = "gpu",
    gateway_group: str = "gateway",
) -> dict[str, Any]:
    """The shape:

    - ``gateways``: the gateway hosts; ``standbys``: those that run a standby;
    - ``admin``: each gateway process's address (host, listen address, port), the
      standby's too, for what talks to their admin API on the gateway host;
    - ``vllm``: per gpu host, its vLLM listen ``address`` and its ``instances``;
    - ``backends``: each instance served on a gpu host, as the gateways route to it
      (``model``; ``backend``: ``name`` host/instance, ``host``, ``port``, and
      ``max_in_flight``, its max_num_seqs: requests each gateway sends it at once; and its
      vLLM's ``scheduling_policy``), in inventory order; ``models``: each model with its
      backends.
    """
    gpu = list(groups.get(gpu_group) or [])
    gateways = gateway_hosts(groups, gpu_group, gateway_group)
    standbys, admin = [], []
    for g in gateways:
        hv = hostvars[g]
        address, port = _var(hv, "llm_proxy_host"), int(_var(hv, "llm_proxy_port"))
        admin.append({"host": g, "address": address, "port": port})
        standby_port = _var(hv, "llm_proxy_standby_port")
        if standby(standby_port, _var(hv, "llm_proxy_redis_url"), groups):
            standbys.append(g)
            admin.append({"host": g, "address": address, "port": int(standby_port)})
    vllm, backends = {}, []
    for h in gpu:
        hv = hostvars[h]
        if "vllm_host" in hv:
            address = str(hv["vllm_host"])
        else:
            address = LOOPBACK if gateways == [h] else private_address(hostvars, h)
        vllm[h] = {"address": address, "instances": instances(hostvars, h)}
        for i in vllm[h]["instances"]:
            if i["served_here"]:
                backend = {
                    "name": f"{h}/{i['name']}",
                    "host": address,
                    "port": i["port"],
                    "max_in_flight": i["max_num_seqs"],
                }
                backends.append(
                    {
                        "model": i["served_model_name"],
                        "backend": backend,
                        "scheduling_policy": i["scheduling_policy"],
                    }
                )
    models = []
    for name in dict.fromkeys(b["model"] for b in backends):
        models.append(
            {"name": name, "backends": [b["backend"] for b in backends if b["model"] == name]}
        )
    return {
        "gateways": gateways,
        "standbys": standbys,
        "admin": admin,
        "vllm": vllm,
        "backends": backends,
        "models": models,
    }


def gateway_hosts(groups: Mapping, gpu_group: str = "gpu", gateway_group: str = "gateway") -> list:
    """The gateway group's hosts, or the gpu hosts where it is absent or empty."""
    return list(groups.get(gateway_group) or []) or list(groups.get(gpu_group) or [])


def listen_address(hostvars: Mapping, groups: Mapping, host: str) -> str:
    """Where a host's vLLM listens by the rule (``vllm_host`` aside): loopback on a host that
    is not a gpu host or is the only gateway host, else its private address."""
    if host not in (groups.get("gpu") or []) or gateway_hosts(groups) == [host]:
        return LOOPBACK
    return private_address(hostvars, host)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "llmhost_topology": topology,
            "llmhost_instances": instances,
            "llmhost_standby": standby,
            "llmhost_vllm_listen_address": listen_address,
            "llmhost_instance_name": instance_name,
            "llmhost_gateway_hosts": gateway_hosts,
        }
