"""A stand-in Hugging Face hub, for the tests of the models' mirror (no hub is reachable from
the test bed): one repository at one commit, over real HTTP, answering the two requests
`llmhost-model hub` makes of the real one, as huggingface_hub itself makes them: the
revision's file list with `?blobs=true` (sizes, git blob ids, and the sha256 of the files kept
in LFS), and `resolve/<commit>/<file>`, which redirects a large file to its content store.
Range requests are answered; the bytes sent are counted per file.

Used by tests/roles/test_model_mirror.py (in this process) and by the cluster scenario's
molecule/cluster/tests/test_model_weights.py (on the controller, reached by the mirror host).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections import Counter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny-chat"


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class Hub:
    """A repository at one commit: files over 1 KiB kept "in LFS" (their sha256 given, served
    by a redirect to /cdn/<sha256>), the others by git blob id. ``served`` overrides the bytes
    sent for a path (what a broken store gives); ``token`` makes the model gated."""

    def __init__(
        self, files: dict[str, bytes], token: str | None = None, bind: str = "127.0.0.1"
    ) -> None:
        self.files, self.token = files, token
        self.served: dict[str, bytes] = {}
        self.sent: Counter[str] = Counter()
        self.answer_commit = COMMIT
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, path: str) -> None:
                data = hub.served.get(path, hub.files[path])
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(m.group(1)) if m else 0
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                hub.sent[path] += len(data) - start
                self.wfile.write(data[start:])

            def do_GET(self) -> None:
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self.send_error(401)
                    return
                info = f"/api/models/{REPO}/revision/{COMMIT}?blobs=true"
                resolve = f"/{REPO}/resolve/{COMMIT}/"
                if self.path == info:
                    body = json.dumps({"sha": hub.answer_commit, "siblings": hub.siblings()})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body.encode())
                elif self.path.startswith(resolve):
                    path = urllib.parse.unquote(self.path[len(resolve) :])
                    if len(hub.files[path]) > 1024:
                        sha = hashlib.sha256(hub.files[path]).hexdigest()
                        self.send_response(302)
                        self.send_header("Location", f"/cdn/{sha}?path={path}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self._send(path)
                elif self.path.startswith("/cdn/"):
                    self._send(urllib.parse.unquote(self.path.partition("?path=")[2]))
                else:
                    self.send_error(404)

        self.server = http.server.ThreadingHTTPServer((bind, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def siblings(self) -> list[dict]:
        out = []
        for path, data in self.files.items():
            entry = {"rfilename": path, "size": len(data), "blobId": _blob_id(data)}
            if len(data) > 1024:
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
            out.append(entry)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
