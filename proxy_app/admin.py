"""The operator's API, on FastAPI: key reloads, usage, and draining backends.

These endpoints are rare and benefit from typed models and validation; the forwarding hot
path does not go through FastAPI (see proxy.py). The gateway (app.py) hands this app only
requests made with an admin key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import (
    ApiError,
    backend_not_found,
    bad_request,
    http_error,
    keys_file_refused,
    method_not_allowed,
    not_found,
)
from .keys import KeyStore, ReloadResult
from .ledger import aggregate, parse_by, render, report_range
from .routing import Router
from .usage import UsageStore, usage_report


class ReloadOut(BaseModel):
    status: Literal["ok"]
    keys: int
    message: str


class TokenCounts(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class KeyUsage(BaseModel):
    key_id: str
    user: str
    enabled: bool
    admin: bool
    quota: int | None
    quota_period: str
    period: str
    period_usage: TokenCounts
    total_usage: TokenCounts
    remaining: int | None


class BackendOut(BaseModel):
    name: str
    model: str | None
    up: bool
    draining: bool
    in_flight: int


class BackendsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[BackendOut]


class UsageOut(BaseModel):
    object: Literal["list"] = "list"
    generated_at: datetime
    data: list[KeyUsage]


def _error_response(err: ApiError) -> Response:
    headers = {k.decode(): v.decode() for k, v in err.headers}
    return Response(err.body(), err.status, headers=headers, media_type="application/json")


def route_templates(app: FastAPI) -> list[tuple[re.Pattern[str], str]]:
    """Each admin route's pattern and template (``/admin/backends/{name}/drain``): the
    endpoint labels of /admin/* in the metrics and the request log."""
    return [(r.path_regex, r.path_format) for r in app.routes if isinstance(r, APIRoute)]


def build_admin_app(
    *,
    keys: KeyStore,
    usage: UsageStore,
    reload_keys: Callable[[str], Awaitable[ReloadResult]],
    router: Router | None = None,
) -> FastAPI:
    """The FastAPI app serving /admin/*."""
    app = FastAPI(title="llmhost gateway admin", docs_url=None, redoc_url=None, openapi_url=None)
    # /admin/usage/ is not /admin/usage: no redirect, whose Location would be built from
    # the client's Host header.
    app.router.redirect_slashes = False

    @app.post("/admin/reload-keys", response_model=ReloadOut)
    async def reload() -> Any:
        """Reload the keys file; a bad file is refused and the keys in force stay."""
        result = await reload_keys("admin")
        if not result.ok:
            raise keys_file_refused(result.keys, result.message)
        return {"status": "ok", "keys": result.keys, "message": result.message}

    @app.get("/admin/usage", response_model=UsageOut)
    async def get_usage(
        user: Annotated[str | None, Query(max_length=128)] = None,
        key_id: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Any:
        """Usage of every key in force in its quota period and in total, and quota left."""
        now = time.time()
        selected = [
            k
            for k in keys.keys.values()
            if (user is None or k.user == user) and (key_id is None or k.key_id == key_id)
        ]
        selected.sort(key=lambda k: (k.user, k.key_id))
        return {
            "object": "list",
            "generated_at": datetime.fromtimestamp(now).astimezone(),
            "data": await usage_report(usage, selected, now),
        }

    @app.get("/admin/usage/report")
    async def usage_ledger(
        since: Annotated[str | None, Query(max_length=10)] = None,
        until: Annotated[str | None, Query(max_length=10)] = None,
        by: Annotated[str, Query(max_length=64)] = "key,model,user",
        format: Annotated[Literal["json", "csv", "table"], Query()] = "json",
    ) -> Response:
        """The usage ledger from ``since`` to ``until`` (UTC days, both included; by
        default this month), summed by ``by`` (key, model, user, day): what ``llm-proxy
        usage`` prints."""
        try:
            first, last = report_range(since, until, time.time())
            groups = parse_by(by)
        except ValueError as e:
            raise bad_request(str(e)) from None
        text = render(aggregate(await usage.ledger(first, last), groups), groups, format)
        media = {"json": "application/json", "csv": "text/csv", "table": "text/plain"}[format]
        return Response(text, media_type=media)

    def _backend(name: str, draining: bool | None = None) -> dict[str, Any]:
        if router is None or name not in router.by_name:
            raise backend_not_found(name)
        if draining is None:
            return router.by_name[name].state()
        return router.drain(name, draining).state()

    @app.get("/admin/backends", response_model=BackendsOut)
    async def backends() -> Any:
        """Every backend of every model: up, drained, requests in flight from this gateway."""
        found = router.backends if router is not None else []
        return {"object": "list", "data": [b.state() for b in found]}

    @app.get("/admin/backends/{name:path}", response_model=BackendOut)
    async def backend(name: str) -> Any:
        return _backend(name)

    @app.post("/admin/backends/{name:path}/drain", response_model=BackendOut)
    async def drain(name: str) -> Any:
        """No new requests to the backend while another of its model can take them; its
        requests in flight run to their end (watch in_flight reach 0)."""
        return _backend(name, True)

    @app.post("/admin/backends/{name:path}/undrain", response_model=BackendOut)
    async def undrain(name: str) -> Any:
        """Back in rotation."""
        return _backend(name, False)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "body")]
        field = ".".join(loc) or None
        return _error_response(bad_request(f"{field}: {first.get('msg', 'invalid')}", field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "").split(", ")
            return _error_response(method_not_allowed(request.method, request.url.path, allowed))
        if exc.status_code == 404:
            return _error_response(not_found(request.url.path))
        return _error_response(http_error(exc.status_code, str(exc.detail)))

    return app
