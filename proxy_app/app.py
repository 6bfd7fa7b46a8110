"""The gateway as one ASGI application: wires the parts, routes, logs and counts requests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from .admin import build_admin_app, route_templates
from .apis import APIS
from .asgi import (
    ClientAddress,
    ClientGone,
    Receive,
    Scope,
    Send,
    request_id_from,
    respond,
    respond_error,
)
from .config import RELOADABLE, Config, ConfigError, load_config
from .errors import (
    ApiError,
    bad_request,
    internal_error,
    method_not_allowed,
    not_found,
    upstream_unavailable,
)
from .framing import CLIENT_LOST
from .keys import KeyStore, ReloadResult, require_admin
from .logs import LEVELS, JsonLog
from .metrics import EndpointLabels, Metrics
from .outcome import Outcome
from .proxy import Proxy
from .ratelimit import Limiter
from .routing import Router
from .usage import RedisUsageStore, SqliteUsageStore, UsageSpool, UsageStore

Handler = Callable[[Receive, Send, Outcome, dict[bytes, bytes]], Awaitable[None]]

_HEALTH_BODY = b'{"status":"ok"}'
_GET = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})


class Gateway:
    """ASGI app. Parts are created at lifespan startup and closed at shutdown."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.log = JsonLog(config.log_level, config.log_file)
        self.keys = KeyStore(config.api_keys_file, config.key_defaults, config.keys_file_max_bytes)
        self.client_address = ClientAddress(config.trusted_proxies)
        self._log_requests = LEVELS["info"] >= self.log.level
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._redis: Any = None
        self.usage: UsageStore | None = None
        self.limiter: Limiter | None = None
        self.router: Router | None = None
        self.proxy: Proxy | None = None
        self.admin: Any = None
        self.routes: dict[str, tuple[frozenset[str], Handler]] = {}
        self.endpoint_label = EndpointLabels((), ())

    # lifespan

    async def startup(self) -> None:
        """Open everything the gateway needs; raises if any part cannot start."""
        c = self.config
        self.keys.load()
        self.metrics.keys_loaded.set(len(self.keys.keys))
        lease_ttl = c.timeouts.total + 60
        if c.redis_url is not None:
            self._redis = redis_client(c.redis_url)
            self.usage = RedisUsageStore(self._redis, c.redis_prefix, c.ledger.retention_days)
        else:
            self.usage = SqliteUsageStore(
                c.state_dir, c.sqlite_synchronous, c.ledger.retention_days
            )
        await self.usage.open()
        self.limiter = Limiter(
            c.rate_limit,
            self.usage,
            reservation=c.token_reservation,
            redis=self._redis,
            prefix=c.redis_prefix,
            lease_ttl=lease_ttl,
            retention_days=c.ledger.retention_days,
            failure_mode=c.redis_failure_mode,
            gateway_count=c.gateway_count,
            spool=UsageSpool(c.state_dir, c.sqlite_synchronous) if c.redis_url else None,
            log=self.log,
            local_gauge=self.metrics.limits_local,
        )
        await self.limiter.open()
        self.router = Router(c, self.metrics, self.log)
        self.proxy = Proxy(
            keys=self.keys,
            limiter=self.limiter,
            usage=self.usage,
            router=self.router,
            metrics=self.metrics,
            log=self.log,
            max_body_bytes=c.max_body_bytes,
            queue_timeout=c.queue.timeout,
            ledger=c.ledger,
        )
        self.admin = build_admin_app(
            keys=self.keys, usage=self.usage, reload_keys=self.reload_keys, router=self.router
        )
        p = self.proxy
        self.routes = {
            **{path: (_POST, p.completion) for path in APIS},
            "/v1/models": (_GET, p.models),
            "/health": (_GET, self._health),
            "/ready": (_GET, self._ready),
            "/metrics": (_GET, self._metrics),
        }
        self.endpoint_label = EndpointLabels(self.routes, route_templates(self.admin))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._tasks = [
            asyncio.create_task(self._watch_keys()),
            asyncio.create_task(self._probe_upstream()),
        ]
        self.log.log(
            "info",
            "started",
            listen=f"{c.fastapi_host}:{c.fastapi_port}",
            backends=[b.name for b in self.router.backends],
            keys=len(self.keys.keys),
            store="redis" if c.redis_url else "sqlite",
        )

    async def shutdown(self) -> None:
        """Stop background work and close connections and files."""
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.router is not None:
            self.router.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.usage is not None:
            await self.usage.close()
        if self._redis is not None:
            await self._redis.aclose()
        self.log.log("info", "stopped")
        self.log.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    self.log.log("error", "startup_failed", error=str(e))
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # reloads

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """SIGHUP: apply the config file's reloadable settings, then read the keys again."""
        if self.config_path is not None:
            self._reload_config(self.config_path)
        await self.reload_keys("sighup")

    def _reload_config(self, path: Path) -> None:
        try:
            new = load_config(path)
        except ConfigError as e:
            self.log.log("error", "config_reload_refused", error=str(e))
            return
        old = self.config
        pending = sorted(
            name
            for name in type(old).model_fields
            if name not in RELOADABLE and getattr(new, name) != getattr(old, name)
        )
        if pending:
            self.log.log("warning", "config_needs_restart", fields=pending)
        changed = sorted(n for n in RELOADABLE if getattr(new, n) != getattr(old, n))
        if not changed:
            return
        self.config = old.model_copy(update={n: getattr(new, n) for n in RELOADABLE})
        self.keys.defaults = new.key_defaults  # takes effect as the keys are read again
        if self.limiter is not None:
            self.limiter.global_limits = new.rate_limit
        self.log.log(
            "info",
            "config_reloaded",
            fields=changed,
            rate_limit=new.rate_limit.model_dump(),
            key_defaults=new.key_defaults.model_dump(),
        )

    async def reload_keys(self, source: str) -> ReloadResult:
        """Reload the keys file (admin call, SIGHUP or file change) and say how it went.

        The file is read and validated in a worker thread, one reload at a time: a large
        file must not stall the requests in flight. The new keys replace the old in one
        assignment, so a request sees either set whole.
        """
        async with self._reload_lock:
            result = await asyncio.to_thread(self.keys.reload)
        self.metrics.key_reloads.labels("ok" if result.ok else "error").inc()
        self.metrics.keys_loaded.set(len(self.keys.keys))
        if result.ok:
            self.log.log("info", "keys_reloaded", source=source, keys=result.keys)
        else:
            self.log.log(
                "error",
                "keys_reload_refused",
                source=source,
                error=result.message,
                keys_in_force=result.keys,
            )
        return result

    async def _watch_keys(self) -> None:
        # Polling stat() every few seconds is cheap and works on every filesystem, including
        # files replaced by rename (Ansible's copy module), where inotify watches go stale.
        while True:
            await asyncio.sleep(self.config.keys_poll_interval)
            if self.keys.changed():
                await self.reload_keys("file_change")

    async def _probe_upstream(self) -> None:
        assert self.router is not None
        while True:
            await self.router.probe_all()
            await asyncio.sleep(self.config.routing.health_interval)

    # small endpoints

    async def _health(
        self, receive: Receive, send: Send, outcome: Outcome, headers: dict[bytes, bytes]
    ) -> None:
        await respond(send, outcome, 200, _HEALTH_BODY)

    async def _ready(
        self, receive: Receive, send: Send, outcome: Outcome, headers: dict[bytes, bytes]
    ) -> None:
        assert self.router is not None
        if not await self.router.probe_all():
            down = ", ".join(self.router.models_down())
            raise upstream_unavailable(
                f"Not ready: no server of these models answers /health: {down}."
                if self.router.named_models
                else "Not ready: the model server does not answer /health."
            )
        if self.limiter is not None and self.config.redis_url is not None:
            try:
                ok = await self.limiter.check()
            except Exception:
                ok = False
            if not ok:
                raise upstream_unavailable("Not ready: Redis does not answer.")
        body = orjson.dumps({"status": "ready", "upstream": "up", "keys": len(self.keys.keys)})
        await respond(send, outcome, 200, body)

    async def _metrics(
        self, receive: Receive, send: Send, outcome: Outcome, headers: dict[bytes, bytes]
    ) -> None:
        await respond(send, outcome, 200, self.metrics.render(), self.metrics.content_type.encode())

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers = dict(raw_headers)
        path: str = scope["path"]
        method: str = scope["method"]
        client = scope.get("client")
        outcome = Outcome(
            request_id=request_id_from(headers.get(b"x-request-id")),
            method=method,
            path=path,
            endpoint=self.endpoint_label(path),
            client_ip=self.client_address.resolve(
                client[0] if client else None, headers.get(b"x-forwarded-for")
            ),
            start=start,
            client_lost=scope.get("extensions", {}).get(CLIENT_LOST),
        )
        metrics = self.metrics
        metrics.active.inc()
        try:
            if len(headers) != len(raw_headers):
                _refuse_repeated_credentials(raw_headers)
            route = self.routes.get(path)
            if route is not None:
                if method not in route[0]:
                    raise method_not_allowed(method, path, route[0])
                await route[1](receive, send, outcome, headers)
            elif path.startswith("/admin/") and self.admin is not None:
                await self._to_admin(scope, receive, send, outcome, headers)
            else:
                raise not_found(path)
        except ApiError as e:
            if e.reason is not None:
                metrics.rejections.labels(e.reason).inc()
            if not outcome.response_started:
                await respond_error(send, outcome, e)
        except ClientGone:
            outcome.client_left()
        except Exception:
            self.log.log(
                "error",
                "unhandled_error",
                request_id=outcome.request_id,
                path=path,
                traceback=traceback.format_exc(),
            )
            if not outcome.response_started:
                await respond_error(send, outcome, internal_error())
            else:
                outcome.failed("internal_error")
        finally:
            metrics.active.dec()
            outcome.finish(metrics, self.log if self._log_requests else None)

    async def _to_admin(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        outcome: Outcome,
        headers: dict[bytes, bytes],
    ) -> None:
        # Every admin path needs an admin key, checked here like every other key, so the
        # admin app itself never sees a request that is not an admin's.
        key = self.keys.authenticate(headers.get(b"authorization"), time.time())
        outcome.identify(key.user, key.key_id)
        require_admin(key)
        rid = outcome.request_id.encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                outcome.responding(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.admin(scope, receive, send_with_id)


# Headers that carry credentials: given twice, two readers could pick different ones.
_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})


def redis_client(url: str) -> Any:
    """The gateway's Redis client: bounded waits, and no command sent ahead of another's answer.

    Bounded waits, so that an unreachable Redis fails requests (or turns on local mode) in
    seconds rather than hanging them. Once Redis restarts, every pooled connection is dead: a
    connection idle for a second is PINGed before use, and a command that fails on a dead
    connection is sent once more on a new one, so a restart costs no request (measured in the
    cluster scenario: without these, the first requests after a Redis restart got 503). A
    command whose answer was lost after Redis ran it may then run twice: a lease or a
    reservation that expires, or usage counted twice, never a request served without being
    counted.

    No CLIENT SETINFO as a connection opens (``driver_info=None``): redis-py sends two of them
    before reading either answer, and when the event loop stalls for more than the health
    check's second between the two (a gateway starting on a loaded host), the health check's
    PING reads the first SETINFO's answer; Redis before 7.2 (Debian 12's 7.0) answers it with
    an error, so the request failed with 503 (measured: a gateway restart under load in the
    cluster scenario; tests/proxy_app/test_redis_failure.py reproduces it).
    """
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=1,
        retry=Retry(NoBackoff(), 1),
        # redis-py's pool refuses a command past 100 connections in use (MaxConnectionsError,
        # a 503 here): a burst (the requests a standby takes while its gateway restarts) had
        # more Redis commands at once.
        max_connections=1024,
        driver_info=None,
    )


def _refuse_repeated_credentials(raw_headers: list[tuple[bytes, bytes]]) -> None:
    """400 when a credentials header appears more than once."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in _CREDENTIALS:
            if name in seen:
                raise bad_request(
                    f"The {name.decode()} header may appear only once.",
                    name.decode(),
                    "duplicate_header",
                )
            seen.add(name)


def create_app(config: Config, config_path: Path | None = None) -> Gateway:
    """The gateway's ASGI app for ``config``; with ``config_path``, SIGHUP reads it again."""
    return Gateway(config, config_path)
