"""The gateway's errors: one root, and every error a client is answered, in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``), built here and nowhere else.

``GatewayError`` is the root of the gateway's own exceptions: ``ApiError`` (answered to a
client), upstream.py's ``UpstreamError`` (vLLM failed; proxy.py turns it into an ApiError),
keys.py's ``KeysFileError`` and config.py's ``ConfigError`` (a file refused; the one in force
stays), asgi.py's ``ClientGone`` (nobody left to answer). ``except GatewayError`` catches
what the gateway raised on purpose, and lets a bug through to the 500 handler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import orjson

Headers = list[tuple[bytes, bytes]]

# Retry-After of the 503s that a restart or a short outage ends.
_RETRY_SOON = (b"retry-after", b"5")


class GatewayError(Exception):
    """The root of the exceptions the gateway raises on purpose."""


class ApiError(GatewayError):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: Headers | None = None,
        metric_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []
        # Label for http_errors_total; defaults to the code, which is a fixed vocabulary.
        self.metric_type = metric_type or code or type_
        # Why a limit refused the request (gateway_rejections_total and the log).
        self.reason: str | None = None

    def with_reason(self, reason: str) -> ApiError:
        """Tag the error with the limit decision that caused it."""
        self.reason = reason
        return self

    def body(self) -> bytes:
        """The JSON body of the error."""
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """Serialise one error in OpenAI's shape."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    """400: the request body is malformed or a field has a wrong value."""
    return ApiError(400, message, "invalid_request_error", code, param, metric_type="bad_request")


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    """401: no key, an unknown key, a disabled or an expired one."""
    return ApiError(
        401,
        message,
        "invalid_request_error",
        code,
        headers=[(b"www-authenticate", b'Bearer realm="llmhost"')],
        metric_type="auth",
    )


def forbidden(message: str, code: str, param: str | None = None) -> ApiError:
    """403: a valid key that may not do this (model not allowed, not an admin)."""
    return ApiError(403, message, "permission_error", code, param, metric_type="forbidden")


def not_found(path: str) -> ApiError:
    """404 for any path the gateway does not serve."""
    return ApiError(
        404,
        f"Unknown request URL: {path}. Please check the URL for typos.",
        "invalid_request_error",
        "unknown_url",
        metric_type="not_found",
    )


def method_not_allowed(method: str, path: str, allowed: Iterable[str]) -> ApiError:
    """405 for a known path asked with the wrong method; ``Allow`` lists the right ones."""
    return ApiError(
        405,
        f"Method {method} is not allowed for {path}.",
        "invalid_request_error",
        "method_not_allowed",
        headers=[(b"allow", ", ".join(sorted(allowed)).encode())],
        metric_type="bad_request",
    )


def too_large(limit: int) -> ApiError:
    """413: the body is larger than max_body_bytes."""
    return ApiError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
        metric_type="too_large",
    )


def headers_too_large(what: str) -> ApiError:
    """431: the request's head is over one of framing.py's limits."""
    return ApiError(
        431,
        f"Request headers are too large: {what}.",
        "invalid_request_error",
        "request_headers_too_large",
        metric_type="headers_too_large",
    )


def model_not_found(model: str) -> ApiError:
    """404: no backend serves the model asked for."""
    return ApiError(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model_not_found",
        param="model",
        metric_type="model_not_found",
    )


def backend_not_found(name: str) -> ApiError:
    """404 from the admin API: no backend of that name."""
    return ApiError(
        404,
        f"No backend named {name!r}; GET /admin/backends lists them.",
        "invalid_request_error",
        "backend_not_found",
    )


def keys_file_refused(keys: int, message: str) -> ApiError:
    """422 from the admin API's reload: the file is refused, the keys in force stay."""
    return ApiError(
        422,
        f"Keys file refused, the {keys} keys in force stay: {message}",
        "invalid_request_error",
        "invalid_keys_file",
    )


def http_error(status: int, detail: str) -> ApiError:
    """Any other HTTP error of the admin API's framework, in OpenAI's shape."""
    return ApiError(status, detail, "invalid_request_error", "http_error")


def upstream_unavailable(message: str = "The model server is not reachable.") -> ApiError:
    """503: vLLM refuses connections (down, restarting), or no backend of the model is up."""
    return ApiError(503, message, "server_error", "upstream_unavailable", headers=[_RETRY_SOON])


def limit_store_unavailable(
    message: str = "The gateway cannot check limits right now; try again shortly.",
) -> ApiError:
    """503: the limits cannot be checked (Redis away, or a quota not yet read): refused
    rather than served without limits."""
    return ApiError(503, message, "server_error", "limit_store_unavailable", headers=[_RETRY_SOON])


def usage_store_unavailable() -> ApiError:
    """503: the usage could not be recorded; serving without counting would leak quotas."""
    return ApiError(
        503,
        "The gateway could not record usage; the request was not completed.",
        "server_error",
        "usage_store_unavailable",
    )


def upstream_timeout(message: str) -> ApiError:
    """504: vLLM did not answer within the configured timeout."""
    return ApiError(504, message, "server_error", "upstream_timeout")


def upstream_error(message: str) -> ApiError:
    """502: vLLM answered with something that is not a usable HTTP response."""
    return ApiError(502, message, "server_error", "upstream_error")


def internal_error() -> ApiError:
    """500: a bug in the gateway; details go to the log, not to the client."""
    return ApiError(
        500,
        "The gateway failed to handle the request.",
        "server_error",
        "internal_error",
    )


# 429s


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s"


def rate_limit_headers(kind: str, limit: int, remaining: int, reset_after: float | None) -> Headers:
    """Retry-After (whole seconds, at least 1) and OpenAI's x-ratelimit-*-``kind`` trio
    (``kind``: requests or tokens); without ``reset_after`` (a total quota never resets),
    neither Retry-After nor the reset."""
    headers: Headers = []
    if reset_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(reset_after))).encode()))
    headers.append((f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()))
    headers.append((f"x-ratelimit-remaining-{kind}".encode(), str(max(0, remaining)).encode()))
    if reset_after is not None:
        reset = format_duration(reset_after).encode()
        headers.append((f"x-ratelimit-reset-{kind}".encode(), reset))
    return headers


def rate_limited(
    limit_kind: str, scope_label: str, kind: str, limit: int, remaining: int, reset_after: float
) -> ApiError:
    """429 rate_limit_exceeded: a limit (``limit_kind``: qps, tpm, concurrency) of
    ``scope_label`` (this API key, the service...) refused the request; retry after the reset.
    """
    what = {
        "qps": f"requests per second ({limit}/s)",
        "tpm": f"tokens per minute ({limit}/min)",
        "concurrency": f"concurrent requests ({limit})",
    }[limit_kind]
    return ApiError(
        429,
        f"Rate limit reached for {scope_label} on {what}. Please try again in "
        f"{format_duration(reset_after)}.",
        # OpenAI's types: "requests" for request limits, "tokens" for token limits.
        kind,
        "rate_limit_exceeded",
        headers=rate_limit_headers(kind, limit, remaining, reset_after),
        metric_type="rate_limit",
    )


def quota_held(quota: int, used: int, reserved: int, needed: int, remaining: int) -> ApiError:
    """429 rate_limit_exceeded: what is left of the quota is held by requests in progress;
    it comes back as they end."""
    return ApiError(
        429,
        f"This API key's quota ({quota} tokens) is held by requests in progress "
        f"({used} used, {reserved} reserved) and this request may use up to "
        f"{needed}. Please try again when they have ended.",
        "tokens",
        "rate_limit_exceeded",
        headers=rate_limit_headers("tokens", quota, remaining, 1.0),
        metric_type="rate_limit",
    )


_PERIODS = {"total": "", "monthly": " for this month", "daily": " for today"}


def quota_exceeded(
    quota: int, used: int, period: str, reset_after: float | None, needed: int | None = None
) -> ApiError:
    """429 insufficient_quota: retrying does not help until the period ends (in
    ``reset_after`` seconds; None for a total quota).

    ``needed``: the request's reservation, when that, not the usage alone, is what does not
    fit in the quota left.
    """
    when = _PERIODS[period]
    if needed is not None and used < quota:
        message = (
            f"This request may use up to {needed} tokens (its prompt and max_tokens), more "
            f"than the {quota - used} left of your quota{when} ({used} of {quota} "
            "tokens used). Lower max_tokens or ask your administrator for a larger quota."
        )
    else:
        message = (
            f"You exceeded your current quota{when} ({used} of {quota} tokens used). "
            "Ask your administrator for a larger quota."
        )
    reset = None if reset_after is None else float(math.ceil(reset_after))
    return ApiError(
        429,
        message,
        "insufficient_quota",
        "insufficient_quota",
        headers=[
            (b"x-should-retry", b"false"),
            *rate_limit_headers("tokens", quota, quota - used, reset),
        ],
        metric_type="quota",
    ).with_reason("quota")


def queue_timeout(model: str, waited: float) -> ApiError:
    """429: every place of the model stayed taken for as long as the request may wait."""
    return ApiError(
        429,
        f"The model `{model}` is busy: this request waited {waited:g}s in the gateway's queue "
        "without a place. Please try again shortly.",
        "requests",
        "queue_timeout",
        headers=[(b"retry-after", b"1")],
        metric_type="rate_limit",
    ).with_reason("queue_timeout")
