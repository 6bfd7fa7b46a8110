"""The gateway role's preflight rule for key priorities (roles/llm_proxy/filter_plugins):
a key with a priority in front of a model whose vLLM runs the fcfs policy is refused, since
vLLM would take the priority and ignore it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "llm_proxy_filters", ROOT / "roles/llm_proxy/filter_plugins/llm_proxy.py"
)
assert _spec is not None and _spec.loader is not None
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)


def _backend(model: str, name: str, policy: str) -> dict:
    return {"model": model, "backend": {"name": name}, "scheduling_policy": policy}


BACKENDS = [
    _backend("chat", "gpu1/chat", "priority"),
    _backend("chat", "gpu2/chat", "priority"),
    _backend("coder", "gpu1/coder", "fcfs"),
]


def test_keys_without_a_priority_or_with_vllms_default_need_no_policy() -> None:
    keys = [{"user": "a"}, {"user": "b", "priority": "interactive"}, {"user": "c", "priority": 0}]
    assert filters.priority_problems(keys, BACKENDS) == []


def test_a_priority_in_front_of_an_fcfs_model_is_refused_naming_key_model_and_backend() -> None:
    keys = [{"user": "a"}, {"user": "batchjob", "priority": "batch"}]
    (problem,) = filters.priority_problems(keys, BACKENDS)
    assert problem.startswith("llm_proxy_api_keys[1] (user batchjob) has priority batch")
    assert "model coder on gpu1/coder" in problem and "fcfs" in problem
    assert "vllm_scheduling_policy: priority" in problem


def test_a_key_limited_to_priority_models_passes() -> None:
    keys = [{"user": "batchjob", "priority": 5, "models": ["chat"]}]
    assert filters.priority_problems(keys, BACKENDS) == []
    keys = [{"user": "batchjob", "priority": 5, "models": ["chat", "coder"]}]
    assert len(filters.priority_problems(keys, BACKENDS)) == 1
