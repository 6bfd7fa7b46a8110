"""The forwarding hot path: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Raw ASGI rather than FastAPI routes: per request the gateway does only what it must (one
JSON parse to read model and stream, a hash lookup for the key, the limit checks, one
usage write), and the body goes to vLLM as received unless stream_options must be added.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from .asgi import Receive, RequestInfo, Send, read_body, respond
from .errors import ApiError, bad_request, error_body, upstream_error, upstream_timeout
from .errors import upstream_unavailable as unavailable
from .keys import ApiKey, KeyStore, check_model
from .logs import JsonLog
from .metrics import Metrics
from .ratelimit import Limiter
from .sse import SseScanner, usage_of
from .upstream import (
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .usage import UsageStore, quota_exhausted

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx must not buffer the stream either.
    (b"x-accel-buffering", b"no"),
]
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
# Without a usage chunk (client gone, vLLM dropped), prompt tokens are estimated from the
# prompt's length: about 4 bytes per token for English text with BPE tokenizers.
_BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class ParsedRequest:
    """The few fields the gateway needs from a request body, and the body to send on."""

    body: bytes
    model: str
    stream: bool
    wants_usage: bool
    prompt_estimate: int


def _prompt_estimate(obj: dict[str, Any]) -> int:
    size = 0
    messages = obj.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            size += len(orjson.dumps(content)) if content is not None else 0
            size += 4 * _BYTES_PER_TOKEN  # role and ChatML markers
    prompt = obj.get("prompt")
    if prompt is not None:
        size += len(orjson.dumps(prompt))
    return max(1, size // _BYTES_PER_TOKEN)


# A client that stops waiting for a whole answer is watched for only once the answer has
# taken this long: quick answers pay one timer, not a task reading the client's connection.
_WATCH_AFTER = 1.0


class DisconnectWatch:
    """Cancels the current task when its client disconnects (``gone`` then says so).

    Reading ``receive`` starts only after ``after`` seconds; a disconnect that happened
    earlier is seen then. Close it when the wait it guards is over.
    """

    __slots__ = ("_receive", "_task", "_timer", "_watcher", "gone")

    def __init__(self, receive: Receive, after: float = _WATCH_AFTER) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Future[None] | None = None
        self.gone = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            after, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


_REQUIRED = {
    "/v1/chat/completions": ("messages", list, "an array of messages"),
    "/v1/completions": ("prompt", (str, list), "a string or an array"),
    "/v1/embeddings": ("input", (str, list), "a string or an array"),
}


def parse_request(body: bytes, endpoint: str) -> ParsedRequest:
    """Validate what the gateway relies on; 400 naming the field otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = obj.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", "model", "missing_required")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string.", "model", "invalid_type")
    field, types, what = _REQUIRED[endpoint]
    value = obj.get(field)
    if value is None:
        raise bad_request(f"'{field}' is a required property.", field, "missing_required")
    if not isinstance(value, types):
        raise bad_request(f"'{field}' must be {what}.", field, "invalid_type")
    stream = obj.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream", "invalid_type")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = obj.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{name}' must be a positive integer.", name, "invalid_type")
    options = obj.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options", "invalid_type")
    wants_usage = bool(options and options.get("include_usage"))
    if not stream or endpoint == "/v1/embeddings":
        return ParsedRequest(body, model, False, wants_usage, 0)
    if not wants_usage:
        # vLLM reports a stream's tokens only when asked: ask, and drop the chunk on return.
        if "stream_options" not in obj:
            end = body.rstrip()
            body = end[:-1] + _INCLUDE_USAGE  # obj has at least "model": never "{,"
        else:
            obj["stream_options"] = {**(options or {}), "include_usage": True}
            body = orjson.dumps(obj)
    return ParsedRequest(body, model, True, wants_usage, _prompt_estimate(obj))


def upstream_api_error(e: UpstreamError) -> ApiError:
    """The client-facing error for a failure to talk to vLLM."""
    if isinstance(e, UpstreamUnavailable):
        return unavailable(f"The model server is not reachable: {e.message}.")
    if isinstance(e, UpstreamTimeout):
        return upstream_timeout(f"The model server did not answer in time: {e.message}.")
    return upstream_error(f"The model server failed: {e.message}.")


def openai_error_body(status: int, body: bytes) -> bytes:
    """vLLM's error body when it is in OpenAI's shape already, else wrapped into it."""
    message: str | None = None
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict):
            if isinstance(obj.get("error"), dict):
                return body
            detail = obj.get("detail", obj.get("message"))
            message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    except orjson.JSONDecodeError:
        message = body[:500].decode("utf-8", "replace").strip() or None
    return error_body(
        f"The model server answered {status}: {message or 'no details'}",
        "invalid_request_error" if status < 500 else "server_error",
        f"upstream_{status}",
    )


class Proxy:
    """Handlers of the forwarded endpoints."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        limiter: Limiter,
        usage: UsageStore,
        upstream: UpstreamPool,
        metrics: Metrics,
        log: JsonLog,
        max_body_bytes: int,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.usage = usage
        self.upstream = upstream
        self.metrics = metrics
        self.log = log
        self.max_body = max_body_bytes
        self._ttft = {e: metrics.upstream_ttft.labels(e) for e in _REQUIRED}
        self._latency = {e: metrics.upstream_latency.labels(e) for e in (*_REQUIRED, "/v1/models")}

    async def completion(
        self, receive: Receive, send: Send, info: RequestInfo, headers: dict[bytes, bytes]
    ) -> None:
        """POST /v1/chat/completions, /v1/completions and /v1/embeddings."""
        now = time.time()
        key = self.keys.authenticate(headers.get(b"authorization"), now)
        info.user = key.user
        info.key_id = key.key_id
        body = await read_body(receive, headers.get(b"content-length"), self.max_body)
        req = parse_request(body, info.endpoint)
        info.model = req.model
        info.stream = req.stream
        check_model(key, req.model)
        try:
            if key.quota is not None:
                used = await self.usage.used(key, now)
                if used >= key.quota:
                    raise quota_exhausted(key, used, now)
            admission = await self.limiter.admit(key)
        except ApiError:
            raise
        except Exception as e:
            # Redis gone: refuse rather than serve without limits and quotas.
            self.log.log("error", "limit_store_failed", request_id=info.request_id, error=repr(e))
            raise ApiError(
                503,
                "The gateway cannot check limits right now; try again shortly.",
                "server_error",
                "limit_store_unavailable",
                headers=[(b"retry-after", b"5")],
            ) from None
        info.limit = "allowed"
        try:
            await self._forward(receive, send, info, key, req)
        finally:
            try:
                await self.limiter.release(admission)
            except Exception as e:
                # The lease expires by itself (request timeout + margin).
                self.log.log("error", "limit_release_failed", error=repr(e))

    async def _forward(
        self, receive: Receive, send: Send, info: RequestInfo, key: ApiKey, req: ParsedRequest
    ) -> None:
        t0 = time.perf_counter()
        try:
            if req.stream:
                resp = await self.upstream.request(
                    "POST", info.endpoint, req.body, request_id=info.request_id, streaming=True
                )
                if resp.status == 200 and (resp.header(b"content-type") or b"").startswith(
                    b"text/event-stream"
                ):
                    await self._stream(receive, send, info, key, req, resp, t0)
                    return
                body = await resp.read()
            else:
                # A whole answer can take minutes. If the client leaves meanwhile, the wait is
                # cancelled and the connection to vLLM dropped: vLLM stops generating.
                watch = DisconnectWatch(receive)
                try:
                    resp, body = await self._fetch(info, req)
                except asyncio.CancelledError:
                    if not watch.gone:
                        raise  # the server is stopping
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    await self._abandoned(key, info, req, t0)
                    return
                finally:
                    watch.close()
        except UpstreamError as e:
            if isinstance(e, UpstreamUnavailable):
                self.metrics.upstream_up.set(0)
            raise upstream_api_error(e) from None
        elapsed = time.perf_counter() - t0
        info.upstream_ms = elapsed * 1000
        if resp.status != 200:
            await self._relay_error(send, info, resp, body)
            return
        self._ttft[info.endpoint].observe(elapsed)
        self._latency[info.endpoint].observe(elapsed)
        try:
            tokens = usage_of(orjson.loads(body).get("usage"))
        except (orjson.JSONDecodeError, AttributeError):
            tokens = None
        if tokens is None:
            self.log.log("warning", "usage_missing", request_id=info.request_id, path=info.endpoint)
            tokens = (0, 0)
        await self._charge(key, info, tokens[0], tokens[1], estimated=False)
        await respond(send, info, 200, body, resp.header(b"content-type") or b"application/json")

    async def _fetch(self, info: RequestInfo, req: ParsedRequest) -> tuple[UpstreamResponse, bytes]:
        resp = await self.upstream.request(
            "POST", info.endpoint, req.body, request_id=info.request_id
        )
        return resp, await resp.read()

    async def _abandoned(
        self, key: ApiKey, info: RequestInfo, req: ParsedRequest, t0: float
    ) -> None:
        """The client left before its whole answer: vLLM was stopped; the prompt is charged.

        What vLLM generated before it stopped is unknown here, so the record says estimated.
        """
        info.upstream_ms = (time.perf_counter() - t0) * 1000
        info.status = 499
        info.error = "client_disconnect"
        self.metrics.client_disconnects.inc()
        prompt = _prompt_estimate(orjson.loads(req.body))
        # On failure usage_record_failed is logged with the figures; nobody is left to tell.
        with contextlib.suppress(ApiError):
            await self._charge(key, info, prompt, 0, estimated=True)

    async def _relay_error(
        self, send: Send, info: RequestInfo, resp: UpstreamResponse, body: bytes
    ) -> None:
        info.error = f"upstream_{resp.status // 100}xx"
        await respond(send, info, resp.status, openai_error_body(resp.status, body))

    async def _charge(
        self, key: ApiKey, info: RequestInfo, prompt: int, completion: int, estimated: bool
    ) -> None:
        """Store the request's usage durably; only then may the response end."""
        info.prompt_tokens = prompt
        info.completion_tokens = completion
        info.tokens_estimated = estimated
        try:
            await self.usage.record(key, prompt, completion, time.time())
        except Exception as e:
            # Serving without counting would let quotas leak: the request fails instead, and
            # the log keeps the figures for the operator.
            self.log.log(
                "error",
                "usage_record_failed",
                request_id=info.request_id,
                key_id=key.key_id,
                user=key.user,
                prompt_tokens=prompt,
                completion_tokens=completion,
                error=repr(e),
            )
            raise ApiError(
                503,
                "The gateway could not record usage; the request was not completed.",
                "server_error",
                "usage_store_unavailable",
            ) from None
        self.metrics.tokens_used(key.user, prompt, completion)
        try:
            await self.limiter.charge_tokens(key, prompt + completion)
        except Exception as e:
            self.log.log("error", "token_limit_charge_failed", error=repr(e))

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        info: RequestInfo,
        key: ApiKey,
        req: ParsedRequest,
        resp: UpstreamResponse,
        t0: float,
    ) -> None:
        headers = [*_SSE_HEADERS, (b"x-request-id", info.request_id.encode())]
        info.status = 200
        info.response_started = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            # Closing the connection is how vLLM learns to stop generating.
            resp.abort()

        watcher = asyncio.ensure_future(watch_disconnect())
        scanner = SseScanner(keep_usage=req.wants_usage)
        failure: UpstreamError | None = None
        first = True
        cancelled = False
        try:
            while not gone:
                try:
                    chunk = await resp.next_chunk()
                except UpstreamError as e:
                    failure = e
                    break
                if chunk is None:
                    break
                if first:
                    first = False
                    ttft = time.perf_counter() - t0
                    info.ttft_ms = ttft * 1000
                    self._ttft[info.endpoint].observe(ttft)
                out = scanner.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except asyncio.CancelledError:
            # The server is stopping: the tokens produced so far are still charged below.
            cancelled = True
        finally:
            watcher.cancel()
            if not resp.done:
                resp.abort()
        elapsed = time.perf_counter() - t0
        info.upstream_ms = elapsed * 1000
        self._latency[info.endpoint].observe(elapsed)

        tokens = usage_of(scanner.usage) if scanner.usage is not None else None
        estimated = tokens is None
        if tokens is None:
            # No usage chunk: the stream ended early. Each vLLM chunk carries one token.
            tokens = (req.prompt_estimate, scanner.chunks)
        try:
            await self._charge(key, info, tokens[0], tokens[1], estimated)
        except ApiError as e:
            failure = failure or UpstreamBroken(e.message)
        if cancelled:
            raise asyncio.CancelledError

        if gone:
            info.status = 499
            info.error = "client_disconnect"
            self.metrics.client_disconnects.inc()
            return
        if failure is not None:
            err = upstream_api_error(failure)
            info.error = err.metric_type
            event = b"data: " + err.body() + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return
        await send({"type": "http.response.body", "body": scanner.rest(), "more_body": False})

    async def models(
        self, receive: Receive, send: Send, info: RequestInfo, headers: dict[bytes, bytes]
    ) -> None:
        """GET /v1/models, limited to the models the key may use."""
        key = self.keys.authenticate(headers.get(b"authorization"), time.time())
        info.user = key.user
        info.key_id = key.key_id
        t0 = time.perf_counter()
        try:
            resp = await self.upstream.request(
                "GET", "/v1/models", request_id=info.request_id, first_byte_timeout=30.0
            )
            body = await resp.read()
        except UpstreamError as e:
            raise upstream_api_error(e) from None
        info.upstream_ms = (time.perf_counter() - t0) * 1000
        self._latency["/v1/models"].observe(time.perf_counter() - t0)
        if resp.status != 200:
            await self._relay_error(send, info, resp, body)
            return
        if key.models is not None:
            obj = orjson.loads(body)
            obj["data"] = [m for m in obj.get("data", []) if m.get("id") in key.models]
            body = orjson.dumps(obj)
        await respond(send, info, 200, body)
