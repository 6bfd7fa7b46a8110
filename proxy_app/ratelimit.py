"""Request, token and concurrency limits, global and per key, in memory or in Redis.

Why not slowapi: it decides once, when a route is entered, through a decorator; a streamed
completion outlives that decision, its tokens are known only at its end, and a concurrency
slot must be held until the last chunk. The gateway takes each decision itself instead:

* Shared limits (``redis_url`` set) use the `limits` library (slowapi's engine) through its
  asyncio API, which never blocks the event loop: requests per second with the moving-window
  strategy (exact: no burst of 2x at window edges as fixed windows allow), tokens per minute
  with the fixed-window strategy, because it records every token a response used even when
  one response overshoots (the moving and sliding strategies refuse such a hit and would
  forget tokens already spent), with a well defined reset for ``x-ratelimit-reset-tokens``.
  Its Lua scripts make each decision atomic across gateways.
* In one process the same decisions are taken by the small exact windows below. `limits`'
  MemoryStorage was measured at 90-130 us per request with high ceilings (a list insert at
  the front for every hit, expiry sweeps through thread hops), the gateway's whole latency
  budget; a deque of timestamps is exact and O(1) amortised. Tokens per minute are a sliding
  window of one-second buckets here: the tokens used in the last 60 seconds.

A request is admitted while its token windows are not exhausted; its tokens are charged when
it ends, streamed or not.

Neither library has a concurrency primitive, so concurrent-request slots are counted here: a
counter in memory, and in Redis a sorted set of leases per scope, acquired atomically by a
Lua script. A lease carries an expiry (the request timeout plus a margin), so slots held by a
gateway that was killed come back by themselves.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from .config import RateLimit
from .errors import ApiError, Headers

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .keys import ApiKey

GLOBAL = "global"


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s"


@dataclass(slots=True)
class Admission:
    """What an admitted request holds and must give back: its concurrency slots."""

    # Unique per request (a client's X-Request-ID need not be), so leases never collide.
    lease_id: str = ""
    scopes: list[str] = field(default_factory=list)
    released: bool = False


def rate_limited(
    reason: str,
    scope_label: str,
    kind: str,
    limit: int,
    remaining: int,
    reset_after: float,
    extra: Headers | None = None,
) -> ApiError:
    """429 in OpenAI's shape with Retry-After and the x-ratelimit-* trio of ``kind``."""
    retry_after = max(1, math.ceil(reset_after))
    headers: Headers = [
        (b"retry-after", str(retry_after).encode()),
        (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, remaining)).encode()),
        (f"x-ratelimit-reset-{kind}".encode(), format_duration(reset_after).encode()),
    ]
    if extra:
        headers.extend(extra)
    what = {
        "qps": f"requests per second ({limit}/s)",
        "tpm": f"tokens per minute ({limit}/min)",
        "concurrency": f"concurrent requests ({limit})",
    }[reason]
    return ApiError(
        429,
        f"Rate limit reached for {scope_label} on {what}. Please try again in "
        f"{format_duration(reset_after)}.",
        # OpenAI's types: "requests" for request limits, "tokens" for token limits.
        kind,
        "rate_limit_exceeded",
        headers=headers,
        metric_type="rate_limit",
    )


# Acquire one slot in every scope or in none. KEYS: the scopes' sorted sets; ARGV: lease id,
# lease ttl (ms), then one limit per key. Returns 0 when acquired, else the 1-based index of
# the first full scope. Redis' own clock is used so gateways with skewed clocks agree.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i, k in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if redis.call('ZCARD', k) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, k in ipairs(KEYS) do
  redis.call('ZADD', k, now + ttl, ARGV[1])
  redis.call('PEXPIRE', k, ttl)
end
return 0
"""


class _Concurrency:
    """Concurrency slots: the in-memory implementation."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def acquire(self, lease_id: str, scopes: list[tuple[str, int]]) -> int:
        held = self._held
        for i, (scope, limit) in enumerate(scopes):
            if held.get(scope, 0) >= limit:
                return i + 1
        for scope, _ in scopes:
            held[scope] = held.get(scope, 0) + 1
        return 0

    async def release(self, lease_id: str, scopes: list[str]) -> None:
        held = self._held
        for scope in scopes:
            n = held.get(scope, 0) - 1
            if n > 0:
                held[scope] = n
            else:
                held.pop(scope, None)

    def in_use(self, scope: str) -> int:
        return self._held.get(scope, 0)


class _RedisConcurrency:
    """Concurrency slots shared by every gateway using the same Redis."""

    def __init__(self, redis: Redis, prefix: str, lease_ttl: float) -> None:
        self._redis = redis
        self._prefix = prefix + "conc:"
        self._ttl_ms = int(lease_ttl * 1000)
        self._acquire = redis.register_script(_ACQUIRE_LUA)

    async def acquire(self, lease_id: str, scopes: list[tuple[str, int]]) -> int:
        keys = [self._prefix + s for s, _ in scopes]
        args: list[Any] = [lease_id, self._ttl_ms, *(limit for _, limit in scopes)]
        return int(await self._acquire(keys=keys, args=args))

    async def release(self, lease_id: str, scopes: list[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for s in scopes:
                pipe.zrem(self._prefix + s, lease_id)
            await pipe.execute()


class _Window:
    """Exact moving window: at most ``limit`` hits in any ``period`` seconds."""

    __slots__ = ("hits",)

    def __init__(self) -> None:
        self.hits: deque[float] = deque()

    def hit(self, now: float, limit: int, period: float) -> bool:
        hits = self.hits
        cutoff = now - period
        while hits and hits[0] <= cutoff:
            hits.popleft()
        if len(hits) >= limit:
            return False
        hits.append(now)
        return True

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

    def reset_after(self, now: float, period: float, limit: int) -> float:
        """Seconds until enough tokens leave the window to admit a request again."""
        left = self.total
        for sec, tokens in self.buckets:
            left -= tokens
            if left < limit:
                return max(0.0, sec + 1 + period - now)
        return 0.0


class _MemoryWindows:
    """Request and token windows of one process."""

    def __init__(self) -> None:
        self._qps: dict[str, _Window] = {}
        self._tpm: dict[str, _TokenLog] = {}

    async def hit_qps(self, scope: str, limit: int) -> tuple[bool, int, float]:
        w = self._qps.get(scope)
        if w is None:
            w = self._qps[scope] = _Window()
        now = time.monotonic()
        if w.hit(now, limit, 1.0):
            return True, 0, 0.0
        return False, 0, w.reset_after(now, 1.0)

    async def tokens_left(self, scope: str, limit: int) -> tuple[bool, int, float]:
        log = self._tpm.get(scope)
        if log is None:
            return True, limit, 0.0
        now = time.monotonic()
        used = log.used(now, 60.0)
        if used < limit:
            return True, limit - used, 0.0
        return False, 0, log.reset_after(now, 60.0, limit)

    async def charge(self, scope: str, limit: int, tokens: int) -> None:
        log = self._tpm.get(scope)
        if log is None:
            log = self._tpm[scope] = _TokenLog()
        now = time.monotonic()
        log.used(now, 60.0)
        log.charge(now, tokens)

    async def check(self) -> bool:
        return True


class _RedisWindows:
    """Request and token windows shared through Redis, by the `limits` library."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.storage = RedisStorage(
            "async+" + redis_url, implementation="redispy", key_prefix=prefix + "limits"
        )
        self._moving = MovingWindowRateLimiter(self.storage)
        self._fixed = FixedWindowRateLimiter(self.storage)
        self._items: dict[tuple[str, int], RateLimitItem] = {}

    def _item(self, per: str, amount: int) -> RateLimitItem:
        item = self._items.get((per, amount))
        if item is None:
            cls = RateLimitItemPerSecond if per == "s" else RateLimitItemPerMinute
            item = self._items[(per, amount)] = cls(amount, namespace="llmhost")
        return item

    async def hit_qps(self, scope: str, limit: int) -> tuple[bool, int, float]:
        item = self._item("s", limit)
        if await self._moving.hit(item, scope):
            return True, 0, 0.0
        reset, remaining = await self._moving.get_window_stats(item, scope)
        return False, remaining, reset - time.time()

    async def tokens_left(self, scope: str, limit: int) -> tuple[bool, int, float]:
        item = self._item("m", limit)
        if await self._fixed.test(item, scope):
            return True, 0, 0.0
        reset, remaining = await self._fixed.get_window_stats(item, scope)
        return False, remaining, reset - time.time()

    async def charge(self, scope: str, limit: int, tokens: int) -> None:
        await self._fixed.hit(self._item("m", limit), scope, cost=tokens)

    async def check(self) -> bool:
        return bool(await self.storage.check())


class Limiter:
    """Admits or refuses requests against the global limits and the key's own."""

    def __init__(
        self,
        global_limits: RateLimit,
        redis_url: str | None = None,
        redis: Redis | None = None,
        prefix: str = "llmhost:",
        lease_ttl: float = 960.0,
    ) -> None:
        self.global_limits = global_limits
        if redis_url is not None:
            if redis is None:
                raise ValueError("a Redis client is needed with redis_url")
            self._windows: _MemoryWindows | _RedisWindows = _RedisWindows(redis_url, prefix)
            self._conc: _Concurrency | _RedisConcurrency = _RedisConcurrency(
                redis, prefix, lease_ttl
            )
        else:
            self._windows = _MemoryWindows()
            self._conc = _Concurrency()

    async def admit(self, key: ApiKey) -> Admission:
        """Admit one request or raise a 429 ApiError naming the limit that refused it."""
        g = self.global_limits
        w = self._windows
        scope_key = "key:" + key.key_id

        # Tokens first: checking costs nothing, while a request-rate hit is consumed.
        if key.tokens_per_minute is not None:
            ok, remaining, reset = await w.tokens_left(scope_key, key.tokens_per_minute)
            if not ok:
                raise rate_limited(
                    "tpm", "this API key", "tokens", key.tokens_per_minute, remaining, reset
                ).with_reason("tpm_key")
        if g.tokens_per_minute is not None:
            ok, remaining, reset = await w.tokens_left(GLOBAL, g.tokens_per_minute)
            if not ok:
                raise rate_limited(
                    "tpm", "the service", "tokens", g.tokens_per_minute, remaining, reset
                ).with_reason("tpm_global")
        if key.qps is not None:
            ok, remaining, reset = await w.hit_qps(scope_key, key.qps)
            if not ok:
                raise rate_limited(
                    "qps", "this API key", "requests", key.qps, remaining, reset
                ).with_reason("qps_key")
        if g.qps is not None:
            ok, remaining, reset = await w.hit_qps(GLOBAL, g.qps)
            if not ok:
                raise rate_limited(
                    "qps", "the service", "requests", g.qps, remaining, reset
                ).with_reason("qps_global")

        admission = Admission()
        scopes: list[tuple[str, int]] = []
        if key.concurrent is not None:
            scopes.append((scope_key, key.concurrent))
        if g.concurrent is not None:
            scopes.append((GLOBAL, g.concurrent))
        if scopes:
            admission.lease_id = os.urandom(12).hex()
            full = await self._conc.acquire(admission.lease_id, scopes)
            if full:
                scope, limit = scopes[full - 1]
                is_key = scope != GLOBAL
                # A slot frees when some request ends: nothing better to promise than soon.
                raise rate_limited(
                    "concurrency",
                    "this API key" if is_key else "the service",
                    "requests",
                    limit,
                    0,
                    1.0,
                ).with_reason("concurrency_key" if is_key else "concurrency_global")
            admission.scopes = [s for s, _ in scopes]
        return admission

    async def release(self, admission: Admission) -> None:
        """Give back the request's concurrency slots; safe to call twice."""
        if admission.released:
            return
        admission.released = True
        if admission.scopes:
            await self._conc.release(admission.lease_id, admission.scopes)

    async def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count a finished request's tokens against the tokens-per-minute windows."""
        if tokens <= 0:
            return
        if key.tokens_per_minute is not None:
            await self._windows.charge("key:" + key.key_id, key.tokens_per_minute, tokens)
        g = self.global_limits.tokens_per_minute
        if g is not None:
            await self._windows.charge(GLOBAL, g, tokens)

    async def check(self) -> bool:
        """Whether the limit store answers."""
        return await self._windows.check()
