"""How long vLLM goes on generating after a client leaves: run ON a serving host.

Python's standard library only (bench/leaving.py pipes it into the host's python3). Each
round waits for vLLM to be idle, sends one request through nginx (``--url``) that vLLM would
take seconds to answer (``n`` sequences of ``--tokens`` tokens, nothing can end them early),
leaves once it is under way (a stream: after its third event; a whole answer: once vLLM
reports it running), and then polls vLLM's own /metrics on the host until vLLM reports no
request running. Per round: milliseconds from the close to that poll (the poll's own period,
a few ms, is the resolution) and the tokens vLLM generated after the last read of its
metrics before the close. Prints JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import sys
import time
import urllib.parse

_RUNNING = re.compile(rb"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", re.M)
_GENERATED = re.compile(rb"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", re.M)


class Metrics:
    """vLLM's /metrics over one keep-alive connection."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        self._path = u.path or "/metrics"
        self._conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def read(self) -> tuple[float, float]:
        """(requests running, tokens generated so far)."""
        self._conn.request("GET", self._path)
        text = self._conn.getresponse().read()
        running = sum(float(v) for v in _RUNNING.findall(text))
        generated = sum(float(v) for v in _GENERATED.findall(text))
        return running, generated


def _request(url: str, key: str, body: bytes) -> socket.socket:
    u = urllib.parse.urlsplit(url)
    s = socket.create_connection((u.hostname, u.port or 80), timeout=60)
    s.sendall(
        b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (u.path.encode(), u.hostname.encode(), key.encode(), len(body), body)
    )
    return s


def _read_events(s: socket.socket, count: int) -> None:
    seen = b""
    while seen.count(b"\ndata: ") + seen.startswith(b"data: ") < count:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("the stream ended before the client meant to leave")
        seen += data


def one_round(args: argparse.Namespace, metrics: Metrics, stream: bool) -> dict[str, float]:
    deadline = time.monotonic() + 120
    while metrics.read()[0] > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM did not become idle")
        time.sleep(0.05)
    body = {
        "model": args.model,
        "prompt": "go",
        "n": args.n,
        "max_tokens": args.tokens,
        "min_tokens": args.tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    s = _request(args.url, args.key, json.dumps(body).encode())
    with s:
        if stream:
            _read_events(s, 3)
        else:
            while metrics.read()[0] == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("vLLM never ran the request")
        # Read just before the close: the tokens counted after it include the read's own
        # few milliseconds of generation (an upper bound).
        _, generated_at_close = metrics.read()
    # Closed: the client has left.
    left = time.monotonic()
    while True:
        running, generated = metrics.read()
        if running == 0:
            stopped = time.monotonic()
            break
        if time.monotonic() - left > 120:
            raise RuntimeError("vLLM still generating 120 s after the client left")
    time.sleep(0.2)  # the engine's last step's tokens reach the counter
    _, generated = metrics.read()
    return {
        "stop_ms": round((stopped - left) * 1000, 1),
        "tokens_after": round(generated - generated_at_close),
        "asked": args.n * args.tokens,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="nginx's /v1/completions on this host")
    p.add_argument("--metrics", required=True, help="vLLM's /metrics on this host")
    p.add_argument("--key", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    metrics = Metrics(args.metrics)
    out = {}
    for mode, stream in (("stream", True), ("whole", False)):
        out[mode] = [one_round(args, metrics, stream) for _ in range(args.rounds)]
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
