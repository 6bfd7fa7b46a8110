"""Where a request goes: each model's backends, their health, and the choice among them.

Policies (``routing.policy``):

* ``prefix`` (default): the model and the start of the prompt are hashed, and the backends
  of that model are ranked by rendezvous hashing (highest random weight): each backend's
  score is a hash of the prompt key and the backend's name. The first in that order gets the
  request, so the same system prompt and first message go where their KV cache already is,
  from any gateway, with no state shared between gateways; a backend that goes away moves
  only its own keys. Bounded load: a backend is passed over while its in-flight requests
  would exceed (1 + load_epsilon) times the mean over the model's backends (counting this
  request; rounded down, but never below the mean nor below 2), and the next in rendezvous
  order takes the request ("spilled").
* ``least_outstanding``: the backend with the fewest requests in flight.
* ``round_robin``: each backend in turn.

Health: every backend's ``/health`` is probed every ``health_interval`` seconds; a backend
that refuses a connection (to a request or a probe) is marked down at once (passive
ejection), one whose probe times out or fails three times in a row too, and it comes back
with its next good probe. Only backends marked up are chosen while the model has one; when none is,
each is tried in turn, and the request gets 503 when all refuse. A request that could not be
sent at all (connection refused) is tried on the next backend; one whose bytes reached a
backend is never sent again (proxy.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
from collections.abc import Iterable
from typing import Any

from .config import Config, Routing, Timeouts
from .errors import model_not_found, upstream_unavailable
from .logs import JsonLog
from .metrics import Metrics
from .queueing import FairQueue
from .upstream import UpstreamError, UpstreamPool, UpstreamUnavailable

# A backend that serves whatever model is asked (the config names no models): the model
# list is vLLM's, and vLLM answers unknown models itself.
ANY_MODEL = ""
# Probes in a row that time out (or answer other than 200) before a backend is taken out.
UNHEALTHY_AFTER = 3


class Backend:
    """One vLLM server: its connections, health and load as this gateway sees them."""

    __slots__ = ("_draining", "_in_flight", "_requests", "_up", "draining", "failures",
                 "in_flight", "model", "name", "pool", "salt", "up")  # fmt: skip

    def __init__(self, name: str, model: str, pool: UpstreamPool, metrics: Metrics) -> None:
        self.name = name
        self.model = model
        self.pool = pool
        self.salt = name.encode()[:64]  # blake2b keys are at most 64 bytes
        self.in_flight = 0
        # Up until shown otherwise: a gateway started beside a loading vLLM must not refuse
        # the first requests for a probe interval (a refused connection marks it down).
        self.up = True
        self.failures = 0  # probes in a row that timed out or did not answer 200
        # Drained by the operator (a rolling update): no new requests while another
        # backend of the model can take them; those in flight run to their end.
        self.draining = False
        label = model or "*"
        self._requests = metrics.backend_requests.labels(name, label)
        self._in_flight = metrics.backend_in_flight.labels(name, label)
        self._up = metrics.backend_up.labels(name, label)
        self._up.set(1)
        self._draining = metrics.backend_draining.labels(name, label)
        self._draining.set(0)

    def start(self) -> None:
        """A request is being sent to this backend."""
        self.in_flight += 1
        self._in_flight.inc()
        self._requests.inc()

    def finish(self) -> None:
        """That request is over (answered, failed or abandoned)."""
        self.in_flight -= 1
        self._in_flight.dec()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self._draining.set(1 if draining else 0)

    def state(self) -> dict[str, Any]:
        """What the admin API says of the backend."""
        return {
            "name": self.name,
            "model": self.model or None,
            "up": self.up,
            "draining": self.draining,
            "in_flight": self.in_flight,
        }

    def set_up(self, up: bool) -> bool:
        """Mark the backend up or down; True when that changed its state."""
        changed = up != self.up
        self.up = up
        self._up.set(1 if up else 0)
        return changed


# In flight on one backend (as this gateway counts) that bounded load never calls too many.
# By the bound alone, at 1 and 0 in flight the capacity is floor(1.2 x 1) = 1: the next
# request of the same prefix went to the other backend, without its cache, whenever the one
# before was still running; a backend serving two requests is not a hot spot. (Not seen in
# `make bench-routing`'s figures: its requests rarely overlapped on one gateway.)
MIN_CAPACITY = 2


def _score(digest: bytes, backend: Backend) -> int:
    return int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=backend.salt).digest())


class Router:
    """The backends of every model, and the policy that picks one for a request."""

    def __init__(self, config: Config, metrics: Metrics, log: JsonLog) -> None:
        self.settings: Routing = config.routing
        self.metrics = metrics
        self.log = log
        self._rr = itertools.count()
        self.models: dict[str, list[Backend]] = {}
        timeouts: Timeouts = config.timeouts
        # Each model's backends' max_in_flight: its places when every backend has one.
        bounds: dict[str, list[int | None]] = {}
        if config.models is None:
            pool = UpstreamPool(config.vllm_host, config.vllm_port, timeouts, config.vllm_api_key)
            self.models[ANY_MODEL] = [Backend("vllm", ANY_MODEL, pool, metrics)]
            bounds[ANY_MODEL] = [config.vllm_max_in_flight]
        else:
            for m in config.models:
                bounds[m.name] = [b.max_in_flight for b in m.backends]
                self.models[m.name] = [
                    Backend(
                        b.name,
                        m.name,
                        UpstreamPool(b.host, b.port, timeouts, config.vllm_api_key),
                        metrics,
                    )
                    for b in m.backends
                ]
        self.queues: dict[str, FairQueue] = {}
        for model, places in bounds.items():
            if None not in places:
                self.queues[model] = FairQueue(
                    model or "*",
                    sum(places),  # type: ignore[arg-type]
                    config.queue.interactive_reserve,
                    metrics.queue_length,
                )
        self.backends = [b for bs in self.models.values() for b in bs]
        self.by_name = {b.name: b for b in self.backends}
        decisions = metrics.routing_decisions
        self._kept = {m: decisions.labels(m or "*", "affinity") for m in self.models}
        self._spilled = {m: decisions.labels(m or "*", "spilled") for m in self.models}

    @property
    def named_models(self) -> bool:
        """Whether the config lists the models (else one backend serves any model)."""
        return ANY_MODEL not in self.models

    def queue_of(self, model: str) -> FairQueue | None:
        """The places and queue of ``model`` (or of the one backend serving any model), if
        its backends are bounded."""
        return self.queues.get(model if model in self.models else ANY_MODEL)

    def backends_of(self, model: str) -> list[Backend]:
        """The backends serving ``model``; 404 model_not_found if none does."""
        backends = self.models.get(model)
        if backends is None:
            backends = self.models.get(ANY_MODEL)
            if backends is None:
                raise model_not_found(model)
        return backends

    def choose(self, model: str, prompt: str, tried: Iterable[Backend] = ()) -> Backend:
        """A backend for one request, not one of ``tried``; 503 when none is left.

        Backends marked down are passed over while the model has one up, and drained ones
        while it has one up and not drained (a drained backend still serves when it is all
        that is left: draining is for moving load, never for failing requests). When none
        is up, they are tried anyway (as Envoy's panic threshold does): one may be back
        before its next probe, and a refused connection costs little (a host that drops
        packets costs the connect timeout).
        """
        backends = self.backends_of(model)
        name = backends[0].model  # the model as configured: "" when one backend serves any
        excluded = set(tried)
        untried = [b for b in backends if b not in excluded]
        up = [b for b in untried if b.up]
        candidates = [b for b in up if not b.draining] or up or untried
        if not candidates:
            raise upstream_unavailable(
                f"No server for the model `{model}` is available right now; try again shortly."
                if name
                else "The model server is not reachable."
            )
        policy = self.settings.policy
        if len(candidates) == 1:
            if policy == "prefix":
                self._kept[name].inc()  # the only backend is the prompt's own
            return candidates[0]
        if policy == "prefix":
            return self._by_prefix(name, prompt, candidates)
        if policy == "least_outstanding":
            start = next(self._rr) % len(candidates)
            rotated = candidates[start:] + candidates[:start]  # ties go round
            return min(rotated, key=lambda b: b.in_flight)
        return candidates[next(self._rr) % len(candidates)]

    def _by_prefix(self, model: str, prompt: str, candidates: list[Backend]) -> Backend:
        digest = hashlib.blake2b(
            model.encode() + b"\x00" + prompt.encode("utf-8", "surrogatepass"), digest_size=16
        ).digest()
        ranked = sorted(candidates, key=lambda b: _score(digest, b), reverse=True)
        mean = (sum(b.in_flight for b in candidates) + 1) / len(candidates)
        # Rounded down, so that (1 + epsilon) bounds busiest / mean at every load (rounding
        # up lets two backends reach 10 / 6 at 16 in flight with epsilon 0.2); never below
        # the mean rounded up, so that there is always room; and never below MIN_CAPACITY.
        capacity = max(
            math.ceil(mean),
            math.floor((1 + self.settings.load_epsilon) * mean),
            MIN_CAPACITY,
        )
        for i, b in enumerate(ranked):
            if b.in_flight + 1 <= capacity:
                (self._kept if i == 0 else self._spilled)[model].inc()
                return b
        self._spilled[model].inc()  # unreachable in practice: the mean is below capacity
        return min(ranked, key=lambda b: b.in_flight)

    def drain(self, name: str, draining: bool) -> Backend:
        """Take a backend out of rotation for new requests (or put it back); KeyError for
        a name no model has."""
        backend = self.by_name[name]
        if backend.draining != draining:
            backend.set_draining(draining)
            event = "backend_draining" if draining else "backend_undrained"
            self.log.log("info", event, backend=name, in_flight=backend.in_flight)
        return backend

    def mark_down(self, backend: Backend, error: UpstreamError) -> None:
        """A connection to the backend was refused: out of rotation until a probe says up."""
        if backend.set_up(False):
            self.log.log("warning", "backend_down", backend=backend.name, error=error.message)
        self._update_up()

    async def probe(self, backend: Backend) -> bool:
        """Ask one backend's /health; updates its state.

        A refused connection takes the backend out at once (nothing listens: it is down).
        A slow or failed answer takes it out only at the third in a row: a vLLM busy with
        a full batch can take seconds to answer /health on a loaded host, and ejecting it
        for that would pile its load onto the others (seen in the cluster scenario).
        """
        timeout = max(2.0, 2 * self.settings.health_interval)
        refused = False
        try:
            resp = await backend.pool.request(
                "GET", "/health", first_byte_timeout=timeout, total_timeout=timeout + 1
            )
            await resp.read()
            ok = resp.status == 200
            error = f"/health answered {resp.status}"
        except UpstreamError as e:
            ok = False
            refused = isinstance(e, UpstreamUnavailable)
            error = e.message
        backend.failures = 0 if ok else backend.failures + 1
        up = ok or (backend.up and not refused and backend.failures < UNHEALTHY_AFTER)
        if backend.set_up(up):
            if up:
                self.log.log("info", "backend_up", backend=backend.name)
            else:
                self.log.log("warning", "backend_down", backend=backend.name, error=error)
        return up

    async def probe_all(self) -> bool:
        """Probe every backend at once; True when every model has a backend up."""
        await asyncio.gather(*(self.probe(b) for b in self.backends))
        return self._update_up()

    def _update_up(self) -> bool:
        ok = all(any(b.up for b in bs) for bs in self.models.values())
        self.metrics.upstream_up.set(1 if ok else 0)
        return ok

    def models_down(self) -> list[str]:
        """The models none of whose backends is up."""
        return [m or "*" for m, bs in self.models.items() if not any(b.up for b in bs)]

    def close(self) -> None:
        """Close every backend's idle connections."""
        for b in self.backends:
            b.pool.close()
