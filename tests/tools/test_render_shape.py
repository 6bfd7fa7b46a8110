"""tools/render_shape.py renders what the roles make of an inventory's shape, through Ansible
itself (the topology plugin reading real hostvars, the rolling update's variables evaluated
where the roll evaluates them); here on the demo cluster's inventory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("render_shape", REPO / "tools/render_shape.py")
assert spec is not None and spec.loader is not None
render_shape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_shape)


def test_the_demo_clusters_shape_as_the_roles_render_it(tmp_path: Path) -> None:
    assert render_shape.main([str(tmp_path), "inventories/local-cluster"]) == 0
    out = tmp_path / "local-cluster"

    def read(host: str, role: str) -> dict:
        return json.loads((out / f"llmhost-demo-{host}.{role}.json").read_text())

    # Hosts in inventory order: gpu1 10.9.0.1, gpu2 10.9.0.2, gw1, gw2, redis 10.9.0.5.
    models = read("gw1", "llm_proxy")["__llm_proxy_config"]["models"]
    # Each backend takes its vLLM's max_num_seqs from each gateway (the inventory's 16).
    gpu1, gpu2 = "10.9.0.1", "10.9.0.2"
    assert models == [
        {
            "name": "tiny",
            "backends": [
                {"name": "llmhost-demo-gpu1/tiny", "host": gpu1, "port": 8002, "max_in_flight": 16},
                {"name": "llmhost-demo-gpu2/tiny", "host": gpu2, "port": 8002, "max_in_flight": 16},
            ],
        },
        # Over both gpu hosts: served by its first node only.
        {
            "name": "other",
            "backends": [
                {"name": "llmhost-demo-gpu1/other", "host": gpu1, "port": 8003, "max_in_flight": 16}
            ],
        },
    ]
    assert read("gw2", "llm_proxy")["__llm_proxy_units"][-1] == "llm-proxy-standby.service"
    assert read("gpu2", "vllm")["vllm_host"] == "10.9.0.2"
    roll = read("gpu2", "roll")
    assert roll["__roll_gateways"] == ["llmhost-demo-gw1", "llmhost-demo-gw2"]
    assert [a["url"] for a in roll["__roll_admin"]] == [
        "http://127.0.0.1:8001/admin/backends",
        "http://127.0.0.1:8011/admin/backends",
    ] * 2
    assert roll["__roll_node_backends"] == ["llmhost-demo-gpu1/other"]
    targets = read("redis", "prometheus")["__prometheus_vllm_targets"]
    assert [t["address"] for t in targets] == ["10.9.0.1:8002", "10.9.0.1:8003", "10.9.0.2:8002"]
    assert read("gw1", "nginx")["__nginx_standby_upstream"] == "127.0.0.1:8011"
