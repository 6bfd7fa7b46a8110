"""Limits in one process: exact windows of timestamps for requests per second, one-second
buckets for tokens per minute, reservations and slots as plain sums. Check and take run with
no await between them, so on one event loop each admission is atomic."""

from __future__ import annotations

import time
from collections import deque

from .plan import Admission, Check, Refusal


class _Window:
    """Exact moving window: at most ``limit`` hits in any ``period`` seconds."""

    __slots__ = ("hits",)

    def __init__(self) -> None:
        self.hits: deque[float] = deque()

    def full(self, now: float, limit: int, period: float) -> bool:
        hits = self.hits
        cutoff = now - period
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return len(hits) >= limit

    def reset_after(self, now: float, period: float) -> float:
        return self.hits[0] + period - now if self.hits else 0.0


class _TokenLog:
    """Tokens charged in the last ``period`` seconds, counted in one-second buckets.

    Exact to the second, and bounded: at most ``period`` + 1 buckets however many requests
    there are (a log of every request would hold hundreds of thousands of entries per minute
    at full speed).
    """

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, tokens], oldest first
        self.total = 0

    def used(self, now: float, period: float) -> int:
        buckets = self.buckets
        oldest = int(now) - int(period)
        while buckets and buckets[0][0] <= oldest:
            self.total -= buckets.popleft()[1]
        return self.total

    def charge(self, now: float, tokens: int) -> None:
        sec = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == sec:
            buckets[-1][1] += tokens
        else:
            buckets.append([sec, tokens])
        self.total += tokens

    def reset_after(self, now: float, period: float, target: int) -> float:
        """Seconds until at most ``target`` tokens are left in the window."""
        if target < 0:
            return 1.0  # requests in flight hold it: they end, or their reservation expires
        left = self.total
        for sec, tokens in self.buckets:
            if left <= target:
                break
            left -= tokens
            if left <= target:
                return max(0.0, sec + 1 + period - now)
        return 0.0


class MemoryState:
    """Windows, reservations and slots of one process. Check and take run with no await
    between them, so on one event loop each admission is atomic."""

    def __init__(self) -> None:
        self.qps: dict[str, _Window] = {}
        self.tpm: dict[str, _TokenLog] = {}
        self.reserved: dict[str, int] = {}
        self.held: dict[str, int] = {}

    def admit(
        self, checks: list[Check], amount: int, quota_used: int, adm: Admission
    ) -> Refusal | None:
        now = time.monotonic()
        for i, c in enumerate(checks):
            kind = c.kind
            if kind == "qps":
                w = self.qps.get(c.scope)
                if w is not None and w.full(now, c.limit, 1.0):
                    return Refusal(i, 0, w.reset_after(now, 1.0))
            elif kind == "concurrency":
                if self.held.get(c.scope, 0) >= c.limit:
                    return Refusal(i, 0, 1.0)
            else:
                log = self.tpm.get(c.scope) if kind == "tpm" else None
                used = quota_used if kind == "quota" else log.used(now, 60.0) if log else 0
                res = self.reserved.get(c.scope, 0)
                if used + res + min(amount, c.limit) > c.limit:
                    target = c.limit - res - min(amount, c.limit)
                    reset = log.reset_after(now, 60.0, target) if log else 1.0
                    return Refusal(i, c.limit - used - res, reset, used, res)
        for c in checks:
            kind = c.kind
            if kind == "qps":
                w = self.qps.get(c.scope)
                if w is None:
                    w = self.qps[c.scope] = _Window()
                w.hits.append(now)
            elif kind == "concurrency":
                self.held[c.scope] = self.held.get(c.scope, 0) + 1
                adm.slots.append(c.scope)
            else:
                take = min(amount, c.limit)
                self.reserved[c.scope] = self.reserved.get(c.scope, 0) + take
                adm.reserved.append((c.scope, take))
                if kind == "tpm":
                    adm.tpm.append(c.scope)
        return None

    def settle(self, adm: Admission, tokens: int) -> None:
        """Free the admission's reservations, charge its real tokens, free its slots."""
        self.unreserve(adm)
        self.charge(adm, tokens)
        self.release(adm)

    def unreserve(self, adm: Admission) -> None:
        reserved = self.reserved
        for scope, tokens in adm.reserved:
            left = reserved.get(scope, 0) - tokens
            if left > 0:
                reserved[scope] = left
            else:
                reserved.pop(scope, None)
        adm.reserved = []

    def charge(self, adm: Admission, tokens: int) -> None:
        if tokens <= 0:
            return
        now = time.monotonic()
        for scope in adm.tpm:
            log = self.tpm.get(scope)
            if log is None:
                log = self.tpm[scope] = _TokenLog()
            log.used(now, 60.0)
            log.charge(now, tokens)

    def release(self, adm: Admission) -> None:
        held = self.held
        for scope in adm.slots:
            n = held.get(scope, 0) - 1
            if n > 0:
                held[scope] = n
            else:
                held.pop(scope, None)
        adm.slots = []
        self.unreserve(adm)
