"""Filters of the llm_proxy role."""

from __future__ import annotations

import hashlib
import re
from typing import Any

# A key must carry at least this many characters after its `sk-` prefix, with at
# least MIN_DISTINCT different ones (a random key of 32 characters has about 25
# from the alphanumerics and about 14 from hex digits; "sk-000..." has 1).
MIN_KEY_CHARS = 32
MIN_DISTINCT = 10
PLACEHOLDER = "change-me"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def weak_secret(value: str, name: str, min_chars: int = MIN_KEY_CHARS) -> list[str]:
    """Say why a secret is a placeholder or guessable (empty list: it is fine), naming it only."""
    value = str(value)
    if PLACEHOLDER in value.lower():
        return [f"{name} is a placeholder (it contains {PLACEHOLDER}): set a real one (vault)."]
    body = value.removeprefix("sk-")
    if len(body) < min_chars:
        return [f"{name} has {len(body)} characters, fewer than {min_chars} random ones."]
    if len(set(body)) < MIN_DISTINCT:
        return [f"{name} is not random ({len(set(body))} different characters)."]
    return []


def key_problems(keys: list[dict[str, Any]], refused_sha256: list[str]) -> list[str]:
    """Say which API keys are placeholders, weak, or keys published as examples (never the key)."""
    refused = {h.lower() for h in refused_sha256}
    problems = []
    for index, entry in enumerate(keys):
        name = f"llm_proxy_api_keys[{index}] (user {entry.get('user', '?')})"
        if "key" in entry:
            key = str(entry["key"])
            found = weak_secret(key, f"{name}.key")
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


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "llm_proxy_keys_file": hash_api_keys,
            "llm_proxy_key_problems": key_problems,
            "llm_proxy_weak_secret": weak_secret,
        }
