"""What became of one request: its status, error, tokens and timings, and its one log line.

Every part of the gateway that learns something about a request hands it to the request's
``Outcome`` through a method; only this module writes the record's fields. At the end the
app calls ``finish``, which counts the request in the metrics and writes its log line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ApiError
from .logs import JsonLog, timestamp

if TYPE_CHECKING:  # metrics.py names the endpoints of apis.py, which uses Tokens
    from .framing import ClientLost
    from .metrics import Metrics

# The label of http_errors_total for an error answer that carries no label of its own
# (the admin API's answers, which FastAPI renders): one per status, a fixed vocabulary.
_STATUS_ERRORS = {
    400: "bad_request",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    413: "too_large",
    422: "invalid_request",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    502: "upstream_error",
    503: "unavailable",
    504: "upstream_timeout",
}


@dataclass(frozen=True, slots=True)
class Tokens:
    """A request's token counts; ``estimated`` when vLLM did not report them."""

    prompt: int
    completion: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class Outcome:
    """One request's record. Read through its properties; written only by its methods."""

    __slots__ = (
        "_backend",
        "_error",
        "_key_id",
        "_limit",
        "_model",
        "_queue_ms",
        "_started",
        "_status",
        "_stream",
        "_tokens",
        "_ttft_ms",
        "_upstream_ms",
        "_user",
        "client_ip",
        "client_lost",
        "endpoint",
        "method",
        "path",
        "request_id",
        "start",
    )

    def __init__(
        self,
        request_id: str,
        method: str,
        path: str,
        endpoint: str,
        client_ip: str | None,
        start: float,
        client_lost: ClientLost | None = None,
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.endpoint = endpoint
        self.client_ip = client_ip
        self.start = start
        # The server's report of the client leaving (framing.py), for whoever waits on vLLM.
        self.client_lost = client_lost
        self._status = 0
        self._started = False
        self._user: str | None = None
        self._key_id: str | None = None
        self._model: str | None = None
        self._stream: bool | None = None
        self._tokens: Tokens | None = None
        self._limit: str | None = None
        self._error: str | None = None
        self._upstream_ms: float | None = None
        self._ttft_ms: float | None = None
        self._backend: str | None = None
        self._queue_ms: float | None = None

    # read

    @property
    def status(self) -> int:
        return self._status

    @property
    def response_started(self) -> bool:
        """Whether the response's headers went out: an error can no longer be answered."""
        return self._started

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def tokens(self) -> Tokens | None:
        return self._tokens

    # written by the parts that learn each fact

    def identify(self, user: str, key_id: str) -> None:
        """The key the request was made with."""
        self._user = user
        self._key_id = key_id

    def requested(self, model: str, stream: bool) -> None:
        """What the request body asked for."""
        self._model = model
        self._stream = stream

    def queued(self, seconds: float) -> None:
        """The request waited ``seconds`` in the gateway's queue for a place."""
        self._queue_ms = seconds * 1000

    def admitted(self) -> None:
        """Every limit let the request through."""
        self._limit = "allowed"

    def responding(self, status: int) -> None:
        """The response's headers are being sent with ``status``."""
        self._status = status
        self._started = True
        if status >= 400 and self._error is None:
            self._error = _STATUS_ERRORS.get(status, f"http_{status}")

    def refused(self, err: ApiError) -> None:
        """The request is answered with ``err`` (sent by the caller right after)."""
        self._error = err.metric_type
        if err.reason is not None:
            self._limit = err.reason

    def failed(self, error: str, status: int | None = None) -> None:
        """Something failed after the response started, or with no response at all."""
        self._error = error
        if status is not None:
            self._status = status

    def client_left(self) -> None:
        """The client closed its connection before the end of the answer."""
        self._status = 499
        self._error = "client_disconnect"

    def sent_to(self, backend: str) -> None:
        """The vLLM backend the request went to."""
        self._backend = backend

    def upstream_done(self, seconds: float) -> None:
        """vLLM's part of the request took ``seconds``."""
        self._upstream_ms = seconds * 1000

    def first_token(self, seconds: float) -> None:
        """A stream's first chunk came ``seconds`` after the request went to vLLM."""
        self._ttft_ms = seconds * 1000

    def charged(self, tokens: Tokens) -> None:
        """The usage recorded for the request's key."""
        self._tokens = tokens

    # the end

    def finish(self, metrics: Metrics, log: JsonLog | None) -> None:
        """Count the request in ``metrics`` and write its log line to ``log`` (if given)."""
        duration = time.perf_counter() - self.start
        metrics.request_done(self.method, self.endpoint, self._status, duration)
        if self._error is not None:
            metrics.errors.labels(self._error).inc()
        if log is not None:
            log.write(self.log_line(duration))

    def log_line(self, duration: float) -> dict[str, Any]:
        """The request's one JSON log record."""
        t = self._tokens
        record: dict[str, Any] = {
            "ts": timestamp(time.time()),
            "level": "info",
            "event": "request",
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path[:256],
            "status": self._status,
            "duration_ms": round(duration * 1000, 3),
            "client_ip": self.client_ip,
            "user": self._user,
            "key_id": self._key_id,
            "model": self._model,
            "stream": self._stream,
            "prompt_tokens": t.prompt if t else None,
            "completion_tokens": t.completion if t else None,
            "limit": self._limit,
        }
        if t is not None and t.estimated:
            record["tokens_estimated"] = True
        if self._backend is not None:
            record["backend"] = self._backend
        if self._queue_ms is not None:
            record["queue_ms"] = round(self._queue_ms, 3)
        if self._upstream_ms is not None:
            record["upstream_ms"] = round(self._upstream_ms, 3)
        if self._ttft_ms is not None:
            record["ttft_ms"] = round(self._ttft_ms, 3)
        if self._error is not None:
            record["error"] = self._error
        return record
