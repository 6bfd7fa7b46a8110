"""A fast vLLM-shaped upstream for the benchmark: raw ASGI on uvicorn + httptools.

It answers every chat completion at once with a fixed vLLM-shaped body (usage included),
streamed as 8 content chunks + a usage chunk + [DONE] when the request asks to stream, so
what the benchmark measures is the cost of whatever sits in front of it.

Run: python bench/upstream.py PORT
"""

from __future__ import annotations

import sys

import orjson
import uvicorn

_MODEL = "tiny"
_USAGE = {"prompt_tokens": 17, "completion_tokens": 8, "total_tokens": 25}
_BODY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": _MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "one two three four five six seven"},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": _USAGE,
        "system_fingerprint": "bench",
    }
)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]
_MODELS = orjson.dumps({"object": "list", "data": [{"id": _MODEL, "object": "model"}]})


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {"role": "assistant", "content": ""}
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": _MODEL,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )
        + b"\n\n"
    )


_WORDS = ["one", " two", " three", " four", " five", " six", " seven"]
_STREAM = [_chunk(None)] + [_chunk(w) for w in _WORDS[:-1]] + [_chunk(_WORDS[-1], "length")]
_USAGE_CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": _MODEL,
            "choices": [],
            "usage": _USAGE,
        }
    )
    + b"\n\n"
)
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                done = (
                    msg["type"]
                    .replace(".startup", ".startup.complete")
                    .replace(".shutdown", ".shutdown.complete")
                )
                await send({"type": done})
                if msg["type"] == "lifespan.shutdown":
                    return
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    if scope["path"] == "/v1/models":
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS[:1]})
        await send({"type": "http.response.body", "body": _MODELS})
        return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if b'"stream":true' not in body.replace(b" ", b""):
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": _BODY})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for c in _STREAM:
        await send({"type": "http.response.body", "body": c, "more_body": True})
    if b'"include_usage":true' in body.replace(b" ", b""):
        await send({"type": "http.response.body", "body": _USAGE_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": _DONE, "more_body": False})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
