"""Keys: how they are presented, which are refused, what they may do, what is logged.

Requests that a key lets through go to the real vLLM ("tiny", and "other": the same model
under a second name). Requests refused before any upstream is asked run against the fake,
so that `make test-gateway` keeps covering them without vLLM.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from proxy_harness import ADMIN_KEY, TINY_CHAT, USER_KEY, Gateway, GatewayFactory, Upstream

HASHED_KEY = "sk-hashed-0123456789abcdef"
CHAT = TINY_CHAT


def _keys(model: str) -> list[dict[str, Any]]:
    return [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "models": [model]},
        {"key": "sk-disabled-0123456789", "user": "gone", "enabled": False},
        {"key": "sk-expired-0123456789", "user": "old", "expires_at": "2020-01-01T00:00:00Z"},
        {"key": "sk-future-0123456789", "user": "new", "expires_at": "2999-01-01T00:00:00+00:00"},
        {"key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest(), "user": "hashed"},
    ]


@pytest.fixture
def gw(gateway_factory: GatewayFactory, vllm: Upstream) -> Gateway:
    """In front of the real vLLM; user1 may use "tiny" only."""
    return gateway_factory(vllm, keys=_keys("tiny"))


@pytest.fixture(scope="module")
def gw_fake(module_gateway_factory: GatewayFactory, fake_upstream: Upstream) -> Gateway:
    """The same keys in front of the fake, for requests refused before any upstream: one
    gateway for those tests, which read nothing but their own answers."""
    return module_gateway_factory(fake_upstream, keys=_keys("fake"))


def _chat(gw: Gateway, headers: dict[str, str], body: dict | None = None) -> httpx.Response:
    with gw.client() as c:
        return c.post("/v1/chat/completions", json=body or CHAT, headers=headers)


def test_bearer_and_bare_keys_are_accepted(gw: Gateway) -> None:
    assert _chat(gw, {"Authorization": f"Bearer {USER_KEY}"}).status_code == 200
    assert _chat(gw, {"Authorization": USER_KEY}).status_code == 200
    assert _chat(gw, {"Authorization": f"bearer {USER_KEY}"}).status_code == 200


def test_key_given_as_sha256_works(gw: Gateway) -> None:
    r = _chat(gw, {"Authorization": f"Bearer {HASHED_KEY}"})
    assert r.status_code == 200
    assert gw.request_log(r.headers["x-request-id"])["user"] == "hashed"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-unknown-0123456789"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"Authorization": "Bearer sk-disabled-0123456789"}, "key_disabled"),
        ({"Authorization": "Bearer sk-expired-0123456789"}, "key_expired"),
    ],
)
def test_refused_keys_are_401(gw_fake: Gateway, headers: dict[str, str], code: str) -> None:
    r = _chat(gw_fake, headers, {**CHAT, "model": "fake"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"}


def test_key_that_expires_later_works(gw: Gateway) -> None:
    assert _chat(gw, {"Authorization": "Bearer sk-future-0123456789"}).status_code == 200


def test_model_outside_the_keys_list_is_403(gw: Gateway) -> None:
    # vLLM serves "other" (the admin key, which has no list, gets an answer); user1 may not.
    assert _chat(gw, {"Authorization": ADMIN_KEY}, {**CHAT, "model": "other"}).status_code == 200
    r = _chat(gw, {"Authorization": USER_KEY}, {**CHAT, "model": "other"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed"
    with gw.client(USER_KEY) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
    with gw.client(ADMIN_KEY) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "other"]


def test_models_listing_needs_a_key(gw_fake: Gateway) -> None:
    with gw_fake.client() as c:
        assert c.get("/v1/models").status_code == 401


def test_admin_endpoints_need_an_admin_key(gw_fake: Gateway) -> None:
    with gw_fake.client(USER_KEY) as c:
        r = c.get("/admin/usage")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        assert c.post("/admin/reload-keys").status_code == 403
    with gw_fake.client() as c:
        assert c.get("/admin/usage").status_code == 401
    with gw_fake.client(ADMIN_KEY) as c:
        assert c.get("/admin/usage").status_code == 200


def test_health_and_metrics_need_no_key(gw_fake: Gateway) -> None:
    with gw_fake.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/metrics").status_code == 200


def test_plaintext_keys_never_reach_logs_or_metrics(gw: Gateway) -> None:
    _chat(gw, {"Authorization": f"Bearer {USER_KEY}"})
    _chat(gw, {"Authorization": "Bearer sk-unknown-0123456789"})
    _chat(gw, {"Authorization": f"Bearer {HASHED_KEY}"})
    r = _chat(gw, {"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == 200
    text = gw.log_path.read_text() + gw.metrics()
    for secret in (USER_KEY, "sk-unknown-0123456789", HASHED_KEY, ADMIN_KEY):
        assert secret not in text
    line = gw.request_log(r.headers["x-request-id"])
    assert line["user"] == "user1"
    assert line["key_id"] == hashlib.sha256(USER_KEY.encode()).hexdigest()[:12]
