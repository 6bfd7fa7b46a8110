"""Gateway configuration: a YAML file validated by pydantic before anything starts."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .apis import BY_NAME
from .errors import GatewayError

PositiveInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
QuotaPeriod = Literal["total", "monthly", "daily"]


class _Strict(BaseModel):
    # A misspelt option must stop the start, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointLimits(_Strict):
    """Limits of one endpoint, on top of the overall ones; null means unlimited."""

    qps: PositiveInt | None = None
    concurrent: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None


def check_endpoint_names(v: dict[str, EndpointLimits]) -> dict[str, EndpointLimits]:
    """Refuse a misspelt endpoint: its limits would silently never apply."""
    unknown = sorted(set(v) - set(BY_NAME))
    if unknown:
        raise ValueError(
            f"unknown endpoint {', '.join(map(repr, unknown))}; "
            f"the endpoints are {', '.join(BY_NAME)}"
        )
    return v


class RateLimit(_Strict):
    """Limits for the whole gateway; null means unlimited."""

    qps: PositiveInt | None = None
    concurrent: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    # Per endpoint (by apis.py's names: chat, completions, embeddings...), on top of the above.
    endpoints: dict[str, EndpointLimits] = Field(default_factory=dict)

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, v: dict[str, EndpointLimits]) -> dict[str, EndpointLimits]:
        return check_endpoint_names(v)


class KeyDefaults(_Strict):
    """Limits every key gets unless its entry in the keys file sets its own."""

    qps: PositiveInt | None = None
    concurrent: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    quota_period: QuotaPeriod = "total"
    # Largest max_tokens a request may ask for (400 above it); injected when it asks none.
    max_tokens: PositiveInt | None = None
    endpoints: dict[str, EndpointLimits] = Field(default_factory=dict)

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, v: dict[str, EndpointLimits]) -> dict[str, EndpointLimits]:
        return check_endpoint_names(v)


class Reservation(_Strict):
    """How many tokens a request reserves at admission, against quotas and tokens per minute.

    The reservation is an upper guess: prompt bytes / ``bytes_per_token`` plus a template
    allowance, plus max_tokens x n. English text runs at about 4 bytes per token with
    production tokenizers and 1.6-2.6 with the tests' tiny model; 2 keeps short English
    prompts over their real count with both. 1 is a true upper bound for byte-level BPE.
    """

    bytes_per_token: Annotated[float, Field(gt=0)] = 2.0
    # Completion tokens reserved for a request that sets no max_tokens, when its key has no
    # max_tokens cap either (vLLM would then generate up to the model's context).
    default_max_tokens: PositiveInt = 1024


class Timeouts(_Strict):
    """Timeouts towards vLLM, in seconds."""

    connect: Seconds = 5.0
    # Until the response headers. vLLM sends them only when a non-streamed completion is
    # finished, so this bounds a whole non-streamed generation (plus its queueing).
    first_byte: Seconds = 300.0
    # Longest silence between two chunks of a response that has started.
    read: Seconds = 60.0
    # Whole request, streamed or not.
    total: Seconds = 900.0


class BackendConfig(_Strict):
    """One vLLM server serving a model, as configured (routing.Backend is its live state)."""

    # A unique label, used in metrics, logs and the admin API: "<host>/<instance>".
    name: Annotated[str, Field(min_length=1, max_length=200)]
    host: str
    port: Port
    # Requests this gateway sends it at once (its vLLM's --max-num-seqs): the model's
    # requests past its backends' sum wait in the gateway's fair queue. null: no bound.
    max_in_flight: PositiveInt | None = None


class Model(_Strict):
    """A model clients ask for by name, and the vLLM servers that serve it."""

    name: Annotated[str, Field(min_length=1)]
    backends: Annotated[list[BackendConfig], Field(min_length=1)]


class Queue(_Strict):
    """Requests waiting in the gateway for a place on a backend of their model (when every
    backend of the model has max_in_flight): one queue per key, released in turn across
    keys (a key's weight is its turns in a row), the lower priority (interactive) first."""

    # Longest wait, for a place or for a slot of a concurrency limit, before a 429 (a key's
    # queue_timeout wins; 0: never wait).
    timeout: Annotated[float, Field(ge=0)] = 30.0
    # Places of a model that batch requests (priority > 0) leave to interactive ones, so
    # that an interactive request never waits for a batch answer to end (never all of them).
    interactive_reserve: Annotated[int, Field(ge=0)] = 1


class Ledger(_Strict):
    """The usage ledger (ledger.py): per key, model, end user and day."""

    # The request header naming the person behind a shared key (else the body's "user").
    end_user_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] = "X-End-User"
    # plain: the name as sent; hashed: sha256: and 16 hex digits of its SHA-256.
    end_user_storage: Literal["plain", "hashed"] = "plain"
    # Days of rows kept (a day's row is dropped once it is older).
    retention_days: PositiveInt = 400


class Routing(_Strict):
    """How a request picks one of its model's backends."""

    # prefix: the same prompt start goes to the same backend (its KV cache has it), from
    # any gateway, unless that backend is busier than (1 + load_epsilon) x the mean.
    policy: Literal["prefix", "least_outstanding", "round_robin"] = "prefix"
    # Characters of the prompt's start that make its routing key (system prompt and first
    # user message for chat, the prompt's start for completions).
    prefix_chars: PositiveInt = 2048
    load_epsilon: Annotated[float, Field(ge=0)] = 0.2
    # Seconds between two /health probes of every backend.
    health_interval: Seconds = 1.0


class Config(_Strict):
    """The gateway's configuration file."""

    vllm_host: str = "127.0.0.1"
    vllm_port: Port = 8002
    # The one backend's max_in_flight when models is absent (see BackendConfig).
    vllm_max_in_flight: PositiveInt | None = None
    # Sent to vLLM as a bearer token when vLLM runs with --api-key (defence in depth).
    vllm_api_key: str | None = None
    # The models and their backends. Absent: one backend, vllm_host:vllm_port, serving
    # whatever model it serves (it answers unknown models itself).
    models: list[Model] | None = None
    routing: Routing = Routing()
    queue: Queue = Queue()
    fastapi_host: str = "127.0.0.1"
    fastapi_port: Port = 8001
    # Seconds an idle client connection (nginx's) stays open.
    keep_alive_timeout: Seconds = 75.0
    api_keys_file: Path
    # A larger keys file is refused: reading one takes memory and time in proportion
    # (a 47 MiB file took 1.2 GB and seconds to validate, reported by the probe).
    keys_file_max_bytes: PositiveInt = 4 * 1024 * 1024
    rate_limit: RateLimit = RateLimit()
    key_defaults: KeyDefaults = KeyDefaults()
    state_dir: Path = Path("/var/lib/llm-proxy")
    # When set, limits and usage live in Redis so that several gateways share them.
    redis_url: str | None = None
    redis_prefix: str = "llmhost:"
    # Redis unreachable: "closed" refuses requests (503); "local" enforces each limit divided
    # by gateway_count in this process and spools usage to state_dir until Redis is back.
    redis_failure_mode: Literal["closed", "local"] = "closed"
    # Gateways sharing the Redis: in local mode each enforces its share of every limit.
    gateway_count: PositiveInt = 1
    token_reservation: Reservation = Reservation()
    # SQLite usage store: "normal" survives the gateway being killed (kill -9) but may lose
    # the last requests on power loss; "full" fsyncs every request and survives that too.
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    ledger: Ledger = Ledger()
    timeouts: Timeouts = Timeouts()
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    # X-Forwarded-For is believed only from these peers (nginx on the same host by default).
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.1/32"),
            ipaddress.ip_network("::1/128"),
        ]
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: Path | None = None
    # How often the key file's mtime/inode is checked for changes (backends are probed every
    # routing.health_interval).
    keys_poll_interval: Seconds = 2.0

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[Model] | None) -> list[Model] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("list at least one model, or leave models out")
        seen_models: set[str] = set()
        seen_backends: set[str] = set()
        for m in v:
            if m.name in seen_models:
                raise ValueError(f"model {m.name!r} is listed twice")
            seen_models.add(m.name)
            for b in m.backends:
                if b.name in seen_backends:
                    raise ValueError(f"backend name {b.name!r} is used twice")
                seen_backends.add(b.name)
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


# What a SIGHUP applies in place, from the config file read again (the keys file is read
# again too). Any other change needs a restart; the gateway logs which fields.
RELOADABLE = frozenset({"rate_limit", "key_defaults"})


class ConfigError(GatewayError):
    """The configuration cannot be used; the message names the field."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: Path) -> Config:
    """Read and validate the YAML config; raises ConfigError with a readable message."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of options")
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from e
    # A relative keys file or state dir is taken relative to the config file, so a config
    # can travel with its files.
    base = path.parent
    updates: dict[str, Path] = {}
    if not config.api_keys_file.is_absolute():
        updates["api_keys_file"] = base / config.api_keys_file
    if not config.state_dir.is_absolute():
        updates["state_dir"] = base / config.state_dir
    if config.log_file is not None and not config.log_file.is_absolute():
        updates["log_file"] = base / config.log_file
    return config.model_copy(update=updates) if updates else config
