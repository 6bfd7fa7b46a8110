"""Server-sent events from vLLM: pass them on whole, take the usage out, count the chunks."""

from __future__ import annotations

import orjson

from .outcome import Tokens

_SEP = b"\n\n"
_DONE = b"data: [DONE]"


class SseScanner:
    """Splits an SSE byte stream into events as they complete.

    ``feed`` returns the bytes to forward now: complete events only (vLLM flushes whole
    events, so this adds no delay), without the usage-only chunk when the client did not ask
    for usage, and without the final ``data: [DONE]``, which the caller sends once the usage
    is stored, so a client never sees the end of a stream whose tokens were not counted.
    """

    __slots__ = ("_buf", "chunks", "done", "held", "keep_usage", "usage")

    def __init__(self, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self._buf = b""
        self.usage: dict[str, int] | None = None
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

    def rest(self) -> bytes:
        """Bytes still to forward at the end: an unterminated event, then the held end."""
        rest = self._buf + self.held
        self._buf = b""
        self.held = b""
        return rest


def usage_of(obj: object) -> Tokens | None:
    """The token counts of an OpenAI usage object, if it is one."""
    if not isinstance(obj, dict):
        return None
    p = obj.get("prompt_tokens")
    c = obj.get("completion_tokens", 0)
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return Tokens(p, c)
