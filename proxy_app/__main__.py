"""Command line: ``llm-proxy [serve] --config PATH``, check-config, check-keys, new-key."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

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


def _serve(config: Config, path: Path) -> int:
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
    server = uvicorn.Server(
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m proxy_app`` and the ``llm-proxy`` script."""
    parser = argparse.ArgumentParser(
        prog="llm-proxy", description="OpenAI-compatible gateway in front of vLLM."
    )
    parser.add_argument("--config", type=Path, help="gateway config file (YAML)")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="serve the gateway (the default)")
    p_serve.add_argument("--config", type=Path, dest="sub_config")
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
    try:
        config, _ = _load(path)
    except (ConfigError, KeysFileError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    return _serve(config, path)


if __name__ == "__main__":
    sys.exit(main())
