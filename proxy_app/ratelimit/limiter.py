"""The limiter: the checks of each request (its key's, the service's, each endpoint's) taken
in memory or in Redis, and, with Redis away in local mode, this gateway's share of them in
memory while its usage is spooled for replay; and the requests that wait for a concurrency
slot, woken as slots come back."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..apis import APIS
from ..config import RateLimit, Reservation
from ..errors import (
    ApiError,
    limit_store_unavailable,
    quota_exceeded,
    quota_held,
    rate_limited,
)
from ..ledger import Attribution
from ..logs import error_text
from ..usage import Entry, UsageSpool, UsageStore, quota_label, seconds_to_period_end
from .memory import MemoryState
from .plan import GLOBAL, Admission, Check, Refusal, reservation
from .redis_state import RedisState, is_redis_down

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

    from ..keys import ApiKey
    from ..logs import JsonLog


class Limiter:
    """Admits or refuses requests against every limit that applies, and settles them."""

    def __init__(
        self,
        global_limits: RateLimit,
        usage: UsageStore,
        *,
        reservation: Reservation | None = None,
        redis: Redis | None = None,
        prefix: str = "llmhost:",
        lease_ttl: float = 960.0,
        retention_days: int = 400,
        failure_mode: str = "closed",
        gateway_count: int = 1,
        spool: UsageSpool | None = None,
        log: JsonLog | None = None,
        local_gauge: Gauge | None = None,
    ) -> None:
        self._global = global_limits
        self.usage = usage
        self.reservation_settings = reservation or Reservation()
        self._redis = (
            RedisState(redis, prefix, lease_ttl, retention_days) if redis is not None else None
        )
        self._in_memory = _InMemory(usage)
        self._shared = _Shared(self._redis, self) if self._redis is not None else None
        self.failure_mode = failure_mode
        self.gateway_count = gateway_count
        self.spool = spool
        self.log = log
        self._gauge = local_gauge
        # Local mode: Redis is away, limits are this process' share.
        self.local = False
        self._local = _Local(self)
        # The quota usage Redis last reported per (key, period): the base of a local share.
        self._quota_seen: dict[tuple[str, str], int] = {}
        self._plans: dict[tuple[int, str], tuple[ApiKey, list[Check]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.replay_interval = 1.0
        # A slot given back by another gateway (Redis) wakes nobody here: a waiter looks
        # again this often. In one process every slot comes back here, and wakes a waiter.
        self._slots = SlotWaits(poll=0.1 if redis is not None else 1.0)

    # lifecycle

    async def open(self) -> None:
        """Start replaying spooled usage into Redis (local mode only)."""
        if self._redis is not None and self.spool is not None:
            self.spool.open()
            self._task = asyncio.create_task(self._replay_loop())
        if self._gauge is not None:
            self._gauge.set(0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.spool is not None:
            self.spool.close()

    @property
    def global_limits(self) -> RateLimit:
        return self._global

    @global_limits.setter
    def global_limits(self, value: RateLimit) -> None:
        self._global = value
        self._plans.clear()

    # admission

    def _plan(self, key: ApiKey, endpoint: str) -> list[Check]:
        """The key's rate checks on this endpoint, in the order refusals are reported."""
        cached = self._plans.get((id(key), endpoint))
        if cached is not None and cached[0] is key:
            return cached[1]
        g = self._global
        k = "key:" + key.key_id
        ke = k + ":" + endpoint
        ge = GLOBAL + ":" + endpoint
        api = APIS.get(endpoint)
        name = api.name if api is not None else endpoint
        kl = key.endpoints.get(endpoint) if key.endpoints else None
        gl = g.endpoints.get(name)
        on = f" on {endpoint}"
        levels = [
            (key, k, "key", "this API key"),
            (g, GLOBAL, "global", "the service"),
            (kl, ke, "key_endpoint", "this API key" + on),
            (gl, ge, "global_endpoint", "the service" + on),
        ]
        checks: list[Check] = []
        for attr, kind, prefix in (
            ("tokens_per_minute", "tpm", "tpm"),
            ("qps", "qps", "qps"),
            ("concurrent", "concurrency", "concurrency"),
        ):
            for limits, scope, level, who in levels:
                value = getattr(limits, attr, None) if limits is not None else None
                if value is not None:
                    checks.append(Check(kind, scope, value, f"{prefix}_{level}", who))  # type: ignore[arg-type]
        if len(self._plans) > 10000:
            self._plans.clear()
        self._plans[(id(key), endpoint)] = (key, checks)
        return checks

    async def admit(
        self, key: ApiKey, endpoint: str, fields: dict[str, Any], now: float
    ) -> Admission:
        """Admit one request (its body's ``fields``), reserving its tokens, or raise a 429
        ApiError naming the limit that refused it. Raises other exceptions when Redis fails
        (closed mode)."""
        checks = self._plan(key, endpoint)
        label = ""
        if key.quota is not None:
            label = quota_label(key.quota_period, now)
            q = Check("quota", f"quota:{key.key_id}:{label}", key.quota, "quota", "")
            checks = [q, *checks]
        # Estimated only when some token limit applies (it reads the whole prompt).
        amount = 0
        if label or any(c.kind == "tpm" for c in checks):
            amount = reservation(fields, endpoint, key.max_tokens, self.reservation_settings)
        adm = Admission(lease_id=os.urandom(12).hex() if checks else "")
        if self._shared is None:
            adm.holder = self._in_memory
            if checks:
                # Served from the store's cache: no await suspends between this read and
                # the check-and-take below, so no settlement can slip in between.
                used = await self.usage.used(key, now) if label else 0
                refusal = self._in_memory.state.admit(checks, amount, used, adm)
                if refusal is not None:
                    raise self._refused(checks, refusal, key, amount, now)
            return adm
        if not self.local:
            adm.holder = self._shared
            if not checks:
                return adm
            try:
                refusal, used = await self._shared.redis.admit(
                    checks, amount, key.key_id, label, adm
                )
            except Exception as e:
                if not self.can_go_local(e):
                    raise
                self._go_local(e)
                adm = Admission(lease_id=adm.lease_id)
            else:
                if label and used >= 0:
                    self._remember_quota(key.key_id, label, used)
                if refusal is not None:
                    raise self._refused(checks, refusal, key, amount, now)
                return adm
        return self._admit_locally(key, checks, label, amount, now, adm)

    def slot_scope(self, key: ApiKey, endpoint: str, e: ApiError) -> str | None:
        """The concurrency limit that refused a request with ``e`` (its counters' scope), or
        None when another limit (or no limit) refused it."""
        if e.reason is None or not e.reason.startswith("concurrency_"):
            return None
        for c in self._plan(key, endpoint):
            if c.reason == e.reason:
                return c.scope
        return None

    async def slot_freed(self, scope: str, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until a slot of ``scope`` may be free: a request
        of this gateway gave one back (waiters are woken one per slot, in arrival order), or
        the poll interval passed (another gateway may have). Then admit() again."""
        await self._slots.wait(scope, timeout)

    def _admit_locally(
        self, key: ApiKey, checks: list[Check], label: str, amount: int, now: float,
        adm: Admission,
    ) -> Admission:  # fmt: skip
        """Redis away, local mode: this gateway's share of every limit (never the whole)."""
        n = self.gateway_count
        share = [replace(c, limit=max(1, math.ceil(c.limit / n))) for c in checks]
        used = 0
        if label:
            base = self._quota_seen.get((key.key_id, label))
            if base is None:
                # Never read from Redis since this gateway started: what is left is unknown.
                raise limit_store_unavailable(
                    "The gateway cannot check this key's quota right now; try again shortly."
                )
            assert key.quota is not None
            left = key.quota - base
            share[0] = replace(checks[0], limit=math.ceil(left / n) if left > 0 else 0)
            used = self._local.used.get((key.key_id, label), 0)
        adm.holder = self._local
        adm.quota_key = (key.key_id, label) if label else None
        refusal = self._local.state.admit(share, amount, used, adm)
        if refusal is not None:
            if label and refusal.index == 0:
                refusal.used += base  # the message speaks of the whole quota
            raise self._refused(share, refusal, key, amount, now)
        return adm

    def _remember_quota(self, key_id: str, label: str, used: int) -> None:
        if len(self._quota_seen) > 100000:
            self._quota_seen.clear()
        self._quota_seen[(key_id, label)] = used

    def _refused(
        self, checks: list[Check], r: Refusal, key: ApiKey, amount: int, now: float
    ) -> ApiError:
        c = checks[r.index]
        if c.kind == "quota":
            assert key.quota is not None
            if r.used + min(amount, c.limit) > c.limit or r.used >= c.limit:
                reset = seconds_to_period_end(key.quota_period, now)
                needed = min(amount, key.quota)
                return quota_exceeded(key.quota, r.used, key.quota_period, reset, needed)
            # What is left is held by requests in flight: it comes back as they end.
            needed = min(amount, c.limit)
            return quota_held(c.limit, r.used, r.reserved, needed, r.remaining).with_reason(
                "quota_reserved"
            )
        kind = "tokens" if c.kind == "tpm" else "requests"
        return rate_limited(c.kind, c.who, kind, c.limit, r.remaining, r.reset).with_reason(
            c.reason
        )

    # settlement

    async def settle(
        self,
        adm: Admission,
        key: ApiKey,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool = False,
    ) -> None:
        """Record a request's usage and its ledger row durably and give back what it holds
        (its reservations and concurrency slots: vLLM's part of it is over), in one step: in
        Redis, one script. ``error``: it failed after its answer had started."""
        if adm.settled:
            # Charged once already: record the usage, nothing more is reserved.
            adm = Admission(holder=adm.holder, quota_key=adm.quota_key)
        adm.settled = True
        assert adm.holder is not None
        slots = adm.slots  # the holder empties adm.slots as it gives them back
        await adm.holder.settle(adm, key, prompt, completion, Entry(now, who, error))
        self._slots.freed(slots)

    async def record_error(self, key: ApiKey, now: float, who: Attribution) -> None:
        """Count in the ledger a request that failed before it was charged (vLLM's error, a
        timeout): a request and an error, no token."""
        if self.local and self.spool is not None:
            self.spool.record(key.key_id, key.user, 0, 0, Entry(now, who, True), charged=False)
            return
        try:
            await self.usage.record_error(key, now, who)
        except Exception as e:
            if not self.can_go_local(e):
                raise
            self._go_local(e)
            assert self.spool is not None
            self.spool.record(key.key_id, key.user, 0, 0, Entry(now, who, True), charged=False)

    async def release(self, adm: Admission) -> None:
        """Give back what a request that was never settled holds (settle() gives it back as
        it charges); safe to call twice."""
        if adm.released:
            return
        adm.released = True
        if (adm.slots or adm.reserved) and adm.holder is not None:
            slots = adm.slots
            await adm.holder.release(adm)
            self._slots.freed(slots)

    # local mode

    def can_go_local(self, e: BaseException) -> bool:
        """Whether this failure of Redis turns the gateway to local mode (else it is raised:
        closed mode refuses, and a bug is a bug)."""
        return self.failure_mode == "local" and is_redis_down(e)

    def _go_local(self, e: BaseException) -> None:
        if self.local:
            return
        self.local = True
        self._local = _Local(self)
        if self._gauge is not None:
            self._gauge.set(1)
        if self.log is not None:
            self.log.log(
                "warning",
                "limits_local",
                error=error_text(e),
                gateway_count=self.gateway_count,
                message="Redis unreachable: enforcing limits / gateway_count locally and "
                "spooling usage until it is back",
            )

    async def _replay_loop(self) -> None:
        assert self._redis is not None and self.spool is not None
        while True:
            await asyncio.sleep(self.replay_interval)
            if not self.local and not self.spool.count():
                continue
            try:
                await self._redis.redis.ping()
                replayed = await self._replay()
            except Exception as e:
                if not is_redis_down(e) and self.log is not None:
                    self.log.log("error", "usage_replay_failed", error=error_text(e))
                continue
            if self.local and not self.spool.count():
                self.local = False
                if self._gauge is not None:
                    self._gauge.set(0)
                if self.log is not None:
                    self.log.log("info", "limits_shared", replayed=replayed)

    async def _replay(self) -> int:
        """Send the spool to Redis, oldest first; returns the rows sent."""
        assert self._redis is not None and self.spool is not None
        sent = 0
        while rows := self.spool.pending():
            for row in rows:
                await self._redis.replay(row)
            self.spool.done([row.id for row in rows])
            sent += len(rows)
        return sent

    async def check(self) -> bool:
        """Whether limits can be decided: Redis answers, or the gateway is in local mode."""
        if self._redis is None or self.local:
            return True
        return bool(await self._redis.redis.ping())


class SlotWaits:
    """Requests waiting for a concurrency slot, by the slot's scope, in arrival order. Each
    slot this gateway gives back wakes the first waiter of its scope; a waiter also looks
    again every ``poll`` seconds (a slot another gateway gave back wakes nobody here)."""

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    async def wait(self, scope: str, timeout: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._waiters.get(scope)
        if line is None:
            line = self._waiters[scope] = deque()
        line.append(waiter)
        woken = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, self.poll)):
                    await waiter
            woken = True
        finally:
            if waiter.done() and not waiter.cancelled() and not woken:
                # Woken, and gone (its client left) before it could take the slot: the next
                # in line takes the wake.
                self.freed([scope])
            waiter.cancel()
            with contextlib.suppress(ValueError):
                line.remove(waiter)
            if not line and self._waiters.get(scope) is line:
                del self._waiters[scope]

    def freed(self, scopes: list[str]) -> None:
        for scope in scopes:
            line = self._waiters.get(scope)
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break


# Where an admission is held (plan.Holder), one for each mode.


class _InMemory:
    """No Redis: the limits in this process' memory, usage in the usage store."""

    def __init__(self, usage: UsageStore) -> None:
        self.usage = usage
        self.state = MemoryState()

    async def settle(
        self, adm: Admission, key: ApiKey, prompt: int, completion: int, at: Entry
    ) -> None:
        await self.usage.record(key, prompt, completion, at.now, at.who, at.error)
        self.state.settle(adm, prompt + completion)

    async def release(self, adm: Admission) -> None:
        self.state.release(adm)


class _Shared:
    """Redis: the limits every gateway shares, and the usage, settled by one script. Redis
    failing at settlement in local mode: the usage goes to the spool (the admission's Redis
    reservations expire by themselves)."""

    def __init__(self, redis: RedisState, limiter: Limiter) -> None:
        self.redis = redis
        self.limiter = limiter

    async def settle(
        self, adm: Admission, key: ApiKey, prompt: int, completion: int, at: Entry
    ) -> None:
        try:
            await self.redis.settle(
                adm, key.key_id, key.user, prompt, completion, at.now, at.who, at.error
            )
        except Exception as e:
            if not self.limiter.can_go_local(e):
                raise
            self.limiter._go_local(e)
            spool = self.limiter.spool
            assert spool is not None
            spool.record(key.key_id, key.user, prompt, completion, at)

    async def release(self, adm: Admission) -> None:
        await self.redis.release(adm)


class _Local:
    """Redis away, local mode (one per time away): this gateway's share of the limits in
    memory, the quota used meanwhile by key and period, and the usage spooled for replay."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.state = MemoryState()
        self.used: dict[tuple[str, str], int] = {}

    async def settle(
        self, adm: Admission, key: ApiKey, prompt: int, completion: int, at: Entry
    ) -> None:
        spool = self.limiter.spool
        assert spool is not None
        spool.record(key.key_id, key.user, prompt, completion, at)
        if adm.quota_key is not None:
            self.used[adm.quota_key] = self.used.get(adm.quota_key, 0) + prompt + completion
        self.state.settle(adm, prompt + completion)

    async def release(self, adm: Admission) -> None:
        self.state.release(adm)
