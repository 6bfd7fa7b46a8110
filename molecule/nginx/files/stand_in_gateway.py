"""Stand-in for the gateway behind nginx in the nginx scenario (test-only).

It answers on 127.0.0.1:8001 so that the nginx role can be proven on its own:
  GET  /v1/stream     sends one SSE chunk, then waits until /v1/release is called
                      (at most 60 s), then sends the last chunk and ends.
  POST /v1/release    lets the pending stream finish.
  any  /v1/echo, /health, /metrics, /admin/...
                      answers 200 with the method, path and headers it received as JSON.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

release = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _echo(self):
        length = int(self.headers.get("Content-Length") or 0)
        body_size = len(self.rfile.read(length)) if length else 0
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body_size": body_size,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        if self.path != "/v1/stream":
            return self._echo()
        release.clear()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(b"data: first\n\n")
        release.wait(60)
        self._chunk(b"data: last\n\n")
        self._chunk(b"")

    def do_POST(self):
        if self.path == "/v1/release":
            release.set()
        return self._echo()


ThreadingHTTPServer(("127.0.0.1", 8001), Handler).serve_forever()
