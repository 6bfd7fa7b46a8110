"""A gateway restart that fails no request: the listening socket handed over as systemd's
socket activation does (llm-proxy.socket), and a shutdown that lets requests in flight end
and never closes a keep-alive connection a request may be on its way over.

Against the fake upstream (fake_delay keeps a request in flight for as long as the test
needs); the stack scenario restarts the real units under load."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from proxy_harness import (
    USER_KEY,
    Proc,
    Upstream,
    checkout_env,
    default_keys,
    free_port,
    start,
    wait_http_ok,
)

from proxy_app.framing import SHUTDOWN_IDLE_SECONDS


def _config(d: Path, upstream: Upstream, port: int) -> Path:
    conf = {
        "vllm_host": "127.0.0.1",
        "vllm_port": upstream.port,
        "fastapi_host": "127.0.0.1",
        "fastapi_port": port,
        "api_keys_file": str(d / "keys.json"),
        "state_dir": str(d / "state"),
        "log_level": "info",
        "timeouts": {"connect": 2, "first_byte": 10, "read": 10, "total": 30},
    }
    (d / "keys.json").write_text(json.dumps({"keys": default_keys()}))
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _start_on_socket(listener: socket.socket, config: Path, log: Path, *args: str) -> Proc:
    """The gateway as systemd starts it from llm-proxy.socket: the socket as fd 3,
    LISTEN_FDS=1 and LISTEN_PID its own PID (the shell's, which execs Python)."""
    n = listener.fileno()
    env = checkout_env()
    script = f'exec 3<&{n}; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" -m proxy_app serve "$@"'
    argv = ["bash", "-c", script, sys.executable, "--config", str(config), *args]
    return start(argv, log, env=env, pass_fds=(n,))


def _post_in_background(port: int, timeout: float) -> tuple[threading.Thread, dict[str, Any]]:
    """CHAT on a new connection to ``port``, in a thread; its answer lands in the dict."""
    out: dict[str, Any] = {}

    def post() -> None:
        out["answer"] = _post(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), CHAT)

    thread = threading.Thread(target=post)
    thread.start()
    return thread, out


def _post(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[int, dict, bytes]:
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"},
    )
    r = conn.getresponse()
    data = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


CHAT = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


@contextlib.contextmanager
def _listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    try:
        yield s
    finally:
        s.close()


def test_a_restart_on_a_handed_over_socket_fails_no_request(fake: Upstream, tmp_path: Path):
    """What nginx does across `systemctl restart llm-proxy`: a request in flight when the
    old process is told to stop ends with 200; a request sent on an idle keep-alive
    connection after the stop began is answered (with Connection: close) instead of
    meeting a closed connection; a new connection made while no process accepts waits in
    the socket's queue and is answered by the next process. None is refused or reset."""
    with _listener() as listener:
        port = listener.getsockname()[1]
        config = _config(tmp_path, fake, port)
        old = _start_on_socket(listener, config, tmp_path / "old.log")
        try:
            # The kernel queues the connection until the gateway accepts it.
            idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            assert _post(idle, CHAT)[0] == 200

            in_flight: dict[str, Any] = {}

            def slow() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                in_flight["answer"] = _post(conn, {**CHAT, "fake_delay": 3})

            t = threading.Thread(target=slow)
            t.start()
            time.sleep(0.5)  # the slow request is in flight
            old._signal(15)  # SIGTERM, as systemctl stop sends it
            time.sleep(0.5)

            # The idle keep-alive connection (nginx's) still gets its answer.
            status, headers, _ = _post(idle, CHAT)
            assert status == 200
            assert headers.get("connection") == "close"

            # A new connection: the kernel queues it on the socket nobody accepts now.
            q, queued = _post_in_background(port, 60)
            t.join(30)
            assert in_flight["answer"][0] == 200, in_flight
            old.popen.wait(SHUTDOWN_IDLE_SECONDS + 20)
            assert "answer" not in queued, "the stopping gateway accepted a new connection"

            new = _start_on_socket(listener, config, tmp_path / "new.log")
            try:
                q.join(60)
                assert queued["answer"][0] == 200, queued
            finally:
                new.stop()
        finally:
            old.stop()


def test_systemd_hears_ready_once_the_gateway_serves_and_stopping_when_it_drains(
    fake: Upstream, tmp_path: Path
):
    """Type=notify: `systemctl start llm-proxy` returns, and the unit's ExecStartPost
    restarts the standby gateway, only once this one answers; READY=1 must therefore come
    after the gateway serves, never before, and STOPPING=1 when it begins to stop."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    port = free_port()
    config = _config(tmp_path, fake, port)
    env = {**checkout_env(), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = start(
        [sys.executable, "-m", "proxy_app", "--config", str(config)], tmp_path / "g.log", env=env
    )
    try:
        assert notify.recv(64) == b"READY=1"
        # Ready means serving: the first request after READY=1 is answered.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert _post(conn, CHAT)[0] == 200
        proc._signal(15)
        assert notify.recv(64) == b"STOPPING=1"
        proc.popen.wait(SHUTDOWN_IDLE_SECONDS + 20)
    finally:
        proc.stop()
        notify.close()


def test_a_standby_serves_the_gateways_socket_only_from_sigusr1_on(fake: Upstream, tmp_path: Path):
    """The standby (llm-proxy-standby.service) gets the gateway's socket from systemd too,
    but leaves it to the gateway: it answers its own port at once, and a connection on the
    gateway's socket waits in the queue until SIGUSR1 (the gateway's ExecStop: it is
    stopping), then the standby answers it. The queue is never dropped meanwhile."""
    with _listener() as listener:
        shared = listener.getsockname()[1]
        own = free_port()
        config = _config(tmp_path, fake, own)
        standby = _start_on_socket(listener, config, tmp_path / "standby.log", "--standby")
        try:
            wait_http_ok(standby, f"http://127.0.0.1:{own}/health", 30, "the standby")
            assert _post(http.client.HTTPConnection("127.0.0.1", own, timeout=10), CHAT)[0] == 200
            q, queued = _post_in_background(shared, 30)
            time.sleep(2)
            assert "answer" not in queued, "the standby took the gateway's socket unasked"
            standby._signal(10)  # SIGUSR1
            q.join(30)
            assert queued["answer"][0] == 200, queued
            assert "serving the gateway's socket" in standby.output()
        finally:
            standby.stop()
