"""What the stack scenario's tests under load share: the load itself, run on the stack
host, and the demo keys the inventory generated on the controller."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path


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
