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
    gw = gateway_factory(fake, keys=keys_with(quota=60))
    body = {**CHAT, "max_tokens": 5}
    with gw.client(USER_KEY) as c:
        served = 0
        while (r := c.post("/v1/chat/completions", json=body)).status_code == 200:
            served += 1
    assert served >= 1 and r.json()["error"]["code"] == "insufficient_quota"
    gw.stop()
    gw.start()
    with gw.client(USER_KEY) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert gw.usage(ADMIN_KEY)["user1"]["total_usage"]["total_tokens"] == 12 * served
