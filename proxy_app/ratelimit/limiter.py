"""The limiter: the checks of each request (its key's, the service's, each endpoint's) taken
in memory or in Redis, and, with Redis away in local mode, this gateway's share of them in
memory while its usage is spooled for replay."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config import ENDPOINTS, RateLimit, Reservation
from ..errors import ApiError
from ..logs import error_text
from ..usage import UsageSpool, UsageStore, quota_exhausted, quota_label
from .memory import MemoryState
from .plan import GLOBAL, Admission, Check, Refusal, rate_limited, reservation
from .redis_state import RedisState, is_redis_down

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

    from ..keys import ApiKey
    from ..logs import JsonLog

_ENDPOINT_NAMES = {path: name for name, path in ENDPOINTS.items()}


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
        failure_mode: str = "closed",
        gateway_count: int = 1,
        spool: UsageSpool | None = None,
        log: JsonLog | None = None,
        local_gauge: Gauge | None = None,
    ) -> None:
        self._global = global_limits
        self.usage = usage
        self.reservation_settings = reservation or Reservation()
        self._memory = MemoryState()
        self._redis = RedisState(redis, prefix, lease_ttl) if redis is not None else None
        self.failure_mode = failure_mode
        self.gateway_count = gateway_count
        self.spool = spool
        self.log = log
        self._gauge = local_gauge
        # Local mode: Redis is away, limits are this process' share.
        self.local = False
        self._local = MemoryState()
        self._local_used: dict[tuple[str, str], int] = {}
        # The quota usage Redis last reported per (key, period): the base of a local share.
        self._quota_seen: dict[tuple[str, str], int] = {}
        self._plans: dict[tuple[int, str], tuple[ApiKey, list[Check]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.replay_interval = 1.0

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
        name = _ENDPOINT_NAMES.get(endpoint, endpoint)
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
        if self._redis is None:
            if checks:
                # Served from the store's cache: no await suspends between this read and
                # the check-and-take below, so no settlement can slip in between.
                used = await self.usage.used(key, now) if label else 0
                refusal = self._memory.admit(checks, amount, used, adm)
                if refusal is not None:
                    raise self._refused(checks, refusal, key, amount, now)
            return adm
        if not self.local:
            adm.by = "redis"
            if not checks:
                return adm
            try:
                refusal, used = await self._redis.admit(checks, amount, key.key_id, label, adm)
            except Exception as e:
                if self.failure_mode != "local" or not is_redis_down(e):
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
                raise ApiError(
                    503,
                    "The gateway cannot check this key's quota right now; try again shortly.",
                    "server_error",
                    "limit_store_unavailable",
                    headers=[(b"retry-after", b"5")],
                )
            assert key.quota is not None
            left = key.quota - base
            share[0] = replace(checks[0], limit=math.ceil(left / n) if left > 0 else 0)
            used = self._local_used.get((key.key_id, label), 0)
        adm.by = "local"
        adm.state = self._local
        adm.quota_key = (key.key_id, label) if label else None
        refusal = self._local.admit(share, amount, used, adm)
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
            if r.used + min(amount, c.limit) > c.limit or r.used >= c.limit:
                return quota_exhausted(key, r.used, now, min(amount, key.quota or 0))
            # What is left is held by requests in flight: it comes back as they end.
            return ApiError(
                429,
                f"This API key's quota ({c.limit} tokens) is held by requests in progress "
                f"({r.used} used, {r.reserved} reserved) and this request may use up to "
                f"{min(amount, c.limit)}. Please try again when they have ended.",
                "tokens",
                "rate_limit_exceeded",
                headers=[
                    (b"retry-after", b"1"),
                    (b"x-ratelimit-limit-tokens", str(c.limit).encode()),
                    (b"x-ratelimit-remaining-tokens", str(max(0, r.remaining)).encode()),
                    (b"x-ratelimit-reset-tokens", b"1s"),
                ],
                metric_type="rate_limit",
            ).with_reason("quota_reserved")
        kind = "tokens" if c.kind == "tpm" else "requests"
        return rate_limited(c.kind, c.who, kind, c.limit, r.remaining, r.reset).with_reason(
            c.reason
        )

    # settlement

    async def settle(
        self, adm: Admission | None, key: ApiKey, prompt: int, completion: int, now: float
    ) -> None:
        """Record a request's usage durably and give back what it holds (its reservations and
        concurrency slots: vLLM's part of it is over), in one step: in Redis, one script."""
        if adm is None:
            by = "memory" if self._redis is None else "local" if self.local else "redis"
            adm = Admission(by=by)
        if adm.settled:
            # Charged once already: record the usage, nothing more is reserved.
            adm = Admission(by=adm.by, state=adm.state)
        adm.settled = True
        if adm.by == "redis":
            assert self._redis is not None
            try:
                await self._redis.settle(adm, key.key_id, key.user, prompt, completion, now)
                return
            except Exception as e:
                if self.failure_mode != "local" or not is_redis_down(e):
                    raise
                self._go_local(e)
                # Its Redis reservations expire by themselves; the usage goes to the spool.
        if self._redis is not None:
            assert self.spool is not None
            self.spool.record(key.key_id, key.user, prompt, completion, now)
            state = adm.state or self._local
            if adm.quota_key is not None:
                qk = adm.quota_key
                self._local_used[qk] = self._local_used.get(qk, 0) + prompt + completion
            if adm.by == "local":
                state.unreserve(adm)
                state.charge(adm, prompt + completion)
                state.release(adm)
            return
        await self.usage.record(key, prompt, completion, now)
        self._memory.unreserve(adm)
        self._memory.charge(adm, prompt + completion)
        self._memory.release(adm)

    async def release(self, adm: Admission) -> None:
        """Give back what a request that was never settled holds (settle() gives it back as
        it charges); safe to call twice."""
        if adm.released:
            return
        adm.released = True
        if not adm.slots and not adm.reserved:
            return
        if adm.by == "redis":
            assert self._redis is not None
            await self._redis.release(adm)
        else:
            (adm.state or self._memory).release(adm)

    # local mode

    def _go_local(self, e: BaseException) -> None:
        if self.local:
            return
        self.local = True
        self._local = MemoryState()
        self._local_used = {}
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
                await self._redis.replay(
                    row.uid, row.key_id, row.user, row.prompt, row.completion, row.at
                )
            self.spool.done([row.id for row in rows])
            sent += len(rows)
        return sent

    async def check(self) -> bool:
        """Whether limits can be decided: Redis answers, or the gateway is in local mode."""
        if self._redis is None or self.local:
            return True
        return bool(await self._redis.redis.ping())
