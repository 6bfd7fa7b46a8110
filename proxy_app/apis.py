"""The APIs the gateway forwards to vLLM, each described once.

Every forwarded endpoint goes through the same path (proxy.py: key, limits, routing, usage);
what differs between them is written here: the field a request must have, which fields ask
for completion tokens, where the answer's usage is, how its stream carries usage and ends,
and the shape of its errors (OpenAI's everywhere but Anthropic's Messages API).

vLLM serves more than these (``/tokenize``, ``/pause``, ``/invocations``...): anything not
listed here is 404 at the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .errors import ApiError
from .outcome import Tokens

# Where a response's token counts are: OpenAI's usage (prompt_tokens, completion_tokens),
# the Responses API's (input_tokens, output_tokens), Anthropic's (input_tokens with the
# cache reads and writes counted apart, output_tokens), or none (count_tokens generates
# nothing and runs no model).
UsageShape = Literal["openai", "responses", "anthropic", "none"]


@dataclass(frozen=True, slots=True)
class Api:
    """One forwarded endpoint."""

    path: str
    # The field every request must have, its types and how a message says them.
    required: tuple[str, type | tuple[type, ...], str] | None
    usage: UsageShape
    # Fields that name the most completion tokens a request may generate (the first is
    # the one a key's max_tokens cap sets when the request names none); () = generates
    # nothing (embeddings, pooling, token counting).
    max_tokens: tuple[str, ...] = ()
    streams: bool = False
    # Anthropic's error shape and credentials header (x-api-key).
    anthropic: bool = False

    @property
    def generates(self) -> bool:
        return bool(self.max_tokens)


_CHAT_TOKENS = ("max_tokens", "max_completion_tokens")

APIS: dict[str, Api] = {
    a.path: a
    for a in (
        Api(
            "/v1/chat/completions",
            ("messages", list, "an array of messages"),
            "openai",
            _CHAT_TOKENS,
            streams=True,
        ),
        Api(
            "/v1/completions",
            ("prompt", (str, list), "a string or an array"),
            "openai",
            ("max_tokens",),
            streams=True,
        ),
        Api("/v1/embeddings", ("input", (str, list), "a string or an array"), "openai"),
        Api(
            "/v1/responses",
            ("input", (str, list), "a string or an array of input items"),
            "responses",
            ("max_output_tokens",),
            streams=True,
        ),
        Api(
            "/v1/messages",
            ("messages", list, "an array of messages"),
            "anthropic",
            ("max_tokens",),
            streams=True,
            anthropic=True,
        ),
        Api(
            "/v1/messages/count_tokens",
            ("messages", list, "an array of messages"),
            "none",
            anthropic=True,
        ),
        Api("/v1/rerank", ("query", (str, dict), "a string or an object"), "openai"),
        # vLLM's score API takes text_1/text_2, data_1/data_2 or queries/documents|items.
        Api("/v1/score", None, "openai"),
    )
}


def usage_tokens(usage: object, shape: UsageShape) -> Tokens | None:
    """The token counts of a usage object of ``shape``, if it is one."""
    if shape == "none":
        return Tokens(0, 0)
    if not isinstance(usage, dict):
        return None
    if shape == "openai":
        p = usage.get("prompt_tokens")
        c = usage.get("completion_tokens", 0)
    else:
        p = usage.get("input_tokens")
        c = usage.get("output_tokens", 0)
        if shape == "anthropic" and isinstance(p, int):
            # Anthropic counts the prompt's cached part apart from input_tokens.
            for name in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                extra = usage.get(name)
                if isinstance(extra, int):
                    p += extra
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return Tokens(p, c)


def body_usage(body: bytes, shape: UsageShape) -> Tokens | None:
    """The usage of a whole (not streamed) answer."""
    if shape == "none":
        return Tokens(0, 0)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_tokens(obj.get("usage"), shape) if isinstance(obj, dict) else None


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); the SDK picks
# its exception class by status, the type tells a reader what happened.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(status: int, message: str) -> bytes:
    """One error in Anthropic's shape."""
    return orjson.dumps(
        {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    )


def error_body_for(api: Api | None, err: ApiError) -> bytes:
    """The body of ``err`` in the shape of the API the request was for."""
    if api is not None and api.anthropic:
        return anthropic_error_body(err.status, err.message)
    return err.body()


def upstream_error_message(status: int, body: bytes) -> str | None:
    """The message of an error vLLM answered, whatever its shape."""
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip() or None
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    detail = obj.get("detail", obj.get("message"))
    if detail is None:
        return None
    return detail if isinstance(detail, str) else orjson.dumps(detail).decode()
