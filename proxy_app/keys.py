"""API keys: the keys file, its validation, lookup by hash, and reloads that never break."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .apis import BY_NAME
from .config import (
    Config,
    EndpointLimits,
    KeyDefaults,
    QuotaPeriod,
    check_endpoint_names,
)
from .errors import GatewayError, forbidden, unauthorized

PositiveInt = Annotated[int, Field(gt=0)]
KEY_ID_LEN = 12
# vLLM's priority of each class (lower is served first; 0 is vLLM's default).
PRIORITIES = {"interactive": 0, "batch": 10}
DEFAULT_MAX_BYTES: int = Config.model_fields["keys_file_max_bytes"].default


def key_digest(key: str) -> str:
    """sha256 of a plaintext key, hex: what the keys file may hold instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(digest: str) -> str:
    """Short, non-secret id of a key for logs, metrics and the usage store."""
    return digest[:KEY_ID_LEN]


def new_key() -> tuple[str, str]:
    """A fresh random key (``sk-`` + 48 url-safe chars) and its sha256."""
    key = "sk-" + secrets.token_urlsafe(36)
    return key, key_digest(key)


class KeyEntry(BaseModel):
    """One entry of the keys file, as written by the operator."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: Annotated[str, Field(min_length=8)] | None = None
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    user: Annotated[str, Field(min_length=1, max_length=128)]
    # Tokens (prompt + completion) per quota period; null or absent means no quota.
    quota: Annotated[int, Field(ge=0)] | None = None
    quota_period: QuotaPeriod | None = None
    enabled: bool = True
    # Models this key may use; absent or null means all models vLLM serves.
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    expires_at: datetime | None = None
    qps: PositiveInt | None = None
    concurrent: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    # Largest max_tokens a request may ask for; injected into requests that ask none.
    max_tokens: PositiveInt | None = None
    # Limits per endpoint (chat, completions, embeddings); replaces key_defaults' whole.
    endpoints: dict[str, EndpointLimits] | None = None
    admin: bool = False
    # vLLM's priority for this key's requests (lower first): interactive (0), batch (10), or
    # an integer; what a client sends is overwritten. Its turns in the gateway's queue
    # (weight) and how long a request may wait there, for a place or for a slot of a
    # concurrency limit (seconds; default queue.timeout; 0: never wait, 429 at once).
    priority: Literal["interactive", "batch"] | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] = (
        "interactive"
    )
    weight: PositiveInt = 1
    queue_timeout: Annotated[float, Field(ge=0)] | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(
        cls, v: dict[str, EndpointLimits] | None
    ) -> dict[str, EndpointLimits] | None:
        return None if v is None else check_endpoint_names(v)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("each key needs exactly one of 'key' or 'key_sha256'")
        return self


class KeysFile(BaseModel):
    """The keys file: ``{"keys": [...]}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[KeyEntry]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key in force, resolved against the defaults: what the hot path reads."""

    digest: str
    key_id: str
    user: str
    quota: int | None
    quota_period: QuotaPeriod
    enabled: bool
    models: frozenset[str] | None
    expires_at: float | None
    qps: int | None
    concurrent: int | None
    tokens_per_minute: int | None
    admin: bool
    max_tokens: int | None = None
    # By request path ("/v1/chat/completions"...): the endpoint's own limits for this key.
    endpoints: dict[str, EndpointLimits] | None = None
    priority: int = 0
    weight: int = 1
    queue_timeout: float | None = None


class KeysFileError(GatewayError):
    """The keys file cannot be used; the keys in force stay."""


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """Outcome of a reload: on failure ``message`` says why and the old keys stay."""

    ok: bool
    keys: int
    message: str


def _resolve(entry: KeyEntry, defaults: KeyDefaults) -> ApiKey:
    digest = key_digest(entry.key) if entry.key is not None else entry.key_sha256.lower()  # type: ignore[union-attr]
    expires: float | None = None
    if entry.expires_at is not None:
        at = entry.expires_at
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        expires = at.timestamp()
    # A limit the entry sets (even to null = unlimited) wins over the default.
    given = entry.model_fields_set

    def pick(name: str) -> int | None:
        return getattr(entry, name) if name in given else getattr(defaults, name)

    return ApiKey(
        digest=digest,
        key_id=key_id_of(digest),
        user=entry.user,
        quota=entry.quota,
        quota_period=entry.quota_period or defaults.quota_period,
        enabled=entry.enabled,
        models=frozenset(entry.models) if entry.models is not None else None,
        expires_at=expires,
        qps=pick("qps"),
        concurrent=pick("concurrent"),
        tokens_per_minute=pick("tokens_per_minute"),
        admin=entry.admin,
        max_tokens=pick("max_tokens"),
        endpoints=_by_path(entry.endpoints if "endpoints" in given else defaults.endpoints),
        priority=PRIORITIES[entry.priority] if isinstance(entry.priority, str) else entry.priority,
        weight=entry.weight,
        queue_timeout=entry.queue_timeout,
    )


def _by_path(endpoints: dict[str, EndpointLimits] | None) -> dict[str, EndpointLimits] | None:
    if not endpoints:
        return None
    return {BY_NAME[name].path: limits for name, limits in endpoints.items()}


def _refuse_repeated_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise KeysFileError(f"member {', '.join(map(repr, repeated))} given more than once")
    return dict(pairs)


def parse_keys(raw: bytes, defaults: KeyDefaults, source: str = "keys file") -> dict[str, ApiKey]:
    """Validate a keys file's bytes; returns keys by digest or raises KeysFileError.

    Refused besides what the schema says: a member given twice in one object (JSON parsers
    keep the last one silently, so a second "keys" would replace the first unseen) and an
    empty list of keys (it would lock everyone out, the admin API included).
    """
    try:
        json.loads(raw, object_pairs_hook=_refuse_repeated_members)
    except KeysFileError as e:
        raise KeysFileError(f"{source}: {e}") from None
    except ValueError:
        pass  # not JSON: the schema's parser below says where
    try:
        parsed = KeysFile.model_validate_json(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{loc}: {err['msg']}")
        raise KeysFileError(f"{source}: " + "; ".join(problems)) from None
    if not parsed.keys:
        raise KeysFileError(f"{source}: no keys: a file without keys would lock everyone out")
    keys: dict[str, ApiKey] = {}
    seen_at: dict[str, int] = {}
    for i, entry in enumerate(parsed.keys):
        k = _resolve(entry, defaults)
        if k.digest in keys:
            raise KeysFileError(
                f"{source}: keys.{i}: duplicate key (same key as keys.{seen_at[k.digest]}, "
                f"key id {k.key_id})"
            )
        keys[k.digest] = k
        seen_at[k.digest] = i
    return keys


def read_keys_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; KeysFileError when it is larger than ``max_bytes``."""
    with path.open("rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise KeysFileError(
            f"{path}: larger than the limit of {max_bytes} bytes (keys_file_max_bytes)"
        )
    return raw


def _file_signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


class KeyStore:
    """The keys in force, replaced whole on a successful reload and kept on a failed one."""

    def __init__(
        self, path: Path, defaults: KeyDefaults, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.path = path
        self.defaults = defaults
        self.max_bytes = max_bytes
        self.keys: dict[str, ApiKey] = {}
        self.loaded_at: float | None = None
        self._signature: tuple[int, int, int, int] | None = None

    def load(self) -> int:
        """(Re)load the file; returns the number of keys or raises KeysFileError."""
        try:
            signature = _file_signature(self.path)
            raw = read_keys_file(self.path, self.max_bytes)
        except OSError as e:
            # Remember the failure's signature too, so the watcher does not log it every poll.
            self._signature = None
            raise KeysFileError(f"{self.path}: cannot read keys file: {e.strerror}") from e
        except KeysFileError:
            self._signature = signature
            raise
        try:
            keys = parse_keys(raw, self.defaults, str(self.path))
        finally:
            self._signature = signature
        self.keys = keys
        self.loaded_at = time.time()
        return len(keys)

    def reload(self) -> ReloadResult:
        """Load the file again; a bad file leaves the keys in force untouched."""
        try:
            n = self.load()
        except KeysFileError as e:
            return ReloadResult(False, len(self.keys), str(e))
        return ReloadResult(True, n, f"{n} keys loaded from {self.path}")

    def changed(self) -> bool:
        """Whether the file differs (inode, mtime or size) from the last load attempt."""
        try:
            return _file_signature(self.path) != self._signature
        except OSError:
            return self._signature is not None

    def authenticate(self, header: bytes | None, now: float) -> ApiKey:
        """Resolve an Authorization header (``Bearer sk-...`` or bare ``sk-...``) to a key."""
        if not header:
            raise unauthorized(
                "Missing API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                "missing_api_key",
            )
        value = header.strip()
        scheme, sep, rest = value.partition(b" ")
        if sep and scheme.lower() == b"bearer":
            token = rest.strip()
        elif sep:
            raise unauthorized(
                "Malformed Authorization header; expected 'Bearer YOUR_KEY'.", "invalid_api_key"
            )
        else:
            token = value
        key = self.keys.get(hashlib.sha256(token).hexdigest()) if token else None
        if key is None:
            raise unauthorized("Incorrect API key provided.", "invalid_api_key")
        if not key.enabled:
            raise unauthorized("This API key is disabled.", "key_disabled")
        if key.expires_at is not None and now >= key.expires_at:
            raise unauthorized("This API key has expired.", "key_expired")
        return key


def check_model(key: ApiKey, model: str | None) -> None:
    """403 when the key may not use this model."""
    if key.models is not None and (model is None or model not in key.models):
        raise forbidden(
            f"This API key may not use the model '{model}'.",
            "model_not_allowed",
            param="model",
        )


def require_admin(key: ApiKey) -> None:
    """403 unless the key has the admin role."""
    if not key.admin:
        raise forbidden("This endpoint needs an admin API key.", "admin_required")
