"""Command line: ``llm-proxy [serve] --config PATH``, check-config, check-keys, new-key,
usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, KeyDefaults, load_config
from .keys import DEFAULT_MAX_BYTES, KeysFileError, KeyStore, new_key, parse_keys, read_keys_file

EXIT_CONFIG = 2


def _load(path: Path) -> tuple[Config, KeyStore]:
    config = load_config(path)
    keys = KeyStore(config.api_keys_file, config.key_defaults, config.keys_file_max_bytes)
    keys.load()
    return config, keys


def _systemd_socket() -> socket.socket | None:
    """The listening socket systemd hands over (socket activation, llm-proxy.socket), if any.

    systemd holds it across a restart: while one gateway process drains and the next
    starts, connections wait in its queue instead of being refused."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=3)  # SD_LISTEN_FDS_START


def _notify(state: str) -> None:
    """Tell systemd (Type=notify units) how the gateway is doing: READY=1 once it serves,
    STOPPING=1 when it starts to drain. Nothing to do outside systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), address)


def _server_class() -> type:
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling systemd when it is ready: `systemctl start` (and the
        ExecStartPost that restarts the standby gateway after this one) waits for that.

        A standby (``standby_socket``: the gateway's listening socket, handed over by
        systemd too) serves its own port from the start and, from SIGUSR1 on (the gateway's
        ExecStop: the gateway is stopping), the gateway's socket as well: the connections
        that arrive while the gateway restarts are answered, not queued. systemd keeps that
        socket open throughout, so no connection waiting in its queue is ever reset."""

        standby_socket: socket.socket | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.started:
                return
            if self.standby_socket is not None:
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._take_over)
            logging.getLogger("uvicorn.error").info("Ready: serving requests")
            _notify("READY=1")

        def _take_over(self) -> None:
            task = asyncio.get_running_loop().create_task(self._serve_gateway_socket())
            task.add_done_callback(self._taken_over)

        @staticmethod
        def _taken_over(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                logging.getLogger("uvicorn.error").error(
                    "Standby: cannot serve the gateway's socket", exc_info=task.exception()
                )

        async def _serve_gateway_socket(self) -> None:
            sock, self.standby_socket = self.standby_socket, None
            if sock is None or self.should_exit:
                return  # already serving it, or stopping
            config = self.config

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config,
                    server_state=self.server_state,
                    app_state=self.lifespan.state,
                    _loop=_loop,
                )

            loop = asyncio.get_running_loop()
            server = await loop.create_server(create_protocol, sock=sock, backlog=config.backlog)
            self.servers.append(server)  # closed with the others when this process stops
            logging.getLogger("uvicorn.error").info(
                "Standby: serving the gateway's socket while the gateway restarts"
            )

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            _notify("STOPPING=1")
            await super().shutdown(sockets=sockets)

    return Server


def _serve(config: Config, path: Path, standby: bool = False) -> int:
    import uvicorn

    from .app import create_app
    from .framing import GatewayHttpProtocol

    app = create_app(config, path)
    # uvicorn's own records (startup, errors) go through the gateway's JSON log.
    handler = app.log.stdlib_handler()
    for name in ("uvicorn", "uvicorn.error", "asyncio"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(config.log_level.upper())
        lg.propagate = False
    server = _server_class()(
        uvicorn.Config(
            app,
            host=config.fastapi_host,
            port=config.fastapi_port,
            loop="uvloop",
            # httptools with limits on the request head and refusals in OpenAI's shape.
            http=GatewayHttpProtocol,
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            # The gateway reads X-Forwarded-For itself, from trusted_proxies only.
            proxy_headers=False,
            # Longer than nginx's upstream keepalive_timeout (60 s), so nginx never reuses a
            # connection the gateway is closing: that race turns into 502s on POSTs.
            timeout_keep_alive=config.keep_alive_timeout,
            timeout_graceful_shutdown=30,
        )
    )
    inherited = _systemd_socket()
    if standby:
        # Its own port (fastapi_port) now; the gateway's socket once the gateway stops.
        server.standby_socket = inherited
        inherited = None
    server.run(sockets=[inherited] if inherited is not None else None)
    return 0 if server.started else 1


def _check(path: Path) -> int:
    try:
        config, keys = _load(path)
    except (ConfigError, KeysFileError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: OK ({len(keys.keys)} keys in {config.api_keys_file})")
    return 0


def _check_keys(path: Path, max_bytes: int) -> int:
    # Used as Ansible's `validate:` on a keys file before it replaces the one in force,
    # so it needs no config: per-key defaults do not change whether a file is valid.
    try:
        keys = parse_keys(read_keys_file(path, max_bytes), KeyDefaults(), str(path))
    except OSError as e:
        print(f"{path}: cannot read keys file: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    except KeysFileError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: OK ({len(keys)} keys)")
    return 0


def _new_key(as_json: bool) -> int:
    key, digest = new_key()
    if as_json:
        print(json.dumps({"key": key, "key_sha256": digest}))
    else:
        print(f"key:        {key}")
        print(f"key_sha256: {digest}")
    return 0


def _usage(config: Config, since: str | None, until: str | None, by: str, fmt: str) -> int:
    """The usage ledger as a report, read from the gateway's store (its SQLite file, or the
    Redis it shares), whether the gateway runs or not."""
    import time

    from .ledger import aggregate, parse_by, render, report_range
    from .usage import read_sqlite_ledger

    try:
        first, last = report_range(since, until, time.time())
        groups = parse_by(by)
    except ValueError as e:
        print(f"llm-proxy usage: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if config.redis_url is not None:
        rows = asyncio.run(_redis_ledger(config, first, last))
    else:
        path = config.state_dir / "usage.sqlite3"
        if not path.exists():
            print(f"llm-proxy usage: {path}: no usage recorded here yet", file=sys.stderr)
            return 1
        owner = path.stat()
        if os.geteuid() == 0 and owner.st_uid != 0:
            # Run by root: read as the file's owner (the gateway's user), so that the journal
            # files SQLite may create beside it are never root's, which the gateway could not
            # open (not tested: the tests run as one user).
            os.setgroups([])
            os.setgid(owner.st_gid)
            os.setuid(owner.st_uid)
        rows = read_sqlite_ledger(path, first, last)
    sys.stdout.write(render(aggregate(rows, groups), groups, fmt))
    return 0


async def _redis_ledger(config: Config, since: str, until: str) -> list[Any]:
    from .app import redis_client
    from .usage import read_redis_ledger

    assert config.redis_url is not None
    redis = redis_client(config.redis_url)
    try:
        return await read_redis_ledger(redis, config.redis_prefix, since, until)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m proxy_app`` and the ``llm-proxy`` script."""
    parser = argparse.ArgumentParser(
        prog="llm-proxy", description="OpenAI-compatible gateway in front of vLLM."
    )
    parser.add_argument("--config", type=Path, help="gateway config file (YAML)")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="serve the gateway (the default)")
    p_serve.add_argument("--config", type=Path, dest="sub_config")
    p_serve.add_argument(
        "--standby",
        action="store_true",
        help="serve fastapi_port; serve the socket systemd hands over only after SIGUSR1",
    )
    p_check = sub.add_parser("check-config", help="validate the config and the keys file")
    p_check.add_argument("--config", type=Path, dest="sub_config")
    p_keys = sub.add_parser("check-keys", help="validate a keys file on its own")
    p_keys.add_argument("keys_file", type=Path)
    p_keys.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"refuse a larger file (the config's keys_file_max_bytes; {DEFAULT_MAX_BYTES})",
    )
    p_key = sub.add_parser("new-key", help="print a new API key and its sha256")
    p_key.add_argument("--json", action="store_true", help="print JSON")
    p_usage = sub.add_parser(
        "usage", help="the usage ledger: requests, errors and tokens by key, model, user, day"
    )
    p_usage.add_argument("--config", type=Path, dest="sub_config")
    p_usage.add_argument("--since", help="first day, YYYY-MM-DD (UTC; default: the 1st)")
    p_usage.add_argument("--until", help="last day, YYYY-MM-DD (UTC; default: today)")
    p_usage.add_argument(
        "--by", default="key,model,user", help="groups: key, model, user, day (comma-separated)"
    )
    p_usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)

    command = args.command or "serve"
    if command == "new-key":
        return _new_key(args.json)
    if command == "check-keys":
        return _check_keys(args.keys_file, args.max_bytes)
    path = getattr(args, "sub_config", None) or args.config
    if path is None:
        parser.error(f"{command} needs --config PATH")
    if command == "check-config":
        return _check(path)
    if command == "usage":
        try:
            config = load_config(path)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_CONFIG
        return _usage(config, args.since, args.until, args.by, args.format)
    try:
        config, _ = _load(path)
    except (ConfigError, KeysFileError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    return _serve(config, path, standby=getattr(args, "standby", False))


if __name__ == "__main__":
    sys.exit(main())
