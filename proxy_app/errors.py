"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

Headers = list[tuple[bytes, bytes]]


class ApiError(Exception):
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


def upstream_unavailable(message: str = "The model server is not reachable.") -> ApiError:
    """503: vLLM refuses connections (down, restarting)."""
    return ApiError(
        503,
        message,
        "server_error",
        "upstream_unavailable",
        headers=[(b"retry-after", b"5")],
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
