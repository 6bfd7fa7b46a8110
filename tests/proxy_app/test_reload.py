"""Keys reload without a restart: on request, on SIGHUP, on file change; bad files refused."""

from __future__ import annotations

import json
import signal

import pytest
from proxy_harness import ADMIN_KEY, USER_KEY, Gateway, GatewayFactory, Upstream, wait_for

NEW_KEY = "sk-new-0123456789"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def _status(gw: Gateway, key: str) -> int:
    with gw.client(key) as c:
        return c.post("/v1/chat/completions", json=CHAT).status_code


def _new_keys() -> list[dict]:
    return [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": NEW_KEY, "user": "newcomer"},
    ]


@pytest.fixture
def gw(gateway_factory: GatewayFactory, fake: Upstream) -> Gateway:
    # No polling: reloads in these tests come only from what each test does.
    return gateway_factory(fake, keys_poll_interval=3600)


def test_admin_reload(gw: Gateway) -> None:
    gw.write_keys(_new_keys())
    assert _status(gw, NEW_KEY) == 401
    with gw.client(ADMIN_KEY) as c:
        r = c.post("/admin/reload-keys")
    assert r.status_code == 200 and r.json()["keys"] == 2
    assert _status(gw, NEW_KEY) == 200
    assert _status(gw, USER_KEY) == 401


def test_sighup_reload(gw: Gateway) -> None:
    gw.write_keys(_new_keys())
    assert gw.proc is not None
    gw.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: _status(gw, NEW_KEY) == 200, 10, "the new key after SIGHUP")
    assert _status(gw, USER_KEY) == 401
    assert any(r.get("event") == "keys_reloaded" and r.get("source") == "sighup" for r in gw.logs())


def test_reload_on_file_change(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake, keys_poll_interval=0.2)
    gw.write_keys(_new_keys())
    wait_for(lambda: _status(gw, NEW_KEY) == 200, 10, "the new key after the file changed")
    assert _status(gw, USER_KEY) == 401


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "Invalid JSON"),
        (
            json.dumps({"keys": [{"key": "sk-abcdefgh1", "user": "u", "quota": "lots"}]}),
            "keys.0.quota",
        ),
        (
            json.dumps({"keys": [{"key": "sk-abcdefgh1", "user": "u", "enabled": "yes"}]}),
            "keys.0.enabled",
        ),
        (json.dumps({"keys": [{"key": "sk-abcdefgh1"}]}), "keys.0.user"),
        (json.dumps({"keys": [{"key": "sk-abcdefgh1", "user": "u", "qouta": 5}]}), "keys.0.qouta"),
        (json.dumps({"keys": [{"user": "u"}]}), "exactly one of"),
        (
            json.dumps(
                {
                    "keys": [
                        {"key": "sk-abcdefgh1", "user": "a"},
                        {"key": "sk-abcdefgh1", "user": "b"},
                    ]
                }
            ),
            "duplicate key",
        ),
        (json.dumps({"tokens": []}), "keys"),
    ],
)
def test_bad_file_is_refused_and_old_keys_stay(gw: Gateway, content: str, expected: str) -> None:
    gw.write_keys(content)
    with gw.client(ADMIN_KEY) as c:
        r = c.post("/admin/reload-keys")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_keys_file"
    assert expected in err["message"]
    assert _status(gw, USER_KEY) == 200
    refused = [rec for rec in gw.logs() if rec.get("event") == "keys_reload_refused"]
    assert refused and expected in refused[-1]["error"]


def test_bad_file_change_is_refused_too(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake, keys_poll_interval=0.2)
    gw.write_keys("{broken")
    wait_for(
        lambda: any(r.get("event") == "keys_reload_refused" for r in gw.logs()),
        10,
        "the refusal in the log",
    )
    assert _status(gw, USER_KEY) == 200
