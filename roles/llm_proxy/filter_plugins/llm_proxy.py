"""Filters of the llm_proxy role."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PLACEHOLDER = "change-me"


def _load_secret_rule() -> Any:
    """The bundle's one secret rule, kept by the common role (roles/common/filter_plugins)."""
    path = Path(__file__).resolve().parents[2] / "common" / "filter_plugins" / "secret_rule.py"
    spec = importlib.util.spec_from_file_location("llmhost_secret_rule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


secret_problems = _load_secret_rule().secret_problems


def hash_api_keys(keys: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Turn inventory key entries into the gateway's keys file, hashing plaintext keys.

    The host then never holds a plaintext key: `key` becomes `key_sha256`.
    Entries are otherwise passed through; the gateway validates them.
    """
    out = []
    for entry in keys:
        entry = dict(entry)
        if "key" in entry:
            plaintext = entry.pop("key")
            entry["key_sha256"] = hashlib.sha256(str(plaintext).encode()).hexdigest()
        out.append(entry)
    return {"keys": out}


def key_problems(keys: list[dict[str, Any]], refused_sha256: list[str]) -> list[str]:
    """Say which API keys are placeholders, weak, or keys published as examples (never the key)."""
    refused = {h.lower() for h in refused_sha256}
    problems = []
    for index, entry in enumerate(keys):
        name = f"llm_proxy_api_keys[{index}] (user {entry.get('user', '?')})"
        if "key" in entry:
            key = str(entry["key"])
            found = secret_problems(key, f"{name}.key")
            if not found and hashlib.sha256(key.encode()).hexdigest() in refused:
                found = [f"{name}.key is an example key published with llmhost: make a new one."]
            problems += found
        if "key_sha256" in entry:
            digest = str(entry["key_sha256"]).lower()
            if PLACEHOLDER in digest:
                problems.append(
                    f"{name}.key_sha256 is a placeholder (it contains {PLACEHOLDER}): "
                    "use the sha256 that `llm-proxy new-key` prints."
                )
            elif not _SHA256.match(digest):
                problems.append(f"{name}.key_sha256 is not a sha256 (64 hex digits).")
            elif digest in refused:
                problems.append(
                    f"{name}.key_sha256 is the hash of an example key published with llmhost: "
                    "make a new one with `llm-proxy new-key`."
                )
    return problems


# vLLM's priority of each class (proxy_app/keys.py's PRIORITIES): 0 is vLLM's default.
_DEFAULT_PRIORITIES = (None, "interactive", 0)


def priority_problems(keys: list[dict[str, Any]], backends: list[dict[str, Any]]) -> list[str]:
    """Say which keys have a priority that a vLLM serving one of their models would ignore:
    it runs the fcfs scheduling policy (the topology's backends carry each instance's)."""
    problems = []
    for index, entry in enumerate(keys):
        priority = entry.get("priority")
        if priority in _DEFAULT_PRIORITIES:
            continue
        allowed = entry.get("models")
        for b in backends:
            if b["scheduling_policy"] == "priority":
                continue
            if allowed is not None and b["model"] not in allowed:
                continue
            problems.append(
                f"llm_proxy_api_keys[{index}] (user {entry.get('user', '?')}) has priority "
                f"{priority}, but vLLM serves its model {b['model']} on {b['backend']['name']} "
                f"with the scheduling policy {b['scheduling_policy']}, which ignores "
                "priorities: set vllm_scheduling_policy: priority on that host (or "
                "scheduling_policy in its vllm_instances entry), or leave the key's priority out."
            )
            break
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "llm_proxy_keys_file": hash_api_keys,
            "llm_proxy_key_problems": key_problems,
            "llm_proxy_priority_problems": priority_problems,
        }
