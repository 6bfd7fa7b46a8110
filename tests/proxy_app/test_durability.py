"""Usage survives kill -9 and restarts; quotas hold across them."""

from __future__ import annotations

from proxy_harness import ADMIN_KEY, USER_KEY, GatewayFactory, Upstream, keys_with

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def test_kill_9_loses_no_completed_request(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake)
    done = 0
    with gw.client(USER_KEY) as c:
        for _ in range(25):
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            done += 1
    gw.kill9()
    gw.start()
    usage = gw.usage(ADMIN_KEY)["user1"]["total_usage"]
    assert usage["requests"] == done
    assert usage["total_tokens"] == 12 * done


def test_quota_holds_across_restart(gateway_factory: GatewayFactory, fake: Upstream) -> None:
    gw = gateway_factory(fake, keys=keys_with(quota=30))
    with gw.client(USER_KEY) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # admitted at 24
    gw.stop()
    gw.start()
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
