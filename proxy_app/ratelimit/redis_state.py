"""Limits in Redis, shared by every gateway: admission and settlement are each one Lua script
(lua/, loaded once), atomic across gateways, on Redis' clock. The keys are listed in the
package's docstring."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ledger import Attribution, day_of, redis_field
from ..usage import (
    SpooledUsage,
    ledger_ttl,
    redis_ledger_key,
    redis_usage_hashes,
    redis_usage_key,
)
from .plan import Admission, Check, Refusal

if TYPE_CHECKING:
    from redis.asyncio import Redis

_LUA = Path(__file__).with_name("lua")


def _lua(name: str) -> str:
    return (_LUA / name).read_text(encoding="utf-8")


# Settlement and replay record usage as record.lua does (from KEYS[first]); settlement and
# release give back reservations and slots with free.lua's functions.
ADMIT = _lua("admit.lua")
SETTLE = _lua("free.lua") + "local first = 1\n" + _lua("record.lua") + _lua("settle.lua")
REPLAY = _lua("replay.lua") + _lua("record.lua") + "return 1\n"
REPLAY_ERROR = _lua("replay_error.lua")
RELEASE = _lua("free.lua") + _lua("release.lua")

_KIND_CODE = {"qps": "q", "concurrency": "c", "tpm": "t", "quota": "u"}
# Spooled rows replayed are marked for a week: far longer than any outage's replay takes.
_REPLAY_MARK_TTL = 7 * 86400


class RedisState:
    """The limits shared by every gateway using one Redis."""

    def __init__(
        self, redis: Redis, prefix: str, lease_ttl: float, retention_days: int = 400
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self._ttl_ms = int(lease_ttl * 1000)
        self._ledger_ttl = ledger_ttl(retention_days)
        self._admit = redis.register_script(ADMIT)
        self._settle = redis.register_script(SETTLE)
        self._replay = redis.register_script(REPLAY)
        self._replay_error = redis.register_script(REPLAY_ERROR)
        self._release = redis.register_script(RELEASE)

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
        usage = redis_usage_key(p, key_id, quota_label)
        return usage, p + "res:" + c.scope, p + "ressum:" + c.scope

    async def admit(
        self, checks: list[Check], amount: int, key_id: str, label: str, adm: Admission
    ) -> tuple[Refusal | None, int]:
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
            return Refusal(index - 1, remaining, reset_ms / 1000, used, reserved), seen
        for c in checks:
            if c.kind == "concurrency":
                adm.slots.append(c.scope)
            elif c.kind != "qps":
                adm.reserved.append((c.scope, min(amount, c.limit)))
                if c.kind == "tpm":
                    adm.tpm.append(c.scope)
        return None, used

    def _ledger(
        self, keys: list[str], args: list[Any], user: str, now: float, who: Attribution,
        error: bool,
    ) -> None:  # fmt: skip
        """record.lua's ledger arguments: the day's hash, the field, its TTL, failed."""
        keys.append(redis_ledger_key(self.prefix, day_of(now)))
        args += [redis_field(user, who), self._ledger_ttl, int(error)]

    async def settle(
        self,
        adm: Admission,
        key_id: str,
        user: str,
        prompt: int,
        completion: int,
        now: float,
        who: Attribution,
        error: bool = False,
    ) -> None:
        p = self.prefix
        hashes = redis_usage_hashes(p, key_id, now)
        keys = [h for h, _ in hashes]
        args: list[Any] = [adm.lease_id, prompt, completion, user, len(hashes)]
        args += [ttl for _, ttl in hashes]
        self._ledger(keys, args, user, now, who, error)
        args.append(len(adm.reserved))
        for scope, tokens in adm.reserved:
            keys += (p + "res:" + scope, p + "ressum:" + scope)
            args.append(tokens)
        keys += [p + "conc:" + s for s in adm.slots]
        args.append(len(adm.slots))
        keys += [p + "tpm:" + s for s in adm.tpm]
        await self._settle(keys=keys, args=args)
        adm.slots, adm.reserved = [], []  # given back: nothing left for release()

    async def replay(self, row: SpooledUsage) -> None:
        # A row spooled by a gateway before the ledger: the key's own user, model unknown.
        who = Attribution(row.model, row.end_user or row.user)
        mark = self.prefix + "spooled:" + row.uid
        if not row.charged:
            day = redis_ledger_key(self.prefix, day_of(row.at))
            args = [_REPLAY_MARK_TTL, redis_field(row.user, who), self._ledger_ttl]
            await self._replay_error(keys=[mark, day], args=args)
            return
        hashes = redis_usage_hashes(self.prefix, row.key_id, row.at)
        keys = [mark, *(h for h, _ in hashes)]
        args: list[Any] = [_REPLAY_MARK_TTL, row.prompt, row.completion, row.user, len(hashes)]
        args += [ttl for _, ttl in hashes]
        self._ledger(keys, args, row.user, row.at, who, row.error)
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


def is_redis_down(e: BaseException) -> bool:
    """A failure to reach Redis (as opposed to a bug or a script error)."""
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    return isinstance(e, ConnectionError | TimeoutError | BusyLoadingError | OSError)
