"""Prometheus metrics of the gateway, in a registry the app owns.

Label values are bounded: endpoints are the gateway's routes (a route with a name in its
path by its template; anything else is "other"), statuses are HTTP codes, users come from
the keys file, error types and rejection reasons from the gateway's own vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class EndpointLabels:
    """The endpoint label of a request path: the path of the route that serves it, the
    template of one with a name in it (``/admin/backends/{name}/drain``), else "other".
    Templates are tried longest first: ``{name:path}`` in ``/admin/backends/{name}`` would
    take a drain's path too."""

    def __init__(self, paths: Iterable[str], templates: Iterable[tuple[re.Pattern[str], str]]):
        self._paths = frozenset(paths)
        self._templates = tuple(sorted(templates, key=lambda t: -len(t[1])))

    def __call__(self, path: str) -> str:
        if path in self._paths:
            return path
        for pattern, template in self._templates:
            if pattern.match(path):
                return template
        return "other"


class Metrics:
    """The gateway's metrics; label children are cached, the hot path only increments."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered by the gateway",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from request to the end of the response, streamed or not",
            ["method", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active = Gauge("http_active_requests", "Requests being handled right now", registry=r)
        self.errors = Counter(
            "http_errors_total",
            "Requests answered with an error, by type",
            ["type"],
            registry=r,
        )
        self.tokens = Counter(
            "token_usage_total",
            "Tokens used, by key (its user name), model and type (prompt, completion)",
            ["user", "model", "type"],
            registry=r,
        )
        self.rejections = Counter(
            "gateway_rejections_total",
            "Requests refused by a limit, by reason",
            ["reason"],
            registry=r,
        )
        self.upstream_ttft = Histogram(
            "upstream_time_to_first_token_seconds",
            "Time until vLLM's first token (first chunk when streamed, whole body if not)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "upstream_request_duration_seconds",
            "Time vLLM took for a whole response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_up = Gauge(
            "upstream_up",
            "Whether every model has a backend whose last health probe answered (1) or not (0)",
            registry=r,
        )
        self.backend_requests = Counter(
            "gateway_backend_requests_total",
            "Requests sent to each vLLM backend",
            ["backend", "model"],
            registry=r,
        )
        self.backend_in_flight = Gauge(
            "gateway_backend_in_flight",
            "Requests in flight to each vLLM backend from this gateway",
            ["backend", "model"],
            registry=r,
        )
        self.backend_up = Gauge(
            "gateway_backend_up",
            "Whether the backend is in rotation (1: its last probe answered) or not (0)",
            ["backend", "model"],
            registry=r,
        )
        self.backend_draining = Gauge(
            "gateway_backend_draining",
            "Whether the backend is drained by the operator (1: no new requests while "
            "another backend of its model can take them)",
            ["backend", "model"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "gateway_routing_decisions_total",
            "Prefix routing: the prompt's own backend taken (affinity) or passed over for load "
            "(spilled)",
            ["model", "decision"],
            registry=r,
        )
        self.backend_retries = Counter(
            "gateway_backend_retries_total",
            "Requests sent to another backend because the first refused the connection",
            registry=r,
        )
        self.limits_local = Gauge(
            "gateway_limits_local",
            "1 while Redis is unreachable and this gateway enforces its share of the limits "
            "locally (redis_failure_mode: local), else 0",
            registry=r,
        )
        self.queue_length = Gauge(
            "gateway_queue_length",
            "Requests waiting in the gateway for a place on a backend of their model, by "
            "priority class (interactive, batch)",
            ["priority"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited in the gateway's queue before it was given a place (those "
            "that found one free are not counted), by priority class",
            ["priority"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for label in ("interactive", "batch"):
            self.queue_length.labels(label)
            self.queue_wait.labels(label)
        self.keys_loaded = Gauge("gateway_keys_loaded", "API keys in force", registry=r)
        self.key_reloads = Counter(
            "gateway_key_reloads_total",
            "Keys file reloads, by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects_total",
            "Requests whose client left before the end of the answer",
            registry=r,
        )
        self.usage_estimated = Counter(
            "gateway_usage_estimated_total",
            "Requests charged an estimate because vLLM reported no usage, by reason",
            ["reason"],
            registry=r,
        )
        self._req_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._token_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def request_done(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        k = (method, endpoint, status)
        children = self._req_children.get(k)
        if children is None:
            m = method if method in METHODS else "OTHER"
            children = (
                self.requests.labels(m, endpoint, str(status)),
                self.duration.labels(m, endpoint),
            )
            self._req_children[k] = children
        children[0].inc()
        children[1].observe(seconds)

    def tokens_used(self, user: str, model: str, prompt: int, completion: int) -> None:
        """Count the tokens of one request (keys and models are the operator's: bounded)."""
        children = self._token_children.get((user, model))
        if children is None:
            children = (
                self.tokens.labels(user, model, "prompt"),
                self.tokens.labels(user, model, "completion"),
            )
            self._token_children[(user, model)] = children
        if prompt:
            children[0].inc(prompt)
        if completion:
            children[1].inc(completion)

    def render(self) -> bytes:
        """The exposition text for /metrics."""
        return generate_latest(self.registry)
