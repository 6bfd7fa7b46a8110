"""The APIs the gateway forwards to vLLM, each described once, and what their requests
look like.

Every forwarded endpoint goes through the same path (proxy.py: key, limits, routing, usage);
what differs between them is written here: the name config and keys files give it, the field
a request must have, which fields ask for completion tokens, where the answer's usage is,
how its stream carries usage and ends, and the shape of its errors (OpenAI's everywhere but
Anthropic's Messages API). So is what every part of the gateway reads of a request: where
its prompt is (limits estimate it, routing hashes its start, usage estimates it when vLLM
reports nothing) and how many tokens it asks for.

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

    # Its name in config and keys files (``endpoints: {chat: ...}``).
    name: str
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
    # Where vLLM reads the request's scheduling priority: its X-Vllm-Priority header (which
    # wins over the body's field, and is all /v1/messages reads), the body's "priority"
    # (pooling APIs), or nowhere (token counting runs no model).
    priority: Literal["header", "body", "none"] = "header"

    @property
    def generates(self) -> bool:
        return bool(self.max_tokens)


_CHAT_TOKENS = ("max_tokens", "max_completion_tokens")

APIS: dict[str, Api] = {
    a.path: a
    for a in (
        Api(
            "chat",
            "/v1/chat/completions",
            ("messages", list, "an array of messages"),
            "openai",
            _CHAT_TOKENS,
            streams=True,
        ),
        Api(
            "completions",
            "/v1/completions",
            ("prompt", (str, list), "a string or an array"),
            "openai",
            ("max_tokens",),
            streams=True,
        ),
        Api(
            "embeddings",
            "/v1/embeddings",
            ("input", (str, list), "a string or an array"),
            "openai",
            priority="body",
        ),
        Api(
            "responses",
            "/v1/responses",
            ("input", (str, list), "a string or an array of input items"),
            "responses",
            ("max_output_tokens",),
            streams=True,
        ),
        Api(
            "messages",
            "/v1/messages",
            ("messages", list, "an array of messages"),
            "anthropic",
            ("max_tokens",),
            streams=True,
            anthropic=True,
        ),
        Api(
            "count_tokens",
            "/v1/messages/count_tokens",
            ("messages", list, "an array of messages"),
            "none",
            anthropic=True,
            priority="none",
        ),
        Api(
            "rerank",
            "/v1/rerank",
            ("query", (str, dict), "a string or an object"),
            "openai",
            priority="body",
        ),
        # vLLM's score API takes text_1/text_2, data_1/data_2 or queries/documents|items.
        Api("score", "/v1/score", None, "openai", priority="body"),
    )
}
# By the names config and keys files use.
BY_NAME: dict[str, Api] = {a.name: a for a in APIS.values()}

# Fields naming the most completion tokens, of every API: chat and completions (and
# Anthropic's Messages API), chat's newer name, the Responses API's.
MAX_TOKENS_FIELDS = tuple(dict.fromkeys(f for a in APIS.values() for f in a.max_tokens))

# Where a request's prompt is: chat's messages and tools, a completion's prompt, the
# Responses API's input and instructions, Anthropic's system, rerank's query and documents,
# score's pairs. One list for every API, not one per descriptor: vLLM takes some fields on
# more than one API (messages on embeddings), and the reservation, a bound, counts them all.
PROMPT_FIELDS = (
    "messages", "prompt", "input", "tools", "functions", "system", "instructions",
    "query", "documents", "text_1", "text_2", "data_1", "data_2", "queries", "items",
)  # fmt: skip

# Without a usage chunk (client gone, vLLM dropped), prompt tokens are estimated from the
# prompt's length: about 4 bytes per token for English text with BPE tokenizers.
BYTES_PER_TOKEN = 4


def requested_max_tokens(fields: dict[str, Any]) -> tuple[str, int] | None:
    """The completion tokens a request asks for at most, and the field that says so."""
    asked = None
    for name in MAX_TOKENS_FIELDS:
        v = fields.get(name)
        if v is not None and (asked is None or v >= asked[1]):
            asked = (name, v)
    return asked


def prompt_estimate(fields: dict[str, Any]) -> int:
    """The prompt's tokens guessed from its length, for charging when vLLM reports none."""
    size = 0
    for name in ("system", "instructions", "input"):  # Anthropic's, the Responses API's
        value = fields.get(name)
        if value is not None:
            size += len(orjson.dumps(value))
    messages = fields.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            size += len(orjson.dumps(content)) if content is not None else 0
            size += 4 * BYTES_PER_TOKEN  # role and ChatML markers
    prompt = fields.get("prompt")
    if prompt is not None:
        size += len(orjson.dumps(prompt))
    return max(1, size // BYTES_PER_TOKEN)


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


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(t for t in texts if isinstance(t, str))
    return "" if content is None else orjson.dumps(content).decode()


# The shortest text before a message's last paragraph that is taken for a document (or a
# tool list) and the paragraph for a question about it; shorter, it is an instruction
# ("Summarize this:") and the whole message decides.
SHARED_MIN_CHARS = 512


def _shared_part(text: str) -> str:
    """``text`` without its last paragraph (after its last blank line) when what comes before
    is at least SHARED_MIN_CHARS long: questions about one document, each a conversation of its
    own, then share a routing key, and the backend whose KV cache holds the document, as the
    turns of one conversation do. vLLM's cache can only reuse what comes first: a document
    after the question shares nothing anyway."""
    cut = text.rfind("\n\n")
    return text[:cut] if cut >= SHARED_MIN_CHARS else text


def prompt_start(fields: dict[str, Any], chars: int) -> str:
    """The part of a request that decides where its KV cache lives.

    Chat (and Anthropic's messages, the Responses API's input items): the system prompt
    (``system``, ``instructions``, or the system and developer messages before the first
    user message) and that user message: every turn of one conversation shares them.
    Completions, embeddings and a Responses input string: the start of the prompt (of its
    first item, for a list). That user message or prompt without its last paragraph when
    what comes before it is long (``_shared_part``): a document and a question about it.
    """
    head = fields.get("system", fields.get("instructions"))
    parts: list[str] = [_text(head)] if head is not None else []
    messages = fields.get("messages")
    items = fields.get("input")
    if messages is None and isinstance(items, list) and items and isinstance(items[0], dict):
        messages = items  # the Responses API's input items
    if isinstance(messages, list):
        size = sum(len(p) for p in parts)
        for m in messages:
            if size >= chars:
                break
            if not isinstance(m, dict):
                continue
            text = _text(m.get("content"))
            if m.get("role") == "user":
                parts.append(_shared_part(text))
                break
            parts.append(text)
            size += len(text)
        return "\x00".join(parts)[:chars]
    prompt = fields.get("prompt", items)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return ("\x00".join([*parts, _shared_part(prompt)]))[:chars]
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt[: chars // 4])
    return "\x00".join(parts)[:chars]


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
