"""The usage ledger: requests, errors and tokens per key x model x end user x UTC day.

Operators hand keys to colleagues and are asked who used what. The quota counters
(usage.py) answer per key and period; the ledger answers per key (its ``user`` name), model,
end user (the person behind a shared key, below) and day, over any range of days, as a table,
CSV or JSON (``llm-proxy usage``, ``GET /admin/usage/report``).

It is written in the same step as the usage counters, with their durability: in the usage
store's SQLite transaction (one host), in the settlement's Lua script (Redis), in the spool
while Redis is away. One row per key, model, end user and day, never one per request; rows
older than ``ledger.retention_days`` are dropped.

The end user: the header ``ledger.end_user_header`` (``X-End-User`` by default; a front end
such as Open WebUI can forward its own, e.g. ``X-OpenWebUI-User-Email``), else the OpenAI
request's ``user`` field, else the key's own ``user`` name. A value must be 1 to 256
printable characters; another is refused with 400 ``invalid_end_user`` naming where it came
from. ``ledger.end_user_storage: hashed`` stores ``sha256:`` and the first 16 hex digits of
its SHA-256 instead (pseudonymous: a known name can be hashed and matched).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from .errors import bad_request

END_USER_MAX = 256
GROUPS = ("key", "model", "user", "day")
FIGURES = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class Attribution:
    """Whose request it was, beyond its key: the model and the end user."""

    model: str
    end_user: str


def _valid(value: str) -> bool:
    return 0 < len(value) <= END_USER_MAX and value.isprintable() and value.strip() == value


def end_user_of(
    header: bytes | None,
    header_name: str,
    field: Any,
    key_user: str,
    storage: Literal["plain", "hashed"],
) -> str:
    """The end user a request is attributed to (the module's docstring says the rule)."""
    if header is not None:
        try:
            value = header.decode("utf-8")
        except UnicodeDecodeError:
            value = ""
        if not _valid(value):
            raise bad_request(
                f"The {header_name} header must be 1 to {END_USER_MAX} printable characters "
                "with no leading or trailing space.",
                code="invalid_end_user",
            )
    elif field is not None:
        if not isinstance(field, str) or not _valid(field):
            raise bad_request(
                f"'user' must be a string of 1 to {END_USER_MAX} printable characters with no "
                "leading or trailing space.",
                param="user",
                code="invalid_end_user",
            )
        value = field
    else:
        return key_user
    if storage == "hashed":
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    return value


def day_of(now: float) -> str:
    """The UTC day of an epoch time, ``YYYY-MM-DD``: the ledger's row."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def days(since: date, until: date) -> list[str]:
    """Every day from ``since`` to ``until``, both included."""
    return [(since + timedelta(n)).isoformat() for n in range((until - since).days + 1)]


def redis_field(key_user: str, who: Attribution) -> str:
    """The field of a key, model and end user in a day's Redis hash (a JSON triple, so no
    name can be confused with another); each figure is ``<letter>`` + this."""
    return json.dumps([key_user, who.model, who.end_user], separators=(",", ":"))


@dataclass(slots=True)
class Row:
    """One key, model, end user and day of the ledger."""

    key: str
    model: str
    user: str
    day: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


# The letter of each figure in a Redis field (ledger hashes: <prefix>ledger:<day>).
REDIS_FIGURES = {"r": "requests", "e": "errors", "p": "prompt_tokens", "c": "completion_tokens"}


def rows_of_redis_hash(day: str, fields: dict[bytes, bytes]) -> list[Row]:
    """A day's Redis hash read back as rows."""
    rows: dict[str, Row] = {}
    for f, v in fields.items():
        name = f.decode()
        figure, triple = REDIS_FIGURES.get(name[:1]), name[1:]
        if figure is None:
            continue
        row = rows.get(triple)
        if row is None:
            key, model, user = json.loads(triple)
            row = rows[triple] = Row(key, model, user, day)
        setattr(row, figure, getattr(row, figure) + int(v))
    return list(rows.values())


def parse_by(text: str) -> tuple[str, ...]:
    """``--by`` / ``by=``: a comma-separated subset of key, model, user, day."""
    by = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in by if p not in GROUPS]
    if bad or not by or len(set(by)) != len(by):
        raise ValueError(
            f"by: {text!r}: name each of {', '.join(GROUPS)} at most once, comma-separated"
        )
    return by


def parse_day(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a date (YYYY-MM-DD, UTC)") from None


# The longest range a report may ask for: ten years of days.
MAX_DAYS = 3660


def report_range(since: str | None, until: str | None, now: float) -> tuple[str, str]:
    """A report's first and last day (UTC, both included): by default from the first of
    this month to today. ValueError naming what is wrong."""
    today = datetime.fromtimestamp(now, UTC).date()
    first = parse_day(since, "since") if since else today.replace(day=1)
    last = parse_day(until, "until") if until else today
    if last < first:
        raise ValueError(f"until ({last}) is before since ({first})")
    if (last - first).days >= MAX_DAYS:
        raise ValueError(f"since to until spans more than {MAX_DAYS} days")
    return first.isoformat(), last.isoformat()


def aggregate(rows: Iterable[Row], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows summed over everything ``by`` does not name, sorted by the groups."""
    sums: dict[tuple[str, ...], list[int]] = {}
    for r in rows:
        group = tuple(getattr(r, g) for g in by)
        s = sums.get(group)
        if s is None:
            s = sums[group] = [0, 0, 0, 0]
        s[0] += r.requests
        s[1] += r.errors
        s[2] += r.prompt_tokens
        s[3] += r.completion_tokens
    return [
        {
            **dict(zip(by, group, strict=True)),
            "requests": s[0],
            "errors": s[1],
            "prompt_tokens": s[2],
            "completion_tokens": s[3],
            "total_tokens": s[2] + s[3],
        }
        for group, s in sorted(sums.items())
    ]


def render(report: list[dict[str, Any]], by: tuple[str, ...], fmt: str) -> str:
    """The report as ``table`` (aligned columns), ``csv`` (a header row) or ``json``."""
    columns = [*by, *FIGURES]
    if fmt == "json":
        return json.dumps({"object": "list", "by": list(by), "data": report}, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(report)
        return out.getvalue()
    cells = [columns] + [[str(r[c]) for c in columns] for r in report]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    numeric = [c in FIGURES for c in columns]
    lines = []
    for row in cells:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"
