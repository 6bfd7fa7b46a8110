"""Filters of the llm_proxy role."""

from __future__ import annotations

import hashlib
from typing import Any


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


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"llm_proxy_keys_file": hash_api_keys}
