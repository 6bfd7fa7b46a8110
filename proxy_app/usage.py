"""Token usage per key, stored durably before a request counts as done; quota checks.

Usage is counted per key and period: ``total``, ``month:YYYY-MM`` and ``day:YYYY-MM-DD``
(UTC), so a quota of any period is one lookup. Two backends:

* SQLite in the state dir (default): one row per key and day. WAL journal and
  ``synchronous=NORMAL`` by default: a commit has been written to the WAL file when it
  returns, so killing the gateway, even with SIGKILL, loses no completed request; only an OS
  crash or power loss can drop the last commits. ``sqlite_synchronous: full`` adds an fsync
  per request for that case too.
* Redis, when the gateways share one (``redis_url``): counters in hashes, written by the
  limiter's settlement script (ratelimit/redis_state.py) in the same step that frees the request's
  reservations. Its durability is Redis' own: run it with ``appendonly yes``.

``UsageSpool`` holds usage recorded while Redis was unreachable (``redis_failure_mode:
local``), in SQLite in the state dir, until it is replayed into Redis.

Each store also keeps the usage ledger (ledger.py: per key, model, end user and day), written
with the counters in the same transaction or script, and reads it back for reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .ledger import (
    REDIS_FIGURES,
    Attribution,
    Row,
    day_of,
    days,
    redis_field,
    rows_of_redis_hash,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .keys import ApiKey

# Counters kept per (key, period): requests, prompt tokens, completion tokens.
Counters = list[int]


@dataclass(frozen=True, slots=True)
class Entry:
    """When a request's usage is recorded, whose it was beyond its key (the ledger's model
    and end user), and whether it failed."""

    now: float
    who: Attribution
    error: bool = False


_labels_cache: tuple[float, float, tuple[str, str, str]] = (0.0, 0.0, ("", "", ""))


def period_labels(now: float) -> tuple[str, str, str]:
    """The three period labels a request at ``now`` counts in."""
    global _labels_cache
    start, end, labels = _labels_cache
    if start <= now < end:
        return labels
    t = time.gmtime(now)
    labels = (
        "total",
        f"month:{t.tm_year:04d}-{t.tm_mon:02d}",
        f"day:{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}",
    )
    day_start = now - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + now % 1)
    _labels_cache = (day_start, day_start + 86400, labels)
    return labels


def quota_label(period: str, now: float) -> str:
    """The counter that a quota of ``period`` (total, monthly, daily) is checked against."""
    total, month, day = period_labels(now)
    return {"total": total, "monthly": month, "daily": day}[period]


def seconds_to_period_end(period: str, now: float) -> float | None:
    """Time until a periodic quota starts afresh; None for a total quota."""
    d = datetime.fromtimestamp(now, UTC)
    if period == "daily":
        start = d.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start.timestamp() + 86400
    elif period == "monthly":
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        end = datetime(year, month, 1, tzinfo=UTC).timestamp()
    else:
        return None
    return end - now


class UsageStore(Protocol):
    """Where usage is counted; ``record`` returns only once the usage is durable."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def record(
        self,
        key: ApiKey,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool = False,
    ) -> None:
        """Count a request's tokens, and its row of the ledger (``error``: it failed after
        its answer had started)."""

    async def record_error(self, key: ApiKey, now: float, who: Attribution) -> None:
        """Count, in the ledger only, a request that failed before it was charged."""

    async def ledger(self, since: str, until: str) -> list[Row]:
        """The ledger's rows from day ``since`` to day ``until`` (both included)."""

    async def used(self, key: ApiKey, now: float) -> int: ...

    async def counters(self, key_id: str, labels: list[str]) -> dict[str, Counters]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_daily (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    user TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID
"""

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_daily (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    end_user TEXT NOT NULL,
    key_user TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model, end_user)
) WITHOUT ROWID
"""

_LEDGER_UPSERT = """
INSERT INTO ledger_daily
    (day, key_id, model, end_user, key_user, requests, errors, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, model, end_user) DO UPDATE SET
    key_user = excluded.key_user,
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""

_LEDGER_SELECT = (
    "SELECT key_user, model, end_user, day, requests, errors, prompt_tokens, completion_tokens "
    "FROM ledger_daily WHERE day >= ? AND day <= ?"
)


def read_sqlite_ledger(path: Path, since: str, until: str) -> list[Row]:
    """The ledger of a usage store file, read on its own connection (the gateway may be
    running: WAL lets a reader see every committed request)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        return [Row(*r) for r in db.execute(_LEDGER_SELECT, (since, until)).fetchall()]
    finally:
        db.close()


def retention_cutoff(now: float, retention_days: int) -> str:
    """The oldest day the ledger keeps."""
    return day_of(now - (retention_days - 1) * 86400)


_UPSERT = """
INSERT INTO usage_daily (key_id, day, user, requests, prompt_tokens, completion_tokens, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_id, day) DO UPDATE SET
    user = excluded.user,
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    updated_at = excluded.updated_at
"""

_SUM = (
    "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(prompt_tokens), 0), "
    "COALESCE(SUM(completion_tokens), 0) FROM usage_daily WHERE key_id = ?"
)


class SqliteUsageStore:
    """Usage in ``<state_dir>/usage.sqlite3``: one row per key and UTC day.

    Writes run on the event loop, grouped: the requests that end in the same turn of the
    loop share one transaction (one upsert per key and day, one commit), and each returns once
    that commit is done. A WAL commit without fsync costs tens of microseconds, less than
    handing it to a thread would. Month and total
    counters are sums of days, read once per key and then kept in memory; the cache is exact
    because this process is the only writer (a store shared by gateways is what the Redis
    backend is for).
    """

    def __init__(
        self, state_dir: Path, synchronous: str = "normal", retention_days: int = 400
    ) -> None:
        self.path = state_dir / "usage.sqlite3"
        self.synchronous = synchronous
        self.retention_days = retention_days
        self._db: sqlite3.Connection | None = None
        self._cache: dict[tuple[str, str], Counters] = {}
        # key, prompt, completion, time, attribution, error, charged (else a ledger-only
        # error), and the future that the commit resolves.
        self._pending: list[
            tuple[ApiKey, int, int, float, Attribution, bool, bool, asyncio.Future[None]]
        ] = []
        self._pruned = ""
        self._checkpointer: asyncio.Task[None] | None = None
        self._writes = 0
        self._hold: asyncio.Future[None] | None = None
        self.checkpoint_interval = 1.0
        self.wal_limit = 64 * 1024 * 1024

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        db.execute(_SCHEMA)
        db.execute(_LEDGER_SCHEMA)
        # Checkpoints copy the WAL into the database and fsync it: that can take long on a
        # busy disk, so they run in a thread, never on the event loop between two requests.
        db.execute("PRAGMA wal_autocheckpoint=0")
        self._db = db
        self._checkpointer = asyncio.create_task(self._checkpoint_loop())

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    async def _checkpoint_loop(self) -> None:
        ckpt = await asyncio.to_thread(self._connect)
        try:
            while True:
                await asyncio.sleep(self.checkpoint_interval)
                if not self._writes:
                    continue
                self._writes = 0
                # PASSIVE never waits for, nor blocks, the writer on the event loop.
                _, frames, _ = await asyncio.to_thread(_checkpoint, ckpt, "PASSIVE")
                if frames * 4096 < self.wal_limit:
                    continue
                # Under sustained load the writer never lets a passive checkpoint reach the
                # end of the WAL, which then only grows. Now and then, writes are held (the
                # event loop is not) while the WAL is checkpointed whole and truncated.
                self._hold = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.to_thread(_checkpoint, ckpt, "TRUNCATE")
                finally:
                    self._hold.set_result(None)
                    self._hold = None
                    if self._pending:
                        asyncio.get_running_loop().call_soon(self._flush)
        finally:
            ckpt.close()

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._db is not None:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    def _load(self, key_id: str, label: str) -> Counters:
        assert self._db is not None
        if label == "total":
            row = self._db.execute(_SUM, (key_id,)).fetchone()
        elif label.startswith("month:"):
            month = label[6:]
            row = self._db.execute(
                _SUM + " AND day >= ? AND day <= ?", (key_id, month + "-01", month + "-31")
            ).fetchone()
        else:
            row = self._db.execute(_SUM + " AND day = ?", (key_id, label[4:])).fetchone()
        c = [row[0], row[1], row[2]]
        self._cache[(key_id, label)] = c
        return c

    def _get(self, key_id: str, label: str) -> Counters:
        c = self._cache.get((key_id, label))
        return c if c is not None else self._load(key_id, label)

    async def record(
        self,
        key: ApiKey,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool = False,
    ) -> None:
        await self._write(key, prompt, completion, now, who, error, True)

    async def record_error(self, key: ApiKey, now: float, who: Attribution) -> None:
        await self._write(key, 0, 0, now, who, True, False)

    async def _write(
        self,
        key: ApiKey,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool,
        charged: bool,
    ) -> None:
        # Group commit: records made in the same turn of the event loop share one
        # transaction, which is committed before any of them returns.
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, prompt, completion, now, who, error, charged, fut))
        if len(self._pending) == 1 and self._hold is None:
            asyncio.get_running_loop().call_soon(self._flush)
        await fut

    async def ledger(self, since: str, until: str) -> list[Row]:
        # On a connection of its own in a thread: a report over many days and users reads
        # many rows, which the requests on the event loop must not wait for.
        return await asyncio.to_thread(read_sqlite_ledger, self.path, since, until)

    def _flush(self) -> None:
        if self._hold is not None or not self._pending:
            return  # the end of the checkpoint flushes
        pending, self._pending = self._pending, []
        db = self._db
        rows: dict[tuple[str, str], list[Any]] = {}
        ledger: dict[tuple[str, str, str, str], list[Any]] = {}
        try:
            assert db is not None
            for key, prompt, completion, now, who, error, charged, _ in pending:
                day = day_of(now)
                lkey = (day, key.key_id, who.model, who.end_user)
                lrow = ledger.get(lkey)
                if lrow is None:
                    lrow = ledger[lkey] = [*lkey, key.user, 0, 0, 0, 0]
                lrow[4] = key.user
                lrow[5] += 1
                lrow[6] += error
                lrow[7] += prompt
                lrow[8] += completion
                if not charged:
                    continue
                labels = period_labels(now)
                # Load the counters before writing, so the new rows are not counted twice.
                for label in labels:
                    self._get(key.key_id, label)
                row = rows.get((key.key_id, labels[2]))
                if row is None:
                    rows[(key.key_id, labels[2])] = [
                        key.key_id, labels[2][4:], key.user, 1, prompt, completion, now
                    ]  # fmt: skip
                else:
                    row[3] += 1
                    row[4] += prompt
                    row[5] += completion
                    row[6] = now
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_UPSERT, list(rows.values()))
                db.executemany(_LEDGER_UPSERT, list(ledger.values()))
                cutoff = retention_cutoff(pending[-1][3], self.retention_days)
                if cutoff != self._pruned:  # the first write of a day drops the oldest day
                    db.execute("DELETE FROM ledger_daily WHERE day < ?", (cutoff,))
                db.execute("COMMIT")
                self._pruned = cutoff
                self._writes += 1
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as e:
            for *_, fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            return
        for key, prompt, completion, now, _, _, charged, fut in pending:
            if not charged:
                if not fut.done():
                    fut.set_result(None)
                continue
            for label in period_labels(now):
                c = self._cache.get((key.key_id, label))
                if c is not None:
                    c[0] += 1
                    c[1] += prompt
                    c[2] += completion
            if not fut.done():
                fut.set_result(None)
        # Keep the cache to the periods in use: older days and months are read from disk.
        if len(self._cache) > 4096:
            self._cache.clear()

    async def used(self, key: ApiKey, now: float) -> int:
        c = self._get(key.key_id, quota_label(key.quota_period, now))
        return c[1] + c[2]

    async def counters(self, key_id: str, labels: list[str]) -> dict[str, Counters]:
        return {label: list(self._get(key_id, label)) for label in labels}


def _checkpoint(db: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
    """Run a WAL checkpoint: (busy, frames in the WAL, frames checkpointed)."""
    row = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


# Redis usage counters: days are kept long enough for a monthly report, months for a yearly one.
_REDIS_TTL: dict[str, int] = {"day": 40 * 86400, "month": 400 * 86400}


def redis_usage_key(prefix: str, key_id: str, label: str) -> str:
    """The Redis hash of a key's usage in one period (``label``: ``day:2026-12-07``...): the
    one place its format is written (the limiter's quota check reads the same hash)."""
    return f"{prefix}usage:{key_id}:{label}"


def redis_usage_hashes(prefix: str, key_id: str, now: float) -> list[tuple[str, int]]:
    """The Redis hashes a request at ``now`` counts in, each with its TTL (0: none)."""
    return [
        (redis_usage_key(prefix, key_id, label), _REDIS_TTL.get(label.split(":", 1)[0], 0))
        for label in period_labels(now)
    ]


def redis_ledger_key(prefix: str, day: str) -> str:
    """The Redis hash of one day of the ledger (fields: ledger.redis_field)."""
    return f"{prefix}ledger:{day}"


def ledger_ttl(retention_days: int) -> int:
    """Seconds a day's ledger hash lives after its last write."""
    return retention_days * 86400


class RedisUsageStore:
    """Usage in Redis hashes ``<prefix>usage:<key_id>:<period>``, shared by gateways; the
    ledger in ``<prefix>ledger:<day>``."""

    _TTL: ClassVar[dict[str, int]] = _REDIS_TTL

    def __init__(self, redis: Redis, prefix: str, retention_days: int = 400) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ledger_ttl = ledger_ttl(retention_days)

    async def open(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        return None

    async def record(
        self,
        key: ApiKey,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool = False,
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._ledger(pipe, key, now, who, error, prompt, completion)
            for label in period_labels(now):
                h = redis_usage_key(self._prefix, key.key_id, label)
                pipe.hincrby(h, "requests", 1)
                pipe.hincrby(h, "prompt_tokens", prompt)
                pipe.hincrby(h, "completion_tokens", completion)
                pipe.hincrby(h, "tokens", prompt + completion)
                pipe.hset(h, "user", key.user)
                ttl = self._TTL.get(label.split(":", 1)[0])
                if ttl:
                    pipe.expire(h, ttl)
            await pipe.execute()

    def _ledger(
        self, pipe: Any, key: ApiKey, now: float, who: Attribution, error: bool,
        prompt: int, completion: int,
    ) -> None:  # fmt: skip
        h = redis_ledger_key(self._prefix, day_of(now))
        field = redis_field(key.user, who)
        for letter, amount in zip(REDIS_FIGURES, (1, int(error), prompt, completion), strict=True):
            if amount:
                pipe.hincrby(h, letter + field, amount)
        pipe.expire(h, self._ledger_ttl)

    async def record_error(self, key: ApiKey, now: float, who: Attribution) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._ledger(pipe, key, now, who, True, 0, 0)
            await pipe.execute()

    async def ledger(self, since: str, until: str) -> list[Row]:
        return await read_redis_ledger(self._redis, self._prefix, since, until)

    async def used(self, key: ApiKey, now: float) -> int:
        label = quota_label(key.quota_period, now)
        v = await self._redis.hget(redis_usage_key(self._prefix, key.key_id, label), "tokens")
        return int(v or 0)

    async def counters(self, key_id: str, labels: list[str]) -> dict[str, Counters]:
        out: dict[str, Counters] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for label in labels:
                pipe.hmget(
                    redis_usage_key(self._prefix, key_id, label),
                    ["requests", "prompt_tokens", "completion_tokens"],
                )
            results: list[Any] = await pipe.execute()
        for label, vals in zip(labels, results, strict=True):
            out[label] = [int(v or 0) for v in vals]
        return out


async def read_redis_ledger(redis: Redis, prefix: str, since: str, until: str) -> list[Row]:
    """The ledger's days from ``since`` to ``until`` in Redis."""
    wanted = days(date.fromisoformat(since), date.fromisoformat(until))
    async with redis.pipeline(transaction=False) as pipe:
        for day in wanted:
            pipe.hgetall(redis_ledger_key(prefix, day))
        hashes: list[dict[bytes, bytes]] = await pipe.execute()
    return [
        row for day, h in zip(wanted, hashes, strict=True) for row in rows_of_redis_hash(day, h)
    ]


async def usage_report(store: UsageStore, keys: list[ApiKey], now: float) -> list[dict[str, Any]]:
    """Per key: usage in its quota period and in total, and the quota left."""
    report = []
    for k in keys:
        qlabel = quota_label(k.quota_period, now)
        labels = sorted({"total", qlabel})
        c = await store.counters(k.key_id, labels)
        period = c[qlabel]
        total = c["total"]
        used = period[1] + period[2]
        report.append(
            {
                "key_id": k.key_id,
                "user": k.user,
                "enabled": k.enabled,
                "admin": k.admin,
                "quota": k.quota,
                "quota_period": k.quota_period,
                "period": qlabel,
                "period_usage": {
                    "requests": period[0],
                    "prompt_tokens": period[1],
                    "completion_tokens": period[2],
                    "total_tokens": used,
                },
                "total_usage": {
                    "requests": total[0],
                    "prompt_tokens": total[1],
                    "completion_tokens": total[2],
                    "total_tokens": total[1] + total[2],
                },
                "remaining": None if k.quota is None else max(0, k.quota - used),
            }
        )
    return report


_SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL,
    key_id TEXT NOT NULL,
    user TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    at REAL NOT NULL
)
"""
# The ledger's columns, added to a spool an older gateway wrote (its rows: the key's user,
# no model: "").
_SPOOL_LEDGER = {
    "model": "TEXT NOT NULL DEFAULT ''",
    "end_user": "TEXT NOT NULL DEFAULT ''",
    "error": "INTEGER NOT NULL DEFAULT 0",
    "charged": "INTEGER NOT NULL DEFAULT 1",
}


@dataclass(frozen=True, slots=True)
class SpooledUsage:
    """One request's usage waiting for Redis; ``uid`` makes its replay count once."""

    id: int
    uid: str
    key_id: str
    user: str
    prompt: int
    completion: int
    at: float
    model: str
    end_user: str
    error: bool
    # False: a request that failed before it was charged (the ledger's error, no usage).
    charged: bool


class UsageSpool:
    """Usage recorded while Redis is unreachable, in ``<state_dir>/usage-spool.sqlite3``.

    Each row is committed (WAL, as the usage store) before the request ends, so a gateway
    killed during an outage loses none; rows leave the spool only once Redis has them.
    """

    def __init__(self, state_dir: Path, synchronous: str = "normal") -> None:
        self.path = state_dir / "usage-spool.sqlite3"
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute(_SPOOL_SCHEMA)
        have = {row[1] for row in db.execute("PRAGMA table_info(spool)")}
        for name, kind in _SPOOL_LEDGER.items():
            if name not in have:
                db.execute(f"ALTER TABLE spool ADD COLUMN {name} {kind}")
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def record(
        self, key_id: str, user: str, prompt: int, completion: int, at: Entry,
        charged: bool = True,
    ) -> None:  # fmt: skip
        """Keep one request's usage and ledger row; committed when this returns."""
        assert self._db is not None
        self._db.execute(
            "INSERT INTO spool (uid, key_id, user, prompt_tokens, completion_tokens, at, "
            "model, end_user, error, charged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                os.urandom(12).hex(), key_id, user, prompt, completion, at.now,
                at.who.model, at.who.end_user, int(at.error), int(charged),
            ),
        )  # fmt: skip

    def pending(self, limit: int = 500) -> list[SpooledUsage]:
        """The oldest rows not yet in Redis."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, uid, key_id, user, prompt_tokens, completion_tokens, at, model, "
            "end_user, error, charged FROM spool ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [SpooledUsage(*row[:9], error=bool(row[9]), charged=bool(row[10])) for row in rows]

    def done(self, ids: list[int]) -> None:
        """Forget rows that Redis has."""
        assert self._db is not None
        self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])

    def count(self) -> int:
        assert self._db is not None
        return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
