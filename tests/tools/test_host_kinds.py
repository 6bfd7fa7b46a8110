"""Which hosts `make check` checks for what (tests/hosts/hostcheck.py's hosts_running), on
the bundle's three layouts: one host, the local cluster, and the example inventory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hostcheck", ROOT / "tests/hosts/hostcheck.py")
assert _spec is not None and _spec.loader is not None
hostcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostcheck)


def _runs(inventory: str) -> dict[str, set[str]]:
    os.environ.setdefault("LLMHOST_CACHE_DIR", str(ROOT / ".cache"))
    return hostcheck.hosts_running(hostcheck.inventory_groups(str(ROOT / inventory)))


def test_one_host_runs_everything_but_redis():
    runs = _runs("inventories/local")
    host = {"llmhost-demo"}
    assert runs == {
        "vllm": host,
        "gateway": host,
        "redis": set(),
        "monitoring": host,
        "model_mirror": set(),
        "all": host,
    }


def test_the_local_cluster_checks_gateways_apart_from_gpu_hosts():
    runs = _runs("inventories/local-cluster")
    gpu = {"llmhost-demo-gpu1", "llmhost-demo-gpu2"}
    assert runs["vllm"] == gpu
    assert runs["gateway"] == {"llmhost-demo-gw1", "llmhost-demo-gw2"}
    assert runs["redis"] == runs["monitoring"] == runs["model_mirror"] == {"llmhost-demo-redis"}
    assert runs["all"] == gpu | runs["gateway"] | runs["redis"]


def test_the_example_inventory():
    runs = _runs("inventories/example")
    assert runs["vllm"] == {"gpu01.example.internal", "gpu02.example.internal"}
    assert runs["gateway"] == {"gw01.example.internal", "gw02.example.internal"}
    assert runs["redis"] == {"redis01.example.internal"}
    assert runs["monitoring"] == {"mon01.example.internal"}
    assert runs["model_mirror"] == {"mon01.example.internal"}
    assert len(runs["all"]) == 6
