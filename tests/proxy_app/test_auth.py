"""Keys: how they are presented, which are refused, what they may do, what is logged."""

from __future__ import annotations

import hashlib

import pytest
from proxy_harness import ADMIN_KEY, USER_KEY, Gateway, GatewayFactory, Upstream

HASHED_KEY = "sk-hashed-0123456789abcdef"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gw(gateway_factory: GatewayFactory, fake: Upstream) -> Gateway:
    keys = [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": USER_KEY, "user": "user1", "models": ["fake"]},
        {"key": "sk-disabled-0123456789", "user": "gone", "enabled": False},
        {"key": "sk-expired-0123456789", "user": "old", "expires_at": "2020-01-01T00:00:00Z"},
        {"key": "sk-future-0123456789", "user": "new", "expires_at": "2999-01-01T00:00:00+00:00"},
        {"key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest(), "user": "hashed"},
    ]
    return gateway_factory(fake, keys=keys)


def _chat(gw: Gateway, headers: dict[str, str], body: dict | None = None):  # type: ignore[no-untyped-def]
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
def test_refused_keys_are_401(gw: Gateway, headers: dict[str, str], code: str) -> None:
    r = _chat(gw, headers)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"}


def test_key_that_expires_later_works(gw: Gateway) -> None:
    assert _chat(gw, {"Authorization": "Bearer sk-future-0123456789"}).status_code == 200


def test_model_outside_the_keys_list_is_403(gw: Gateway) -> None:
    r = _chat(gw, {"Authorization": USER_KEY}, {**CHAT, "model": "other"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed"
    with gw.client(USER_KEY) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake"]
    with gw.client(ADMIN_KEY) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake", "other"]


def test_models_listing_needs_a_key(gw: Gateway) -> None:
    with gw.client() as c:
        assert c.get("/v1/models").status_code == 401


def test_admin_endpoints_need_an_admin_key(gw: Gateway) -> None:
    with gw.client(USER_KEY) as c:
        r = c.get("/admin/usage")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        assert c.post("/admin/reload-keys").status_code == 403
    with gw.client() as c:
        assert c.get("/admin/usage").status_code == 401
    with gw.client(ADMIN_KEY) as c:
        assert c.get("/admin/usage").status_code == 200


def test_health_and_metrics_need_no_key(gw: Gateway) -> None:
    with gw.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/metrics").status_code == 200


def test_plaintext_keys_never_reach_logs_or_metrics(gw: Gateway) -> None:
    _chat(gw, {"Authorization": f"Bearer {USER_KEY}"})
    _chat(gw, {"Authorization": "Bearer sk-unknown-0123456789"})
    _chat(gw, {"Authorization": f"Bearer {HASHED_KEY}"})
    r = _chat(gw, {"Authorization": f"Bearer {USER_KEY}"})
    text = gw.log_path.read_text() + gw.metrics()
    for secret in (USER_KEY, "sk-unknown-0123456789", HASHED_KEY, ADMIN_KEY):
        assert secret not in text
    line = gw.request_log(r.headers["x-request-id"])
    assert line["user"] == "user1"
    assert line["key_id"] == hashlib.sha256(USER_KEY.encode()).hexdigest()[:12]
