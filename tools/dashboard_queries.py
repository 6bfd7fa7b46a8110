"""Every PromQL expression of the llmhost Grafana dashboards, and a check that each returns data.

    python tools/dashboard_queries.py                       list the queries of both dashboards
    python tools/dashboard_queries.py --prometheus URL      evaluate each; exit 1 if any is empty
        [--var instance=gpu1 --var model=tiny] [--rate-interval 1m] [--allow-nan] [FILE ...]

Template variables are substituted as Grafana does for a Prometheus data source: a value given
with --var (or ``variables``) is matched exactly (regex-escaped, several values joined as
``(a|b)``); a variable left out takes its "All" value (``allValue``, ``.*`` in these
dashboards). ``$__rate_interval`` becomes ``--rate-interval`` (1m: at least four scrapes at a
15 s interval, and short enough that a test's traffic fills it). The dashboards' query
variables (``label_values(metric, label)``) are checked too, as ``count by (label) (metric)``,
so that the host and model selectors are known to have options.

"Returns data" means at least one series with a value other than 0; less is empty. A panel
that reads a flat zero looks the same as one whose metric was renamed behind an
``or vector(0)``, a counter that is exported but never moves, or a target that is down
(``up`` is 0): none of those counts. Only the panels in ``ZERO_BY_NATURE`` may answer 0,
each for the reason given there; they still need a series, so a metric that disappears fails
them too. The check reads one instant, after the traffic, when in-flight gauges are 0.

Only the standard library is used, so the check runs wherever Python does.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

DASHBOARDS = Path(__file__).resolve().parent.parent / "roles/grafana/files/dashboards"

VariableValue = str | Sequence[str]

# $name, ${name}, ${name:format}, [[name]], [[name:format]]
_VARIABLE = re.compile(
    r"\$(?P<plain>\w+)|\$\{(?P<braced>\w+)(?::(?P<fmt1>\w+))?\}|\[\[(?P<old>\w+)(?::(?P<fmt2>\w+))?\]\]"
)
# Characters Grafana escapes in a Prometheus regex value. The backslash is doubled because the
# value lands inside a PromQL double-quoted string, where "\\." reaches the regex as "\.".
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$"
)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.S)


# Panels whose correct value right after a test's traffic (or on a quiet, healthy host) is 0,
# by panel title, with the reason. Anything else must show a non-zero value to count as data.
# The gateway's "Active requests" panels are not here: the scrape that reads the gauge is
# itself in flight, so it is at least 1 on a gateway that counts its requests.
ZERO_BY_NATURE: dict[str, str] = {
    "5xx share": "a healthy stack answers no 5xx; its denominator still needs http_requests_total",
    "Preemptions/s": "vLLM preempts only when its KV cache runs out",
    "Requests waiting": "vLLM queues only past max_num_seqs, which the gateway's limits stay under",
    "Requests running": "requests in flight: 0 once the traffic has ended",
    "Requests running and waiting": "requests in flight and queued: 0 once the traffic has ended",
    "vLLM requests running and waiting": "requests in flight and queued: 0 once the traffic ends",
    "KV cache usage now": "vLLM frees a request's KV blocks when it ends",
    "KV cache usage": "vLLM frees a request's KV blocks when it ends",
    "In flight by backend": "requests in flight to each backend: 0 once the traffic has ended",
    "Requests waiting in the gateway's queue": "requests wait only while every place of their "
    "model (max_num_seqs per backend) or every slot of their key's concurrency is taken: 0 "
    "once the traffic has ended",
    "Requests that waited in the queue/s": "requests wait only while every place of their "
    "model (max_num_seqs per backend) or every slot of their key's concurrency is taken",
}


class Query(NamedTuple):
    """One PromQL expression and the panel (or template variable) it comes from."""

    panel: str
    expr: str


@dataclass(frozen=True, slots=True)
class Result:
    """What Prometheus answered for one query."""

    query: Query
    series: int = 0
    finite: int = 0
    nan: int = 0
    error: str | None = None
    nonzero: int = 0

    def has_data(self, allow_nan: bool = False) -> bool:
        """True when a series has a non-zero number (any number for a panel in
        ZERO_BY_NATURE; NaN too, if allowed)."""
        if self.error is not None:
            return False
        if self.nonzero > 0:
            return True
        if self.finite > 0 and self.query.panel in ZERO_BY_NATURE:
            return True
        return allow_nan and self.nan > 0


def load(path: str | Path) -> dict[str, Any]:
    """The dashboard model of a JSON file (the file-provisioning form, or the API's wrapper)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data.get("dashboard", data) if isinstance(data, dict) else data


def _regex_escape(value: str) -> str:
    value = value.replace("\\", "\\\\\\\\")
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value)


def _format(value: VariableValue) -> str:
    if isinstance(value, str):
        return _regex_escape(value)
    values = [_regex_escape(v) for v in value]
    return values[0] if len(values) == 1 else "(" + "|".join(values) + ")"


def builtins(
    rate_interval: str = "1m", interval: str = "15s", range_: str = "1h"
) -> dict[str, str]:
    """Grafana's global variables that panel queries may use, with fixed values."""
    return {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
    }


def resolved_variables(
    dashboard: Mapping[str, Any], variables: Mapping[str, VariableValue] | None = None
) -> dict[str, str]:
    """Every template variable's text as it lands in a query: given values, else "All"."""
    given = dict(variables or {})
    out: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in given:
            out[name] = _format(given.pop(name))
        elif var.get("type") == "datasource":
            continue  # names a data source, never part of an expression
        elif var.get("includeAll") and var.get("allValue"):
            out[name] = var["allValue"]
        else:
            raise ValueError(f"variable {name!r} has no All value: give it a value")
    if given:
        raise ValueError(f"the dashboard has no variable {', '.join(sorted(given))}")
    return out


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variable references by ``values``; an unknown name is an error."""

    def replace(m: re.Match[str]) -> str:
        name = m.group("plain") or m.group("braced") or m.group("old")
        if name.isdigit():
            return m.group(0)  # $1 in label_replace, not a variable
        if name not in values:
            raise ValueError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        # A collapsed row holds its panels inside it.
        yield from _panels(panel.get("panels", []))


def _variable_expr(var: Mapping[str, Any]) -> str | None:
    query = var.get("query")
    if isinstance(query, Mapping):
        query = query.get("query")
    if not isinstance(query, str) or not query.strip():
        return None
    m = _LABEL_VALUES.match(query)
    if m:
        label = m.group("label")
        metric = m.group("metric")
        if metric is None:
            return f'count by ({label}) ({{{label}=~".+"}})'
        return f"count by ({label}) ({metric})"
    m = _QUERY_RESULT.match(query)
    if m:
        return m.group("expr")
    raise ValueError(f"variable {var['name']!r}: cannot check the query {query!r}")


def queries(
    dashboard_path: str | Path,
    variables: Mapping[str, VariableValue] | None = None,
    *,
    rate_interval: str = "1m",
    include_variables: bool = False,
) -> list[Query]:
    """(panel title, PromQL) of every visible panel target, variables substituted.

    ``variables`` maps a template variable to a label value or a list of them; one left out
    takes its All value. With ``include_variables``, the query variables come first, as
    ``Query("variable <name>", "count by (label) (metric)")``.
    """
    dashboard = load(dashboard_path)
    values = {**builtins(rate_interval), **resolved_variables(dashboard, variables)}
    found: list[Query] = []
    if include_variables:
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            expr = _variable_expr(var)
            if expr is not None:
                found.append(Query(f"variable {var['name']}", substitute(expr, values)))
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            found.append(Query(panel.get("title", ""), substitute(expr, values)))
    return found


def evaluate(prometheus_url: str, query: Query, timeout: float = 10.0) -> Result:
    """Run one instant query through Prometheus' /api/v1/query."""
    url = prometheus_url.rstrip("/") + "/api/v1/query"
    body = urllib.parse.urlencode({"query": query.expr}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        # Prometheus answers a bad query with 400 and a JSON error.
        try:
            answer = json.load(e)
        except ValueError:
            return Result(query, error=f"HTTP {e.code}")
    except (urllib.error.URLError, TimeoutError, ValueError) as e:
        return Result(query, error=str(e))
    return result_of(query, answer)


def result_of(query: Query, answer: Mapping[str, Any]) -> Result:
    """Summarise Prometheus' JSON answer to one query (each series' latest value)."""
    if answer.get("status") != "success":
        return Result(query, error=f"{answer.get('errorType')}: {answer.get('error')}")
    data = answer["data"]
    if data["resultType"] == "scalar":
        samples = [data["result"][1]]
    elif data["resultType"] == "vector":
        samples = [s["value"][1] for s in data["result"]]
    elif data["resultType"] == "matrix":
        samples = [s["values"][-1][1] for s in data["result"] if s["values"]]
    else:
        samples = []
    values = [float(v) for v in samples]
    nan = sum(1 for v in values if math.isnan(v))
    nonzero = sum(1 for v in values if not math.isnan(v) and v != 0)
    return Result(query, series=len(values), finite=len(values) - nan, nan=nan, nonzero=nonzero)


def _parse_vars(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--var {item!r}: expected NAME=VALUE")
        out.setdefault(name, []).append(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: list the queries, or evaluate them and fail on any without data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dashboards",
        nargs="*",
        type=Path,
        help=f"dashboard JSON files (default: every *.json in {DASHBOARDS})",
    )
    parser.add_argument("--prometheus", metavar="URL", help="evaluate each query there")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template variable's value; repeat for several values",
    )
    parser.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    parser.add_argument(
        "--allow-nan",
        action="store_true",
        help="count a query whose series are all NaN as data (a quantile of "
        "a histogram with no requests in the window)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per query")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    paths = args.dashboards or sorted(DASHBOARDS.glob("*.json"))
    variables = _parse_vars(args.var)
    failed = 0
    report: list[dict[str, Any]] = []
    for path in paths:
        dashboard = load(path)
        known = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        # A --var meant for another dashboard (e.g. model) is not an error here.
        mine = {k: v for k, v in variables.items() if k in known}
        found = queries(path, mine, rate_interval=args.rate_interval, include_variables=True)
        if not args.prometheus:
            for q in found:
                print(f"{path.name}\t{q.panel}\t{q.expr}")
            continue
        for q in found:
            result = evaluate(args.prometheus, q, args.timeout)
            ok = result.has_data(args.allow_nan)
            failed += not ok
            if result.error is not None:
                status = f"ERROR {result.error}"
            elif ok:
                status = f"ok ({result.finite} series" + (
                    f", {result.nan} NaN)" if result.nan else ")"
                )
            elif result.finite:
                status = f"ZERO ({result.finite} series, all 0; not in ZERO_BY_NATURE)"
            elif result.nan:
                status = f"NO DATA ({result.nan} series, all NaN)"
            else:
                status = "NO DATA"
            report.append(
                {
                    "dashboard": path.name,
                    "panel": q.panel,
                    "expr": q.expr,
                    "ok": ok,
                    "series": result.series,
                    "nonzero": result.nonzero,
                    "nan": result.nan,
                    "error": result.error,
                }
            )
            if not args.json:
                print(f"{'PASS' if ok else 'FAIL'}  {path.name}  {q.panel}: {status}")
                if not ok:
                    print(f"      {q.expr}")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.prometheus:
        total = len(report)
        print(f"{total - failed} of {total} queries returned data")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
