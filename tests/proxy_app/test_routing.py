"""Several backends behind one gateway: which backend a request goes to, and what happens
when one goes away (proxy_app/routing.py).

The backends are the tests' fake upstream (fake_upstream.py), one process each, because the
test needs to stop one and count what each received. The same behaviour against real vLLM
on two hosts, with two gateways, is the cluster scenario's (molecule/cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_harness import (
    ADMIN_KEY,
    HERE,
    USER_KEY,
    Upstream,
    free_port,
    http,
    metric_value,
    openai_error,
    start,
    wait_for,
    wait_http_ok,
)

from proxy_app.apis import prompt_start
from proxy_app.config import Config
from proxy_app.errors import ApiError
from proxy_app.logs import JsonLog
from proxy_app.metrics import Metrics
from proxy_app.routing import Router


def _start_fake(port: int, log: Path) -> Upstream:
    proc = start([sys.executable, str(HERE / "fake_upstream.py"), str(port)], log)
    wait_http_ok(proc, f"http://127.0.0.1:{port}/health", 30, "a fake upstream")
    return Upstream(port, proc)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Upstream]]:
    """Three fake upstreams: a, b (both serve "fake") and c (serves "other")."""
    d = tmp_path_factory.mktemp("fakes")
    ups = [_start_fake(free_port(), d / f"fake{i}.log") for i in range(3)]
    try:
        yield ups
    finally:
        for u in ups:
            u.proc.stop()


def _models(fakes: list[Upstream]) -> list[dict[str, Any]]:
    a, b, c = fakes
    return [
        {
            "name": "fake",
            "backends": [
                {"name": "a/fake", "host": "127.0.0.1", "port": a.port},
                {"name": "b/fake", "host": "127.0.0.1", "port": b.port},
            ],
        },
        {"name": "other", "backends": [{"name": "c/other", "host": "127.0.0.1", "port": c.port}]},
    ]


def _received(up: Upstream) -> int:
    with http(up.url) as c:
        return int(c.get("/_stats").json()["requests"])


def _counts(fakes: list[Upstream]) -> list[int]:
    return [_received(u) for u in fakes]


def _chat(system: str, user: str = "hello", model: str = "fake") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


def _which(fakes: list[Upstream], client: Any, body: dict[str, Any]) -> int:
    """Send one request; the index of the fake that received it."""
    before = _counts(fakes)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    after = _counts(fakes)
    moved = [i for i in range(len(fakes)) if after[i] != before[i]]
    assert len(moved) == 1, (before, after)
    return moved[0]


# --- the routing key ---------------------------------------------------------------------


def test_a_chat_prompt_start_is_its_system_prompt_and_first_user_message():
    first_turn = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Question one"},
    ]
    later_turn = [
        *first_turn,
        {"role": "assistant", "content": "Answer one"},
        {"role": "user", "content": "Question two"},
    ]
    assert prompt_start({"messages": first_turn}, 2048) == "You are terse.\x00Question one"
    # Every turn of a conversation shares its start, so it keeps its backend.
    assert prompt_start({"messages": later_turn}, 2048) == prompt_start(
        {"messages": first_turn}, 2048
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]}]
    assert prompt_start({"messages": parts}, 2048) == "look"


def test_questions_about_one_document_share_its_key_each_in_a_conversation_of_its_own():
    doc = "Document. " + "words of the document " * 30  # ~670 characters
    other = "Another document. " + "other words " * 50

    def ask(document: str, question: str, api: str) -> str:
        text = f"{document}\n\nQuestion: {question}?"
        if api == "chat":
            fields = {"messages": [{"role": "system", "content": "Answer."},
                                   {"role": "user", "content": text}]}  # fmt: skip
        else:
            fields = {"prompt": text}
        return prompt_start(fields, 2048)

    for api in ("chat", "completions"):
        assert ask(doc, "who", api) == ask(doc, "when", api)
        assert ask(doc, "who", api) != ask(other, "who", api)
        assert "Question" not in ask(doc, "who", api)
    # A short instruction before the blank line is not a document: the whole message decides.
    short = [{"role": "user", "content": "Summarize this:\n\n" + doc}]
    assert prompt_start({"messages": short}, 2048) == "Summarize this:\n\n" + doc
    # A message of one paragraph stays whole, whatever its length.
    assert prompt_start({"prompt": doc + " Question: who?"}, 2048) == doc + " Question: who?"


def test_a_completion_prompt_start_is_its_first_characters():
    assert prompt_start({"prompt": "abcdef"}, 3) == "abc"
    assert prompt_start({"prompt": ["xyz", "other"]}, 10) == "xyz"
    assert prompt_start({"input": "embed me"}, 5) == "embed"
    assert prompt_start({"prompt": [1, 2, 3]}, 2048) == "1,2,3"


def _router(policy: str = "prefix", n: int = 4, epsilon: float = 0.2) -> Router:
    config = Config.model_validate(
        {
            "api_keys_file": "/nonexistent",
            "models": [
                {
                    "name": "m",
                    "backends": [
                        {"name": f"gpu{i}/m", "host": "127.0.0.1", "port": 9000 + i}
                        for i in range(n)
                    ],
                }
            ],
            "routing": {"policy": policy, "load_epsilon": epsilon},
        }
    )
    return Router(config, Metrics(), JsonLog("error", None))


def test_two_routers_with_the_same_backends_choose_alike_without_talking():
    one, two = _router(), _router()
    picks = [one.choose("m", f"system prompt {i}").name for i in range(200)]
    assert picks == [two.choose("m", f"system prompt {i}").name for i in range(200)]
    # Rendezvous hashing spreads distinct prefixes over every backend.
    assert {picks.count(f"gpu{i}/m") for i in range(4)} != {0}
    assert min(picks.count(f"gpu{i}/m") for i in range(4)) > 20


def test_a_backend_leaving_moves_only_its_own_prefixes():
    router = _router()
    before = {i: router.choose("m", f"p{i}").name for i in range(400)}
    gone = router.by_name["gpu2/m"]
    gone.set_up(False)
    after = {i: router.choose("m", f"p{i}").name for i in range(400)}
    moved = [i for i in before if before[i] != after[i]]
    assert moved and all(before[i] == "gpu2/m" for i in moved)


def test_bounded_load_spills_a_hot_prefix_to_the_next_backend():
    router = _router(n=2, epsilon=0.2)
    home = router.choose("m", "hot")
    other = next(b for b in router.backends if b is not home)
    # 2 and 2 in flight: mean with this request 2.5, capacity max(3, floor(1.2 x 2.5)) = 3.
    home.in_flight, other.in_flight = 2, 2
    assert router.choose("m", "hot") is home
    # 3 and 2: mean 3, capacity 3; a fourth on the home backend would exceed it: spilled.
    home.in_flight = 3
    assert router.choose("m", "hot") is other
    # 9 and 6: mean 8, capacity floor(9.6) = 9: spilled; rounding up (10) would have let
    # it reach 10 / 6 = 1.67, above 1 + epsilon over 1 - epsilon = 1.5.
    home.in_flight, other.in_flight = 9, 6
    assert router.choose("m", "hot") is other
    home.in_flight, other.in_flight = 8, 7
    assert router.choose("m", "hot") is home
    text = router.metrics.render().decode()
    assert 'gateway_routing_decisions_total{decision="spilled",model="m"} 2.0' in text
    assert 'gateway_routing_decisions_total{decision="affinity",model="m"} 3.0' in text


def test_bounded_load_keeps_a_prefix_home_at_a_request_or_two_in_flight():
    router = _router(n=2, epsilon=0.2)
    home = router.choose("m", "doc")
    other = next(b for b in router.backends if b is not home)
    # 1 and 0 in flight: mean with this request 1, floor(1.2) = 1, but a backend takes 2.
    home.in_flight, other.in_flight = 1, 0
    assert router.choose("m", "doc") is home
    # 2 and 0: mean 1.5, capacity 2: the third spills.
    home.in_flight = 2
    assert router.choose("m", "doc") is other


def test_least_outstanding_takes_the_least_busy_and_round_robin_takes_turns():
    router = _router("least_outstanding", n=3)
    for b, n in zip(router.backends, (4, 1, 3), strict=True):
        b.in_flight = n
    assert router.choose("m", "").name == "gpu1/m"
    rr = _router("round_robin", n=3)
    assert [rr.choose("m", "").name for _ in range(6)] == [f"gpu{i % 3}/m" for i in range(6)]


# --- through a gateway -------------------------------------------------------------------


def test_a_model_goes_only_to_its_own_backends(fakes, gateway_factory):
    gw = gateway_factory(fakes[0], models=_models(fakes))
    before = _counts(fakes)
    with http(gw.url, USER_KEY) as c:
        for i in range(6):
            r = c.post("/v1/chat/completions", json=_chat(f"s{i}", model="other"))
            assert r.status_code == 200, r.text
    after = _counts(fakes)
    assert after[2] - before[2] == 6
    assert after[:2] == before[:2]
    text = http(gw.url).get("/metrics").text
    assert metric_value(text, "gateway_backend_requests_total", {"backend": "c/other"}) == 6


def test_a_drained_backend_gets_no_new_requests_and_comes_back(fakes, gateway_factory):
    """POST /admin/backends/{name}/drain (admin key only): every new request of the model
    goes to its other backend, whatever its prefix; a request in flight to the drained one
    runs to its end (in_flight says when it is idle); undrain puts it back. A model whose
    every backend is drained is still served: draining moves load, it never fails it."""
    gw = gateway_factory(fakes[0], models=_models(fakes))
    with http(gw.url, USER_KEY) as c:
        r = c.post("/admin/backends/a/fake/drain")
        assert r.status_code == 403, r.text
    with http(gw.url, ADMIN_KEY) as admin, http(gw.url, USER_KEY, timeout=30) as c:
        # A slow request in flight to a/fake when it is drained.
        prompts = [f"p{i}" for i in range(40)]
        to_a = next(p for p in prompts if _which(fakes, c, _chat(p)) == 0)
        result: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: result.update(
                r=c.post("/v1/chat/completions", json={**_chat(to_a), "fake_delay": 2.0})
            )
        )
        runner.start()
        wait_for(
            lambda: admin.get("/admin/backends/a/fake").json()["in_flight"] == 1, 10, "in flight"
        )
        r = admin.post("/admin/backends/a/fake/drain")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "name": "a/fake",
            "model": "fake",
            "up": True,
            "draining": True,
            "in_flight": 1,
        }
        before = _counts(fakes)
        for p in prompts:
            assert c.post("/v1/chat/completions", json=_chat(p)).status_code == 200
        after = _counts(fakes)
        assert after[0] - before[0] <= 1, (before, after)  # at most the slow one's arrival
        assert after[1] - before[1] == len(prompts)
        runner.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert admin.get("/admin/backends/a/fake").json()["in_flight"] == 0
        text = http(gw.url).get("/metrics").text
        assert metric_value(text, "gateway_backend_draining", {"backend": "a/fake"}) == 1
        # Both drained: still served.
        assert admin.post("/admin/backends/b/fake/drain").status_code == 200
        assert c.post("/v1/chat/completions", json=_chat("both")).status_code == 200
        for name in ("a/fake", "b/fake"):
            assert admin.post(f"/admin/backends/{name}/undrain").json()["draining"] is False
        assert _which(fakes, c, _chat(to_a)) == 0
        listing = admin.get("/admin/backends").json()["data"]
        assert [b["name"] for b in listing] == ["a/fake", "b/fake", "c/other"]
        r = admin.post("/admin/backends/nope/drain")
        assert r.status_code == 404 and r.json()["error"]["code"] == "backend_not_found"
    # The metrics count each admin call under its route's template, a name in it or not.
    text = http(gw.url).get("/metrics").text
    drains = "/admin/backends/{name}/drain"
    for endpoint, status, count in [
        (drains, "403", 1),
        (drains, "200", 2),
        (drains, "404", 1),
        ("/admin/backends/{name}/undrain", "200", 2),
        ("/admin/backends", "200", 1),
    ]:
        labels = {"method": "POST" if "drain" in endpoint else "GET", "endpoint": endpoint}
        assert metric_value(text, "http_requests_total", labels | {"status": status}) == count
    assert metric_value(text, "http_requests_total", {"endpoint": "other"}, True) == 0


def test_an_unknown_model_is_404_model_not_found_and_reaches_no_backend(fakes, gateway_factory):
    gw = gateway_factory(fakes[0], models=_models(fakes))
    before = _counts(fakes)
    with http(gw.url, USER_KEY) as c:
        r = c.post("/v1/chat/completions", json=_chat("s", model="nobody-serves-this"))
    assert r.status_code == 404
    err = openai_error(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "nobody-serves-this" in err["message"]
    assert _counts(fakes) == before


def test_the_model_list_has_every_configured_model(fakes, gateway_factory):
    gw = gateway_factory(fakes[0], models=_models(fakes))
    with http(gw.url, USER_KEY) as c:
        r = c.get("/v1/models")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["object"] == "list"
    assert sorted(m["id"] for m in listing["data"]) == ["fake", "other"]
    # The entries are the backends' own (the fake says owned_by "fake").
    assert {m["owned_by"] for m in listing["data"]} == {"fake"}


def test_the_same_prefix_goes_to_the_same_backend_from_two_gateways(fakes, gateway_factory):
    one = gateway_factory(fakes[0], models=_models(fakes), name="one")
    two = gateway_factory(fakes[0], models=_models(fakes), name="two")
    with http(one.url, USER_KEY) as c1, http(two.url, USER_KEY) as c2:
        first = [_which(fakes, c1, _chat(f"system prompt {i}")) for i in range(16)]
        again = [_which(fakes, c2, _chat(f"system prompt {i}", user="hello")) for i in range(16)]
    assert first == again
    assert set(first) == {0, 1}  # 16 prefixes all on one of two backends: 1 in 32768


def test_a_backend_that_refuses_connections_is_skipped_and_comes_back(
    fakes, gateway_factory, tmp_path
):
    a = fakes[0]
    gw = gateway_factory(
        fakes[0],
        models=_models(fakes),
        routing={"policy": "round_robin", "health_interval": 0.5},
    )
    a.proc.stop()
    try:
        with http(gw.url, USER_KEY) as c:
            for i in range(8):
                r = c.post("/v1/chat/completions", json=_chat(f"s{i}"))
                assert r.status_code == 200, r.text  # refused by a: sent to b instead
        text = http(gw.url).get("/metrics").text
        assert metric_value(text, "gateway_backend_up", {"backend": "a/fake"}) == 0
        assert metric_value(text, "gateway_backend_up", {"backend": "b/fake"}) == 1
        assert metric_value(text, "gateway_backend_retries_total") >= 1
    finally:
        fakes[0] = _start_fake(a.port, tmp_path / "a-again.log")

    def back() -> bool:
        text = http(gw.url).get("/metrics").text
        return metric_value(text, "gateway_backend_up", {"backend": "a/fake"}) == 1

    wait_for(back, 5, "backend a back in rotation")
    before = _received(fakes[0])
    with http(gw.url, USER_KEY) as c:
        for i in range(4):
            assert c.post("/v1/chat/completions", json=_chat(f"t{i}")).status_code == 200
    assert _received(fakes[0]) - before == 2  # round robin: its turn again


def test_when_no_backend_of_a_model_answers_the_request_is_503(fakes, gateway_factory, tmp_path):
    c_up = fakes[2]
    gw = gateway_factory(fakes[0], models=_models(fakes))
    c_up.proc.stop()
    try:
        with http(gw.url, USER_KEY) as c:
            r = c.post("/v1/chat/completions", json=_chat("s", model="other"))
            assert r.status_code == 503
            assert openai_error(r)["code"] == "upstream_unavailable"
            assert r.headers["retry-after"]
            # The other model is still served.
            assert c.post("/v1/chat/completions", json=_chat("s")).status_code == 200
            ready = c.get("/ready")
            assert ready.status_code == 503 and "other" in openai_error(ready)["message"]
    finally:
        fakes[2] = _start_fake(c_up.port, tmp_path / "c-again.log")


# --- a request that reached a backend is never sent again --------------------------------


class _ClosingServer:
    """Answers its first request on a connection, then reads the next one and closes the
    connection without answering: what vLLM does to a request when it stops, or when its
    keep-alive timer fires as the request arrives. Counts the requests it read."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        with contextlib.suppress(RuntimeError):
            self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"POST"):
                    self.requests += 1
                if answered and head.startswith(b"POST"):
                    writer.transport.abort()  # read, then gone without a byte of answer
                    return
                body = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'  # noqa: E501
                if head.startswith(b"GET /health"):
                    body = b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                if head.startswith(b"POST"):
                    answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def __enter__(self) -> _ClosingServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_request_cut_after_it_reached_the_backend_is_not_sent_again(gateway_factory):
    with _ClosingServer() as server:
        up = Upstream(server.port, None)  # type: ignore[arg-type]
        gw = gateway_factory(up, routing={"health_interval": 60})
        with http(gw.url, USER_KEY) as c:
            first = c.post("/v1/chat/completions", json=_chat("s", model="any"))
            assert first.status_code == 200, first.text
            # The gateway reuses the kept-alive connection; the server reads the request
            # and closes. Sending it again could run a generation twice: 502 instead.
            second = c.post("/v1/chat/completions", json=_chat("s", model="any"))
        assert second.status_code == 502, second.text
        assert openai_error(second)["code"] == "upstream_error"
        time.sleep(0.2)
        assert server.requests == 2


def test_a_model_list_with_two_names_for_one_backend_is_refused():
    with pytest.raises(ValueError, match="used twice"):
        Config.model_validate(
            {
                "api_keys_file": "/k",
                "models": [
                    {"name": "a", "backends": [{"name": "x", "host": "h", "port": 1}]},
                    {"name": "b", "backends": [{"name": "x", "host": "h", "port": 2}]},
                ],
            }
        )


def test_when_no_backend_is_up_they_are_tried_anyway():
    router = _router(n=2)
    for b in router.backends:
        b.set_up(False)
    # A probe may not have seen a backend come back yet: trying costs a refused connection.
    first = router.choose("m", "p")
    second = router.choose("m", "p", tried=[first])
    assert {first, second} == set(router.backends)
    with pytest.raises(ApiError) as refused:
        router.choose("m", "p", tried=[first, second])
    assert refused.value.status == 503 and refused.value.code == "upstream_unavailable"


class _Answers:
    """A stand-in pool whose /health answers what the test says (in-process: the probe's
    decision is what is tested, not HTTP)."""

    def __init__(self) -> None:
        self.next: BaseException | int = 200

    async def request(self, *args: object, **kwargs: object) -> _Answers:
        if isinstance(self.next, BaseException):
            raise self.next
        return self

    @property
    def status(self) -> int:
        assert isinstance(self.next, int)
        return self.next

    async def read(self) -> bytes:
        return b""


def test_a_slow_health_answer_ejects_only_at_the_third_in_a_row_a_refusal_at_once():
    from proxy_app.upstream import UpstreamTimeout, UpstreamUnavailable

    router = _router(n=2)
    backend = router.backends[0]
    answers = _Answers()
    backend.pool = answers  # type: ignore[assignment]

    def probe() -> bool:
        return asyncio.run(router.probe(backend))

    answers.next = UpstreamTimeout("slow")
    assert probe() and probe()  # a busy vLLM: still in rotation
    assert not probe()  # the third in a row: out
    answers.next = 200
    assert probe() and backend.up
    answers.next = UpstreamTimeout("slow")
    assert probe()  # the count starts again after a good answer
    answers.next = UpstreamUnavailable("refused")
    assert not probe() and not backend.up  # nothing listens: out at once
