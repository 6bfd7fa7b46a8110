"""The stack scenario's test order.

VLLMDown must stay pending for a minute before it fires. Tests that run plays on the probe
host only, needing nothing of llmhost-stack (test_cuda_unit.py, test_offline_paths.py), run
in that minute: between test_monitoring.py's test that stops vLLM and the one that reads the
alert.
"""

from __future__ import annotations

import pytest

STOPS_VLLM = "test_stopping_vllm_makes_its_alert_pending"
READS_THE_ALERT = (
    "test_its_alert_fires_after_a_minute_pending_then_llmhost_target_restarts_the_stack"
)
WHILE_VLLM_IS_DOWN = {"test_cuda_unit", "test_offline_paths"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    stops = [i for i in items if getattr(i, "originalname", "") == STOPS_VLLM]
    if not stops:
        return
    reads = [i for i in items if getattr(i, "originalname", "") == READS_THE_ALERT]
    beside = [i for i in items if i.module.__name__ in WHILE_VLLM_IS_DOWN]
    rest = [i for i in items if i not in reads and i not in beside]
    after = rest.index(stops[-1]) + 1
    items[:] = rest[:after] + beside + reads + rest[after:]
