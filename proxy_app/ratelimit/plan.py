"""What a request is checked against and what it holds: the reservation of its tokens (an
estimate of its most), the checks of its key and endpoint, the refusal that names the one
that refused it, and the admission that records what was taken and where it is held."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from ..apis import APIS, PROMPT_FIELDS, requested_max_tokens
from ..config import Reservation

if TYPE_CHECKING:
    from ..keys import ApiKey
    from ..usage import Entry

GLOBAL = "global"
Kind = Literal["quota", "tpm", "qps", "concurrency"]


# Tokens a chat template or a completion's framing adds to a prompt beyond its own bytes
# (BOS, the assistant's turn marker). Per message, the JSON's own keys ("role", "content")
# stand in for the template's markers.
_TEMPLATE_TOKENS = 8


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
    for name in PROMPT_FIELDS:
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


class Holder(Protocol):
    """Where an admission's slots and reservations are held: this process' memory (no
    Redis), Redis (shared by every gateway), or this gateway's share in memory (Redis away,
    local mode). Its settlement and release go back there (limiter.py)."""

    async def settle(
        self, adm: Admission, key: ApiKey, prompt: int, completion: int, at: Entry
    ) -> None:
        """Record the usage (and its ledger row) durably and give back what ``adm`` holds."""

    async def release(self, adm: Admission) -> None:
        """Give back what ``adm`` holds (a request that was never settled)."""


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
    # Where they are held, which settles and releases them (set at admission).
    holder: Holder | None = None
    # Local mode: the quota counter its usage counts toward in this gateway's share.
    quota_key: tuple[str, str] | None = None
    settled: bool = False
    released: bool = False


@dataclass(slots=True)
class Refusal:
    index: int
    remaining: int
    reset: float  # seconds
    used: int = 0
    reserved: int = 0
