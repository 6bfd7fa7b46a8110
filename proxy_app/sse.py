"""Server-sent events from vLLM: pass them on whole, take the usage out, count the chunks.

Three stream shapes: OpenAI's (chat, completions: a usage chunk, then ``data: [DONE]``), the
Responses API's (``event: response.*``; the usage in the final ``response.completed``) and
Anthropic's (``event: message_start`` with the input tokens, ``message_delta`` with the
output tokens, ``message_stop``). In each the final event is held back (see SseScanner).
"""

from __future__ import annotations

from typing import Any

import orjson

from .apis import UsageShape, usage_tokens
from .outcome import Tokens

_SEP = b"\n\n"
_DONE = b"data: [DONE]"
# The events that end a Responses API stream, and an Anthropic one.
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
_MESSAGES_END = "message_stop"


def _event(event: bytes) -> tuple[str, Any]:
    """An event's name (its ``event:`` line, else its data's "type") and its data."""
    name = ""
    data: Any = None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                data = None
    if not name and isinstance(data, dict) and isinstance(data.get("type"), str):
        name = data["type"]
    return name, data


class SseScanner:
    """Splits an SSE byte stream into events as they complete.

    ``feed`` returns the bytes to forward now: complete events only (vLLM flushes whole
    events, so this adds no delay), without the usage-only chunk when the client did not ask
    for usage, and without the final ``data: [DONE]``, which the caller sends once the usage
    is stored, so a client never sees the end of a stream whose tokens were not counted.
    """

    __slots__ = ("_buf", "chunks", "done", "final", "held", "keep_usage", "shape", "usage")

    def __init__(self, keep_usage: bool, shape: UsageShape = "openai") -> None:
        self.keep_usage = keep_usage
        self.shape = shape
        self._buf = b""
        self.usage: dict[str, Any] | None = None
        self.final = False  # usage holds the whole stream's counts (not message_start's)
        self.chunks = 0
        self.done = False
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        """Take bytes from vLLM; return the bytes to forward to the client now."""
        if self.done:
            self.held += data
            return b""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(_SEP, start)
            if end < 0:
                break
            end += 2
            event = buf[start:end]
            start = end
            if self.shape != "openai":
                if self._ends(event):
                    self.done = True
                    self.held = event + buf[end:]
                    start = len(buf)
                    break
                out.append(event)
                continue
            if event.startswith(_DONE):
                self.done = True
                self.held = event + buf[end:]
                start = len(buf)
                break
            if self._keep(event):
                out.append(event)
        self._buf = buf[start:] if start < len(buf) else b""
        return b"".join(out) if len(out) != 1 else out[0]

    def _keep(self, event: bytes) -> bool:
        if b'"usage"' not in event:
            self.chunks += 1
            return True
        try:
            obj = orjson.loads(event[event.index(b":") + 1 :])
        except (ValueError, orjson.JSONDecodeError):
            self.chunks += 1
            return True
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(usage, dict):
            self.chunks += 1
            return True
        self.usage = usage
        if obj.get("choices"):
            # Usage riding on a content chunk (continuous usage stats): it carries tokens.
            self.chunks += 1
            return True
        return self.keep_usage

    def _ends(self, event: bytes) -> bool:
        """Responses and Messages streams: take the usage; whether the event is the last."""
        name, data = _event(event)
        delta = "_delta" if self.shape == "anthropic" else ".delta"
        if name.endswith(delta) and name != "message_delta":
            self.chunks += 1  # one per token, as vLLM sends them
        if not isinstance(data, dict):
            return False
        if self.shape == "responses":
            response = data.get("response")
            if name in _RESPONSES_END:
                if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                    self.usage = response["usage"]
                    self.final = True
                return True
            return False
        # Anthropic: input tokens in message_start, the output (and final input) tokens in
        # message_delta.
        if name == "message_start" and isinstance(data.get("message"), dict):
            usage = data["message"].get("usage")
            if isinstance(usage, dict):
                self.usage = {**usage}
        elif name == "message_delta" and isinstance(data.get("usage"), dict):
            self.usage = {**(self.usage or {}), **data["usage"]}
            self.final = True
        return name == _MESSAGES_END

    def tokens(self, prompt_estimate: int) -> Tokens:
        """The stream's usage when it came whole, else an estimate: each token chunk is
        one token, and the prompt is what message_start said, or ``prompt_estimate``."""
        counts = usage_tokens(self.usage, self.shape) if self.usage is not None else None
        if counts is not None and (self.final or self.shape == "openai"):
            return counts
        prompt = counts.prompt if counts is not None and counts.prompt else prompt_estimate
        return Tokens(prompt, self.chunks, estimated=True)

    def rest(self) -> bytes:
        """Bytes still to forward at the end: an unterminated event, then the held end."""
        rest = self._buf + self.held
        self._buf = b""
        self.held = b""
        return rest
