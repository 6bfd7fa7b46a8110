"""What the stack scenario's tests under load share: the load itself, run on the stack
host, the demo keys the inventory generated on the controller, and the gateway's request
log read back."""

from __future__ import annotations

import json
import os
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any


def demo_key_text(name: str) -> str:
    """A key of the demo inventory, generated into .cache/demo/<name> by the converge."""
    cache = Path(os.environ["LLMHOST_CACHE_DIR"])
    return "sk-" + (cache / "demo" / name).read_text().split()[0]


# Run on the stack host as root: RATE requests a second (each on its own connection to
# nginx, as many clients would), `action` run 3 s in, the load kept on 5 s after it ends.
# Prints what the requests got (sent_at: each one's send time and status, in order).
LOAD = textwrap.dedent(
    """
    import http.client, json, subprocess, sys, threading, time
    key, rate, action = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    results, lock, stop, threads = [], threading.Lock(), threading.Event(), []

    def one(n):
        body = json.dumps({"model": "tiny", "max_tokens": 1,
                           "messages": [{"role": "user", "content": "load %d" % n}]})
        at, start = time.time(), time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", 8000, timeout=120)
            c.request("POST", "/v1/chat/completions", body,
                      {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
            r = c.getresponse()
            data, status = r.read(), r.status
            c.close()
        except Exception as e:
            data, status = repr(e).encode(), 0
        with lock:
            results.append({"n": n, "at": at, "status": status,
                            "seconds": time.monotonic() - start,
                            "body": "" if status == 200 else data[:300].decode(errors="replace")})

    def run():
        n, t0 = 0, time.monotonic()
        while not stop.is_set():
            t = threading.Thread(target=one, args=(n,))
            t.start()
            threads.append(t)
            n += 1
            stop.wait(max(0.0, t0 + n / rate - time.monotonic()))

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(3)
    t = time.monotonic()
    done = subprocess.run(action, capture_output=True, text=True)
    action_seconds = time.monotonic() - t
    time.sleep(5)
    stop.set()
    runner.join()
    for t in threads:
        t.join(150)
    print(json.dumps({
        "sent": len(results),
        "sent_at": sorted((r["at"], r["status"]) for r in results),
        "failed": [r for r in results if r["status"] != 200],
        "slowest": max((r["seconds"] for r in results), default=0),
        "action_rc": done.returncode, "action_out": done.stdout + done.stderr,
        "action_seconds": action_seconds,
    }))
    """
)


def request_records(host: Any, since: float, user: str) -> list[dict[str, Any]]:
    """The gateway's request log lines of ``user`` since ``since`` (epoch seconds; from a
    second before), each with when it was admitted (``start``: its end less its duration,
    plus the time it waited in the gateway's queue), when vLLM's part of it ended
    (``upstream_end``: ``start`` plus ``upstream_ms``) and its ``end``, in epoch seconds."""
    log = host.run(
        "journalctl -u llm-proxy -o cat --no-pager --since @%s", str(int(since) - 1)
    ).stdout
    out = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("event") != "request" or r.get("user") != user:
            continue
        end = datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()
        start = end - (r["duration_ms"] - r.get("queue_ms", 0)) / 1000
        upstream_end = start + r.get("upstream_ms", 0) / 1000
        out.append({**r, "start": start, "upstream_end": upstream_end, "end": end})
    return out


# The log's timestamps are to the millisecond, and a slot passes from a request whose vLLM
# part has ended to one that waited for it in well under that: each request's time at vLLM
# is taken 5 ms shorter at both ends, so that rounding never shows a hand-over as an overlap
# (a request admitted beyond the limit would overlap the others by its whole answer).
_ROUNDING = 0.005


def max_overlap(records: list[dict[str, Any]]) -> int:
    """The most of ``records`` at vLLM at once, from each one's admission to the end of its
    answer from vLLM (the slot is held at least that long: it is given back as the request
    is charged, before the last bytes reach the client)."""
    events = [(r["start"] + _ROUNDING, 1) for r in records]
    events += [(r["upstream_end"] - _ROUNDING, -1) for r in records]
    in_flight = peak = 0
    for _, step in sorted(events):  # at one instant, an end (-1) before a start
        in_flight += step
        peak = max(peak, in_flight)
    return peak
