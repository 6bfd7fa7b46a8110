"""The usage ledger: requests, errors and tokens per key x model x end user x day, reported
by ``llm-proxy usage`` and ``GET /admin/usage/report``.

Through gateways and the fake upstream (two models and a failing one: the point is the
gateway's accounting, which the fake's usage blocks check exactly), on one host (SQLite, across
a kill -9) and on two gateways sharing a real Redis; the day boundaries and the retention on
the stores themselves, at chosen times.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from proxy_harness import (
    ADMIN_KEY,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    checkout_env,
    metric_value,
    openai_error,
)

from proxy_app.keys import ApiKey
from proxy_app.ledger import Attribution, Row
from proxy_app.usage import RedisUsageStore, SqliteUsageStore, read_sqlite_ledger

TEAM_B_KEY = "sk-team-b-0123456789"
KEYS = [
    {"key": ADMIN_KEY, "user": "admin", "admin": True},
    {"key": USER_KEY, "user": "team-a"},
    {"key": TEAM_B_KEY, "user": "team-b"},
]
MODELS = ("fake", "fake-usage")


def _models(fake: Upstream) -> list[dict[str, Any]]:
    """The fake's two well-behaved models and one that fails, as three backends."""
    return [
        {"name": m, "backends": [{"name": f"b-{m}", "host": "127.0.0.1", "port": fake.port}]}
        for m in (*MODELS, "fake-500")
    ]


def _send(gw: Gateway, n: int, expected: Counter[tuple[str, ...]]) -> None:
    """Request ``n`` of the mix: both keys, both models, streamed and not, three end users
    (ann by the header, bob by the body's ``user``, carol by the header over a body's
    ``user``); add what each client was told it used to ``expected``."""
    for i in range(n):
        key, key_user = [(USER_KEY, "team-a"), (TEAM_B_KEY, "team-b")][i % 2]
        model = MODELS[(i // 2) % 2]
        stream = (i // 4) % 2 == 1
        body: dict[str, Any] = {"model": model, "prompt": "x", "max_tokens": 1 + i % 5}
        headers = {}
        end_user = ("ann", "bob", "carol")[i % 3]
        if end_user == "ann":
            headers["X-End-User"] = "ann"
        elif end_user == "bob":
            body["user"] = "bob"
        else:
            headers["X-End-User"] = "carol"
            body["user"] = "not-carol"
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        with gw.client(key) as c:
            r = c.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            usage = chunks[-1]["usage"]
        else:
            usage = r.json()["usage"]
        group = (key_user, model, end_user)
        expected[(*group, "requests")] += 1
        expected[(*group, "prompt_tokens")] += usage["prompt_tokens"]
        expected[(*group, "completion_tokens")] += usage["completion_tokens"]


def _expected_report(expected: Counter[tuple[str, ...]]) -> list[dict[str, Any]]:
    groups = sorted({k[:3] for k in expected})
    out = []
    for g in groups:
        p, c = expected[(*g, "prompt_tokens")], expected[(*g, "completion_tokens")]
        row = dict(zip(("key", "model", "user"), g, strict=True))
        row |= {"requests": expected[(*g, "requests")], "errors": expected[(*g, "errors")]}
        out.append(row | {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    return out


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """``llm-proxy usage`` on the gateway's config, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy_app", "usage", "--config", str(gw.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=checkout_env(),
        check=False,
    )


def _cli_json(gw: Gateway, by: str = "key,model,user") -> list[dict[str, Any]]:
    run = _cli(gw, "--format", "json", "--by", by)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["by"] == by.split(",")
    return report["data"]


def _fail_once(gw: Gateway, expected: Counter[tuple[str, ...]]) -> None:
    """A request that vLLM fails (500): in the ledger as a request and an error, no token."""
    with gw.client(TEAM_B_KEY) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "fake-500", "prompt": "x"},
            headers={"X-End-User": "ann"},
        )
    assert r.status_code == 500, r.text
    expected[("team-b", "fake-500", "ann", "requests")] += 1
    expected[("team-b", "fake-500", "ann", "errors")] += 1


def test_the_report_is_what_the_clients_were_told_across_a_kill_9(
    gateway_factory: GatewayFactory, fake: Upstream
) -> None:
    """24 requests of the mix and a failed one, the gateway killed with SIGKILL, 24 more:
    the report (CLI, JSON and CSV; the admin API) is exactly the sum of the usage blocks the
    clients received, per key, model and end user; bad end users are refused and count
    nowhere; the tokens metric has the key and the model."""
    gw = gateway_factory(fake, keys=KEYS, models=_models(fake))
    expected: Counter[tuple[str, ...]] = Counter()
    _send(gw, 24, expected)
    _fail_once(gw, expected)
    gw.kill9()
    gw.start()
    _send(gw, 24, expected)
    want = _expected_report(expected)
    assert len(want) == 2 * 2 * 3 + 1
    assert _cli_json(gw) == want

    # Bad end users: refused before anything is counted.
    with gw.client(USER_KEY) as c:
        for headers, body in (
            ({"X-End-User": b"caf\xe9"}, {}),  # Latin-1, not UTF-8
            ({"X-End-User": "x" * 257}, {}),
            ({}, {"user": "x" * 257}),
            ({}, {"user": 42}),
        ):
            r = c.post(
                "/v1/completions", json={"model": "fake", "prompt": "x", **body}, headers=headers
            )
            assert r.status_code == 400, r.text
            assert openai_error(r)["code"] == "invalid_end_user"
            assert ("X-End-User" in openai_error(r)["message"]) == bool(headers)
    assert _cli_json(gw) == want

    # The same through the admin API, as CSV: the columns named after the grouping.
    with gw.client(ADMIN_KEY) as c:
        r = c.get("/admin/usage/report", params={"by": "key,model,user", "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == [
        "key", "model", "user", "requests", "errors",
        "prompt_tokens", "completion_tokens", "total_tokens",
    ]  # fmt: skip
    assert [{k: (v if k in ("key", "model", "user") else int(v)) for k, v in row.items()}
            for row in rows] == want  # fmt: skip
    # Another grouping, and the table.
    by_key = _cli_json(gw, "key")
    assert [(r["key"], r["requests"]) for r in by_key] == [("team-a", 24), ("team-b", 25)]
    table = _cli(gw, "--by", "model,day")
    assert table.returncode == 0, table.stderr
    head, *lines = table.stdout.splitlines()
    assert head.split() == [
        "model", "day", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines] == ["fake", "fake-500", "fake-usage"]  # one day
    text = gw.metrics()
    for model in MODELS:
        labels = {"user": "team-a", "model": model, "type": "completion"}
        assert metric_value(text, "token_usage_total", labels) > 0


def test_reports_of_two_gateways_sharing_redis_agree_and_end_users_may_be_hashed(
    gateway_factory: GatewayFactory, fake: Upstream, redis_url: str, tmp_path: Path
) -> None:
    """Requests through two gateways sharing Redis, one of them killed with SIGKILL in the
    middle and started again: either gateway's ``llm-proxy usage`` and admin API give the
    same report, the sum of what the clients were told; with
    ``end_user_storage: hashed`` the end users are stored as hashes."""
    prefix = f"ledger-{tmp_path.name}:"
    common = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "models": _models(fake),
        "ledger": {"end_user_storage": "hashed"},
    }
    a = gateway_factory(fake, keys=KEYS, name="a", **common)
    b = gateway_factory(fake, keys=KEYS, name="b", **common)
    expected: Counter[tuple[str, ...]] = Counter()
    _send(a, 12, expected)
    a.kill9()
    _send(b, 12, expected)
    a.start()
    _send(a, 12, expected)
    _fail_once(b, expected)

    def hashed(name: str) -> str:
        return "sha256:" + hashlib.sha256(name.encode()).hexdigest()[:16]

    want = [row | {"user": hashed(row["user"])} for row in _expected_report(expected)]
    want.sort(key=lambda r: (r["key"], r["model"], r["user"]))
    assert _cli_json(a) == want
    assert _cli_json(b) == want
    with b.client(ADMIN_KEY) as c:
        r = c.get("/admin/usage/report", params={"by": "key,model,user"})
    assert r.status_code == 200 and r.json()["data"] == want
    with a.client(ADMIN_KEY) as c:
        bad = c.get("/admin/usage/report", params={"by": "key,color"})
        assert bad.status_code == 400 and "by" in openai_error(bad)["message"]
        bad = c.get("/admin/usage/report", params={"since": "2026-13-01"})
        assert bad.status_code == 400 and "since" in openai_error(bad)["message"]


# The stores themselves, at chosen times (no processes).

_KEY = ApiKey(
    digest="", key_id="k1", user="team-a", quota=None, quota_period="total", enabled=True,
    models=None, expires_at=None, qps=None, concurrent=None, tokens_per_minute=None,
    admin=False,
)  # fmt: skip
_MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def test_a_request_at_23_59_59_and_one_at_midnight_are_two_days(tmp_path: Path) -> None:
    async def run() -> list[Row]:
        store = SqliteUsageStore(tmp_path)
        await store.open()
        who = Attribution("m", "ann")
        await store.record(_KEY, 3, 4, _MIDNIGHT - 1, who)
        await store.record(_KEY, 5, 6, _MIDNIGHT, who)
        await store.close()
        return read_sqlite_ledger(store.path, "2026-02-01", "2026-03-31")

    rows = sorted(asyncio.run(run()), key=lambda r: r.day)
    assert rows == [
        Row("team-a", "m", "ann", "2026-02-28", 1, 0, 3, 4),
        Row("team-a", "m", "ann", "2026-03-01", 1, 0, 5, 6),
    ]
    # The CLI's --since and --until take whole UTC days, both included.
    config = tmp_path / "config.yaml"
    config.write_text(f"api_keys_file: {tmp_path}/keys.json\nstate_dir: {tmp_path}\n")
    for since, until, days in (
        ("2026-02-28", "2026-02-28", ["2026-02-28"]),
        ("2026-03-01", "2026-03-01", ["2026-03-01"]),
        ("2026-02-28", "2026-03-01", ["2026-02-28", "2026-03-01"]),
    ):
        run_ = subprocess.run(
            [sys.executable, "-m", "proxy_app", "usage", "--config", str(config),
             "--since", since, "--until", until, "--by", "day", "--format", "csv"],
            capture_output=True, text=True, timeout=60, env=checkout_env(), check=False,
        )  # fmt: skip
        assert run_.returncode == 0, run_.stderr
        assert [r["day"] for r in csv.DictReader(io.StringIO(run_.stdout))] == days
    bad = subprocess.run(
        [sys.executable, "-m", "proxy_app", "usage", "--config", str(config),
         "--since", "2026-03-02", "--until", "2026-03-01"],
        capture_output=True, text=True, timeout=60, env=checkout_env(), check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "until" in bad.stderr


def test_the_redis_ledger_splits_days_at_midnight_utc(redis_url: str, tmp_path: Path) -> None:
    async def run() -> list[Row]:
        from redis.asyncio import Redis

        r = Redis.from_url(redis_url)
        store = RedisUsageStore(r, f"days-{tmp_path.name}:")
        who = Attribution("m", "ann")
        await store.record(_KEY, 3, 4, _MIDNIGHT - 1, who)
        await store.record(_KEY, 5, 6, _MIDNIGHT, who)
        await store.record_error(_KEY, _MIDNIGHT, who)
        rows = await store.ledger("2026-02-28", "2026-03-01")
        await r.aclose()
        return rows

    rows = sorted(asyncio.run(run()), key=lambda r: r.day)
    assert rows == [
        Row("team-a", "m", "ann", "2026-02-28", 1, 0, 3, 4),
        Row("team-a", "m", "ann", "2026-03-01", 2, 1, 5, 6),
    ]


def test_rows_older_than_the_retention_are_dropped(tmp_path: Path) -> None:
    async def run() -> list[Row]:
        store = SqliteUsageStore(tmp_path, retention_days=2)
        await store.open()
        who = Attribution("m", "ann")
        await store.record(_KEY, 1, 1, _MIDNIGHT - 86400, who)  # 2026-02-28
        await store.record(_KEY, 1, 1, _MIDNIGHT, who)  # 2026-03-01
        await store.record(_KEY, 1, 1, _MIDNIGHT + 86400, who)  # 2026-03-02: keeps 2 days
        rows = await store.ledger("2026-01-01", "2026-12-31")
        await store.close()
        return rows

    assert sorted(r.day for r in asyncio.run(run())) == ["2026-03-01", "2026-03-02"]


def test_an_end_user_must_be_printable_and_short() -> None:
    from proxy_app.errors import ApiError
    from proxy_app.ledger import end_user_of

    assert end_user_of(None, "X-End-User", None, "team-a", "plain") == "team-a"
    assert end_user_of(b"ann", "X-End-User", "bob", "team-a", "plain") == "ann"
    assert end_user_of(None, "X-End-User", "bob", "team-a", "plain") == "bob"
    assert end_user_of("é".encode(), "X-End-User", None, "t", "plain") == "é"
    for header, field in ((b"", None), (b"a\tb", None), (b"\xff", None), (None, ""), (None, [1])):
        with pytest.raises(ApiError) as e:
            end_user_of(header, "X-End-User", field, "team-a", "plain")
        assert e.value.status == 400 and e.value.code == "invalid_end_user"
