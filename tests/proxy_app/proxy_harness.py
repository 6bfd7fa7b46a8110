"""Processes for the gateway tests: the gateway itself, vLLM, the fake upstream, Redis.

Everything runs as a real process on loopback; every helper that starts one also stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
T = TypeVar("T")

# The test vLLM's context (--max-model-len): the tiny model's own 2048 positions.
VLLM_MAX_MODEL_LEN = 2048

ADMIN_KEY = "sk-admin-0123456789"
USER_KEY = "sk-user-0123456789"


# A chat completion the test vLLM answers in tens of milliseconds: "tiny", exactly 2 tokens
# generated (ignore_eos), so that every answer to it costs the same number of tokens.
TINY_CHAT: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 2,
    "ignore_eos": True,
}


def default_keys() -> list[dict[str, Any]]:
    """An admin key and a user key with a large quota."""
    return [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "quota": 1_000_000},
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the thing polled may not be up yet
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def http(base_url: str = "", key: str | None = None, timeout: float = 30.0) -> httpx.Client:
    """An HTTP client for the tests' loopback servers: never through a proxy from the
    environment, and plain HTTP, so no TLS set-up (loading the CA bundle cost about 60 ms
    per client on 2 busy cores, seconds over a run)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        base_url=base_url, headers=headers, timeout=timeout, trust_env=False, verify=False
    )


@dataclass
class Proc:
    """A started process, its output in ``log``, stopped by its own id."""

    popen: subprocess.Popen[bytes]
    log: Path
    group: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(10)
        elif self.group:
            # The leader is gone; make sure its children are too.
            self._signal(signal.SIGKILL)

    def kill9(self) -> None:
        self._signal(signal.SIGKILL)
        self.popen.wait(10)


def start(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    group: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> Proc:
    """Start a process with stdout and stderr to ``log`` (and ``pass_fds`` kept open)."""
    out = log.open("ab")
    try:
        popen = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            # Its own process group (stopped as a whole), but not its own session: the kernel
            # shares the CPU fairly between sessions (autogroup), so in a session of its own
            # vLLM at nice 10 took 75% of both cores and starved the gateway and the client
            # for seconds at a time, nice or not (measured: the gateway's /metrics took 8 s).
            process_group=0 if group else None,
            pass_fds=pass_fds,
        )
    finally:
        out.close()
    return Proc(popen, log, group)


def checkout_env() -> dict[str, str]:
    """Environment under which ``python -m proxy_app`` imports this checkout's gateway.

    The venv may hold an editable install of another checkout (a second git worktree, say):
    the gateway under test must be the one these tests sit next to.
    """
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def wait_http_ok(proc: Proc, url: str, timeout: float, what: str) -> None:
    """Wait until GET ``url`` answers 200; fail at once if the process exits."""
    deadline = time.monotonic() + timeout
    with http(timeout=2.0) as c:
        while time.monotonic() < deadline:
            if not proc.alive:
                raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{proc.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if c.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not answer {url} within {timeout}s:\n{proc.output()}")


@dataclass
class Upstream:
    """Something OpenAI-shaped the gateway forwards to."""

    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Gateway:
    """A gateway process started from a config and keys file of the test's own."""

    dir: Path
    port: int
    config: dict[str, Any]
    proc: Proc | None = None
    keys: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.config.get('fastapi_host', '127.0.0.1')}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def keys_path(self) -> Path:
        return self.dir / "keys.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "gateway.log"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return http(self.url, key, timeout)

    def write_keys(self, keys: list[dict[str, Any]] | str) -> None:
        """Replace the keys file the way Ansible does: write aside, rename over."""
        tmp = self.keys_path.with_suffix(".tmp")
        tmp.write_text(keys if isinstance(keys, str) else json.dumps({"keys": keys}))
        tmp.replace(self.keys_path)

    def start(self) -> Gateway:
        self.config_path.write_text(yaml.safe_dump(self.config))
        if not self.keys_path.exists():
            self.write_keys(self.keys)
        self.proc = start(
            [sys.executable, "-m", "proxy_app", "--config", str(self.config_path)],
            self.log_path,
            env=checkout_env(),
        )
        wait_http_ok(self.proc, self.url + "/health", 30, "the gateway")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()

    def logs(self) -> list[dict[str, Any]]:
        """The gateway's JSON log lines so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def request_log(self, request_id: str) -> dict[str, Any]:
        """The request line of one request (waits for it: it is written as the request ends)."""

        def find() -> dict[str, Any] | None:
            for rec in self.logs():
                if rec.get("event") == "request" and rec.get("request_id") == request_id:
                    return rec
            return None

        return wait_for(find, 10, f"the log line of request {request_id}")

    def metrics(self) -> str:
        with self.client() as c:
            r = c.get("/metrics")
            r.raise_for_status()
            return r.text

    def usage(self, admin_key: str) -> dict[str, dict[str, Any]]:
        """/admin/usage, by user."""
        with self.client(admin_key) as c:
            r = c.get("/admin/usage")
            r.raise_for_status()
            return {row["user"]: row for row in r.json()["data"]}


GatewayFactory = Callable[..., Gateway]


def total_tokens(r: httpx.Response) -> int:
    """The tokens an answer cost, as its upstream counted them (prompt and completion)."""
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return int(usage["total_tokens"])


def chat_cost(upstream: Upstream, body: dict[str, Any] = TINY_CHAT) -> int:
    """What one chat completion costs, asked of the upstream itself (not through a gateway).

    For limits that must sit between one and two answers: the figure is vLLM's own.
    """
    with http(upstream.url, timeout=60) as c:
        return total_tokens(c.post("/v1/chat/completions", json=body))


def keys_with(**limits: Any) -> list[dict[str, Any]]:
    """The admin key, and the user key with these settings."""
    return [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", **limits},
    ]


class MetricMissing(AssertionError):
    """A metric a test reads is not exposed: renamed, or never recorded with these labels."""


def metric_value(
    text: str, name: str, labels: dict[str, str] | None = None, unseen_is_zero: bool = False
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``.

    Raises MetricMissing when no sample matches: a renamed metric must fail the test that
    reads it, not read as zero. ``unseen_is_zero``: a metric that is declared (``# TYPE``)
    but has no sample with these labels yet (a counter before its first count) reads 0.
    """
    total: float | None = None
    seen: list[str] = []
    declared = False
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            declared = declared or family == name or name.removeprefix(family) in _SUFFIXES
            continue
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        seen.append(line)
        got = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                got[k] = v.strip('"')
        if all(got.get(k) == v for k, v in (labels or {}).items()):
            total = (total or 0.0) + float(value)
    if total is not None:
        return total
    if unseen_is_zero and declared:
        return 0.0
    if not seen:
        raise MetricMissing(f"no metric {name!r} in the exposition")
    shown = "\n  ".join(seen[:20])
    raise MetricMissing(f"no sample of {name!r} with labels {labels}; there are:\n  {shown}")


# Sample names of a family: counters' _total, histograms' and summaries' parts.
_SUFFIXES = {"_total", "_created", "_count", "_sum", "_bucket"}


def upstream_metric(upstream: Upstream, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric of the upstream's own /metrics (vLLM's), read straight from it.

    vLLM's busy API process can take seconds to answer on 2 shared cores: a long timeout.
    """
    with http(upstream.url, timeout=60) as c:
        r = c.get("/metrics")
        r.raise_for_status()
        return metric_value(r.text, name, labels)


ERROR_FIELDS = {"message", "type", "param", "code"}


def openai_error(r: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of an answer, checked to be JSON in OpenAI's shape."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == ERROR_FIELDS
    return err
