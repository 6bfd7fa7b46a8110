"""A client leaving is seen in the event-loop turn its close arrives, not after a timer.

In-process, on purpose: the gateway's own HTTP protocol (framing.py) serves one end of a
socket pair and the test holds the other, so that "how soon" can be counted in turns of the
event loop instead of seconds on a shared machine. The end-to-end proof (vLLM stops short of
what it was asked) is in test_vllm.py; the time from the client leaving to vLLM's abort,
through nginx, is measured in bench/leaving.py.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from proxy_app.framing import CLIENT_LOST, GatewayHttpProtocol
from proxy_app.stream import ClientWatch

REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
# Turns of the loop the close may take to arrive (the socket's EOF is read in the first one;
# connection_lost and the cancellation run in the next few). Far fewer than a timer needs.
TURNS = 20


async def _serve_one(client_leaves: bool) -> dict[str, Any]:
    """Serve REQUEST with an app that waits forever under a ClientWatch; return what it saw."""
    seen: dict[str, Any] = {"cancelled": False}
    waiting = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the body
        watch = ClientWatch(receive, scope["extensions"][CLIENT_LOST])
        waiting.set()
        try:
            await asyncio.Future()  # vLLM, thinking
        except asyncio.CancelledError:
            seen["cancelled"] = True
            seen["gone"] = watch.gone
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            watch.close()

    config = uvicorn.Config(app, http=GatewayHttpProtocol, lifespan="off", log_config=None)
    config.load()
    state = uvicorn.server.ServerState()
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    with theirs:
        await loop.connect_accepted_socket(
            lambda: GatewayHttpProtocol(config=config, server_state=state, app_state={}), ours
        )
        theirs.sendall(REQUEST)
        await asyncio.wait_for(waiting.wait(), 10)
        if client_leaves:
            theirs.close()
        for turn in range(TURNS):
            await asyncio.sleep(0)
            if seen["cancelled"]:
                seen["turns"] = turn + 1
                break
        result = dict(seen)
    for task in list(state.tasks):
        task.cancel()
    return result


def test_a_client_leaving_cancels_the_wait_within_a_few_turns() -> None:
    seen = asyncio.run(_serve_one(client_leaves=True))
    assert seen["cancelled"], f"the wait was not cancelled within {TURNS} turns of the loop"
    assert seen["gone"] is True


def test_a_client_that_stays_is_left_waiting() -> None:
    seen = asyncio.run(_serve_one(client_leaves=False))
    assert seen["cancelled"] is False
