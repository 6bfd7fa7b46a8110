"""What the cluster scenario's tests share: the hosts, their addresses and variables, a
client that sends real requests from the controller to both gateways, and readers of the
gateways' and vLLM's own metrics.

The controller reaches the test hosts on the scenario's Docker network (the hosts' own
addresses, as a client of a real site would reach its gateways); what only hosts inside the
cluster may reach (vLLM behind its firewall, the gateways' loopback port) is read through a
command run on a host that may.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

SCENARIO = Path(__file__).resolve().parent.parent
GPU_HOSTS = ("llmhost-gpu1", "llmhost-gpu2")
GATEWAYS = ("llmhost-gw1", "llmhost-gw2")
REDIS = "llmhost-redis"  # also the monitoring host
# Both gateway processes of a gateway host (the standby answers while the gateway restarts),
# as journalctl's arguments: their request logs.
GATEWAY_UNITS = "-u llm-proxy -u llm-proxy-standby"


def inventory() -> str:
    return os.environ["MOLECULE_INVENTORY_FILE"]


@cache
def hostvars(name: str) -> dict[str, Any]:
    """A host's variables as Ansible resolves them (lookups included)."""
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory(), "--host", name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out)


@cache
def address(name: str) -> str:
    """The test host's address on the scenario's network."""
    out = subprocess.run(
        [
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    return out[0]


def gateway_url(name: str) -> str:
    """Where clients reach a gateway host: its nginx."""
    return f"http://{address(name)}:{hostvars(name).get('nginx_port', 8000)}"


@dataclass(frozen=True)
class BackendInfo:
    """One backend of the gateways' config, and the vLLM unit behind it."""

    name: str
    model: str
    host: str
    port: int
    unit: str

    def as_config(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port}


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus exposition text as {(name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = []
        for part in rest.rstrip("}").split('",'):
            if "=" in part:
                k, v = part.split("=", 1)
                labels.append((k, v.strip('"')))
        samples[(name, frozenset(labels))] = float(value)
    return samples


def metric_sum(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``; a metric with
    no sample at all is an error (renamed metrics must fail the test, not read as 0)."""
    found = [
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, v_) in ls for k, v_ in labels.items())
    ]
    if not any(n == name for n, _ in samples):
        raise AssertionError(f"no metric {name!r}")
    return sum(found)


class Cluster:
    """Commands on the test hosts (through testinfra) and their metrics."""

    def __init__(self, hosts: dict[str, Any]) -> None:
        self.hosts = hosts

    def run(self, name: str, command: str, *args: Any) -> str:
        """A command as root on the host (the tests stop units and read journals)."""
        host = self.hosts[name]
        with host.sudo():
            result = host.run(command, *args)
        assert result.rc == 0, (name, command, result.stdout, result.stderr)
        return result.stdout

    def run_stdin(self, name: str, argv: list[str], stdin: str) -> str:
        """argv on the host with ``stdin`` as its input (secrets stay off command lines)."""
        result = self.hosts[name].ansible(
            "ansible.builtin.command",
            json.dumps({"argv": argv, "stdin": stdin}),
            check=False,
            become=True,
        )
        assert result.get("rc") == 0, (name, argv, result)
        return result["stdout"]

    def redis(self, *args: str) -> str:
        """redis-cli on the Redis host, the password on its standard input (not argv)."""
        password = Path(os.environ["LLMHOST_CACHE_DIR"]) / "demo" / "redis-password"
        script = 'read -r REDISCLI_AUTH; export REDISCLI_AUTH; exec redis-cli "$@"'
        argv = ["sh", "-c", script, "redis-cli", *args]
        return self.run_stdin(REDIS, argv, password.read_text().split()[0])

    @contextlib.contextmanager
    def redis_commands(self) -> Iterator[list[str]]:
        """Every command Redis runs during the block, scripts' own calls included, each line
        with Redis' clock (its MONITOR feed), in the list once the block has ended."""
        password = Path(os.environ["LLMHOST_CACHE_DIR"]) / "demo" / "redis-password"
        path, unit = "/root/llmhost-test-monitor.log", "llmhost-test-monitor"
        self.run(REDIS, f"rm -f {path}")
        self.run(
            REDIS,
            "systemd-run --collect --unit %s -p StandardOutput=file:%s -E REDISCLI_AUTH=%s "
            "stdbuf -oL redis-cli MONITOR",
            unit,
            path,
            password.read_text().split()[0],
        )
        feed = self.hosts[REDIS]
        wait_until(lambda: feed.run(f"grep -qx OK {path}").rc == 0, 30, "Redis' MONITOR feed")
        lines: list[str] = []
        try:
            yield lines
        finally:
            # Redis feeds commands in order: once this one is in, every earlier one is too.
            marker = f"llmhost-test-{time.time_ns()}"
            self.redis("ECHO", marker)
            wait_until(lambda: feed.run(f"grep -q {marker} {path}").rc == 0, 30, "the feed")
            self.run(REDIS, f"systemctl stop {unit}")
            lines += self.run(REDIS, f"cat {path}").splitlines()

    def drained(self, admin_key: str) -> dict[tuple[str, int], set[str]]:
        """The backends each gateway process (gateway 8001, standby 8011) has drained, as its
        admin API says."""
        out = {}
        for gw in GATEWAYS:
            for port in (8001, 8011):
                listed = self.run_stdin(
                    gw,
                    ["curl", "-sf", "-H", "@-", f"http://127.0.0.1:{port}/admin/backends"],
                    f"Authorization: Bearer {admin_key}\n",
                )
                out[gw, port] = {b["name"] for b in json.loads(listed)["data"] if b["draining"]}
        return out

    def active(self, name: str, unit: str) -> bool:
        return self.hosts[name].run(f"systemctl is-active {unit}").stdout.strip() == "active"

    def gateway_config(self, gateway: str) -> dict[str, Any]:
        """The gateway's config file as it reads it."""
        py = "/opt/llm-proxy/venv/bin/python"
        code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
        return json.loads(self.run(gateway, f"{py} -c '{code}' /etc/llm-proxy/config.yaml"))

    def gateway_port(self, gateway: str) -> int:
        return int(self.gateway_config(gateway).get("fastapi_port", 8001))

    def lease_ttl(self) -> int:
        """Seconds a dead gateway's concurrency slots outlive it: the request timeout + 60."""
        timeouts = self.gateway_config(GATEWAYS[0]).get("timeouts", {})
        return int(timeouts.get("total", 900)) + 60

    def gateway_metrics(self, gateway: str) -> dict:
        port = self.gateway_port(gateway)
        return parse_metrics(self.run(gateway, f"curl -sf http://127.0.0.1:{port}/metrics"))

    def vllm_metrics(self, instance: BackendInfo) -> dict:
        """vLLM's own metrics, read from a gateway host (the firewall admits it)."""
        text = self.run(GATEWAYS[0], f"curl -sf http://{instance.host}:{instance.port}/metrics")
        return parse_metrics(text)

    def vllm_health(self, instance: BackendInfo) -> bool:
        url = f"http://{instance.host}:{instance.port}/health"
        out = self.hosts[GATEWAYS[0]].run(f"curl -s -o /dev/null -w %{{http_code}} -m 2 {url}")
        return out.stdout.strip() == "200"

    def backend_up(self, gateway: str, backend: str) -> float:
        return metric_sum(self.gateway_metrics(gateway), "gateway_backend_up", backend=backend)

    def request_log(
        self,
        since: float,
        user: str,
        id_prefix: str = "",
        gateways: Iterable[str] = GATEWAYS,
        units: str = GATEWAY_UNITS,
    ) -> list[dict[str, Any]]:
        """The gateways' request log lines of ``user`` since ``since`` (epoch seconds), of
        both gateway processes unless ``units`` says which (journalctl's ``-u`` arguments),
        whose request id starts with ``id_prefix``, each with the gateway's own ``start``
        and ``end`` of the request (epoch seconds)."""
        out = []
        for gw in gateways:
            since_arg = f"--since @{int(since)}"
            text = self.run(gw, f"journalctl {units} -o cat --no-pager {since_arg}")
            for line in text.splitlines():
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if record.get("event") != "request" or record.get("user") != user:
                    continue
                if not str(record.get("request_id", "")).startswith(id_prefix):
                    continue
                end = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
                out.append(
                    {
                        **record,
                        "gateway": gw,
                        "end": end,
                        "start": end - record["duration_ms"] / 1000,
                    }
                )
        return out

    def request_backends(self, ids: list[str]) -> dict[str, str]:
        """request id -> the backend it went to, from the gateways' request log lines."""
        wanted = set(ids)
        found: dict[str, str] = {}
        for gw in GATEWAYS:
            out = self.run(gw, f"journalctl {GATEWAY_UNITS} -o cat --no-pager -n 20000")
            for line in out.splitlines():
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                rid = record.get("request_id")
                if rid in wanted and "backend" in record:
                    found[rid] = record["backend"]
        return found


# One client for every request of the tests: creating one per request (httpx.post) costs
# enough on the controller that requests sent "at once" from threads reached the gateways
# seconds apart (measured), and a concurrency test then proves nothing.
CLIENT = httpx.Client(
    timeout=120, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
)


def chat(
    url: str,
    key: str,
    body: dict[str, Any],
    timeout: float = 120,
    request_id: str | None = None,
) -> httpx.Response:
    headers = _auth(key) | ({"X-Request-ID": request_id} if request_id else {})
    return CLIENT.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


class Pending:
    """Calls running in threads, whose results are read as they come: requests that a
    frozen vLLM keeps waiting, next to those the gateways answer at once."""

    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(len(calls))
        self.futures = [self._pool.submit(c) for c in calls]

    def answered(self) -> list[Any]:
        """The results (or exceptions) of the calls that have returned."""
        return [f.result() if f.exception() is None else f.exception() for f in self.futures
                if f.done()]  # fmt: skip

    def wait_answered(self, n: int, timeout: float) -> list[Any]:
        wait_until(lambda: len(self.answered()) >= n, timeout, f"{n} answers", interval=0.1)
        return self.answered()

    def all(self, timeout: float) -> list[Any]:
        concurrent.futures.wait(self.futures, timeout)
        self._pool.shutdown(wait=False)
        return self.answered()


@contextlib.contextmanager
def frozen_vllm(cluster: Cluster, instances: Iterable[str] = GPU_HOSTS) -> Iterator[None]:
    """vLLM's engine of the default instance on each host stopped (SIGSTOP to every process
    under the API server: the engine core, whose worker runs in it, see inventories/local):
    the API server takes requests and /health answers, but no token comes, so a request the
    gateway admits holds its slot, for certain, until the test lets the engine go on
    (SIGCONT, always) or the gateway's first-byte timeout (30 s here) ends it. (Streams that
    the test left unread did not hold: the hosts' TCP buffers took a whole 4.8 MB stream in a
    second. And a stopped API server did not hold either: on SIGCONT it ran its keep-alive
    timers before reading what had arrived, closing the connections the gateway had reused:
    502s.)"""
    hosts = list(instances)
    try:
        for h in hosts:
            cluster.run(h, ENGINE_SIGNAL.format(signal="STOP"))
        yield
    finally:
        for h in hosts:
            cluster.run(h, ENGINE_SIGNAL.format(signal="CONT"))


# A signal to every process below vllm.service's main one (the API server).
ENGINE_SIGNAL = (
    "kids() {{ for c in $(pgrep -P $1); do echo $c; kids $c; done; }}; "
    "kill -{signal} $(kids $(systemctl show -p MainPID --value vllm))"
)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def parallel(calls: Iterable[Callable[[], Any]], workers: int) -> list[Any]:
    """Run the calls on ``workers`` threads; their results (or exceptions) in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(c) for c in calls]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # the caller decides what a failure means
                out.append(e)
        return out


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> float:
    """Seconds until ``check()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


class SteadyLoad:
    """``rate`` requests a second through one gateway, each on its own thread, for as long
    as the ``with`` block lasts: chat completions, every other one streamed, or with
    ``completions_every`` > 1 one chat completion in that many and the others GET
    /v1/models (also answered by vLLM, without generating). What each got: the status, and
    for a stream whether it ended with [DONE] and no error event."""

    def __init__(
        self, url: str, key: str, rate: float, completions_every: int = 1, max_tokens: int = 2
    ) -> None:
        self.interval = 1 / rate
        self.max_tokens = max_tokens
        address = urlsplit(url)
        self._host, self._port = address.hostname, address.port
        self._headers = {**_auth(key), "Content-Type": "application/json"}
        self.completions_every = completions_every
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # How long it sent: from the first request to the end of the block (not the wait
        # for the last answers after it).
        self.sending_seconds = 0.0

    def _one(self, n: int) -> None:
        body: dict[str, Any] = {
            "model": "tiny",
            # Short answers by default: the load must not starve the restarting vLLM of the
            # CPU it loads with (this machine's 2 cores serve every test host).
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Steady request {n}."}],
        }
        chat, k = n % self.completions_every == 0, n // self.completions_every
        out: dict[str, Any] = {"n": n, "stream": chat and k % 2 == 1, "chat": chat}
        # A connection of its own per request, with the standard library: nothing shared
        # between the load's threads (httpx's shared pool once failed a request on the
        # controller itself under this load, "Bad file descriptor"), and little CPU per
        # request, so that the load keeps its rate on a busy controller.
        c = http.client.HTTPConnection(self._host, self._port, timeout=120)
        try:
            if chat:
                body["stream"] = out["stream"]
                c.request("POST", "/v1/chat/completions", json.dumps(body), self._headers)
            else:
                c.request("GET", "/v1/models", headers=self._headers)
            r = c.getresponse()
            text = r.read().decode(errors="replace")
            out["status"] = r.status
            if r.status != 200:
                out["body"] = text[:300]
            elif out["stream"]:
                lines = [line for line in text.splitlines() if line.startswith("data: ")]
                out["done"] = bool(lines) and lines[-1] == "data: [DONE]"
                events = [json.loads(x[6:]) for x in lines if x != "data: [DONE]"]
                out["error_events"] = [e for e in events if "error" in e]
        except (OSError, http.client.HTTPException, ValueError) as e:
            out["exception"] = repr(e)
        finally:
            c.close()
        with self._lock:
            self.results.append(out)

    def _run(self) -> None:
        # The load first: on a machine busy with other work the controller fell behind the
        # rate (measured: 20 of 50 a second beside two busy loops). Linux gives each thread
        # its own nice value, and the request threads inherit this one's: the load goes
        # ahead of other work on this machine, as a client on a machine of its own would.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        n = 0
        first = next_at = time.monotonic()
        while not self._stop.is_set():
            t = threading.Thread(target=self._one, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
            n += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        self.sending_seconds = time.monotonic() - first

    def __enter__(self) -> SteadyLoad:
        self._runner = threading.Thread(target=self._run, daemon=True)
        self._runner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._runner.join()
        for t in self._threads:
            t.join(150)

    def failures_told(self) -> list[tuple[Any, ...]]:
        """The first failures, each as (n, status, body or exception, stream done): what an
        assertion message can show whole."""
        return [
            (r["n"], r.get("status"), r.get("body") or r.get("exception"), r.get("done"))
            for r in self.failures()[:5]
        ]

    def failures(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.results
            if r.get("status") != 200
            or (r["stream"] and (not r.get("done") or r.get("error_events")))
        ]
