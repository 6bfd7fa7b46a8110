"""What counts as a dashboard panel "returning data" (tools/dashboard_queries.py).

The stack scenario evaluates every panel against the real Prometheus with this rule; here
the rule itself is checked on Prometheus answers written out by hand, so no server is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import dashboard_queries  # noqa: E402 - a tool of the repository, not a package
from dashboard_queries import ZERO_BY_NATURE, Query, result_of  # noqa: E402

DASHBOARDS = sorted((ROOT / "roles/grafana/files/dashboards").glob("*.json"))


def _vector(*values: str) -> dict:
    """Prometheus' answer to an instant query: one series per value."""
    series = [
        {"metric": {"instance": f"h{i}"}, "value": [1700000000, v]} for i, v in enumerate(values)
    ]
    return {"status": "success", "data": {"resultType": "vector", "result": series}}


def _has_data(panel: str, answer: dict, allow_nan: bool = False) -> bool:
    return result_of(Query(panel, "expr"), answer).has_data(allow_nan)


def test_a_panel_whose_every_series_reads_zero_has_no_data():
    # A renamed counter behind `or vector(0)`, or one that is exported but never moves.
    assert not _has_data("API requests/s", _vector("0"))
    assert not _has_data("Requests/s by status", _vector("0", "0", "-0"))


def test_a_target_that_is_down_is_not_data():
    # min(up) is 0 when the target is down: a number, but not the panel working.
    assert not _has_data("Gateway up", _vector("0"))


def test_one_non_zero_series_is_data():
    assert _has_data("Requests/s by status", _vector("0", "0.25"))
    assert _has_data("Gateway up", _vector("1"))


def test_a_scalar_and_a_matrix_follow_the_same_rule():
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1, "0"]}}
    assert not _has_data("API requests/s", scalar)
    matrix = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            # The latest value is what the panel shows now.
            "result": [{"metric": {}, "values": [[1, "3"], [2, "0"]]}],
        },
    }
    assert not _has_data("API requests/s", matrix)


def test_a_panel_zero_by_nature_may_read_zero_but_still_needs_a_series():
    assert _has_data("5xx share", _vector("0"))
    assert not _has_data("5xx share", _vector())


def test_no_series_at_all_is_no_data():
    assert not _has_data("API requests/s", _vector())


def test_nan_counts_only_when_allowed():
    # A latency quantile with no request in its window.
    answer = _vector("NaN")
    assert not _has_data("Latency (p50, p95, p99)", answer)
    assert _has_data("Latency (p50, p95, p99)", answer, allow_nan=True)


def test_an_error_answer_is_never_data():
    answer = {"status": "error", "errorType": "bad_data", "error": "parse error"}
    result = result_of(Query("5xx share", "expr"), answer)
    assert not result.has_data(allow_nan=True)
    assert result.error == "bad_data: parse error"


@pytest.mark.parametrize("panel", sorted(ZERO_BY_NATURE))
def test_every_zero_allowance_names_a_dashboard_panel(panel):
    # A renamed panel would otherwise leave a stale allowance behind, and a new panel
    # with the old title would inherit it unseen.
    titles = {q.panel for path in DASHBOARDS for q in dashboard_queries.queries(path)}
    assert panel in titles, f"{panel!r} is in ZERO_BY_NATURE but on no dashboard"
    assert ZERO_BY_NATURE[panel].strip(), "say why the panel reads 0"
