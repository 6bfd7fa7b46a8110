"""Admission and settlement: quotas and request, token and concurrency limits, global, per key
and per endpoint, in memory or in Redis.

Why not slowapi or `limits`: they decide once, when a route is entered; a completion outlives
that decision, its tokens are known only at its end, and a concurrency slot must be held until
the last chunk. Nor do they reserve: a limit checked before a request and charged after it
lets every request in flight through (20 concurrent requests against a 100-token quota ended
at 420 tokens). So the gateway takes each decision itself, in two steps:

* **Admission** checks every limit that applies (quota, tokens per minute, requests per
  second, concurrency; the key's, the service's, and each endpoint's) and, only when all
  pass, takes what the request needs from each: a slot, a request in the second's window,
  and a *reservation* of tokens against the quota and the token windows. The reservation is
  the request's most: a prompt estimate (:func:`reservation`) plus max_tokens x n. A request
  is admitted when used + reserved by requests in flight + its reservation <= the limit.
* **Settlement** at the request's end (finished, failed, client gone) records the real usage
  and frees the reservation in one step; a request that fails before it is charged frees it
  on release.

A reservation larger than the whole limit is cut to the limit: such a request runs alone,
when nothing else is used or reserved (a fresh quota, an idle minute), instead of never. When
the real usage exceeds the reservation (a prompt that tokenizes worse than estimated, a
request without max_tokens generating more than the default reservation), it is charged in
full: the limit is then exceeded by at most that difference.

In Redis (``redis_url``), admission is one Lua script (one round trip, atomic across every
gateway, on Redis' clock) and settlement another. Keys under ``redis_prefix``:

* ``qps:<scope>`` sorted set of the last second's requests (an exact moving window);
* ``tpm:<scope>`` hash ``{w, used}``: tokens used in the current minute ``w`` (fixed window:
  it keeps every token a response used even when one overshoots, and a well defined reset for
  ``x-ratelimit-reset-tokens``);
* ``usage:<key_id>:<period>`` the usage counters (usage.py); the quota reads ``tokens``;
* ``res:<scope>`` sorted set of reservations (member ``<lease>:<tokens>``, score = expiry)
  and ``ressum:<scope>`` their sum; ``<scope>`` is a tpm scope or ``quota:<key_id>:<period>``;
* ``conc:<scope>`` sorted set of concurrency leases (score = expiry).

Reservations and leases carry an expiry (the request timeout plus a margin), so those of a
gateway that died come back by themselves; expired reservations are subtracted from the sum
by the next admission that looks at the scope.

In one process the same decisions are taken on the event loop, with no await between check
and take: exact windows of timestamps (`limits`' MemoryStorage was measured at 90-130 us per
request; a deque is O(1) amortised), tokens per minute as a sliding window of one-second
buckets, and reservations as plain sums.

Redis unreachable: ``redis_failure_mode: closed`` refuses (503, the caller's job);
``local`` takes the decisions in this process, each limit divided by ``gateway_count``, and
spools usage to SQLite until a background task has replayed it into Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .apis import APIS
from .config import ENDPOINTS, RateLimit, Reservation
from .errors import ApiError, Headers
from .logs import error_text
from .usage import UsageSpool, UsageStore, quota_exhausted, quota_label, redis_usage_hashes

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

    from .keys import ApiKey
    from .logs import JsonLog

GLOBAL = "global"
_ENDPOINT_NAMES = {path: name for name, path in ENDPOINTS.items()}
Kind = Literal["quota", "tpm", "qps", "concurrency"]


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s"


# Tokens a chat template or a completion's framing adds to a prompt beyond its own bytes
# (BOS, the assistant's turn marker). Per message, the JSON's own keys ("role", "content")
# stand in for the template's markers.
_TEMPLATE_TOKENS = 8
_PROMPT_FIELDS = (
    "messages", "prompt", "input", "tools", "functions", "system", "instructions",
    "query", "documents", "text_1", "text_2", "data_1", "data_2", "queries", "items",
)  # fmt: skip


# Fields naming the most completion tokens: chat and completions (and Anthropic's Messages
# API), chat's newer name, the Responses API's.
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def requested_max_tokens(fields: dict[str, Any]) -> tuple[str, int] | None:
    """The completion tokens a request asks for at most, and the field that says so."""
    asked = None
    for name in _MAX_TOKENS_FIELDS:
        v = fields.get(name)
        if v is not None and (asked is None or v >= asked[1]):
            asked = (name, v)
    return asked


def reservation(
    fields: dict[str, Any], endpoint: str, cap: int | None, settings: Reservation
) -> int:
    """Tokens a request may use at most, by estimate: what admission reserves.

    Prompt: every byte of its JSON (messages, prompt, input, tools) / ``bytes_per_token``,
    plus a template allowance. Completion: max_tokens (or max_completion_tokens,
    max_output_tokens) x n (or best_of, which vLLM generates); without them the key's
    max_tokens cap, else ``default_max_tokens``. Embeddings, pooling and token counting
    generate nothing.
    """
    size = 0
    for name in _PROMPT_FIELDS:
        v = fields.get(name)
        if v is not None:
            size += len(orjson.dumps(v))
    prompt = math.ceil(size / settings.bytes_per_token) + _TEMPLATE_TOKENS
    api = APIS.get(endpoint)
    if api is not None and not api.generates:
        return prompt
    asked = requested_max_tokens(fields)
    out = asked[1] if asked is not None else cap or settings.default_max_tokens
    n = max(fields.get("n") or 1, fields.get("best_of") or 1)
    return prompt + out * n


@dataclass(slots=True, frozen=True)
class Check:
    """One limit a request is checked against."""

    kind: Kind
    scope: str  # names its counters: "global", "key:<id>", "key:<id>:/v1/embeddings"...
    limit: int
    reason: str  # gateway_rejections_total{reason} and the log's "limit"
    who: str  # the message's "Rate limit reached for <who>"


@dataclass(slots=True)
class Admission:
    """What an admitted request holds and must give back: slots and token reservations."""

    # Unique per request (a client's X-Request-ID need not be), so leases never collide.
    lease_id: str = ""
    # Concurrency scopes held; token scopes reserved (tpm scopes and the quota's), with the
    # tokens reserved in each; the tpm scopes to charge at settlement.
    slots: list[str] = field(default_factory=list)
    reserved: list[tuple[str, int]] = field(default_factory=list)
    tpm: list[str] = field(default_factory=list)
    # Who admitted it: "memory" (no Redis), "redis", or "local" (Redis away, local mode).
    by: str = "memory"
    # The local state that admitted it (local mode); its reservations live there.
    state: _MemoryState | None = None
    quota_key: tuple[str, str] | None = None
    settled: bool = False
    released: bool = False


@dataclass(slots=True)
class _Refusal:
    index: int
    remaining: int
    reset: float  # seconds
    used: int = 0
    reserved: int = 0


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


class _MemoryState:
    """Windows, reservations and slots of one process. Check and take run with no await
    between them, so on one event loop each admission is atomic."""

    def __init__(self) -> None:
        self.qps: dict[str, _Window] = {}
        self.tpm: dict[str, _TokenLog] = {}
        self.reserved: dict[str, int] = {}
        self.held: dict[str, int] = {}

    def admit(
        self, checks: list[Check], amount: int, quota_used: int, adm: Admission
    ) -> _Refusal | None:
        now = time.monotonic()
        for i, c in enumerate(checks):
            kind = c.kind
            if kind == "qps":
                w = self.qps.get(c.scope)
                if w is not None and w.full(now, c.limit, 1.0):
                    return _Refusal(i, 0, w.reset_after(now, 1.0))
            elif kind == "concurrency":
                if self.held.get(c.scope, 0) >= c.limit:
                    return _Refusal(i, 0, 1.0)
            else:
                log = self.tpm.get(c.scope) if kind == "tpm" else None
                used = quota_used if kind == "quota" else log.used(now, 60.0) if log else 0
                res = self.reserved.get(c.scope, 0)
                if used + res + min(amount, c.limit) > c.limit:
                    target = c.limit - res - min(amount, c.limit)
                    reset = log.reset_after(now, 60.0, target) if log else 1.0
                    return _Refusal(i, c.limit - used - res, reset, used, res)
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


# Admission. KEYS: three per check (padded with the first for checks that need one); ARGV:
# lease id, lease ttl (ms), then per check its kind (q, c, t: tokens per minute, u: quota),
# limit and the tokens it reserves. Returns {0, 0, 0, quota used} when admitted, else {index
# of the first refusing check (1-based), remaining, reset (ms), used, reserved}.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = (#ARGV - 2) / 3
local win = math.floor(now / 60000)
local quota_used = -1
for i = 1, n do
  local kind = ARGV[3 * i]
  local limit = tonumber(ARGV[3 * i + 1])
  local k1, k2, k3 = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if kind == 'q' then
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now - 1000)
    if redis.call('ZCARD', k1) >= limit then
      local first = redis.call('ZRANGE', k1, 0, 0, 'WITHSCORES')
      return {i, 0, tonumber(first[2]) + 1000 - now, 0, 0}
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now)
    if redis.call('ZCARD', k1) >= limit then
      return {i, 0, 1000, 0, 0}
    end
  else
    local used = 0
    if kind == 't' then
      local h = redis.call('HMGET', k1, 'w', 'used')
      if tonumber(h[1]) == win then used = tonumber(h[2]) or 0 end
    else
      used = tonumber(redis.call('HGET', k1, 'tokens') or '0')
      quota_used = used
    end
    local old = redis.call('ZRANGEBYSCORE', k2, '-inf', now)
    if #old > 0 then
      local gone = 0
      for _, m in ipairs(old) do
        gone = gone + tonumber(string.match(m, ':(%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', k2, '-inf', now)
      redis.call('DECRBY', k3, gone)
    end
    local reserved = math.max(0, tonumber(redis.call('GET', k3) or '0'))
    if used + reserved + tonumber(ARGV[3 * i + 2]) > limit then
      local reset = 1000
      if kind == 't' then reset = 60000 - now % 60000 end
      return {i, limit - used - reserved, reset, used, reserved}
    end
  end
end
for i = 1, n do
  local kind = ARGV[3 * i]
  local k1, k2, k3 = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if kind == 'q' then
    redis.call('ZADD', k1, now, lease)
    redis.call('PEXPIRE', k1, 2000)
  elseif kind == 'c' then
    redis.call('ZADD', k1, now + ttl, lease)
    redis.call('PEXPIRE', k1, ttl)
  else
    local amount = ARGV[3 * i + 2]
    redis.call('ZADD', k2, now + ttl, lease .. ':' .. amount)
    redis.call('INCRBY', k3, amount)
    redis.call('PEXPIRE', k2, ttl)
    redis.call('PEXPIRE', k3, ttl)
  end
end
return {0, 0, 0, quota_used, 0}
"""

# Usage counters: KEYS[first .. first + ARGV[5] - 1] are the usage hashes of the request's
# periods; ARGV: 2 prompt, 3 completion, 4 user, 5 number of hashes, then one TTL each.
_RECORD_LUA = """
local prompt = tonumber(ARGV[2])
local completion = tonumber(ARGV[3])
local nu = tonumber(ARGV[5])
for i = 1, nu do
  local h = KEYS[first + i - 1]
  redis.call('HINCRBY', h, 'requests', 1)
  redis.call('HINCRBY', h, 'prompt_tokens', prompt)
  redis.call('HINCRBY', h, 'completion_tokens', completion)
  redis.call('HINCRBY', h, 'tokens', prompt + completion)
  redis.call('HSET', h, 'user', ARGV[4])
  local ttl = tonumber(ARGV[5 + i])
  if ttl > 0 then redis.call('EXPIRE', h, ttl) end
end
"""

# Settlement: the usage (as _RECORD_LUA, from KEYS[1]), then the reservations freed (pairs
# of keys: set and sum; ARGV after the TTLs: their count, then the tokens of each), then the
# concurrency slots given back (sets; ARGV next: their count), then the tokens charged to the
# tpm counters (the remaining KEYS). ARGV[1]: the lease id. Slots go back here, not in a
# release after the answer: one round trip to Redis per request saved.
_SETTLE_LUA = (
    "local first = 1\n"
    + _RECORD_LUA
    + """
local lease = ARGV[1]
local nr = tonumber(ARGV[6 + nu])
for j = 1, nr do
  local amount = ARGV[6 + nu + j]
  local z, s = KEYS[nu + 2 * j - 1], KEYS[nu + 2 * j]
  if redis.call('ZREM', z, lease .. ':' .. amount) == 1 then
    redis.call('DECRBY', s, amount)
  end
end
local nc = tonumber(ARGV[7 + nu + nr])
for i = nu + 2 * nr + 1, nu + 2 * nr + nc do
  redis.call('ZREM', KEYS[i], lease)
end
local total = prompt + completion
if total > 0 then
  local t = redis.call('TIME')
  local win = math.floor(tonumber(t[1]) / 60)
  for k = nu + 2 * nr + nc + 1, #KEYS do
    if tonumber(redis.call('HGET', KEYS[k], 'w')) == win then
      redis.call('HINCRBY', KEYS[k], 'used', total)
    else
      redis.call('HSET', KEYS[k], 'w', win, 'used', total)
    end
    redis.call('PEXPIRE', KEYS[k], 120000)
  end
end
return 1
"""
)

# Replay of spooled usage: KEYS[1] marks the row as counted (so a replay cut short and done
# again counts it once), then the usage hashes. ARGV[1]: the mark's TTL in seconds.
_REPLAY_LUA = (
    """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
local first = 2
"""
    + _RECORD_LUA
    + "return 1\n"
)

# Release: KEYS: ARGV[2] concurrency sets, then pairs (set, sum) of reservations not
# settled, whose tokens follow in ARGV.
_RELEASE_LUA = """
local lease = ARGV[1]
local nc = tonumber(ARGV[2])
for i = 1, nc do
  redis.call('ZREM', KEYS[i], lease)
end
for j = 1, (#KEYS - nc) / 2 do
  local amount = ARGV[2 + j]
  local z, s = KEYS[nc + 2 * j - 1], KEYS[nc + 2 * j]
  if redis.call('ZREM', z, lease .. ':' .. amount) == 1 then
    redis.call('DECRBY', s, amount)
  end
end
return 1
"""

_KIND_CODE = {"qps": "q", "concurrency": "c", "tpm": "t", "quota": "u"}
# Spooled rows replayed are marked for a week: far longer than any outage's replay takes.
_REPLAY_MARK_TTL = 7 * 86400


class _RedisState:
    """The limits shared by every gateway using one Redis."""

    def __init__(self, redis: Redis, prefix: str, lease_ttl: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self._ttl_ms = int(lease_ttl * 1000)
        self._admit = redis.register_script(_ADMIT_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)
        self._replay = redis.register_script(_REPLAY_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    def _keys(self, c: Check, quota_label: str, key_id: str) -> tuple[str, str, str]:
        p = self.prefix
        if c.kind == "qps":
            k = p + "qps:" + c.scope
            return k, k, k
        if c.kind == "concurrency":
            k = p + "conc:" + c.scope
            return k, k, k
        if c.kind == "tpm":
            return p + "tpm:" + c.scope, p + "res:" + c.scope, p + "ressum:" + c.scope
        return f"{p}usage:{key_id}:{quota_label}", p + "res:" + c.scope, p + "ressum:" + c.scope

    async def admit(
        self, checks: list[Check], amount: int, key_id: str, label: str, adm: Admission
    ) -> tuple[_Refusal | None, int]:
        keys: list[str] = []
        args: list[Any] = [adm.lease_id, self._ttl_ms]
        for c in checks:
            keys.extend(self._keys(c, label, key_id))
            args += (_KIND_CODE[c.kind], c.limit, min(amount, c.limit))
        r = await self._admit(keys=keys, args=args)
        index, remaining, reset_ms, used, reserved = (int(x) for x in r)
        if index:
            # The quota's usage, when the quota (always the first check) refused it.
            seen = used if index == 1 and checks[0].kind == "quota" else -1
            return _Refusal(index - 1, remaining, reset_ms / 1000, used, reserved), seen
        for c in checks:
            if c.kind == "concurrency":
                adm.slots.append(c.scope)
            elif c.kind != "qps":
                adm.reserved.append((c.scope, min(amount, c.limit)))
                if c.kind == "tpm":
                    adm.tpm.append(c.scope)
        return None, used

    async def settle(
        self, adm: Admission, key_id: str, user: str, prompt: int, completion: int, now: float
    ) -> None:
        p = self.prefix
        hashes = redis_usage_hashes(p, key_id, now)
        keys = [h for h, _ in hashes]
        args: list[Any] = [adm.lease_id, prompt, completion, user, len(hashes)]
        args += [ttl for _, ttl in hashes]
        args.append(len(adm.reserved))
        for scope, tokens in adm.reserved:
            keys += (p + "res:" + scope, p + "ressum:" + scope)
            args.append(tokens)
        keys += [p + "conc:" + s for s in adm.slots]
        args.append(len(adm.slots))
        keys += [p + "tpm:" + s for s in adm.tpm]
        await self._settle(keys=keys, args=args)
        adm.slots, adm.reserved = [], []  # given back: nothing left for release()

    async def replay(
        self, uid: str, key_id: str, user: str, prompt: int, completion: int, at: float
    ) -> None:
        hashes = redis_usage_hashes(self.prefix, key_id, at)
        keys = [self.prefix + "spooled:" + uid, *(h for h, _ in hashes)]
        args: list[Any] = [_REPLAY_MARK_TTL, prompt, completion, user, len(hashes)]
        args += [ttl for _, ttl in hashes]
        await self._replay(keys=keys, args=args)

    async def release(self, adm: Admission) -> None:
        p = self.prefix
        keys = [p + "conc:" + s for s in adm.slots]
        args: list[Any] = [adm.lease_id, len(adm.slots)]
        for scope, tokens in adm.reserved:
            keys += (p + "res:" + scope, p + "ressum:" + scope)
            args.append(tokens)
        if keys:
            await self._release(keys=keys, args=args)


def _is_redis_down(e: BaseException) -> bool:
    """A failure to reach Redis (as opposed to a bug or a script error)."""
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    return isinstance(e, ConnectionError | TimeoutError | BusyLoadingError | OSError)


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
        self._memory = _MemoryState()
        self._redis = _RedisState(redis, prefix, lease_ttl) if redis is not None else None
        self.failure_mode = failure_mode
        self.gateway_count = gateway_count
        self.spool = spool
        self.log = log
        self._gauge = local_gauge
        # Local mode: Redis is away, limits are this process' share.
        self.local = False
        self._local = _MemoryState()
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
                if self.failure_mode != "local" or not _is_redis_down(e):
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
        self, checks: list[Check], r: _Refusal, key: ApiKey, amount: int, now: float
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
                if self.failure_mode != "local" or not _is_redis_down(e):
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
        self._local = _MemoryState()
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
                if not _is_redis_down(e) and self.log is not None:
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
