"""Keys reload without a restart: on request, on SIGHUP, on file change; bad files refused.
SIGHUP also applies the config file's global limits and key defaults in place.

Against the real vLLM: every request a test makes is a short "tiny" chat completion."""

from __future__ import annotations

import json
import signal

import pytest
import yaml
from proxy_harness import (
    ADMIN_KEY,
    TINY_CHAT,
    USER_KEY,
    Gateway,
    GatewayFactory,
    Upstream,
    metric_value,
    wait_for,
)

NEW_KEY = "sk-new-0123456789"
CHAT = TINY_CHAT


def _status(gw: Gateway, key: str) -> int:
    with gw.client(key) as c:
        return c.post("/v1/chat/completions", json=CHAT).status_code


def _new_keys() -> list[dict]:
    return [
        {"key": ADMIN_KEY, "user": "admin", "admin": True},
        {"key": NEW_KEY, "user": "newcomer"},
    ]


@pytest.fixture
def gw(gateway_factory: GatewayFactory, vllm: Upstream) -> Gateway:
    # No polling: reloads in these tests come only from what each test does.
    return gateway_factory(vllm, keys_poll_interval=3600)


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


def test_reload_on_file_change(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, keys_poll_interval=0.2)
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


def test_bad_file_change_is_refused_too(gateway_factory: GatewayFactory, vllm: Upstream) -> None:
    gw = gateway_factory(vllm, keys_poll_interval=0.2)
    gw.write_keys("{broken")
    wait_for(
        lambda: any(r.get("event") == "keys_reload_refused" for r in gw.logs()),
        10,
        "the refusal in the log",
    )
    assert _status(gw, USER_KEY) == 200


def _sighup_with_config(gw: Gateway, event: str, **changes: object) -> dict:
    """Rewrite the config file with ``changes``, send SIGHUP, return the log line ``event``."""
    assert gw.proc is not None
    seen = sum(1 for r in gw.logs() if r.get("event") == event)
    gw.config_path.write_text(yaml.safe_dump({**gw.config, **changes}))
    gw.proc.popen.send_signal(signal.SIGHUP)
    wait_for(
        lambda: sum(1 for r in gw.logs() if r.get("event") == event) > seen,
        10,
        f"{event} after SIGHUP",
    )
    return [r for r in gw.logs() if r.get("event") == event][-1]


def _rejections(gw: Gateway, reason: str) -> float:
    return metric_value(gw.metrics(), "gateway_rejections_total", {"reason": reason})


def test_sighup_applies_new_global_limits_and_key_defaults(gw: Gateway) -> None:
    assert gw.proc is not None
    pid = gw.proc.popen.pid
    assert [_status(gw, USER_KEY) for _ in range(3)] == [200, 200, 200]

    line = _sighup_with_config(gw, "config_reloaded", rate_limit={"qps": 1})
    assert line["fields"] == ["rate_limit"]
    assert 429 in [_status(gw, USER_KEY) for _ in range(3)]
    assert _rejections(gw, "qps_global") >= 1

    # Key defaults apply to keys that set no limit of their own: the keys are read again.
    line = _sighup_with_config(gw, "config_reloaded", key_defaults={"qps": 1})
    assert line["fields"] == ["key_defaults", "rate_limit"]
    assert 429 in [_status(gw, USER_KEY) for _ in range(3)]
    assert _rejections(gw, "qps_key") >= 1
    assert gw.proc.popen.poll() is None and gw.proc.popen.pid == pid


def test_sighup_names_changes_that_need_a_restart(gw: Gateway) -> None:
    line = _sighup_with_config(
        gw, "config_needs_restart", max_body_bytes=4096, rate_limit={"qps": 1}
    )
    assert line["fields"] == ["max_body_bytes"]
    # The reloadable part is applied all the same; the rest waits for the restart.
    assert 429 in [_status(gw, USER_KEY) for _ in range(3)]
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 8192})
    assert r.status_code in (200, 429)  # not 413: the old max_body_bytes is in force


def test_sighup_with_a_bad_config_keeps_the_limits_in_force(gw: Gateway) -> None:
    line = _sighup_with_config(gw, "config_reload_refused", rate_limit={"qps": -1})
    assert "rate_limit.qps" in line["error"]
    assert [_status(gw, USER_KEY) for _ in range(3)] == [200, 200, 200]
    assert any(r.get("event") == "keys_reloaded" for r in gw.logs())
