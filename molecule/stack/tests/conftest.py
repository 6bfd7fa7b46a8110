"""The stack scenario's verify: the no-change re-run of site.yml comes first.

It is the scenario's idempotence check (its Molecule sequence has no idempotence step: the
two ran the same no-change converge), so it runs on the hosts exactly as the converge left
them, before any test changes or restarts anything.
"""

from __future__ import annotations

import pytest

FIRST = "test_rerun.py::"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: FIRST not in item.nodeid)  # stable: the rest keep their order
