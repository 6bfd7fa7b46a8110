"""Small ASGI helpers for the raw hot path: request facts, bodies, responses."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .apis import APIS, error_body_for
from .errors import ApiError, GatewayError, Headers, bad_request, too_large
from .outcome import Outcome

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
JSON = b"application/json"


class ClientGone(GatewayError):
    """The client closed the connection before its request was read, or while it waited in
    the gateway for a place or a slot (it held nothing: there is nothing to charge)."""


def request_id_from(header: bytes | None) -> str:
    """The caller's X-Request-ID when it is sane (nginx sends $request_id), else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header.decode()
    return os.urandom(16).hex()


class ClientAddress:
    """The client's IP: the peer's, or X-Forwarded-For's when the peer is a trusted proxy."""

    def __init__(self, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._trusted = trusted
        self._cache: dict[str, bool] = {}

    def _is_trusted(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
                hit = any(addr in net for net in self._trusted)
            except ValueError:
                hit = False
            if len(self._cache) < 10000:
                self._cache[ip] = hit
        return hit

    def resolve(self, peer: str | None, forwarded_for: bytes | None) -> str | None:
        """Walk X-Forwarded-For from the right past trusted proxies to the real client."""
        if peer is None or forwarded_for is None or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer
        return hops[0] if hops else peer


async def read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes ``limit``."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise bad_request("Invalid Content-Length header.") from None
        if declared > limit:
            raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            parts.append(chunk)
        if not msg.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def respond(
    send: Send,
    outcome: Outcome,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: Headers | None = None,
) -> None:
    """Send a whole response, with the request id."""
    h = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", outcome.request_id.encode()),
    ]
    if headers:
        h.extend(headers)
    outcome.responding(status)
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, outcome: Outcome, err: ApiError) -> None:
    """Send an ApiError in the shape of the API asked (OpenAI's but for Anthropic's)."""
    outcome.refused(err)
    body = error_body_for(APIS.get(outcome.endpoint), err)
    await respond(send, outcome, err.status, body, headers=err.headers)
