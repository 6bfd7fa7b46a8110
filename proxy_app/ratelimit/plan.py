"""What a request is checked against and what it holds: the reservation of its tokens (an
estimate of its most), the checks of its key and endpoint, the admission that records what
was taken, and the 429 that names the limit that refused it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson

from ..apis import APIS
from ..config import Reservation
from ..errors import ApiError, Headers

if TYPE_CHECKING:
    from .memory import MemoryState

GLOBAL = "global"
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
    state: MemoryState | None = None
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
