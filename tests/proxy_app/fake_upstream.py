"""A small OpenAI-shaped server standing in for vLLM where vLLM cannot be made to misbehave.

This is the tests' own server, not vLLM: happy paths are tested against real vLLM. It exists
for what vLLM will not do on demand: answer slowly, stall, drop the connection mid-stream,
fail with 500s, hang, serve embeddings with a generative model. The model name picks the
behaviour:

  fake            normal answer; usage prompt=7, completion=5 (streamed: 5 chunks)
  fake-slow       streamed: 200 chunks, one every 50 ms (for client disconnects)
  fake-tick       streamed: 100 chunks, one every 2 ms, each its own write (token pace)
  fake-drop       streamed: 3 chunks, then the connection is cut (not streamed: half a body)
  fake-stall      streamed: 2 chunks, then silence
  fake-500        500 with a plain-text body
  fake-hang       never answers
  fake-nousage    normal answer without a usage object
  fake-notjson    200 whose body is not JSON
  fake-usage      normal answer; usage prompt=``fake_prompt_tokens`` (default 7),
                  completion=max_tokens x n

Every model answers after ``fake_delay`` seconds (a request field, default 0), and not before
the gate named by ``fake_gate`` (a request field) is opened: POST /_open/<name>.

GET /_stats (straight to this server, not through the gateway) returns counters and the
last request body received, so tests can see what the gateway sent and whether it hung up;
``arrivals`` lists the requests in the order they came: their ``fake_tag`` (a
request field), the X-Vllm-Priority header, the body's priority, and how many requests
were being answered with it (itself included).

Run: python fake_upstream.py PORT [ADDRESS]   (ADDRESS: where it listens, 127.0.0.1 by default)
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn

STATS: dict[str, object] = {
    "requests": 0,
    "disconnects": 0,
    "last_body": None,
    "last_headers": None,
    "health": "ok",
    "arrivals": [],
    "in_flight": 0,
}
# Gates a request may wait for (fake_gate), opened by POST /_open/<name>.
GATES: dict[str, asyncio.Event] = {}


def _chunk(i: int, model: str, obj: str) -> bytes:
    if obj == "chat.completion.chunk":
        choice = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
    else:
        choice = {"index": 0, "text": f"t{i} ", "finish_reason": None}
    body = {"id": "x-1", "object": obj, "created": 1, "model": model, "choices": [choice]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _json(send, status: int, obj: object, ctype: bytes = b"application/json") -> None:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes:
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            return body


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/_stats":
        await _json(send, 200, STATS)
        return
    if path.startswith("/_open/"):
        GATES.setdefault(path[len("/_open/") :], asyncio.Event()).set()
        await _json(send, 200, {"opened": path[len("/_open/") :]})
        return
    if path == "/_health":
        body = await _read_body(receive)
        STATS["health"] = body.decode()
        await _json(send, 200, {"health": STATS["health"]})
        return
    if path == "/health":
        if STATS["health"] == "ok":
            await _json(send, 200, b"", b"text/plain")
        else:
            await _json(send, 503, b"down", b"text/plain")
        return
    if path == "/_models":
        # The raw body /v1/models answers from now on; empty: the normal list again.
        body = await _read_body(receive)
        STATS["models_body"] = body.decode()
        await _json(send, 200, {"models_body": STATS["models_body"]})
        return
    if path == "/v1/models":
        if STATS.get("models_body"):
            await _json(send, 200, str(STATS["models_body"]).encode())
            return
        data = [{"id": m, "object": "model", "owned_by": "fake"} for m in ("fake", "other")]
        await _json(send, 200, {"object": "list", "data": data})
        return
    body = await _read_body(receive)
    STATS["requests"] = int(STATS["requests"]) + 1  # type: ignore[call-overload]
    req = json.loads(body)
    STATS["last_body"] = req
    STATS["last_headers"] = headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    arrivals: list = STATS["arrivals"]  # type: ignore[assignment]
    STATS["in_flight"] = int(STATS["in_flight"]) + 1  # type: ignore[call-overload]
    tag, priority = req.get("fake_tag"), req.get("priority")
    arrivals.append([tag, headers.get("x-vllm-priority"), priority, STATS["in_flight"]])
    try:
        await _answer(scope, receive, send, path, req)
    finally:
        STATS["in_flight"] = int(STATS["in_flight"]) - 1  # type: ignore[call-overload]


async def _answer(scope, receive, send, path: str, req: dict) -> None:
    model = req.get("model", "fake")
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    # Any model: answer after ``fake_delay`` seconds (a request in flight for that long), and
    # once its gate (if any) is open.
    if req.get("fake_gate"):
        await GATES.setdefault(req["fake_gate"], asyncio.Event()).wait()
    await asyncio.sleep(float(req.get("fake_delay", 0)))
    if path == "/v1/embeddings":
        await _json(
            send,
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": model,
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            },
        )
        return
    obj = "chat.completion.chunk" if path == "/v1/chat/completions" else "text_completion"
    if model == "fake-500":
        await _json(send, 500, b"Internal Server Error: boom", b"text/plain")
        return
    if model == "fake-notjson":
        await _json(send, 200, b"<html>not json</html>")
        return
    if model == "fake-hang":
        # Never answer; return only once the caller has given up (counted as a disconnect).
        while (await receive())["type"] != "http.disconnect":
            pass
        STATS["disconnects"] = int(STATS["disconnects"]) + 1  # type: ignore[call-overload]
        return
    if model == "fake-drop" and not req.get("stream"):
        # Headers and half a body, then the connection is cut.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "x-1", ', "more_body": True})
        raise RuntimeError("fake upstream drops the connection")
    if model == "fake-usage":
        prompt = int(req.get("fake_prompt_tokens", 7))
        completion = int(req.get("max_tokens") or 5) * int(req.get("n") or 1)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    if not req.get("stream"):
        out = {"id": "x-1", "object": obj.replace(".chunk", ""), "model": model, "choices": []}
        if model != "fake-nousage":
            out["usage"] = usage
        await _json(send, 200, out)
        return

    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
        }
    )
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        STATS["disconnects"] = int(STATS["disconnects"]) + 1  # type: ignore[call-overload]
        gone.set()

    watcher = asyncio.ensure_future(watch())
    n, delay = {
        "fake-slow": (200, 0.05),
        "fake-tick": (100, 0.002),
        "fake-drop": (3, 0.0),
        "fake-stall": (2, 0.0),
    }.get(model, (5, 0.0))
    try:
        for i in range(n):
            if gone.is_set():
                return
            await send(
                {"type": "http.response.body", "body": _chunk(i, model, obj), "more_body": True}
            )
            if delay:
                await asyncio.sleep(delay)
        if model == "fake-drop":
            raise RuntimeError("fake upstream drops the connection")
        if model == "fake-stall":
            await gone.wait()
            return
        if (req.get("stream_options") or {}).get("include_usage"):
            u = {
                "id": "x-1",
                "object": obj,
                "created": 1,
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(u).encode() + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    finally:
        watcher.cancel()


if __name__ == "__main__":
    uvicorn.run(
        app,
        host=sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        loop="uvloop",
        http="httptools",
        lifespan="on",
    )
