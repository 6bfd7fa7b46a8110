"""The forwarding hot path: every API of apis.py (chat, completions, embeddings, responses,
Anthropic's messages, rerank, score) and /v1/models.

Raw ASGI rather than FastAPI routes: per request the gateway does only what it must (one
JSON parse to read model and stream, a hash lookup for the key, the limit checks, one
usage write), and the body goes to vLLM as received unless stream_options must be added.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from .apis import (
    APIS,
    BYTES_PER_TOKEN,
    MAX_TOKENS_FIELDS,
    Api,
    anthropic_error_body,
    body_usage,
    prompt_estimate,
    prompt_start,
    requested_max_tokens,
    upstream_error_message,
)
from .asgi import ClientGone, Receive, Send, read_body, respond
from .config import Ledger
from .errors import (
    ApiError,
    bad_request,
    error_body,
    limit_store_unavailable,
    upstream_error,
    upstream_timeout,
    usage_store_unavailable,
)
from .errors import upstream_unavailable as unavailable
from .keys import ApiKey, KeyStore, check_model
from .ledger import Attribution, end_user_of
from .logs import JsonLog, error_text
from .metrics import Metrics
from .outcome import Outcome, Tokens
from .queueing import FairQueue, priority_class
from .ratelimit import Admission, Limiter
from .routing import Backend, Router
from .stream import ClientWatch, StreamRelay
from .upstream import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .usage import UsageStore

_T = TypeVar("_T")

_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'


@dataclass(slots=True)
class ParsedRequest:
    """The few fields the gateway needs from a request body, and the body to send on."""

    body: bytes
    model: str
    stream: bool
    wants_usage: bool
    fields: dict[str, Any]
    api: Api
    # vLLM's scheduling priority, sent as X-Vllm-Priority (the key's; None: not sent).
    priority: int | None = None
    # The model and end user its usage is recorded under in the ledger.
    who: Attribution | None = None

    def prompt_estimate(self) -> int:
        """The prompt's tokens guessed from its length, for when vLLM reports none."""
        return prompt_estimate(self.fields)


def parse_request(body: bytes, api: Api) -> ParsedRequest:
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
    if api.required is not None:
        field, types, what = api.required
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
    for name in (*MAX_TOKENS_FIELDS, "n"):
        v = obj.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{name}' must be a positive integer.", name, "invalid_type")
    options = obj.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options", "invalid_type")
    wants_usage = bool(options and options.get("include_usage"))
    if not stream or not api.streams:
        return ParsedRequest(body, model, False, wants_usage, obj, api)
    if api.usage != "openai":
        # The Responses and Messages streams always carry their usage.
        return ParsedRequest(body, model, True, True, obj, api)
    if not wants_usage:
        # vLLM reports a stream's tokens only when asked: ask, and drop the chunk on return.
        if "stream_options" not in obj:
            end = body.rstrip()
            body = end[:-1] + _INCLUDE_USAGE  # obj has at least "model": never "{,"
        else:
            obj["stream_options"] = {**(options or {}), "include_usage": True}
            body = orjson.dumps(obj)
    return ParsedRequest(body, model, True, wants_usage, obj, api)


def _cap_max_tokens(req: ParsedRequest, cap: int) -> None:
    """A key's max_tokens cap: 400 for a request asking more; set on one that asks none,
    so that vLLM never generates past it (and the reservation holds)."""
    asked = requested_max_tokens(req.fields)
    if asked is not None:
        name, value = asked
        if value > cap:
            raise bad_request(
                f"'{name}' is {value}, more than this API key may ask for ({cap}). "
                f"Set {name} to {cap} or less.",
                name,
                "max_tokens_exceeded",
            )
        return
    name = req.api.max_tokens[0]
    req.fields[name] = cap
    req.body = req.body.rstrip()[:-1] + f',"{name}":{cap}}}'.encode()


def _set_priority(req: ParsedRequest, priority: int) -> None:
    """vLLM's priority in the body, where the pooling APIs read it: the key's, whatever the
    client sent (a client never raises its own)."""
    sent = "priority" in req.fields
    req.fields["priority"] = priority
    if sent:
        req.body = orjson.dumps(req.fields)
    else:
        req.body = req.body.rstrip()[:-1] + b',"priority":%d}' % priority


def _anthropic_credentials(headers: dict[bytes, bytes]) -> bytes | None:
    """The key of an Anthropic API request: ``x-api-key``, as Anthropic's clients send it,
    or ``Authorization: Bearer``; both at once must name the same key."""
    api_key = headers.get(b"x-api-key")
    authorization = headers.get(b"authorization")
    if api_key is None:
        return authorization
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or token.strip() != api_key.strip():
            raise bad_request(
                "The x-api-key and Authorization headers name different keys; send one.",
                "x-api-key",
                "conflicting_credentials",
            )
    return b"Bearer " + api_key.strip()


def upstream_api_error(e: UpstreamError) -> ApiError:
    """The client-facing error for a failure to talk to vLLM."""
    if isinstance(e, UpstreamUnavailable):
        return unavailable(f"The model server is not reachable: {e.message}.")
    if isinstance(e, UpstreamTimeout):
        return upstream_timeout(f"The model server did not answer in time: {e.message}.")
    return upstream_error(f"The model server failed: {e.message}.")


def openai_error_body(status: int, body: bytes) -> bytes:
    """vLLM's error body when it is in OpenAI's shape already, else wrapped into it."""
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "type" not in obj:
            return body
    except orjson.JSONDecodeError:
        pass
    message = upstream_error_message(status, body)
    return error_body(
        f"The model server answered {status}: {message or 'no details'}",
        "invalid_request_error" if status < 500 else "server_error",
        f"upstream_{status}",
    )


def _model_list(body: bytes) -> dict[str, Any]:
    """vLLM's /v1/models answer, checked to be in OpenAI's shape; 502 if it is not."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
    ):
        raise upstream_error("The model server's model list is not in OpenAI's shape.")
    return obj  # type: ignore[return-value]


class Proxy:
    """Handlers of the forwarded endpoints."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        limiter: Limiter,
        usage: UsageStore,
        router: Router,
        metrics: Metrics,
        log: JsonLog,
        max_body_bytes: int,
        queue_timeout: float = 30.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.usage = usage
        self.router = router
        self._prefix_chars = router.settings.prefix_chars
        self.metrics = metrics
        self.log = log
        self.max_body = max_body_bytes
        self.queue_timeout = queue_timeout
        self.ledger = ledger or Ledger()
        self._end_user_header = self.ledger.end_user_header.lower().encode()
        self._ttft = {e: metrics.upstream_ttft.labels(e) for e in APIS}
        self._latency = {e: metrics.upstream_latency.labels(e) for e in (*APIS, "/v1/models")}

    async def completion(
        self, receive: Receive, send: Send, outcome: Outcome, headers: dict[bytes, bytes]
    ) -> None:
        """POST to any API of apis.py."""
        now = time.time()
        endpoint = outcome.endpoint
        api = APIS[endpoint]
        credentials = headers.get(b"authorization")
        if api.anthropic:
            credentials = _anthropic_credentials(headers)
        key = self.keys.authenticate(credentials, now)
        outcome.identify(key.user, key.key_id)
        body = await read_body(receive, headers.get(b"content-length"), self.max_body)
        req = parse_request(body, api)
        outcome.requested(req.model, req.stream)
        check_model(key, req.model)
        self.router.backends_of(req.model)  # 404 for a model nobody serves, before any limit
        end_user = end_user_of(
            headers.get(self._end_user_header),
            self.ledger.end_user_header,
            req.fields.get("user"),
            key.user,
            self.ledger.end_user_storage,
        )
        req.who = Attribution(req.model, end_user)
        if key.max_tokens is not None and api.generates:
            _cap_max_tokens(req, key.max_tokens)
        if api.priority == "body":
            _set_priority(req, key.priority)
        elif api.priority == "header":
            req.priority = key.priority
        queue = self.router.queue_of(req.model) if api.priority != "none" else None
        admission = await self._wait_for_admission(receive, outcome, key, req, queue)
        try:
            await self._forward(receive, send, outcome, key, req, admission)
        finally:
            try:
                # Slots, and the reservations of a request that was never charged.
                await self.limiter.release(admission)
            except Exception as e:
                # The lease expires by itself (request timeout + margin).
                self.log.log("error", "limit_release_failed", error=error_text(e))
            if queue is not None:
                queue.release(key.priority)

    async def _wait_for_admission(
        self,
        receive: Receive,
        outcome: Outcome,
        key: ApiKey,
        req: ParsedRequest,
        queue: FairQueue | None,
    ) -> Admission:
        """Take a place of the request's model (waiting in its key's queue while none is
        free), then pass every limit. Over a concurrency limit (its key's, the service's),
        the request gives its place back, waits for a slot of that limit and tries again: a
        short dip in capacity (a rolling update, a slow backend) delays requests rather than
        refusing them. All its waiting is bounded by its key's queue timeout, then 429 (the
        limit's refusal, or queue_timeout). ClientGone when the client left meanwhile: it
        held nothing and is charged nothing."""
        timeout = key.queue_timeout if key.queue_timeout is not None else self.queue_timeout
        start = time.monotonic()
        deadline = start + timeout
        waited = False
        label = priority_class(key.priority)
        while True:
            if queue is not None:
                place = queue.acquire(key.key_id, key.priority, key.weight, timeout, start)
                took = await self._unless_client_leaves(receive, outcome, place)
                waited = waited or took > 0
            try:
                admission = await self._admit(key, outcome, req)
            except BaseException as e:
                if queue is not None:
                    queue.release(key.priority)
                if not isinstance(e, ApiError) or time.monotonic() >= deadline:
                    raise
                scope = self.limiter.slot_scope(key, outcome.endpoint, e)
                if scope is None:
                    raise
            else:
                break
            self.metrics.queue_length.labels(label).inc()
            try:
                freed = self.limiter.slot_freed(scope, deadline - time.monotonic())
                await self._unless_client_leaves(receive, outcome, freed)
            finally:
                self.metrics.queue_length.labels(label).dec()
            waited = True
        outcome.admitted()
        if waited:
            seconds = time.monotonic() - start
            outcome.queued(seconds)
            self.metrics.queue_wait.labels(label).observe(seconds)
        return admission

    async def _unless_client_leaves(
        self, receive: Receive, outcome: Outcome, wait: Awaitable[_T]
    ) -> _T:
        """``wait``'s result; ClientGone when the client left meanwhile (``wait`` is then
        cancelled: it must hold nothing once cancelled)."""
        if outcome.client_lost is not None and outcome.client_lost.gone:
            # Gone already: a watch would cancel this task at once, and a free place is taken
            # with no await that could deliver that cancellation.
            if asyncio.iscoroutine(wait):
                wait.close()
            raise ClientGone
        watch = ClientWatch(receive, outcome.client_lost)
        try:
            return await wait
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            raise ClientGone from None
        finally:
            watch.close()

    async def _admit(self, key: ApiKey, outcome: Outcome, req: ParsedRequest) -> Admission:
        """Check the request against its limits (429 naming the one that refused it)."""
        try:
            return await self.limiter.admit(key, outcome.endpoint, req.fields, time.time())
        except ApiError:
            raise
        except Exception as e:
            # Redis gone: refuse rather than serve without limits and quotas.
            self.log.log(
                "error", "limit_store_failed", request_id=outcome.request_id, error=error_text(e)
            )
            raise limit_store_unavailable() from None

    async def _forward(
        self,
        receive: Receive,
        send: Send,
        outcome: Outcome,
        key: ApiKey,
        req: ParsedRequest,
        admission: Admission,
    ) -> None:
        """Send the request to vLLM and its answer to the client; charge what it used (which
        settles ``admission``: its reservations are freed as the usage is recorded).

        One watch covers the whole wait, streamed or not, from the request to the last
        chunk: a client that leaves cancels it, vLLM's connection is dropped (vLLM stops
        generating) and what was used so far is charged as an estimate.
        """
        endpoint = outcome.endpoint
        relay = StreamRelay(send, outcome, req.wants_usage, req.api) if req.stream else None
        resp: UpstreamResponse | None = None
        body = b""
        failure: UpstreamError | None = None
        stopping = False
        t0 = time.perf_counter()
        watch = ClientWatch(receive, outcome.client_lost)
        backend: Backend | None = None
        try:
            resp, backend = await self._send(outcome, req)
            if relay is not None and relay.accepts(resp):
                await relay.pump(resp, t0, self._ttft[endpoint])
            else:
                body = await resp.read()
        except UpstreamError as e:
            failure = e
        except asyncio.CancelledError:
            if watch.gone:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            else:
                stopping = True  # the server is stopping: charge, then stop
        finally:
            watch.close()
            if resp is not None and not resp.done:
                resp.abort()
            if backend is not None:
                backend.finish()
        elapsed = time.perf_counter() - t0
        outcome.upstream_done(elapsed)

        if relay is not None and relay.started:
            self._latency[endpoint].observe(elapsed)
            tokens = relay.tokens(req.prompt_estimate())
            if tokens.estimated:
                self._estimated(outcome, watch.gone, stopping)
            problem = upstream_api_error(failure) if failure is not None else None
            try:
                await self._charge(admission, key, outcome, req, tokens, failure is not None)
            except ApiError as e:
                problem = problem or e
            if stopping:
                raise asyncio.CancelledError
            if watch.gone:
                outcome.client_left()
            elif problem is not None:
                await relay.end_with_error(problem)
            else:
                await relay.end()
            return

        if watch.gone or stopping:
            # Nothing reached the client; what vLLM generated before it stopped is unknown.
            self._estimated(outcome, watch.gone, stopping)
            if watch.gone:
                outcome.client_left()
            # On failure usage_record_failed is logged with the figures; nobody is left to tell.
            with contextlib.suppress(ApiError):
                estimate = Tokens(req.prompt_estimate(), 0, True)
                await self._charge(admission, key, outcome, req, estimate)
            if stopping:
                raise asyncio.CancelledError
            return
        if failure is not None:
            await self._record_error(key, outcome, req)
            raise upstream_api_error(failure)
        assert resp is not None
        if resp.status != 200:
            await self._record_error(key, outcome, req)
            await self._relay_error(send, outcome, resp, body, req.api)
            return
        self._ttft[endpoint].observe(elapsed)
        self._latency[endpoint].observe(elapsed)
        await self._charge(admission, key, outcome, req, self._usage_of_body(outcome, req, body))
        await respond(send, outcome, 200, body, resp.header(b"content-type") or b"application/json")

    async def _send(self, outcome: Outcome, req: ParsedRequest) -> tuple[UpstreamResponse, Backend]:
        """Send the request to a backend of its model and wait for the answer's headers.

        A backend that refuses the connection (nothing was sent) is marked down and the next
        one is tried; once bytes reached a backend the request is never sent again. The
        backend returned counts the request in flight until the caller calls finish().
        """
        router = self.router
        by_prefix = router.settings.policy == "prefix"
        prompt = prompt_start(req.fields, self._prefix_chars) if by_prefix else ""
        tried: list[Backend] = []
        last: UpstreamUnavailable | None = None
        while True:
            try:
                backend = router.choose(req.model, prompt, tried)
            except ApiError:
                if last is None:
                    raise
                raise last from None  # every backend refused: "not reachable", as one would
            backend.start()
            try:
                resp = await backend.pool.request(
                    "POST",
                    outcome.endpoint,
                    req.body,
                    request_id=outcome.request_id,
                    streaming=req.stream,
                    priority=req.priority,
                )
            except UpstreamUnavailable as e:
                backend.finish()
                router.mark_down(backend, e)
                tried.append(backend)
                last = e
                self.metrics.backend_retries.inc()
                continue
            except BaseException:
                backend.finish()
                raise
            outcome.sent_to(backend.name)
            return resp, backend

    def _usage_of_body(self, outcome: Outcome, req: ParsedRequest, body: bytes) -> Tokens:
        """vLLM's reported usage; an estimate (counted, logged) when the body has none."""
        tokens = body_usage(body, req.api.usage)
        if tokens is not None:
            return tokens
        self.log.log(
            "warning", "usage_missing", request_id=outcome.request_id, path=outcome.endpoint
        )
        self.metrics.usage_estimated.labels("usage_missing").inc()
        # The answer's own length stands in for its tokens: a guess, never zero.
        return Tokens(req.prompt_estimate(), max(1, len(body) // BYTES_PER_TOKEN), True)

    def _estimated(self, outcome: Outcome, gone: bool, stopping: bool) -> None:
        reason = "client_disconnect" if gone else "server_stopping" if stopping else "stream_cut"
        self.metrics.usage_estimated.labels(reason).inc()
        if gone:
            self.metrics.client_disconnects.inc()

    async def _relay_error(
        self,
        send: Send,
        outcome: Outcome,
        resp: UpstreamResponse,
        body: bytes,
        api: Api | None = None,
    ) -> None:
        """vLLM's error, in the shape of the API asked."""
        outcome.failed(f"upstream_{resp.status // 100}xx")
        if api is not None and api.anthropic:
            message = upstream_error_message(resp.status, body) or "no details"
            body = anthropic_error_body(resp.status, f"The model server answered: {message}")
        else:
            body = openai_error_body(resp.status, body)
        await respond(send, outcome, resp.status, body)

    async def _charge(
        self,
        admission: Admission,
        key: ApiKey,
        outcome: Outcome,
        req: ParsedRequest,
        tokens: Tokens,
        error: bool = False,
    ) -> None:
        """Store the request's usage and ledger row durably; only then may the response end.
        ``error``: the answer started and then failed."""
        outcome.charged(tokens)
        assert req.who is not None
        try:
            # Usage recorded and the admission's reservations freed in one step (one Lua
            # script with Redis); tokens per minute charged with the real count.
            await self.limiter.settle(
                admission, key, tokens.prompt, tokens.completion, time.time(), req.who, error
            )
        except Exception as e:
            # Serving without counting would let quotas leak: the request fails instead, and
            # the log keeps the figures for the operator.
            self.log.log(
                "error",
                "usage_record_failed",
                request_id=outcome.request_id,
                key_id=key.key_id,
                user=key.user,
                prompt_tokens=tokens.prompt,
                completion_tokens=tokens.completion,
                error=error_text(e),
            )
            raise usage_store_unavailable() from None
        self.metrics.tokens_used(key.user, req.model, tokens.prompt, tokens.completion)

    async def _record_error(self, key: ApiKey, outcome: Outcome, req: ParsedRequest) -> None:
        """Count in the ledger a request that failed before it was charged; a failure to
        count it is logged, and the client gets the request's own error."""
        assert req.who is not None
        try:
            await self.limiter.record_error(key, time.time(), req.who)
        except Exception as e:
            self.log.log(
                "error",
                "ledger_error_record_failed",
                request_id=outcome.request_id,
                key_id=key.key_id,
                error=error_text(e),
            )

    async def models(
        self, receive: Receive, send: Send, outcome: Outcome, headers: dict[bytes, bytes]
    ) -> None:
        """GET /v1/models: every model served, limited to those the key may use."""
        key = self.keys.authenticate(headers.get(b"authorization"), time.time())
        outcome.identify(key.user, key.key_id)
        t0 = time.perf_counter()
        if self.router.named_models:
            names = [m for m in self.router.models if key.models is None or m in key.models]
            entries = await asyncio.gather(*(self._model_entry(m, outcome) for m in names))
            body = orjson.dumps({"object": "list", "data": entries})
        else:
            (backend,) = self.router.backends_of("")
            try:
                resp = await backend.pool.request(
                    "GET", "/v1/models", request_id=outcome.request_id, first_byte_timeout=30.0
                )
                body = await resp.read()
            except UpstreamError as e:
                raise upstream_api_error(e) from None
            if resp.status != 200:
                await self._relay_error(send, outcome, resp, body)
                return
            listing = _model_list(body)
            if key.models is not None:
                listing["data"] = [m for m in listing["data"] if m["id"] in key.models]
                body = orjson.dumps(listing)
        elapsed = time.perf_counter() - t0
        outcome.upstream_done(elapsed)
        self._latency["/v1/models"].observe(elapsed)
        await respond(send, outcome, 200, body)

    async def _model_entry(self, model: str, outcome: Outcome) -> dict[str, Any]:
        """The model's entry in vLLM's own list (max_model_len and all), from a backend
        that is up; a plain entry when none answers, since the model is still configured."""
        for backend in self.router.backends_of(model):
            if not backend.up:
                continue
            try:
                resp = await backend.pool.request(
                    "GET", "/v1/models", request_id=outcome.request_id, first_byte_timeout=5.0
                )
                body = await resp.read()
                if resp.status == 200:
                    for entry in _model_list(body)["data"]:
                        if entry["id"] == model:
                            return entry
            except (UpstreamError, ApiError):
                continue
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "llmhost"}
